"""What the frozen layer keeps between forward and backward: Saved, one NamedTuple, and the
custom op's view of it (which fields it returns, padded to every position, and their fakes).

A field the call does not need is an empty tensor (never None: the autograd Function and the
custom op both carry tensors only). Which fields a call keeps, and their widths, is decided by
pifi_fast.frozen.blocks.saved_widths; forward, the op and its fake all read that one answer.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class Saved(NamedTuple):
    """The tensors of one layer call kept for backward (T packed tokens):

    x            (T, H) the input
    rstd1        (T,) fp32 1/std of the input norm
    x2           (T, H) the mid-block residual (empty for the parallel block: its MLP reads x)
    rstd2        (T,) fp32 1/std of the MLP's norm
    positions    (T,) int64 token positions
    qkv          (T, q + 2 kv) the rotated projection (raw with per-head q/k norms; empty in
                 [CLS] mode)
    gu           (T, gate/up width) the gate/up output (empty under recompute="mlp" or without
                 a backward)
    extra        (T, 2H) the sandwich block's normed inputs: attention's and the MLP's outputs
    extra_stats  (T, 2) fp32 their norms' 1/std
    """

    x: torch.Tensor
    rstd1: torch.Tensor
    x2: torch.Tensor
    rstd2: torch.Tensor
    positions: torch.Tensor
    qkv: torch.Tensor
    gu: torch.Tensor
    extra: torch.Tensor
    extra_stats: torch.Tensor


# the fields holding fp32 (or wider) norm statistics, and the int64 one
STAT_FIELDS = frozenset({"rstd1", "rstd2", "extra_stats"})
INDEX_FIELDS = frozenset({"positions"})
# What the custom op returns besides the layer's output: every field but those re-made in its
# backward from the op's own inputs (x re-packed from the mask, positions re-counted).
OP_FIELDS = tuple(f for f in Saved._fields if f not in ("x", "positions"))


def field_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype of field `name` for a layer computing in `dtype`."""
    if name in STAT_FIELDS:
        return torch.promote_types(dtype, torch.float32)
    return torch.int64 if name in INDEX_FIELDS else dtype


def padded(t: torch.Tensor, rows: int) -> torch.Tensor:
    """t's T rows as the first rows of a (rows, ...) tensor (t itself when nothing is padded;
    an empty placeholder stays empty, a fresh one: a custom op's outputs may not alias)."""
    if t.numel() == 0:
        return t.new_empty(0)
    if t.shape[0] == rows:
        return t
    full = t.new_empty((rows,) + tuple(t.shape[1:]))
    full[: t.shape[0]] = t
    return full


def op_outputs(saved: Saved, rows: int) -> list[torch.Tensor]:
    """The OP_FIELDS of `saved`, each padded to `rows` rows (static shapes under compile)."""
    return [padded(getattr(saved, f), rows) for f in OP_FIELDS]


def from_op(x: torch.Tensor, positions: torch.Tensor, outputs) -> Saved:
    """Saved from the op's outputs (OP_FIELDS, padded) and its re-packed x and positions: the
    first T rows of each are the real tokens'."""
    t = x.shape[0]
    cut = {f: (v[:t] if v.numel() else v) for f, v in zip(OP_FIELDS, outputs)}
    return Saved(x=x, positions=positions, **cut)


def fake_op_outputs(x: torch.Tensor, rows: int, widths: dict) -> list[torch.Tensor]:
    """What op_outputs returns, as empty tensors of the right shapes and dtypes, from the widths
    a call keeps (blocks.saved_widths: per field None for an empty placeholder, 0 for a (rows,)
    vector, else the row width); a placeholder is empty in the compute dtype."""
    out = []
    for name in OP_FIELDS:
        width = widths[name]
        if width is None:  # a placeholder is empty in the compute dtype, as forward makes it
            out.append(x.new_empty(0))
            continue
        shape = (rows,) if width == 0 else (rows, width)
        out.append(x.new_empty(shape, dtype=field_dtype(name, x.dtype)))
    return out
