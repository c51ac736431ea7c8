"""The registry of the benchmark workloads: all_cases() lists every case of a size list.

  W1 frozen layer, full-sequence mode: forward, and forward + input-gradient backward;
     dense (rows of 512) and with real padding (SST-2 sentence lengths, padded to the batch max)
     (pifi_fast.bench.w1_layer)
  W2 CLS mode (one token per row) forward + backward (w2_cls)
  W3 each op of the layer alone, against the ceilings measured in the same run (w3_ops)
  W4 a whole PiFi step: classification training step and inference batch on SST-2 sentence
     lengths, the QA training step on 384-token windows (w4_step), and one whole SST-2 training
     epoch with evaluation through pifi_fast.train (epoch), eager and under torch.compile

What they share (the Case, shapes, size lists, the implementations' layers and models) is in
pifi_fast.bench.common. A new workload is a module with cases(sizes, device, dtype) and one entry
in WORKLOADS.

The other names imported below are re-exported for existing callers (tests, benchmarks/, the
CLI, scripts) that reach them as pifi_fast.bench.workloads.NAME; new code imports them from
their own modules.
"""
from __future__ import annotations

import torch

from pifi_fast.bench import epoch, w1_layer, w2_cls, w3_ops, w4_step, w5_deploy
from pifi_fast.bench.common import (FAMILY_OP_SHAPES, LLM_SHAPES, Case, bench_layers, liger_rope,
                                    pifi_models, quant_model, default_dtype, liger_layer,
                                    llm_config, size_lists)
from pifi_fast.bench.epoch import build_epoch
from pifi_fast.bench.w3_ops import cases as w3_cases
from pifi_fast.bench.w4_step import QA_TOKENS, build_w4, slm_path, w4_batch

__all__ = ["WORKLOADS", "all_cases",
           # re-exports for existing callers
           "Case", "FAMILY_OP_SHAPES", "LLM_SHAPES", "QA_TOKENS", "build_epoch", "build_w4",
           "bench_layers", "liger_rope", "pifi_models", "quant_model", "slm_path", "w3_cases",
           "w4_batch", "default_dtype", "liger_layer", "llm_config", "size_lists"]

# workload -> the functions listing its cases, in the order a run takes them
WORKLOADS = {"W1": (w1_layer.cases,), "W2": (w2_cls.cases,), "W3": (w3_ops.cases,),
             "W4": (w4_step.cases, epoch.cases), "W5": (w5_deploy.cases,)}


def all_cases(level: str, device: torch.device, dtype: torch.dtype,
              workloads=("W1", "W2", "W3", "W4", "W5")) -> list[Case]:
    sizes = size_lists(level, device)
    return [case for name, listers in WORKLOADS.items() if name in workloads
            for cases in listers for case in cases(sizes, device, dtype)]
