"""One row-norm kernel for every family: RMSNorm (Llama's and Gemma's) and LayerNorm with bias,
the residual add fused in front, forward and the input-gradient-only backward (weights frozen).

Meaning (the twins below), with s = x + residual (rounded to the dtype, as PyTorch's add) or
s = x, statistics in fp32:

    rms      y = w * (s * rstd).to(dtype)            rstd = 1 / sqrt(mean(s^2) + eps)
    rms_1p   y = (s * rstd * (1 + w)).to(dtype)      the same rstd; (1 + w) in fp32, cast last
    layer    y = ((s - mean) * rstd * w + b).to(dtype)   rstd = 1 / sqrt(var(s) + eps)

    rms      ds = rstd * (g - s * rstd^2 * mean(g * s)) + dres,        g = dy * w
    rms_1p   ds = rstd * (g - xh * mean(g * xh)) + dres,   xh = s * rstd,   g = dy * (1 + w)
    layer    ds = rstd * (g - mean(g) - xh * mean(g * xh)) + dres,
             xh = (s - mean) * rstd,  g = dy * w

"rms" is Hugging Face's LlamaRMSNorm (cast to the input dtype before the weight multiply),
"rms_1p" Gemma's (the module stores w, multiplies by (1 + w)), "layer" F.layer_norm. ``dres``
is the gradient already flowing along the residual stream: folding it in here saves one
elementwise pass and one buffer; since s = x + residual, ds is the gradient of both. The
backward takes the saved s and rstd; LayerNorm's mean is recomputed there (one reduction).

One program handles one row. Rows up to MAX_BLOCK_BYTES wide are held in registers in one block
(one read of each input); wider rows (up to MAX_HIDDEN) loop over LOOP_BLOCK-wide column blocks,
one pass per statistic (the mean first, then what depends on it, so LayerNorm never forms
E[x^2] - E[x]^2), recomputing the residual add from x and r instead of reading back what the
first pass stored. Row offsets are 64-bit: tensors of more than 2^31 elements are addressed
correctly. Each mode keeps its own arithmetic order, the order of its twin's formula above.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import modes
from .common import HAS_TRITON
from .common import acc_dtype as _acc
from .common import as_rows as _rows
from ._spec import DTYPE_NAMES, Float, Int, Launch, Ptr

Norm = modes.Norm
MAX_HIDDEN = 65536
# Limits in bytes per row, so that fp32 gets half the columns: the widest blocks that compile
# without spilling on every target (the kernel compile report checks each configuration).
MAX_BLOCK_BYTES = 32768  # one pass: 16384 16-bit or 8192 fp32 columns
LOOP_BLOCK = 8192
# One pass gives "rms" a warp per 512 columns (at most 16); "rms_1p" and "layer" a warp per
# 1024 (at most 8): their one-pass backward keeps the normalised row and its gradient live
# together, which needs the registers that fewer threads per row leave. Looped, all use 16.
_COLUMNS_PER_WARP = {Norm.RMS: (512, 16), Norm.RMS_1P: (1024, 8), Norm.LAYER: (1024, 8)}


# -- plain PyTorch twins: the meaning ------------------------------------------------------------
def norm_fwd_ref(x, weight, eps, mode, bias=None, residual=None):
    """(y, s, rstd): the twin of norm_fwd."""
    mode = Norm.named(mode)
    s = x if residual is None else x + residual
    s32 = _acc(s)
    if mode == Norm.LAYER:
        # F.layer_norm itself: what the Hugging Face module computes, to the bit
        y = F.layer_norm(s, (s.shape[-1],), weight, bias, eps)
        return y, s, torch.rsqrt(s32.var(-1, unbiased=False) + eps)
    rstd = torch.rsqrt(s32.pow(2).mean(-1) + eps)
    if mode == Norm.RMS:
        y = weight * (s32 * rstd.unsqueeze(-1)).to(x.dtype)
    else:
        y = (s32 * rstd.unsqueeze(-1) * (1.0 + _acc(weight))).to(x.dtype)
    return y, s, rstd


def norm_bwd_ref(dy, s, weight, rstd, mode, dres=None):
    """The twin of norm_bwd, in fp32 (the input's dtype above it), cast back."""
    mode = Norm.named(mode)
    s32, r = _acc(s), rstd.unsqueeze(-1)
    if mode == Norm.RMS:
        g = _acc(dy) * _acc(weight)
        ds = r * (g - s32 * (r * r) * (g * s32).mean(-1, keepdim=True))
    elif mode == Norm.RMS_1P:
        g = _acc(dy) * (1.0 + _acc(weight))
        ds = r * (g - s32 * (r * r) * (g * s32).mean(-1, keepdim=True))
    else:
        xh = (s32 - s32.mean(-1, keepdim=True)) * r
        g = _acc(dy) * _acc(weight)
        ds = r * (g - g.mean(-1, keepdim=True) - xh * (g * xh).mean(-1, keepdim=True))
    if dres is not None:
        ds = ds + _acc(dres)
    return ds.to(s.dtype)


# -- Triton ----------------------------------------------------------------------------------------
if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._round import to_dtype

    @triton.jit
    def _stream(X, R, S, row_x, row_r, row_s, c, m, HAS_RES: tl.constexpr, STORE: tl.constexpr):
        """s = x + r in the input dtype (stored to S when STORE), or x."""
        x = tl.load(X + row_x + c, mask=m, other=0.0)
        if HAS_RES:
            r = tl.load(R + row_r + c, mask=m, other=0.0)
            # the add rounds to the stream dtype, as x + residual does in PyTorch
            s = to_dtype(x.to(tl.float32) + r.to(tl.float32), x.dtype)
            if STORE:
                tl.store(S + row_s + c, s, mask=m)
        else:
            s = x
        return s

    @triton.jit
    def _scale(xh, W, B, c, m, DTYPE: tl.constexpr, NORM: tl.constexpr):
        """The normalised row xh scaled: (xh).to(dtype) * w, xh * (1 + w) or xh * w + b."""
        w = tl.load(W + c, mask=m, other=0.0).to(tl.float32)
        if NORM == modes.Norm.RMS:
            y = to_dtype(xh, DTYPE).to(tl.float32) * w
        elif NORM == modes.Norm.LAYER:
            y = xh * w + tl.load(B + c, mask=m, other=0.0).to(tl.float32)
        else:
            y = xh * (1.0 + w)
        return y

    @triton.jit
    def _grad_in(DY, W, row_dy, c, m, NORM: tl.constexpr):
        """g = dy * w, or dy * (1 + w): the gradient reaching the normalised row."""
        w = tl.load(W + c, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(DY + row_dy + c, mask=m, other=0.0).to(tl.float32)
        if NORM == modes.Norm.RMS_1P:
            g = dy * (1.0 + w)
        else:
            g = dy * w
        return g

    @triton.jit
    def _norm_fwd_kernel(X, R, W, B, Y, S, RSTD, stride_x, stride_r, stride_y, stride_s, N,
                         eps, NORM: tl.constexpr, HAS_RES: tl.constexpr, BLOCK_N: tl.constexpr,
                         ONE_PASS: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_N)
        rx, rr, ry, rs = row * stride_x, row * stride_r, row * stride_y, row * stride_s
        if ONE_PASS:
            m = cols < N
            s = _stream(X, R, S, rx, rr, rs, cols, m, HAS_RES, True)
            s32 = s.to(tl.float32)
            if NORM == modes.Norm.LAYER:
                s32 = tl.where(m, s32 - tl.sum(s32, axis=0) / N, 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(s32 * s32, axis=0) / N + eps)
            y = _scale(s32 * rstd, W, B, cols, m, s.dtype, NORM)
            tl.store(Y + row * stride_y + cols, to_dtype(y, Y.dtype.element_ty), mask=m)
        else:  # one pass per statistic: the mean (LayerNorm), the squares, then the output
            mean = 0.0
            if NORM == modes.Norm.LAYER:
                acc = tl.zeros([BLOCK_N], dtype=tl.float32)
                for off in range(0, N, BLOCK_N):
                    c = off + cols
                    acc += _stream(X, R, S, rx, rr, rs, c, c < N, HAS_RES, True).to(tl.float32)
                mean = tl.sum(acc, axis=0) / N
            sq = tl.zeros([BLOCK_N], dtype=tl.float32)
            for off in range(0, N, BLOCK_N):
                c = off + cols
                m = c < N
                s32 = _stream(X, R, S, rx, rr, rs, c, m, HAS_RES,
                              NORM != modes.Norm.LAYER).to(tl.float32)
                if NORM == modes.Norm.LAYER:
                    s32 = tl.where(m, s32 - mean, 0.0)
                sq += s32 * s32
            rstd = 1.0 / tl.sqrt(tl.sum(sq, axis=0) / N + eps)
            for off in range(0, N, BLOCK_N):
                c = off + cols
                m = c < N
                s = _stream(X, R, S, rx, rr, rs, c, m, HAS_RES, False)
                if NORM == modes.Norm.LAYER:
                    xh = (s.to(tl.float32) - mean) * rstd
                else:
                    xh = s.to(tl.float32) * rstd
                y = _scale(xh, W, B, c, m, s.dtype, NORM)
                tl.store(Y + ry + c, to_dtype(y, Y.dtype.element_ty), mask=m)
        tl.store(RSTD + row, rstd)

    @triton.jit
    def _norm_bwd_kernel(DY, S, W, RSTD, DRES, DS, stride_dy, stride_s, stride_dres, stride_ds,
                         N, NORM: tl.constexpr, HAS_DRES: tl.constexpr, BLOCK_N: tl.constexpr,
                         ONE_PASS: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_N)
        rstd = tl.load(RSTD + row)
        if ONE_PASS:
            m = cols < N
            g = _grad_in(DY, W, row * stride_dy, cols, m, NORM)
            s = tl.load(S + row * stride_s + cols, mask=m, other=0.0).to(tl.float32)
            if NORM == modes.Norm.RMS:
                ds = rstd * (g - s * (rstd * rstd) * (tl.sum(g * s, axis=0) / N))
            else:
                if NORM == modes.Norm.LAYER:
                    xh = tl.where(m, s - tl.sum(s, axis=0) / N, 0.0) * rstd
                    g_c = g - tl.sum(g, axis=0) / N
                else:
                    xh = s * rstd
                    g_c = g
                ds = rstd * (g_c - xh * (tl.sum(g * xh, axis=0) / N))
            if HAS_DRES:
                ds += tl.load(DRES + row * stride_dres + cols, mask=m, other=0.0).to(tl.float32)
            tl.store(DS + row * stride_ds + cols, to_dtype(ds, DS.dtype.element_ty), mask=m)
        else:
            mean = 0.0
            if NORM == modes.Norm.LAYER:
                acc = tl.zeros([BLOCK_N], dtype=tl.float32)
                for off in range(0, N, BLOCK_N):
                    c = off + cols
                    acc += tl.load(S + row * stride_s + c, mask=c < N, other=0.0).to(tl.float32)
                mean = tl.sum(acc, axis=0) / N
            sg = tl.zeros([BLOCK_N], dtype=tl.float32)
            sgx = tl.zeros([BLOCK_N], dtype=tl.float32)
            for off in range(0, N, BLOCK_N):
                c = off + cols
                m = c < N
                g = _grad_in(DY, W, row * stride_dy, c, m, NORM)
                s = tl.load(S + row * stride_s + c, mask=m, other=0.0).to(tl.float32)
                if NORM == modes.Norm.RMS:
                    sgx += g * s
                else:
                    sg += g
                    sgx += g * tl.where(m, s - mean, 0.0) * rstd
            mean_g = 0.0
            if NORM == modes.Norm.LAYER:
                mean_g = tl.sum(sg, axis=0) / N
            mean_gx = tl.sum(sgx, axis=0) / N
            for off in range(0, N, BLOCK_N):
                c = off + cols
                m = c < N
                g = _grad_in(DY, W, row * stride_dy, c, m, NORM)
                s = tl.load(S + row * stride_s + c, mask=m, other=0.0).to(tl.float32)
                if NORM == modes.Norm.RMS:
                    ds = rstd * (g - s * (rstd * rstd) * mean_gx)
                else:
                    ds = rstd * (g - mean_g - (s - mean) * rstd * mean_gx)
                if HAS_DRES:
                    ds += tl.load(DRES + row * stride_dres + c, mask=m,
                                  other=0.0).to(tl.float32)
                tl.store(DS + row * stride_ds + c, to_dtype(ds, DS.dtype.element_ty), mask=m)


def launch_params(n: int, element_size: int = 2, mode=Norm.RMS):
    """(BLOCK_N, num_warps, one_pass) for rows of n columns of element_size bytes: one block up
    to MAX_BLOCK_BYTES per row, else LOOP_BLOCK-wide blocks in a loop (16 warps)."""
    if n > MAX_HIDDEN:
        raise ValueError(f"the norm kernel handles hidden sizes up to {MAX_HIDDEN}, got {n}")
    block = 1 << max(n - 1, 0).bit_length()
    if block * element_size > MAX_BLOCK_BYTES:
        return LOOP_BLOCK, 16, False
    per_warp, most = _COLUMNS_PER_WARP[Norm.named(mode)]
    return block, min(max(block // per_warp, 1), most), True


def norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float, mode, bias=None,
             residual=None):
    """(y, s, rstd): the normalised output, the residual stream s (x itself when residual is
    None) and the fp32 1/std per row (shape x.shape[:-1]). ``mode`` is a modes.Norm or its
    name ("rms", "rms_1p", "layer"); "layer" needs ``bias``."""
    mode = Norm.named(mode)
    if (bias is not None) != (mode == Norm.LAYER):
        raise ValueError(f"the {mode.label!r} norm takes {'a' if mode == Norm.LAYER else 'no'} "
                         "bias")
    n = x.shape[-1]
    block, warps, one_pass = launch_params(n, x.element_size(), mode)
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
        _norm_fwd_kernel[(rows,)](x2, r2, weight, weight if bias is None else bias, y, s, rstd,
                                  x2.stride(0), r2.stride(0), y.stride(0), s.stride(0), n, eps,
                                  NORM=int(mode), HAS_RES=residual is not None, BLOCK_N=block,
                                  ONE_PASS=one_pass, num_warps=warps)
    shape = x.shape
    return y.view(shape), s.view(shape), rstd.view(shape[:-1])


def norm_bwd(dy: torch.Tensor, s: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, mode,
             dres=None) -> torch.Tensor:
    """The gradient of norm_fwd's input(s) for a frozen weight (and bias), plus dres when
    given; s and rstd are what norm_fwd returned."""
    mode = Norm.named(mode)
    n = s.shape[-1]
    block, warps, one_pass = launch_params(n, s.element_size(), mode)
    dy2, s2 = _rows(dy, n), _rows(s, n)
    dres2 = _rows(dres, n) if dres is not None else dy2
    ds = torch.empty_like(s2)
    rows = s2.shape[0]
    if rows:
        _norm_bwd_kernel[(rows,)](dy2, s2, weight, rstd.reshape(-1).contiguous(), dres2, ds,
                                  dy2.stride(0), s2.stride(0), dres2.stride(0), ds.stride(0), n,
                                  NORM=int(mode), HAS_DRES=dres is not None, BLOCK_N=block,
                                  ONE_PASS=one_pass, num_warps=warps)
    return ds.view(s.shape)


def compile_launches(arch: int, dtype: str):
    """Every configuration the launchers pick (pifi_fast.kernels.compile_report): for each
    mode, one per block width, 64 columns to the one-pass limit, and the looped one for wider
    rows; forward with and without the fused residual add, backward with and without the
    residual gradient."""
    dt = DTYPE_NAMES[dtype]
    size = torch.empty(0, dtype=dt).element_size()
    widest = MAX_BLOCK_BYTES // size
    widths = [1 << k for k in range(6, widest.bit_length())] + [MAX_HIDDEN]
    out = []
    for mode in Norm:
        for n in widths:
            block, warps, one_pass = launch_params(n, size, mode)
            config = f"BLOCK_N={block} warps={warps}" + ("" if one_pass else " looped")
            const = dict(NORM=int(mode), BLOCK_N=block, ONE_PASS=one_pass)
            for res in (False, True):
                out.append(Launch(
                    _norm_fwd_kernel, f"{mode.label}_norm_fwd" + ("+residual" if res else ""),
                    config, dtype,
                    dict(X=Ptr(dt), R=Ptr(dt), W=Ptr(dt), B=Ptr(dt), Y=Ptr(dt), S=Ptr(dt),
                         RSTD=Ptr(torch.float32), stride_x=Int(n), stride_r=Int(n),
                         stride_y=Int(n), stride_s=Int(n), N=Int(n), eps=Float()),
                    dict(const, HAS_RES=res), num_warps=warps))
                out.append(Launch(
                    _norm_bwd_kernel, f"{mode.label}_norm_bwd" + ("+dres" if res else ""),
                    config, dtype,
                    dict(DY=Ptr(dt), S=Ptr(dt), W=Ptr(dt), RSTD=Ptr(torch.float32),
                         DRES=Ptr(dt), DS=Ptr(dt), stride_dy=Int(n), stride_s=Int(n),
                         stride_dres=Int(n), stride_ds=Int(n), N=Int(n)),
                    dict(const, HAS_DRES=res), num_warps=warps))
    return out
