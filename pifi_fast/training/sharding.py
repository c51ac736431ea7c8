"""FSDP2 for `pifi-fast train --distributed fsdp`: the model's trained parts sharded across the
processes of a run, the frozen layer replicated, and the full weights and optimizer state
gathered for checkpoints (written by rank 0) and scattered back on resume.

Units (torch.distributed.fsdp.fully_shard, one all-gather and one reduce-scatter each): every
block of the SLM (the classes its ``_no_split_modules`` names, else the children of its block
lists), each adapter, the head, and the root (embeddings, pooler and whatever else is left).
The frozen layer's parameters are ``ignored_params`` of the root: every rank holds all of them,
they never get a gradient and never enter the optimizer. Sharding them would save only their
own bytes (no gradient, no Adam moments) and cost an all-gather of the whole layer in every
forward and again in every backward (the fused op's input gradient reads the weights);
docs/training.md has the measurement and the reasoning behind this choice.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

# what --distributed fsdp does not run, with what to do instead
_UNSUPPORTED = {
    "lora_r": "LoRA (--lora-r) trains a few million parameters: run it under DDP (the default)",
    "compile": "--compile: not with --distributed fsdp yet; run without it",
    "eval_cuda_graphs": "--eval-cuda-graphs: not with --distributed fsdp; run without it",
    "fp16": "--precision fp16 needs a sharded gradient scaler: use --precision bf16 (or fp32)",
    "seq2seq": "--task seq2seq (generation on every rank) is not supported with --distributed "
               "fsdp: run it under DDP",
    "freeze": "--freeze false trains the layer: FSDP here keeps the layer frozen and replicated",
}


def check_supported(cfg, precision: str, world: int) -> None:
    """ValueError naming the option and what to do, for what the FSDP path does not run."""
    if world < 2:
        raise ValueError("--distributed fsdp shards the model across processes, and this run has "
                         "one: start it with torchrun --nproc-per-node N (N >= 2) or accelerate "
                         "launch, or leave --distributed at ddp")
    for key, flag in (("lora_r", cfg.lora_r), ("compile", cfg.compile),
                      ("eval_cuda_graphs", cfg.eval_cuda_graphs), ("fp16", precision == "fp16"),
                      ("seq2seq", cfg.task == "seq2seq"), ("freeze", not cfg.freeze)):
        if flag:
            raise ValueError(f"--distributed fsdp: {_UNSUPPORTED[key]}")
    if cfg.packed_slm == "true":
        raise ValueError("--distributed fsdp runs the SLM's own forward (the packed path calls "
                         "inside the SLM's blocks, around FSDP's gathers): use --packed-slm "
                         "auto or false")


def slm_blocks(slm: nn.Module) -> list[nn.Module]:
    """The SLM's repeated blocks: the modules of the classes Transformers marks as not to be
    split (``_no_split_modules``), else the children of every ModuleList of one class."""
    names = set(getattr(slm, "_no_split_modules", None) or ())
    blocks = [m for m in slm.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    for m in slm.modules():
        if isinstance(m, nn.ModuleList) and len(m) and len({type(c) for c in m}) == 1:
            blocks.extend(m)
    return blocks


def frozen_parameters(model: nn.Module) -> set[nn.Parameter]:
    layer = getattr(model, "llm_layer", None)
    return set(layer.parameters()) if layer is not None else set()


def shard_model(model: nn.Module, precision: str, shard_frozen_layer: bool = False) -> nn.Module:
    """fully_shard over the units the module docstring lists, in place (the model's parameters
    become DTensors: build the optimizer after this). precision "bf16": parameters gathered in
    bf16 for compute, gradients reduced in fp32 (the sharded master weights stay fp32).
    shard_frozen_layer makes the frozen layer a unit of its own instead of replicating it (the
    alternative benchmarks/fsdp_frozen_layer.py measures; training does not use it)."""
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if precision == "bf16" else MixedPrecisionPolicy())
    for block in slm_blocks(model.slm):
        fully_shard(block, mp_policy=mp)
    for name in ("adapter_in", "adapter_out", "head"):
        part = getattr(model, name, None)
        if part is not None and any(p.requires_grad for p in part.parameters()):
            fully_shard(part, mp_policy=mp)
    frozen = frozen_parameters(model)
    if shard_frozen_layer and frozen:
        fully_shard(model.llm_layer, mp_policy=MixedPrecisionPolicy())
        frozen = set()
    fully_shard(model, mp_policy=mp, ignored_params=frozen or None)
    return model


def full_model_state(model: nn.Module) -> dict:
    """The whole model's state dict as plain CPU tensors on rank 0 ({} on the others); every
    rank must call it (it gathers one tensor at a time, so no rank holds more than one full
    tensor beyond its shards). The keys are model.state_dict()'s, which the frozen layer names
    as Transformers does (not its attribute paths, which the checkpoint helpers of
    torch.distributed.checkpoint expect)."""
    rank0 = dist.get_rank() == 0
    full = {}
    for key, value in model.state_dict().items():
        if isinstance(value, DTensor):
            value = value.full_tensor()
        if rank0:
            full[key] = value.detach().to("cpu", copy=True)
    return full


def full_optimizer_state(model: nn.Module, optimizer) -> dict:
    """The optimizer's whole state, keyed by parameter name, as plain CPU tensors on rank 0 ({}
    on the others): what trainer_state.pt holds for a sharded run. Every rank must call it."""
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True))


def load_full_model_state(model: nn.Module, state: dict, strict: bool = True):
    """Full (unsharded) weights, which every rank holds, into the sharded model: each rank keeps
    its own shard (no communication). Returns (missing, unexpected) keys as load_state_dict."""
    own = model.state_dict()
    local = {}
    for key, value in state.items():
        target = own.get(key)
        if isinstance(target, DTensor):
            value = distribute_tensor(value.to(target.device, target.dtype), target.device_mesh,
                                      target.placements, src_data_rank=None)
        local[key] = value
    return model.load_state_dict(local, strict=strict)


def load_full_optimizer_state(model: nn.Module, optimizer, state: dict) -> None:
    set_optimizer_state_dict(model, optimizer, state,
                             options=StateDictOptions(full_state_dict=True))


def local_bytes(tensors) -> int:
    """Bytes this rank holds of the tensors: a DTensor's local shard, a tensor's whole self."""
    total = 0
    for t in tensors:
        local = t.to_local() if isinstance(t, DTensor) else t
        total += local.numel() * local.element_size()
    return total


def rank_memory(model: nn.Module, optimizer) -> dict:
    """This rank's bytes of the trained parameters, of the frozen layer, of other untrained
    parameters (an SLM's unused pooler) and of the optimizer state (gradients are the trained
    parameters' size again, freed after each step)."""
    states = [v for s in optimizer.state.values() for v in s.values()
              if torch.is_tensor(v) and v.dim() > 0]
    layer = frozen_parameters(model)
    return {"trained_parameter_bytes": local_bytes(p for p in model.parameters()
                                                   if p.requires_grad),
            "frozen_layer_bytes": local_bytes(layer),
            "other_parameter_bytes": local_bytes(p for p in model.parameters()
                                                 if not p.requires_grad and p not in layer),
            "optimizer_state_bytes": local_bytes(states)}
