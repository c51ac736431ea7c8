"""RMSNorm with the residual add fused, and its input-gradient-only backward.

Meaning (the twins below): with s = x + residual (or s = x),

    y    = w * (s * rstd).to(dtype),   rstd = 1 / sqrt(mean(s^2) + eps)   (statistics in fp32)
    ds   = rstd * (g - s * rstd^2 * mean(g * s)) + dres,   g = dy * w     (fp32, cast back)

which is Hugging Face's LlamaRMSNorm (fp32 statistics, cast to the input dtype before the weight
multiply) and its gradient with the weight frozen. ``dres`` is the gradient already flowing
along the residual stream; folding it in here saves one elementwise pass and one buffer. Since
s = x + residual, ds is the gradient of both x and residual.

One program handles one row (any hidden size up to 65536, in one block); row offsets are
computed in 64 bits so tensors of more than 2^31 elements are addressed correctly.
"""
from __future__ import annotations

import torch

from . import HAS_TRITON
from . import acc_dtype as _acc
from . import as_rows as _rows

MAX_HIDDEN = 65536


# -- plain PyTorch twins: the meaning ------------------------------------------------------------
def rms_norm_fwd_ref(x, weight, eps, residual=None):
    s = x if residual is None else x + residual
    s32 = _acc(s)
    rstd = torch.rsqrt(s32.pow(2).mean(-1) + eps)
    y = weight * (s32 * rstd.unsqueeze(-1)).to(x.dtype)
    return y, s, rstd


def rms_norm_bwd_ref(dy, s, weight, rstd, dres=None):
    s32 = _acc(s)
    r = rstd.unsqueeze(-1)
    g = _acc(dy) * _acc(weight)
    ds = r * (g - s32 * (r * r) * (g * s32).mean(-1, keepdim=True))
    if dres is not None:
        ds = ds + _acc(dres)
    return ds.to(s.dtype)


# -- Triton ----------------------------------------------------------------------------------------
if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._round import to_dtype

    @triton.jit
    def _rms_norm_fwd_kernel(X, R, W, Y, S, RSTD, stride_x, stride_r, stride_y, stride_s, N,
                             eps, HAS_RES: tl.constexpr, BLOCK_N: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_N)
        m = cols < N
        x = tl.load(X + row * stride_x + cols, mask=m, other=0.0)
        if HAS_RES:
            r = tl.load(R + row * stride_r + cols, mask=m, other=0.0)
            # the add rounds to the stream dtype, as x + residual does in PyTorch
            s = to_dtype(x.to(tl.float32) + r.to(tl.float32), x.dtype)
            tl.store(S + row * stride_s + cols, s, mask=m)
        else:
            s = x
        s32 = s.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(s32 * s32, axis=0) / N + eps)
        w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
        y = to_dtype(s32 * rstd, x.dtype).to(tl.float32) * w
        tl.store(Y + row * stride_y + cols, to_dtype(y, Y.dtype.element_ty), mask=m)
        tl.store(RSTD + row, rstd)

    @triton.jit
    def _rms_norm_bwd_kernel(DY, S, W, RSTD, DRES, DS, stride_dy, stride_s, stride_dres,
                             stride_ds, N, HAS_DRES: tl.constexpr, BLOCK_N: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_N)
        m = cols < N
        dy = tl.load(DY + row * stride_dy + cols, mask=m, other=0.0).to(tl.float32)
        s = tl.load(S + row * stride_s + cols, mask=m, other=0.0).to(tl.float32)
        w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        g = dy * w
        ds = rstd * (g - s * (rstd * rstd) * (tl.sum(g * s, axis=0) / N))
        if HAS_DRES:
            ds += tl.load(DRES + row * stride_dres + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(DS + row * stride_ds + cols, to_dtype(ds, DS.dtype.element_ty), mask=m)


def _launch_params(n: int):
    if n > MAX_HIDDEN:
        raise ValueError(f"rms_norm kernel handles hidden sizes up to {MAX_HIDDEN}, got {n}")
    block = triton.next_power_of_2(n)
    return block, min(max(block // 512, 1), 16)


def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float, residual=None):
    """(y, s, rstd): normalised output, the residual stream s (= x when residual is None) and
    the fp32 1/rms per row (shape x.shape[:-1])."""
    n = x.shape[-1]
    block, warps = _launch_params(n)
    x2 = _rows(x, n)
    rows = x2.shape[0]
    y = torch.empty_like(x2)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    if residual is not None:
        r2 = _rows(residual, n)
        s = torch.empty_like(x2)
    else:
        r2, s = x2, x2
    if rows:
        _rms_norm_fwd_kernel[(rows,)](x2, r2, weight, y, s, rstd, x2.stride(0), r2.stride(0),
                                      y.stride(0), s.stride(0), n, eps,
                                      HAS_RES=residual is not None, BLOCK_N=block,
                                      num_warps=warps)
    shape = x.shape
    return y.view(shape), s.view(shape), rstd.view(shape[:-1])


def rms_norm_bwd(dy: torch.Tensor, s: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                 dres=None) -> torch.Tensor:
    """Gradient of rms_norm_fwd's input(s) for a frozen weight, plus dres when given."""
    n = s.shape[-1]
    block, warps = _launch_params(n)
    dy2, s2 = _rows(dy, n), _rows(s, n)
    dres2 = _rows(dres, n) if dres is not None else dy2
    ds = torch.empty_like(s2)
    rows = s2.shape[0]
    if rows:
        _rms_norm_bwd_kernel[(rows,)](dy2, s2, weight, rstd.reshape(-1).contiguous(), dres2, ds,
                                      dy2.stride(0), s2.stride(0), dres2.stride(0), ds.stride(0),
                                      n, HAS_DRES=dres is not None, BLOCK_N=block,
                                      num_warps=warps)
    return ds.view(s.shape)
