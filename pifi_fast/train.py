"""Training and evaluation of PiFi (and of the SLM alone) on classification, QA and seq2seq:
the public entry. The code lives in pifi_fast.training, one module per concern (config,
runtime, batches, optim, faults, checkpoints, evaluation, loop); this module re-exports what
users and scripts call, so `from pifi_fast.train import TrainConfig, train` keeps working.

One loop for all: length-grouped batches with dynamic padding, autocast where the device
supports it, a progress bar with loss and throughput, per-task metrics, a checkpoint each
epoch (best-on-dev kept), --resume that continues an interrupted run to the same result, DDP
under torchrun / accelerate launch, and a results JSON per run.

Determinism: batches depend only on (seed, epoch); the RNG states are saved with every epoch
checkpoint, so an interrupted run resumed from its last checkpoint replays the same steps (on
the CPU bit for bit; tests/test_reliability.py kills runs with SIGKILL and checks).

Reliability: token ids and labels are checked on the CPU before a batch moves to a GPU; a
non-finite loss or gradient norm stops the run before the optimizer step (or skips the step
with on_nonfinite="skip"); checkpoints are written into a temporary folder and renamed into
place, the best one before the last one, so a run killed at any moment resumes to the same
result. PIFI_FAST_FAULT="point:n" kills the process at the n-th pass through a named point
(step, eval, checkpoint_write): the fault injection the reliability tests use.
"""
from __future__ import annotations

from pifi_fast.training.batches import TaskData, load_rows
from pifi_fast.training.checkpoints import save_checkpoint
from pifi_fast.training.config import (BASELINES, TrainConfig, apply_baseline, build_model,
                                       layer_indices, load_tokenizer, packed_slm_option,
                                       resolve_llm, resolve_slm)
from pifi_fast.training.evaluation import evaluate, evaluate_checkpoint, qa_answer
from pifi_fast.training.faults import fault_point
from pifi_fast.training.loop import NonFiniteError, train
from pifi_fast.training.optim import FUSED_ADAM_DEVICES, make_optimizer, optimizer_step
from pifi_fast.training.runtime import precision_autocast

__all__ = ["BASELINES", "FUSED_ADAM_DEVICES", "NonFiniteError", "TaskData", "TrainConfig",
           "apply_baseline", "build_model", "evaluate", "evaluate_checkpoint", "fault_point",
           "layer_indices", "load_rows", "load_tokenizer", "make_optimizer", "optimizer_step",
           "packed_slm_option", "precision_autocast", "qa_answer", "resolve_llm", "resolve_slm",
           "save_checkpoint", "train"]
