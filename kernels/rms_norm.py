"""RMSNorm with the residual add fused, and its input-gradient-only backward.

Meaning (the twins below): with s = x + residual (or s = x),

    y    = w * (s * rstd).to(dtype),   rstd = 1 / sqrt(mean(s^2) + eps)   (statistics in fp32)
    ds   = rstd * (g - s * rstd^2 * mean(g * s)) + dres,   g = dy * w     (fp32, cast back)

which is Hugging Face's LlamaRMSNorm (fp32 statistics, cast to the input dtype before the weight
multiply) and its gradient with the weight frozen. ``dres`` is the gradient already flowing
along the residual stream; folding it in here saves one elementwise pass and one buffer. Since
s = x + residual, ds is the gradient of both x and residual.

One program handles one row (any hidden size up to 65536: in one block up to 16384 16-bit or
8192 fp32 columns, in a two-pass loop above); row offsets are computed in 64 bits so tensors of
more than 2^31 elements are addressed correctly.
"""
from __future__ import annotations

import torch

from .common import HAS_TRITON
from .common import acc_dtype as _acc
from .common import as_rows as _rows
from ._spec import DTYPE_NAMES, Float, Int, Launch, Ptr

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
# Rows up to MAX_BLOCK_BYTES wide are held in registers in one block (one read of each input); wider
# rows (up to MAX_HIDDEN) loop over LOOP_BLOCK-wide column blocks twice: once for the
# statistics, once for the output, recomputing the residual add from x and r in the second pass
# instead of reading back what the first pass stored. Measured with the kernel compile report
# (16 warps): one block of 16384 16-bit columns needs at most ~100 registers on sm_75..sm_90a,
# but 16384 fp32 columns spill 4 B in forward on sm_86/sm_89, the looped backward over 16384-
# wide blocks spills 12 B on sm_80, and one block of 32768 (32 warps) spills 36-140 B in
# backward. Hence the limits below, in bytes per row so that fp32 gets half the columns.
MAX_BLOCK_BYTES = 32768  # one pass: 16384 16-bit or 8192 fp32 columns
LOOP_BLOCK = 8192

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._round import to_dtype

    @triton.jit
    def _rms_norm_fwd_kernel(X, R, W, Y, S, RSTD, stride_x, stride_r, stride_y, stride_s, N,
                             eps, HAS_RES: tl.constexpr, BLOCK_N: tl.constexpr,
                             ONE_PASS: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_N)
        if ONE_PASS:
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
        else:
            sq = tl.zeros([BLOCK_N], dtype=tl.float32)
            for off in range(0, N, BLOCK_N):
                c = off + cols
                m = c < N
                x = tl.load(X + row * stride_x + c, mask=m, other=0.0)
                if HAS_RES:
                    r = tl.load(R + row * stride_r + c, mask=m, other=0.0)
                    s = to_dtype(x.to(tl.float32) + r.to(tl.float32), x.dtype)
                    tl.store(S + row * stride_s + c, s, mask=m)
                else:
                    s = x
                s32 = s.to(tl.float32)
                sq += s32 * s32
            rstd = 1.0 / tl.sqrt(tl.sum(sq, axis=0) / N + eps)
            for off in range(0, N, BLOCK_N):
                c = off + cols
                m = c < N
                x = tl.load(X + row * stride_x + c, mask=m, other=0.0)
                if HAS_RES:
                    r = tl.load(R + row * stride_r + c, mask=m, other=0.0)
                    s = to_dtype(x.to(tl.float32) + r.to(tl.float32), x.dtype)
                else:
                    s = x
                w = tl.load(W + c, mask=m, other=0.0).to(tl.float32)
                y = to_dtype(s.to(tl.float32) * rstd, x.dtype).to(tl.float32) * w
                tl.store(Y + row * stride_y + c, to_dtype(y, Y.dtype.element_ty), mask=m)
        tl.store(RSTD + row, rstd)

    @triton.jit
    def _rms_norm_bwd_kernel(DY, S, W, RSTD, DRES, DS, stride_dy, stride_s, stride_dres,
                             stride_ds, N, HAS_DRES: tl.constexpr, BLOCK_N: tl.constexpr,
                             ONE_PASS: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_N)
        rstd = tl.load(RSTD + row)
        if ONE_PASS:
            m = cols < N
            dy = tl.load(DY + row * stride_dy + cols, mask=m, other=0.0).to(tl.float32)
            s = tl.load(S + row * stride_s + cols, mask=m, other=0.0).to(tl.float32)
            w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
            g = dy * w
            ds = rstd * (g - s * (rstd * rstd) * (tl.sum(g * s, axis=0) / N))
            if HAS_DRES:
                ds += tl.load(DRES + row * stride_dres + cols, mask=m, other=0.0).to(tl.float32)
            tl.store(DS + row * stride_ds + cols, to_dtype(ds, DS.dtype.element_ty), mask=m)
        else:
            gs = tl.zeros([BLOCK_N], dtype=tl.float32)
            for off in range(0, N, BLOCK_N):
                c = off + cols
                m = c < N
                dy = tl.load(DY + row * stride_dy + c, mask=m, other=0.0).to(tl.float32)
                s = tl.load(S + row * stride_s + c, mask=m, other=0.0).to(tl.float32)
                w = tl.load(W + c, mask=m, other=0.0).to(tl.float32)
                gs += dy * w * s
            mean_gs = tl.sum(gs, axis=0) / N
            for off in range(0, N, BLOCK_N):
                c = off + cols
                m = c < N
                dy = tl.load(DY + row * stride_dy + c, mask=m, other=0.0).to(tl.float32)
                s = tl.load(S + row * stride_s + c, mask=m, other=0.0).to(tl.float32)
                w = tl.load(W + c, mask=m, other=0.0).to(tl.float32)
                ds = rstd * (dy * w - s * (rstd * rstd) * mean_gs)
                if HAS_DRES:
                    ds += tl.load(DRES + row * stride_dres + c, mask=m,
                                  other=0.0).to(tl.float32)
                tl.store(DS + row * stride_ds + c, to_dtype(ds, DS.dtype.element_ty), mask=m)


def launch_params(n: int, element_size: int = 2):
    """(BLOCK_N, num_warps, one_pass) for rows of n columns of element_size bytes: one block up
    to MAX_BLOCK_BYTES per row, else LOOP_BLOCK-wide blocks in a loop; at most 32 columns per
    thread (16 warps)."""
    if n > MAX_HIDDEN:
        raise ValueError(f"rms_norm kernel handles hidden sizes up to {MAX_HIDDEN}, got {n}")
    block = 1 << max(n - 1, 0).bit_length()
    one_pass = block * element_size <= MAX_BLOCK_BYTES
    if not one_pass:
        block = LOOP_BLOCK
    return block, min(max(block // 512, 1), 16), one_pass


def compile_launches(arch: int, dtype: str):
    """Every configuration the launchers pick (pifi_fast.kernels.compile_report): one per
    block width, 64 columns to the one-pass limit, and the looped one for wider rows; forward
    with and without the fused residual add, backward with and without the residual
    gradient."""
    dt = DTYPE_NAMES[dtype]
    size = torch.empty(0, dtype=dt).element_size()
    widest = MAX_BLOCK_BYTES // size
    widths = [1 << k for k in range(6, widest.bit_length())] + [MAX_HIDDEN]
    out = []
    for n in widths:
        block, warps, one_pass = launch_params(n, size)
        config = f"BLOCK_N={block} warps={warps}" + ("" if one_pass else " looped")
        for res in (False, True):
            out.append(Launch(
                _rms_norm_fwd_kernel, "rms_norm_fwd" + ("+residual" if res else ""), config,
                dtype, dict(X=Ptr(dt), R=Ptr(dt), W=Ptr(dt), Y=Ptr(dt), S=Ptr(dt),
                            RSTD=Ptr(torch.float32), stride_x=Int(n), stride_r=Int(n),
                            stride_y=Int(n), stride_s=Int(n), N=Int(n), eps=Float()),
                dict(HAS_RES=res, BLOCK_N=block, ONE_PASS=one_pass), num_warps=warps))
            out.append(Launch(
                _rms_norm_bwd_kernel, "rms_norm_bwd" + ("+dres" if res else ""), config, dtype,
                dict(DY=Ptr(dt), S=Ptr(dt), W=Ptr(dt), RSTD=Ptr(torch.float32), DRES=Ptr(dt),
                     DS=Ptr(dt), stride_dy=Int(n), stride_s=Int(n), stride_dres=Int(n),
                     stride_ds=Int(n), N=Int(n)),
                dict(HAS_DRES=res, BLOCK_N=block, ONE_PASS=one_pass), num_warps=warps))
    return out


def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float, residual=None):
    """(y, s, rstd): normalised output, the residual stream s (= x when residual is None) and
    the fp32 1/rms per row (shape x.shape[:-1])."""
    n = x.shape[-1]
    block, warps, one_pass = launch_params(n, x.element_size())
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
                                      ONE_PASS=one_pass, num_warps=warps)
    shape = x.shape
    return y.view(shape), s.view(shape), rstd.view(shape[:-1])


def rms_norm_bwd(dy: torch.Tensor, s: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                 dres=None) -> torch.Tensor:
    """Gradient of rms_norm_fwd's input(s) for a frozen weight, plus dres when given."""
    n = s.shape[-1]
    block, warps, one_pass = launch_params(n, s.element_size())
    dy2, s2 = _rows(dy, n), _rows(s, n)
    dres2 = _rows(dres, n) if dres is not None else dy2
    ds = torch.empty_like(s2)
    rows = s2.shape[0]
    if rows:
        _rms_norm_bwd_kernel[(rows,)](dy2, s2, weight, rstd.reshape(-1).contiguous(), dres2, ds,
                                      dy2.stride(0), s2.stride(0), dres2.stride(0), ds.stride(0),
                                      n, HAS_DRES=dres is not None, BLOCK_N=block,
                                      ONE_PASS=one_pass, num_warps=warps)
    return ds.view(s.shape)
