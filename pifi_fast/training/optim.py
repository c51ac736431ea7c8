"""The optimizer and its step: Adam (fused where torch has the kernel), gradient clipping, and
the non-finite guard that keeps a NaN/inf loss or gradient from reaching the weights."""
from __future__ import annotations

import torch
import torch.distributed as dist


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
    itself (routine while it finds its scale). Under DDP and FSDP the verdict is the same on every
    rank (the flag is reduced by max), so no rank steps while another skips."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for p in model.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, clip if clip else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP: a DTensor, the norm over every rank's shards
        norm = norm.full_tensor()
    bad = loss is not None and not bool(torch.isfinite(loss.detach()))
    if scaler is None:
        bad = bad or not bool(torch.isfinite(norm))
    if world > 1:
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
