"""Training and evaluation of PiFi (and of the SLM alone) on classification, QA and seq2seq.

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

import collections
import dataclasses
import json
import os
import random
import shutil
import signal
import time
from pathlib import Path

import torch
from tqdm import tqdm

from pifi_fast import data as data_mod
from pifi_fast import metrics as metrics_mod
from pifi_fast.pifi_base import compile_model, inference_runner


@dataclasses.dataclass
class TrainConfig:
    data: str = "sst2"  # built-in name, folder, file or hub:NAME/CONFIG (see pifi_fast.data)
    task: str = "classification"  # classification | question_answering | seq2seq
    slm: str = "minilm"  # Hub id or folder; "minilm" = the offline all-MiniLM-L6-v2
    llm: str | None = "smollm2"  # Hub id, folder, .gguf; "smollm2" = offline; None = SLM alone
    layer: int = -1
    baseline: str = "none"  # none | llm-lora: the whole --llm with LoRA, no plugged layer
    layers: str | None = None  # several plugged layers, run in this order: "27,28,29" or
    # "-3,-2,-1" (on the command line --layers=-3,-2,-1); overrides layer
    freeze: bool = True
    implementation: str = "fast"  # fast (pifi_fast.PiFiModel) | reference
    kernels: str = "auto"  # fused layer: auto (Triton on CUDA) | triton | torch
    recompute: str = "none"  # fused layer memory mode: none | mlp (recompute gate/up in backward)
    attention: str = "auto"  # fused layer attention backend: auto | flash_attn | torch_varlen | sdpa
    gemm: str = "cublas"  # fused layer projections: cublas | triton (fused epilogues)
    layer_weights: str = "auto"  # fused layer: auto (compute dtype) | int8 | fp8 (8-bit weights)
    adapter: str = "linear"  # L_in / L_out: linear (the paper's) | mlp (Linear-GELU-Linear)
    adapter_width: int = 0  # mlp adapters' hidden width (0: the SLM's hidden size)
    lora_r: int = 0  # LoRA rank on the SLM (0: full fine-tuning); the export is merged
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str | None = None  # comma list of SLM module names (default: peft's for it)
    packed_slm: str = "auto"  # classification: the SLM's sentence vectors from the real
    # tokens only (pifi_fast.packed_slm): auto (on CPU) | true | false
    chunk_tokens: int = -1  # fused layer: MLP block over this many tokens at a time (-1: auto,
    # 4096 on CUDA, on CPU by bytes: see FrozenLlamaLayer; 0: all at once)
    authors_setup: bool = False  # fp32, pad to max_length, attend to padding, no grouping,
    # torch's default (unfused) Adam
    seed: int = 42
    precision: str = "auto"  # auto (bf16/fp16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16; with
    # bf16/fp16 the frozen layer is loaded in that dtype (autocast for the rest; fp16 loss scaling)
    epochs: int = 3
    batch_size: int = 32
    lr: float = 5e-5
    weight_decay: float = 0.0
    fused_adam: bool = True  # Adam as one fused kernel over all parameters (CPU and CUDA): the
    # same update to rounding, 4-6x less optimizer time on CPU (see make_optimizer)
    max_length: int | None = None  # tokens per input (default: 384 for question_answering,
    # 100 otherwise: the authors' value)
    doc_stride: int = 128  # question_answering: tokens shared by consecutive context windows
    clip: float = 5.0
    label_smoothing: float = 0.05
    head_dropout: float = 0.2
    group_by_length: bool = True
    output_dir: str = "runs/default"
    resume: bool = False
    max_steps: int | None = None  # stop after this many optimiser steps (smoke runs)
    limit_train: int | None = None
    limit_eval: int | None = None
    eval_split: str = "dev"
    test_split: str | None = "test"
    text_column: str = "text"
    pair_column: str | None = None
    label_column: str = "label"
    full_checkpoints: bool = False  # store the frozen layer in every checkpoint (default: a
    # reference to its source and a sha256, re-read on load: lean checkpoints)
    on_nonfinite: str = "stop"  # a NaN/inf loss or gradient norm: stop (default) | skip the step
    deterministic: bool = False  # GPU: deterministic algorithms only (see README, Reliability)
    compile: bool = False  # torch.compile the model (the fused layer is one custom op in it);
    # batch lengths are padded to multiples of length_bucket so recompilation stays bounded
    length_bucket: int = 16
    eval_cuda_graphs: bool = False  # evaluation runs the model compiled with CUDA graphs
    # (mode="reduce-overhead", lengths in buckets; GPU only: elsewhere compiled without them)
    no_dropout: bool = False  # turn every dropout off (exact comparisons, e.g. DDP tests)
    device: str | None = None


# -- resolution of names --------------------------------------------------------------------------
def resolve_slm(name: str) -> str:
    if name == "minilm":
        from pifi_fast.offline import minilm_dir

        return str(minilm_dir())
    if name == "smollm2":  # the whole small LLM as the encoder (the LLM + LoRA baseline)
        from pifi_fast.offline import smollm2_hf_dir

        return str(smollm2_hf_dir())
    return name


BASELINES = ("none", "llm-lora")


def apply_baseline(cfg: TrainConfig) -> TrainConfig:
    """--baseline llm-lora: the comparison the paper did not make. The whole small LLM named by
    --llm (smollm2 by default) fine-tuned with LoRA (rank --lora-r, 8 if unset) as a sequence
    classifier: the LLM is the encoder, its last real token feeds the same head, no plugged
    layer."""
    if cfg.baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {cfg.baseline!r}")
    if cfg.baseline == "none":
        return cfg
    if cfg.llm in (None, "", "none") or str(cfg.llm).endswith(".gguf"):
        raise ValueError("--baseline llm-lora needs --llm smollm2, a Hub id or a Transformers "
                         f"folder (a .gguf other than the offline SmolLM2 is not converted), got "
                         f"{cfg.llm!r}")
    if cfg.task != "classification":
        raise ValueError("--baseline llm-lora is a sequence classifier: task classification")
    return dataclasses.replace(cfg, baseline="none", slm=cfg.llm, llm=None,
                               lora_r=cfg.lora_r or 8, layers=None)


def load_tokenizer(path):
    """The SLM's tokenizer. One without a padding token (decoder-only tokenizers such as GPT-2's
    or Llama's; SmolLM2's as transformers 5.17 converts it from the GGUF, where 5.24 sets
    <|im_end|>) pads with its end-of-sequence token, as SmolLM2's own configuration does:
    padding is masked out, and a decoder-only SLM reads its last real token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"the tokenizer of {path} has neither a padding token nor an "
                             "end-of-sequence token to pad with: set tokenizer.pad_token and "
                             "save it with the model")
        tok.pad_token = tok.eos_token
    return tok


def resolve_llm(name):
    if name in (None, "", "none"):
        return None
    if name == "smollm2":
        from pifi_fast.offline import smollm2_gguf

        return str(smollm2_gguf())
    return name


# -- distributed ----------------------------------------------------------------------------------
def _dist_setup():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _barrier(world):
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


# -- RNG state ------------------------------------------------------------------------------------
def _seed_everything(seed: int):
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def _rng_state():
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- model ----------------------------------------------------------------------------------------
def build_model(cfg: TrainConfig, num_labels: int, precision: str | None = None):
    """The model for a config. ``precision`` (resolved: fp32, bf16 or fp16) sets the frozen
    layer's dtype: it computes in its own dtype under autocast (pifi_fast.layer), so it is
    loaded in the autocast dtype to run at 16-bit speed; fp32 (or None) keeps the source's."""
    from pifi_fast import PiFiModel, reference

    cls = reference.PiFiModel if (cfg.implementation == "reference" or cfg.authors_setup) \
        else PiFiModel
    options = dict(task=cfg.task, label_smoothing=cfg.label_smoothing, freeze=cfg.freeze,
                   attend_to_padding=cfg.authors_setup)
    if cfg.task == "classification":
        options.update(num_labels=num_labels, head_dropout=cfg.head_dropout)
    if cfg.lora_r:
        options["lora"] = {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout,
                           "targets": cfg.lora_targets}
    llm = resolve_llm(cfg.llm)
    if cfg.adapter != "linear" or cfg.adapter_width:
        options.update(adapter=cfg.adapter, adapter_width=cfg.adapter_width or None)
    if cfg.layer_weights != "auto" and (cls is not PiFiModel or llm is None or not cfg.freeze):
        raise ValueError(f"--layer-weights {cfg.layer_weights} needs the fused frozen layer "
                         "(implementation fast, an LLM, freeze true, not the authors' setup)")
    if cls is PiFiModel and llm is not None and cfg.freeze:
        options.update(kernels=cfg.kernels, recompute=cfg.recompute, gemm=cfg.gemm,
                       weights=cfg.layer_weights,
                       chunk_tokens={-1: "auto", 0: None}.get(cfg.chunk_tokens,
                                                              cfg.chunk_tokens),
                       attention=None if cfg.attention == "auto" else cfg.attention)
    llm_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if cfg.authors_setup:
        llm_dtype = torch.float32
    model = cls.from_parts(resolve_slm(cfg.slm), llm, layer=layer_indices(cfg),
                           llm_dtype=llm_dtype, seed=cfg.seed, **options)
    if cls is PiFiModel:
        model.packed_slm = packed_slm_option(cfg.packed_slm)
    if cfg.no_dropout:
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    return model


def packed_slm_option(value: str | bool) -> str | bool:
    """PiFiModel.packed_slm from its command-line spelling: auto, true or false."""
    if isinstance(value, bool) or value == "auto":
        return value
    if value in ("true", "false"):
        return value == "true"
    raise ValueError(f"packed_slm must be auto, true or false, got {value!r}")


def layer_indices(cfg: TrainConfig) -> int | list[int]:
    """cfg.layer, or the list cfg.layers names ("27,28,29")."""
    if not cfg.layers:
        return cfg.layer
    try:
        return [int(part) for part in str(cfg.layers).split(",")]
    except ValueError:
        raise ValueError(f"--layers takes comma-separated layer indices (e.g. --layers=-2,-1), "
                         f"got {cfg.layers!r}") from None


def precision_autocast(device: torch.device, precision: str):
    """(the autocast context the model's forward runs in, the resolved precision) for
    --precision: what training, evaluation and the W4 benchmark rows run under."""
    if precision == "auto":
        if device.type != "cuda":
            precision = "fp32"
        else:
            # bf16 from Ampere (sm_80) on; a T4 (sm_75) only emulates it: fp16 with loss scaling
            major = torch.cuda.get_device_capability(device)[0]
            precision = "bf16" if major >= 8 else "fp16"
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False), precision
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype), precision


# -- batches per task -----------------------------------------------------------------------------
class TaskData:
    """Turns records into model inputs for the configured task."""

    def __init__(self, cfg: TrainConfig, tokenizer, train_rows=None, label_map=None):
        self.cfg, self.tok = cfg, tokenizer
        self.label_map = None
        if label_map is not None:  # keys as the data spells them: normalized like loaded rows
            self.label_map = {data_mod.normalize_label(k): v for k, v in label_map.items()}
        elif cfg.task == "classification":
            self.label_map = data_mod.label_vocabulary(train_rows)

    @property
    def labels(self) -> list | None:
        """Class index -> label (what a model stores with its weights)."""
        if self.label_map is None:
            return None
        return [k for k, _ in sorted(self.label_map.items(), key=lambda kv: kv[1])]

    def check_rows(self, rows, split: str) -> None:
        """Every label of a split known to the model, checked once when the data is loaded:
        ValueError naming the label, the row and the known labels."""
        if self.label_map is None:
            return
        for i, r in enumerate(rows):
            data_mod.encode_label(self.label_map, r["label"], f"row {i} of {split}")

    def lengths(self, rows):
        key = {"classification": "text", "question_answering": "context",
               "seq2seq": "source"}[self.cfg.task]
        return [len(r[key]) + len(r.get("text_pair") or "") for r in rows]

    def collate(self, rows, bucketed: bool | None = None):
        """A batch of rows as tensors; ``bucketed`` (default: cfg.compile) pads its length to a
        multiple of cfg.length_bucket: compiled models then see few distinct lengths."""
        cfg = self.cfg
        bucketed = cfg.compile if bucketed is None else bucketed
        bucket = cfg.length_bucket if bucketed else None
        if cfg.task == "classification":
            return data_mod.collate_classification(self.tok, rows, cfg.max_length, self.label_map,
                                                   pad_to_max=cfg.authors_setup,
                                                   pad_to_multiple_of=bucket)
        if cfg.task == "seq2seq":
            enc = data_mod.pad_to_bucket(
                self.tok([r["source"] for r in rows], truncation=True, max_length=cfg.max_length,
                         padding=True, return_tensors="pt"), bucket, cfg.max_length,
                self.tok.pad_token_id)
            tgt = data_mod.pad_to_bucket(
                self.tok(text_target=[r["target"] for r in rows], truncation=True,
                         max_length=cfg.max_length, padding=True, return_tensors="pt"), bucket,
                cfg.max_length, self.tok.pad_token_id)
            labels = tgt["input_ids"].masked_fill(tgt["attention_mask"] == 0, -100)
            return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                    "labels": labels}
        return self._collate_qa(rows, bucket)

    def _collate_qa(self, rows, bucket: int | None = None):
        """Extractive QA as Hugging Face's recipe does it: each context cut into windows of
        max_length tokens (question included) overlapping by doc_stride tokens, every window a
        feature of the batch; a window that does not hold the answer points at [CLS]. The
        authors' setup keeps one truncated window per example (answers past the cut are lost)."""
        windows = not self.cfg.authors_setup
        enc = self.tok([r["question"] for r in rows], [r["context"] for r in rows],
                       truncation="only_second", max_length=self.cfg.max_length, padding=True,
                       stride=self.cfg.doc_stride if windows else 0,
                       return_overflowing_tokens=windows, return_offsets_mapping=True,
                       return_tensors="pt")
        example = (enc["overflow_to_sample_mapping"].tolist() if windows
                   else list(range(len(rows))))
        sequence_ids = [enc.sequence_ids(f) for f in range(len(example))]
        if bucket:  # padded positions: no sequence, offsets (0, 0)
            before = enc["input_ids"].shape[1]
            enc = data_mod.pad_to_bucket(enc, bucket, self.cfg.max_length,
                                         self.tok.pad_token_id)
            sequence_ids = [ids + [None] * (enc["input_ids"].shape[1] - before)
                            for ids in sequence_ids]
        starts, ends = [], []
        for f, i in enumerate(example):
            r = rows[i]
            a_start = int(r["answer_start"])
            a_end = a_start + len(r["answer_text"])
            seq_ids = sequence_ids[f]
            s_tok = e_tok = 0  # [CLS]: the answer is not in this window
            for t, (off, sid) in enumerate(zip(enc["offset_mapping"][f].tolist(), seq_ids)):
                if sid != 1:
                    continue
                if off[0] <= a_start < off[1] and s_tok == 0:
                    s_tok = t
                if off[0] < a_end <= off[1]:
                    e_tok = t
            if e_tok < s_tok or (s_tok == 0) != (e_tok == 0):
                s_tok = e_tok = 0
            starts.append(s_tok)
            ends.append(e_tok)
        batch = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
        batch["start_positions"] = torch.tensor(starts)
        batch["end_positions"] = torch.tensor(ends)
        batch["_offsets"] = enc["offset_mapping"]
        batch["_sequence_ids"] = sequence_ids
        batch["_example"] = example
        return batch


def _to_device(batch, device, compiled: bool = False):
    """The model's inputs of a collated batch on ``device``. ``compiled``: for a compiled
    runner, the batch and length dimensions are marked dynamic from the first call, so Dynamo
    compiles one graph (per training / evaluation) instead of a static one first, then a
    dynamic one at the next length and again at the first smaller batch (each 30-40 s on 2 CPU
    cores; maybe_mark_dynamic stays static where the model needs a fixed size)."""
    out = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()
           if not k.startswith("_")}
    if compiled:
        for v in out.values():
            if torch.is_tensor(v):
                for dim in range(min(v.dim(), 2)):
                    torch._dynamo.maybe_mark_dynamic(v, dim)
    return out


@torch.no_grad()
def evaluate(model, task_data: TaskData, rows, device, precision="fp32", batch_size=64,
             runner=None) -> dict:
    """Per-task metrics of `model` on `rows` (run through `runner`, e.g. its compiled form
    from pifi_base.inference_runner, when given: then batch lengths are bucketed)."""
    runner = model if runner is None else runner
    cfg = task_data.cfg
    was_training = model.training
    model.eval()
    autocast, _ = precision_autocast(device, precision)
    preds, golds = [], []
    loss_sum, n = 0.0, 0
    lengths = task_data.lengths(rows)
    order = sorted(range(len(rows)), key=lengths.__getitem__)  # little padding per batch
    for start in range(0, len(rows), batch_size):
        fault_point("eval")
        chunk = [rows[i] for i in order[start:start + batch_size]]
        raw = task_data.collate(chunk, bucketed=runner is not model)
        batch = _to_device(raw, device, compiled=runner is not model)
        with autocast:
            if cfg.task == "seq2seq":
                gen = model.generate(input_ids=batch["input_ids"],
                                     attention_mask=batch["attention_mask"],
                                     max_new_tokens=cfg.max_length, do_sample=False)
                preds += task_data.tok.batch_decode(gen, skip_special_tokens=True)
                golds += [r["target"] for r in chunk]
                continue
            out = runner(**batch)
        if out.loss is not None:
            loss_sum += out.loss.item() * len(chunk)
            n += len(chunk)
        if cfg.task == "classification":
            preds += out.logits.argmax(-1).tolist()
            golds += batch["labels"].tolist()
        else:  # the best span over all windows of each example
            for i, r in enumerate(chunk):
                feats = [f for f, e in enumerate(raw["_example"]) if e == i]
                preds.append(qa_answer([out.start_logits[f] for f in feats],
                                       [out.end_logits[f] for f in feats],
                                       [raw["_offsets"][f] for f in feats],
                                       [raw["_sequence_ids"][f] for f in feats], r["context"]))
                golds.append(r.get("answers_all") or [r["answer_text"]])
    model.train(was_training)
    if cfg.task == "classification":
        result = metrics_mod.classification_metrics(preds, golds)
    elif cfg.task == "seq2seq":
        result = metrics_mod.bleu(preds, golds)
    else:
        result = metrics_mod.qa_metrics(preds, golds)
    if n:
        result["loss"] = loss_sum / n
    result["examples"] = len(rows)  # how many were scored
    return result


def qa_answer(start_logits, end_logits, offsets, sequence_ids, context, max_answer: int = 30,
              n_best: int = 20) -> str:
    """The answer text of one example from all its windows (lists, one entry per window):
    the n_best start and end positions inside the context of each window, every valid pair
    (end >= start, at most max_answer tokens) scored start + end, the best over all windows
    (Hugging Face's recipe). "" when no window holds a valid span."""
    best, text = float("-inf"), ""
    for s_logits, e_logits, offs, seq_ids in zip(start_logits, end_logits, offsets,
                                                  sequence_ids):
        ctx = [t for t, sid in enumerate(seq_ids) if sid == 1]
        if not ctx:
            continue
        lo, hi = ctx[0], ctx[-1]
        s = s_logits[lo:hi + 1].float().cpu()
        e = e_logits[lo:hi + 1].float().cpu()
        k = min(n_best, len(s))
        for i in s.topk(k).indices.tolist():
            for j in e.topk(k).indices.tolist():
                if j < i or j - i >= max_answer:
                    continue
                score = float(s[i] + e[j])
                if score > best:
                    best = score
                    text = context[int(offs[lo + i][0]):int(offs[lo + j][1])]
    return text


# -- the loop -------------------------------------------------------------------------------------
class NonFiniteError(RuntimeError):
    """A NaN or inf loss or gradient norm stopped training (on_nonfinite="stop")."""


FUSED_ADAM_DEVICES = ("cpu", "cuda")  # where torch has a fused Adam kernel (torch >= 2.4 on CPU)


def make_optimizer(params, lr: float, weight_decay: float = 0.0, fused: bool = True):
    """The trainer's Adam. fused=True runs torch's fused Adam (one kernel over all parameters)
    where every parameter is a floating tensor on a device that has it, else the default Adam;
    both compute the same update (they differ only in rounding, ~1e-7 after 30 steps). Measured
    on 2 CPU cores, MiniLM + SmolLM2 (23.2M trained parameters): 9-12 ms a step against 55 ms
    for the default (for-loop) Adam; the step itself is ~600-900 ms there."""
    params = list(params)
    fused = fused and bool(params) and all(
        p.device.type in FUSED_ADAM_DEVICES and p.is_floating_point() for p in params)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def optimizer_step(model, optimizer, scaler, clip: float, loss=None, world: int = 1) -> bool:
    """One optimiser step (a separate function so tests can interrupt a run here), unless the
    loss or the gradient norm is not finite; returns whether the step was taken. With fp16 loss
    scaling only the loss decides: the scaler skips steps whose scaled gradients overflow by
    itself (routine while it finds its scale). Under DDP the verdict is the same on every rank."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for p in model.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, clip if clip else float("inf"))
    bad = loss is not None and not bool(torch.isfinite(loss.detach()))
    if scaler is None:
        bad = bad or not bool(torch.isfinite(norm))
    if world > 1:
        import torch.distributed as dist

        flag = torch.tensor([float(bad)], device=norm.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        bad = bool(flag.item())
    if not bad:
        if scaler is not None:
            scaler.step(optimizer)
        else:
            optimizer.step()
    if scaler is not None:  # also after a skipped step: unscale_ must be followed by update
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return not bad


_fault_counts: collections.Counter = collections.Counter()


def fault_point(name: str) -> None:
    """PIFI_FAST_FAULT="name:n" SIGKILLs this process the n-th time it passes `name` (fault
    injection for the reliability tests: a kill at a known moment, as a crash or OOM would)."""
    spec = os.environ.get("PIFI_FAST_FAULT")
    if not spec or spec.partition(":")[0] != name:
        return
    _fault_counts[name] += 1
    if _fault_counts[name] == int(spec.partition(":")[2] or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def _recover_checkpoints(out_dir: Path) -> None:
    """After a kill: temporary folders of an unfinished save are removed (they never load), and
    a checkpoint caught between its two renames (the old one moved aside, the new one not yet
    in place) is moved back."""
    if not out_dir.is_dir():
        return
    for tmp in out_dir.glob(".*.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    for old in out_dir.glob(".*.old-*"):
        target = out_dir / old.name[1:].split(".old-")[0]
        if not target.exists():
            os.replace(old, target)
        else:
            shutil.rmtree(old, ignore_errors=True)


def _load_rows(cfg: TrainConfig, split: str, limit):
    columns = {"text": cfg.text_column, "text_pair": cfg.pair_column, "label": cfg.label_column}
    rows = data_mod.load_split(cfg.data, split, columns if cfg.task == "classification" else None)
    if cfg.task == "question_answering":
        rows = [_squad_record(r) for r in rows]
    return rows[:limit] if limit else rows


def _squad_record(r):
    if "answers" in r and isinstance(r["answers"], dict):
        texts, starts = r["answers"]["text"], r["answers"]["answer_start"]
        return {**r, "answer_text": texts[0], "answer_start": starts[0], "answers_all": texts}
    return r


def train(cfg: TrainConfig) -> dict:
    """Fine-tune as configured; returns the results dict (also written to results.json) with
    the trained model under "model"."""
    if not cfg.deterministic:
        return _train(cfg)
    # cuBLAS needs a fixed workspace for reproducible reductions; the Triton GEMM must not tune
    # (another tile is another rounding); torch refuses ops without a deterministic version.
    # Process-wide switches: set for this run, restored after it.
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
             os.environ.get("PIFI_FAST_GEMM_TUNE"))
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    os.environ["PIFI_FAST_GEMM_TUNE"] = "0"
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    try:
        return _train(cfg)
    finally:
        torch.use_deterministic_algorithms(saved[0])
        torch.backends.cudnn.benchmark = saved[1]
        if saved[2] is None:
            os.environ.pop("PIFI_FAST_GEMM_TUNE", None)
        else:
            os.environ["PIFI_FAST_GEMM_TUNE"] = saved[2]


def _peak_memory(device: torch.device) -> int:
    """The run's peak memory: CUDA memory allocated on a GPU, the process's peak resident set
    on the CPU (which includes the Python runtime and libraries)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def _train(cfg: TrainConfig) -> dict:
    cfg = apply_baseline(cfg)
    rank, world = _dist_setup()
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    if cfg.max_length is None:  # 384 for extractive QA (the Hugging Face recipe), else 100
        cfg = dataclasses.replace(cfg, max_length=384 if cfg.task == "question_answering"
                                  and not cfg.authors_setup else 100)
    if cfg.authors_setup:
        cfg = dataclasses.replace(cfg, precision="fp32", group_by_length=False,
                                  fused_adam=False)
    out_dir = Path(cfg.output_dir)
    last_dir, best_dir = out_dir / "checkpoint-last", out_dir / "best"
    _seed_everything(cfg.seed)

    if cfg.on_nonfinite not in ("stop", "skip"):
        raise ValueError(f"on_nonfinite must be 'stop' or 'skip', got {cfg.on_nonfinite!r}")
    train_rows = _load_rows(cfg, "train", cfg.limit_train)
    dev_rows = _load_rows(cfg, cfg.eval_split, cfg.limit_eval)
    if rank == 0 and data_mod.is_one_file(cfg.data):
        print(data_mod.one_file_note(cfg.data))
    tokenizer = load_tokenizer(resolve_slm(cfg.slm))
    task_data = TaskData(cfg, tokenizer, train_rows)
    task_data.check_rows(dev_rows, cfg.eval_split)  # once, before any training
    num_labels = len(task_data.label_map) if task_data.label_map else 0
    autocast, precision = precision_autocast(device, cfg.precision)
    model = build_model(cfg, num_labels, precision).to(device)
    model.labels = task_data.labels
    vocab = model.slm.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        raise ValueError(f"the tokenizer of {cfg.slm} has {len(tokenizer)} tokens but the SLM's "
                         f"embedding has {vocab} rows: ids {vocab}..{len(tokenizer) - 1} would "
                         "index past it (a tokenizer from another model?)")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg.lr, cfg.weight_decay, fused=cfg.fused_adam)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    if rank == 0:
        _recover_checkpoints(out_dir)

    state = {"epoch": 0, "step": 0, "best_metric": None, "history": [], "nonfinite_skipped": 0}
    if cfg.resume and (last_dir / "trainer_state.pt").is_file():
        _load_weights(model, last_dir, device)
        saved = torch.load(last_dir / "trainer_state.pt", weights_only=False, map_location="cpu")
        optimizer.load_state_dict(saved["optimizer"])
        for group in optimizer.param_groups:  # the saved groups carry their run's setting
            group["fused"] = optimizer.defaults["fused"]
        if scaler is not None and saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        _set_rng_state(saved["rng"])
        state = saved["state"]
        if rank == 0:
            print(f"resumed from {last_dir}: epoch {state['epoch']} done, step {state['step']}")
    elif cfg.resume and rank == 0:
        print(f"--resume: no checkpoint in {last_dir}, starting fresh")

    compiled = compile_model(model) if cfg.compile else None
    runner = compiled if compiled is not None else model
    # evaluation: the training graph (no_grad, eval mode), or its own CUDA-graph runner
    eval_runner = (inference_runner(model, "cuda-graphs") if cfg.eval_cuda_graphs else compiled)
    if world > 1:
        runner = torch.nn.parallel.DistributedDataParallel(
            runner, device_ids=[device.index] if device.type == "cuda" else None)
    metric_name = data_mod.TASK_METRIC.get(cfg.data, {"classification": "accuracy",
                                                       "question_answering": "f1",
                                                       "seq2seq": "bleu"}[cfg.task])
    lengths = task_data.lengths(train_rows)
    epoch_times = []
    model.train()
    done = False
    for epoch in range(state["epoch"], cfg.epochs):
        batches = data_mod.length_grouped_batches(
            lengths, cfg.batch_size, cfg.seed, epoch, mega=50 if cfg.group_by_length else 1)
        t_epoch = time.perf_counter()
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                   disable=rank != 0)
        seen, t0 = 0, time.perf_counter()
        for global_batch in bar:
            mine = global_batch[rank::world]  # each rank: its share of the same global batch
            cpu_batch = task_data.collate([train_rows[i] for i in mine])
            # on the CPU, before any GPU kernel sees them (a bad id there is a device assert)
            model.check_values(cpu_batch.get("input_ids"), cpu_batch.get("labels"), rows=mine)
            batch = _to_device(cpu_batch, device, compiled=compiled is not None)
            with autocast:
                loss = runner(**batch).loss
            (scaler.scale(loss) if scaler is not None else loss).backward()
            if not optimizer_step(model, optimizer, scaler, cfg.clip, loss, world):
                where = (f"epoch {epoch + 1}, step {state['step'] + 1}, examples "
                         f"{sorted(global_batch)}")
                if cfg.on_nonfinite == "stop":
                    raise NonFiniteError(
                        f"non-finite loss ({loss.item()}) or gradient norm at {where}; stopped "
                        f"before the optimizer step, so the last checkpoint ({last_dir}) is the "
                        "last good state. Lower --lr, check the data, or pass "
                        "--on-nonfinite skip to skip such steps")
                state["nonfinite_skipped"] += 1
                if rank == 0:
                    tqdm.write(f"skipped a non-finite step at {where}")
            state["step"] += 1
            fault_point("step")
            seen += len(global_batch)
            bar.set_postfix(loss=f"{loss.item():.4f}",
                            samples_per_s=f"{seen / (time.perf_counter() - t0):.1f}")
            if cfg.max_steps and state["step"] >= cfg.max_steps:
                done = True
                break
        epoch_times.append(time.perf_counter() - t_epoch)
        result = (evaluate(model, task_data, dev_rows, device, precision, runner=eval_runner)
                  if rank == 0 else {})
        state["history"].append({"epoch": epoch + 1, "step": state["step"],
                                 "epoch_seconds": epoch_times[-1],
                                 f"{cfg.eval_split}": result})
        improved = rank == 0 and (state["best_metric"] is None
                                  or result[metric_name] > state["best_metric"])
        if improved:
            state["best_metric"] = result[metric_name]
            state["best_epoch"] = epoch + 1
        state["epoch"] = epoch + 1
        if rank == 0:
            print(f"epoch {epoch + 1}: {cfg.eval_split} {metric_name} {result[metric_name]:.4f}"
                  f"  ({epoch_times[-1]:.1f}s)")
            # best first: a kill between the two leaves the previous last checkpoint, and the
            # resumed run rewrites best with the same weights
            if improved:
                _save_checkpoint(model, task_data, None, state, cfg, best_dir)
            _save_checkpoint(model, task_data, optimizer, state, cfg, last_dir, scaler)
        _barrier(world)
        if done:
            break

    results = {"config": dataclasses.asdict(cfg), "metric": metric_name,
               "best_dev": state["best_metric"], "best_epoch": state.get("best_epoch"),
               "history": state["history"], "world_size": world,
               "precision": precision, "device": str(device),
               "nonfinite_steps_skipped": state.get("nonfinite_skipped", 0),
               "trainable_parameters": sum(p.numel() for p in params),
               "peak_memory_bytes": _peak_memory(device)}
    if rank == 0 and cfg.test_split and best_dir.exists():
        try:
            test_rows = _load_rows(cfg, cfg.test_split, cfg.limit_eval)
        except (FileNotFoundError, KeyError):
            test_rows = None
        if test_rows:
            _load_best(model, best_dir, device)
            results["test"] = evaluate(model, task_data, test_rows, device, precision,
                                       runner=eval_runner)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
        if best_dir.exists():  # the exported model carries its numbers and a model card
            from pifi_fast.hub import write_model_card

            if cfg.lora_r:  # exported merged: loads without peft, runs at full speed
                exported = _load_best(model, best_dir, device)
                model.merge_lora()
                if not exported:
                    _save_checkpoint(model, task_data, None, state, cfg, best_dir)

            (best_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
            write_model_card(model, best_dir, results)
    results["model"] = model
    return results


def _load_best(model, best_dir: Path, device) -> bool:
    """The best checkpoint's weights into the model; True when it was already exported merged
    (LoRA folded in, by an earlier invocation of a resumed run): the model is merged first."""
    from pifi_fast.pifi_base import CONFIG_NAME

    options = json.loads((best_dir / CONFIG_NAME).read_text())["options"]
    merged = "lora" in model._options and "lora" not in options
    if merged:
        model.merge_lora()
    _load_weights(model, best_dir, device)
    return merged


def _load_weights(model, directory: Path, device) -> None:
    """A checkpoint's weights into the model being trained: full, or lean (no frozen layer:
    the model's own, read from the same source, must be the one the checkpoint names)."""
    from safetensors.torch import load_file

    from pifi_fast.pifi_base import CONFIG_NAME

    config = json.loads((directory / CONFIG_NAME).read_text())
    reference = config.get("frozen_layer")
    if reference is not None and model.frozen_layer_sha256() != reference["sha256"]:
        raise RuntimeError(f"{directory}: the frozen layer of this run differs from the one the "
                           f"checkpoint was trained with ({reference['source']}, layer "
                           f"{reference['layer']}): not resuming from it")
    missing, unexpected = model.load_state_dict(
        load_file(str(directory / "model.safetensors"), device=str(device)),
        strict=reference is None)
    if reference is not None and (unexpected or any(not k.startswith("llm_layer.")
                                                    for k in missing)):
        raise RuntimeError(f"{directory}: checkpoint does not fit the model ({missing[:5]}, "
                           f"{unexpected[:5]})")


def _save_checkpoint(model, task_data, optimizer, state, cfg, directory: Path, scaler=None):
    labels = None if task_data.label_map is None else [[k, v] for k, v in
                                                        task_data.label_map.items()]
    extra = {"tokenizer": lambda p: task_data.tok.save_pretrained(p),
             "train_config.json": lambda p: p.write_text(json.dumps(
                 {**dataclasses.asdict(cfg), "label_map": labels}, indent=2))}
    if optimizer is not None:
        def write_state(p):
            fault_point("checkpoint_write")  # weights and config are written, this is not
            torch.save({"optimizer": optimizer.state_dict(), "rng": _rng_state(), "state": state,
                        "scaler": scaler.state_dict() if scaler is not None else None}, p)

        extra["trainer_state.pt"] = write_state
    # lean by default: the frozen layer never changes, so it is referenced, not copied
    lean = not cfg.full_checkpoints and model.can_reference_frozen_layer() is None
    model.save_pretrained(directory, extra_files=extra,
                          frozen_layer="reference" if lean else "full")


def evaluate_checkpoint(checkpoint: str, data: str, split: str = "dev", limit=None,
                        device=None, compile: bool = False, cuda_graphs: bool = False,
                        label_map: dict | None = None,
                        text_column: str | None = None,
                        label_column: str | None = None,
                        packed_slm: str | bool | None = None) -> dict:
    """Metrics of a saved checkpoint, a local folder or a Hub repo (pifi-fast eval), on its own
    data or another (cross-domain transfer): ``label_map`` renames the data's labels to the
    model's ({"negative": 0, "positive": 1}); the columns default to the training run's.
    ``compile``: torch.compile the model; ``cuda_graphs``: compiled with CUDA graphs (GPU;
    elsewhere compiled without them, with a warning). Both bucket the batch lengths.
    ``packed_slm``: PiFiModel.packed_slm (auto, true or false; None: the training run's).
    A file other than the training data is evaluated whole (``split`` applies to folders,
    built-in names and the training file, whose splits data.load_split cuts)."""
    from pifi_fast import PiFiModel
    from pifi_fast.pifi_base import _looks_like_repo_id

    ckpt = Path(checkpoint).expanduser()
    if not ckpt.exists() and _looks_like_repo_id(str(checkpoint)):
        from pifi_fast import hub

        ckpt = hub.download(str(checkpoint))
    saved = json.loads((ckpt / "train_config.json").read_text())
    labels = saved.pop("label_map")
    known = {f.name for f in dataclasses.fields(TrainConfig)}  # (older checkpoints: fewer)
    cfg = dataclasses.replace(TrainConfig(**{k: v for k, v in saved.items() if k in known}),
                              data=data or saved["data"])
    cfg.text_column = text_column or cfg.text_column
    cfg.label_column = label_column or cfg.label_column
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = load_tokenizer(ckpt / "tokenizer")
    task_data = TaskData(cfg, tokenizer, label_map=None if labels is None else
                         {k: v for k, v in labels})
    model = PiFiModel.from_pretrained(ckpt).to(device)
    model.packed_slm = packed_slm_option(cfg.packed_slm if packed_slm is None else packed_slm)
    if model.labels is not None:  # the vocabulary stored with the weights wins
        task_data.label_map = {data_mod.normalize_label(k): i for i, k in enumerate(model.labels)}
    if data and data != saved["data"] and Path(data).is_file():
        split = "all"  # a file of its own (another domain): evaluated whole, not cut in splits
    rows = data_mod.apply_label_map(_load_rows(cfg, split, limit), label_map)
    task_data.check_rows(rows, split)
    execution = "cuda-graphs" if cuda_graphs else "compile" if compile else "eager"
    return evaluate(model, task_data, rows, device, cfg.precision,
                    runner=inference_runner(model, execution))
