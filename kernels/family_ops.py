"""The elementwise steps the Gemma and Falcon layers need beyond Llama's: Triton kernels and
their plain PyTorch twins (the meaning). Each forward returns what its input-gradient-only
backward needs. The GEMM's epilogues (pifi_fast.kernels.gemm) use the same activation helpers.

    rms_norm_1p   Gemma's RMSNorm: y = (s * rstd * (1 + w)).to(dtype), the (1 + w) in fp32
                  and the cast last (Llama casts before the weight multiply)
    layer_norm    LayerNorm with bias (Falcon): y = (s - mean) * rstd * w + b
    geglu_tanh    gelu_tanh(g) * u on a merged gate/up buffer (Gemma's gated MLP)
    gelu          gelu(u), exact (erf) (Falcon's plain MLP)

Backward, weights frozen (fp32, cast back):

    rms_norm_1p   ds = rstd * (g - s * rstd^2 * mean(g * s)) + dres,   g = dy * (1 + w)
    layer_norm    ds = rstd * (g - mean(g) - xh * mean(g * xh)) + dres,  g = dy * w,
                  xh = (s - mean) * rstd
    geglu_tanh    dg = dm * u * gelu_tanh'(g),  du = dm * gelu_tanh(g)
    gelu          du = dm * (Phi(u) + u * phi(u))

Launchers: norm_fwd / norm_bwd (kind "rms_1p" or "layer") and act_fwd / act_bwd (act
"gelu_tanh" or "gelu"), each with a *_ref twin of the same signature.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .common import HAS_TRITON
from .common import acc_dtype as _acc
from .common import as_rows as _rows
from . import rms_norm as _rms
from ._spec import DTYPE_NAMES, Float, Int, Launch, Ptr


def rms_norm_1p_fwd_ref(x, weight, eps):
    """(y, rstd): Gemma's RMSNorm of x (T, H) with stored weight w (the module's (1 + w))."""
    x32 = _acc(x)
    rstd = torch.rsqrt(x32.pow(2).mean(-1) + eps)
    y = (x32 * rstd.unsqueeze(-1) * (1.0 + _acc(weight))).to(x.dtype)
    return y, rstd


def rms_norm_1p_bwd_ref(dy, x, weight, rstd, dres=None):
    x32, r = _acc(x), rstd.unsqueeze(-1)
    g = _acc(dy) * (1.0 + _acc(weight))
    dx = r * (g - x32 * (r * r) * (g * x32).mean(-1, keepdim=True))
    if dres is not None:
        dx = dx + _acc(dres)
    return dx.to(x.dtype)


def layer_norm_fwd_ref(x, weight, bias, eps):
    """(y, rstd): F.layer_norm itself (what the Hugging Face module computes, to the bit) and
    the fp32 1 / std its backward needs (the mean is recomputed there: one reduction)."""
    y = F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    x32 = _acc(x)
    rstd = torch.rsqrt(x32.var(-1, unbiased=False) + eps)
    return y, rstd


def layer_norm_bwd_ref(dy, x, weight, rstd, dres=None):
    x32, r = _acc(x), rstd.unsqueeze(-1)
    xh = (x32 - x32.mean(-1, keepdim=True)) * r
    g = _acc(dy) * _acc(weight)
    dx = r * (g - g.mean(-1, keepdim=True) - xh * (g * xh).mean(-1, keepdim=True))
    if dres is not None:
        dx = dx + _acc(dres)
    return dx.to(x.dtype)


_K = math.sqrt(2.0 / math.pi)


def _gelu_tanh_grad(g32):
    inner = _K * (g32 + 0.044715 * g32 ** 3)
    t = torch.tanh(inner)
    return 0.5 * (1.0 + t) + 0.5 * g32 * (1.0 - t * t) * _K * (1.0 + 3 * 0.044715 * g32 * g32)


def geglu_tanh_fwd_ref(gu: torch.Tensor) -> torch.Tensor:
    g, u = gu.chunk(2, dim=-1)
    return F.gelu(g, approximate="tanh") * u


def geglu_tanh_bwd_ref(gu: torch.Tensor, dm: torch.Tensor) -> torch.Tensor:
    """[dg | du] in one (T, 2I) buffer, as swiglu_bwd writes it."""
    g, u = (_acc(t) for t in gu.chunk(2, dim=-1))
    dm = _acc(dm)
    return torch.cat((dm * u * _gelu_tanh_grad(g), dm * F.gelu(g, approximate="tanh")),
                     -1).to(gu.dtype)


def gelu_fwd_ref(u: torch.Tensor) -> torch.Tensor:
    return F.gelu(u)


def gelu_bwd_ref(u: torch.Tensor, dm: torch.Tensor) -> torch.Tensor:
    u32 = _acc(u)
    cdf = 0.5 * (1.0 + torch.erf(u32 / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * u32 * u32) / math.sqrt(2.0 * math.pi)
    return (_acc(dm) * (cdf + u32 * pdf)).to(u.dtype)



def norm_fwd_ref(x, weight, eps, kind: str, bias=None):
    """The twin of norm_fwd: kind "rms_1p" (Gemma) or "layer" (LayerNorm with bias)."""
    if kind == "rms_1p":
        return rms_norm_1p_fwd_ref(x, weight, eps)
    return layer_norm_fwd_ref(x, weight, bias, eps)


def norm_bwd_ref(dy, x, weight, rstd, kind: str, dres=None):
    """The twin of norm_bwd."""
    bwd = rms_norm_1p_bwd_ref if kind == "rms_1p" else layer_norm_bwd_ref
    return bwd(dy, x, weight, rstd, dres)


def act_fwd_ref(gu, act: str):
    """The twin of act_fwd: act "gelu_tanh" (gated, on [g | u]) or "gelu"."""
    return geglu_tanh_fwd_ref(gu) if act == "gelu_tanh" else gelu_fwd_ref(gu)


def act_bwd_ref(gu, dm, act: str):
    """The twin of act_bwd."""
    return geglu_tanh_bwd_ref(gu, dm) if act == "gelu_tanh" else gelu_bwd_ref(gu, dm)


# -- Triton ----------------------------------------------------------------------------------------
# The norms: one program per row, with rms_norm's block rule (rms_norm.launch_params: the row
# in one block up to its MAX_BLOCK_BYTES, else LOOP_BLOCK-wide blocks in a loop, one pass per
# statistic: the mean first, then what depends on it, so LayerNorm never forms E[x^2] - E[x]^2).
# KIND: 1 = Gemma's (1 + w) RMSNorm, 2 = LayerNorm with bias. One pass takes a warp per 1024
# columns (at most MAX_WARPS), not rms_norm's per 512 (at most 16): LayerNorm's one-pass
# backward keeps the centred row and its gradient live together, and with rms_norm's rule it
# spilled 8 B on sm_80 at 8192 and 16384 16-bit columns (16 warps: a 128-register cap) under
# Triton 3.8, and 16 B on sm_80 at 4096 fp32 columns (8 warps) under 3.6 (kernel compile
# report). The looped path keeps rms_norm's 16 warps.
NORM_KINDS = {"rms_1p": 1, "layer": 2}
ACTS = {"gelu_tanh": 1, "gelu": 2}
MAX_WARPS = 8
ACT_BLOCK = 1024

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._round import to_dtype

    @triton.jit
    def _norm_out(xh, W, B, c, m, KIND: tl.constexpr):
        """The normalised row xh = (x - mean) * rstd scaled: xh * (1 + w) or xh * w + b."""
        w = tl.load(W + c, mask=m, other=0.0).to(tl.float32)
        if KIND == 2:
            y = xh * w + tl.load(B + c, mask=m, other=0.0).to(tl.float32)
        else:
            y = xh * (1.0 + w)
        return y

    @triton.jit
    def _norm_g(DY, W, row_dy, c, m, KIND: tl.constexpr):
        """g = dy * (1 + w) or dy * w: the gradient reaching the normalised row."""
        w = tl.load(W + c, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(DY + row_dy + c, mask=m, other=0.0).to(tl.float32)
        if KIND == 2:
            g = dy * w
        else:
            g = dy * (1.0 + w)
        return g

    @triton.jit
    def _looped_mean(X, row_x, N, BLOCK_N: tl.constexpr):
        cols = tl.arange(0, BLOCK_N)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for off in range(0, N, BLOCK_N):
            acc += tl.load(X + row_x + off + cols, mask=off + cols < N, other=0.0).to(tl.float32)
        return tl.sum(acc, axis=0) / N

    @triton.jit
    def _norm_fwd_kernel(X, W, B, Y, RSTD, stride_x, stride_y, N, eps, KIND: tl.constexpr,
                         BLOCK_N: tl.constexpr, ONE_PASS: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_N)
        if ONE_PASS:
            m = cols < N
            x = tl.load(X + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)
            if KIND == 2:
                x = tl.where(m, x - tl.sum(x, axis=0) / N, 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
            y = _norm_out(x * rstd, W, B, cols, m, KIND)
            tl.store(Y + row * stride_y + cols, to_dtype(y, Y.dtype.element_ty), mask=m)
        else:  # one pass per statistic: the mean, then the centred squares, then the output
            mean = 0.0
            if KIND == 2:
                mean = _looped_mean(X, row * stride_x, N, BLOCK_N)
            sq = tl.zeros([BLOCK_N], dtype=tl.float32)
            for off in range(0, N, BLOCK_N):
                c = off + cols
                m = c < N
                x = tl.load(X + row * stride_x + c, mask=m, other=0.0).to(tl.float32)
                x = tl.where(m, x - mean, 0.0)
                sq += x * x
            rstd = 1.0 / tl.sqrt(tl.sum(sq, axis=0) / N + eps)
            for off in range(0, N, BLOCK_N):
                c = off + cols
                m = c < N
                x = tl.load(X + row * stride_x + c, mask=m, other=0.0).to(tl.float32)
                y = _norm_out((x - mean) * rstd, W, B, c, m, KIND)
                tl.store(Y + row * stride_y + c, to_dtype(y, Y.dtype.element_ty), mask=m)
        tl.store(RSTD + row, rstd)

    @triton.jit
    def _norm_bwd_kernel(DY, X, W, RSTD, DRES, DX, stride_dy, stride_x, stride_dres, stride_dx,
                         N, KIND: tl.constexpr, HAS_DRES: tl.constexpr, BLOCK_N: tl.constexpr,
                         ONE_PASS: tl.constexpr):
        # dx = rstd * (g - mean(g) - xh * mean(g * xh)) with xh = (x - mean) * rstd; for the
        # RMSNorm (KIND 1) the mean and mean(g) are 0
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_N)
        rstd = tl.load(RSTD + row)
        if ONE_PASS:
            m = cols < N
            x = tl.load(X + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)
            g = _norm_g(DY, W, row * stride_dy, cols, m, KIND)
            if KIND == 2:
                xh = tl.where(m, x - tl.sum(x, axis=0) / N, 0.0) * rstd
                g_c = g - tl.sum(g, axis=0) / N
            else:
                xh = x * rstd
                g_c = g
            dx = rstd * (g_c - xh * (tl.sum(g * xh, axis=0) / N))
            if HAS_DRES:
                dx += tl.load(DRES + row * stride_dres + cols, mask=m, other=0.0).to(tl.float32)
            tl.store(DX + row * stride_dx + cols, to_dtype(dx, DX.dtype.element_ty), mask=m)
        else:
            mean = 0.0
            if KIND == 2:
                mean = _looped_mean(X, row * stride_x, N, BLOCK_N)
            sg = tl.zeros([BLOCK_N], dtype=tl.float32)
            sgx = tl.zeros([BLOCK_N], dtype=tl.float32)
            for off in range(0, N, BLOCK_N):
                c = off + cols
                m = c < N
                x = tl.load(X + row * stride_x + c, mask=m, other=0.0).to(tl.float32)
                g = _norm_g(DY, W, row * stride_dy, c, m, KIND)
                sg += g
                sgx += g * tl.where(m, x - mean, 0.0) * rstd
            mean_g = 0.0
            if KIND == 2:
                mean_g = tl.sum(sg, axis=0) / N
            mean_gx = tl.sum(sgx, axis=0) / N
            for off in range(0, N, BLOCK_N):
                c = off + cols
                m = c < N
                x = tl.load(X + row * stride_x + c, mask=m, other=0.0).to(tl.float32)
                g = _norm_g(DY, W, row * stride_dy, c, m, KIND)
                dx = rstd * (g - mean_g - (x - mean) * rstd * mean_gx)
                if HAS_DRES:
                    dx += tl.load(DRES + row * stride_dres + c, mask=m,
                                  other=0.0).to(tl.float32)
                tl.store(DX + row * stride_dx + c, to_dtype(dx, DX.dtype.element_ty), mask=m)

    @triton.jit
    def gelu_tanh_f32(g):
        """gelu_tanh(g) in fp32 (also the GEMM's epilogue)."""
        return g * tl.sigmoid(1.5957691216057308 * (g + 0.044715 * g * g * g))

    @triton.jit
    def gelu_tanh_grad_f32(g):
        """d gelu_tanh / dg = s + 2 g s (1 - s) z', s = sigmoid(2 z)."""
        s = tl.sigmoid(1.5957691216057308 * (g + 0.044715 * g * g * g))
        return s + g * s * (1.0 - s) * 1.5957691216057308 * (1.0 + 0.134145 * g * g)

    @triton.jit
    def gelu_f32(u):
        """gelu(u), the exact (erf) one, in fp32."""
        return 0.5 * u * (1.0 + tl.math.erf(u * 0.7071067811865476))

    @triton.jit
    def gelu_grad_f32(u):
        """Phi(u) + u phi(u)."""
        return (0.5 * (1.0 + tl.math.erf(u * 0.7071067811865476))
                + u * 0.3989422804014327 * tl.exp(-0.5 * u * u))

    @triton.jit
    def _act_fwd_kernel(GU, M, stride_gu, stride_m, I, ACT: tl.constexpr,
                        BLOCK_I: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
        msk = cols < I
        g = tl.load(GU + row * stride_gu + cols, mask=msk, other=0.0)
        if ACT == 1:
            # the activation rounds to the dtype before the product, as F.gelu(g) * u does
            act = to_dtype(gelu_tanh_f32(g.to(tl.float32)), g.dtype).to(tl.float32)
            u = tl.load(GU + row * stride_gu + I + cols, mask=msk, other=0.0).to(tl.float32)
            out = act * u
        else:
            out = gelu_f32(g.to(tl.float32))
        tl.store(M + row * stride_m + cols, to_dtype(out, M.dtype.element_ty), mask=msk)

    @triton.jit
    def _act_bwd_kernel(GU, DM, DGU, stride_gu, stride_dm, stride_dgu, I, ACT: tl.constexpr,
                        BLOCK_I: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
        msk = cols < I
        g = tl.load(GU + row * stride_gu + cols, mask=msk, other=0.0).to(tl.float32)
        dm = tl.load(DM + row * stride_dm + cols, mask=msk, other=0.0).to(tl.float32)
        if ACT == 1:
            u = tl.load(GU + row * stride_gu + I + cols, mask=msk, other=0.0).to(tl.float32)
            tl.store(DGU + row * stride_dgu + I + cols,
                     to_dtype(dm * gelu_tanh_f32(g), DGU.dtype.element_ty), mask=msk)
            dg = dm * u * gelu_tanh_grad_f32(g)
        else:
            dg = dm * gelu_grad_f32(g)
        tl.store(DGU + row * stride_dgu + cols, to_dtype(dg, DGU.dtype.element_ty), mask=msk)


def _launch_params(n: int, element_size: int):
    """rms_norm's (BLOCK_N, num_warps, one_pass), except that one pass takes a warp per 1024
    columns, at most MAX_WARPS."""
    block, warps, one_pass = _rms.launch_params(n, element_size)
    return block, min(max(block // 1024, 1), MAX_WARPS) if one_pass else warps, one_pass


def norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float, kind: str, bias=None):
    """(y, rstd) of Gemma's RMSNorm (kind "rms_1p") or LayerNorm ("layer", with bias) over the
    last dim; rstd is fp32, shape x.shape[:-1]."""
    n = x.shape[-1]
    block, warps, one_pass = _launch_params(n, x.element_size())
    x2 = _rows(x, n)
    y = torch.empty_like(x2)
    rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
    if x2.shape[0]:
        _norm_fwd_kernel[(x2.shape[0],)](x2, weight, weight if bias is None else bias, y, rstd,
                                         x2.stride(0), y.stride(0), n, eps,
                                         KIND=NORM_KINDS[kind], BLOCK_N=block,
                                         ONE_PASS=one_pass, num_warps=warps)
    return y.view(x.shape), rstd.view(x.shape[:-1])


def norm_bwd(dy, x, weight, rstd, kind: str, dres=None) -> torch.Tensor:
    """dx of norm_fwd for a frozen weight (and bias), plus dres when given."""
    n = x.shape[-1]
    block, warps, one_pass = _launch_params(n, x.element_size())
    dy2, x2 = _rows(dy, n), _rows(x, n)
    dres2 = _rows(dres, n) if dres is not None else dy2
    dx = torch.empty_like(x2)
    if x2.shape[0]:
        _norm_bwd_kernel[(x2.shape[0],)](dy2, x2, weight, rstd.reshape(-1).contiguous(), dres2,
                                         dx, dy2.stride(0), x2.stride(0), dres2.stride(0),
                                         dx.stride(0), n, KIND=NORM_KINDS[kind],
                                         HAS_DRES=dres is not None, BLOCK_N=block,
                                         ONE_PASS=one_pass, num_warps=warps)
    return dx.view(x.shape)


def _act_grid(rows: int, inter: int):
    block = min(ACT_BLOCK, triton.next_power_of_2(inter))
    return (rows, triton.cdiv(inter, block)), block


def act_fwd(gu: torch.Tensor, act: str) -> torch.Tensor:
    """gelu_tanh(g) * u for gu = [g | u] (act "gelu_tanh"; returns (..., I)) or gelu(u) ("gelu",
    same shape as gu)."""
    width = gu.shape[-1]
    inter = width // 2 if act == "gelu_tanh" else width
    gu2 = _rows(gu, width)
    m = torch.empty(gu2.shape[0], inter, dtype=gu.dtype, device=gu.device)
    if gu2.shape[0]:
        grid, block = _act_grid(gu2.shape[0], inter)
        _act_fwd_kernel[grid](gu2, m, gu2.stride(0), m.stride(0), inter, ACT=ACTS[act],
                              BLOCK_I=block, num_warps=4)
    return m.view(*gu.shape[:-1], inter)


def act_bwd(gu: torch.Tensor, dm: torch.Tensor, act: str) -> torch.Tensor:
    """The activation's input gradient, gu's shape: [dg | du] for "gelu_tanh", du for "gelu"."""
    width = gu.shape[-1]
    inter = dm.shape[-1]
    gu2, dm2 = _rows(gu, width), _rows(dm, inter)
    dgu = torch.empty_like(gu2)
    if gu2.shape[0]:
        grid, block = _act_grid(gu2.shape[0], inter)
        _act_bwd_kernel[grid](gu2, dm2, dgu, gu2.stride(0), dm2.stride(0), dgu.stride(0), inter,
                              ACT=ACTS[act], BLOCK_I=block, num_warps=4)
    return dgu.view(gu.shape)


def compile_launches(arch: int, dtype: str):
    """Every configuration the launchers pick (pifi_fast.kernels.compile_report): the norms per
    block width (64 columns to the one-pass limit, and the looped one), forward and backward
    with and without the residual gradient, for both kinds; the activations per block width."""
    dt = DTYPE_NAMES[dtype]
    size = torch.empty(0, dtype=dt).element_size()
    widths = [1 << k for k in range(6, (_rms.MAX_BLOCK_BYTES // size).bit_length())]
    widths.append(_rms.MAX_HIDDEN)
    out = []
    for kind, code in NORM_KINDS.items():
        for n in widths:
            block, warps, one_pass = _launch_params(n, size)
            config = f"BLOCK_N={block} warps={warps}" + ("" if one_pass else " looped")
            const = dict(KIND=code, BLOCK_N=block, ONE_PASS=one_pass)
            out.append(Launch(
                _norm_fwd_kernel, f"{kind}_norm_fwd", config, dtype,
                dict(X=Ptr(dt), W=Ptr(dt), B=Ptr(dt), Y=Ptr(dt), RSTD=Ptr(torch.float32),
                     stride_x=Int(n), stride_y=Int(n), N=Int(n), eps=Float()),
                const, num_warps=warps))
            for dres in (False, True):
                out.append(Launch(
                    _norm_bwd_kernel, f"{kind}_norm_bwd" + ("+dres" if dres else ""), config,
                    dtype, dict(DY=Ptr(dt), X=Ptr(dt), W=Ptr(dt), RSTD=Ptr(torch.float32),
                                DRES=Ptr(dt), DX=Ptr(dt), stride_dy=Int(n), stride_x=Int(n),
                                stride_dres=Int(n), stride_dx=Int(n), N=Int(n)),
                    dict(const, HAS_DRES=dres), num_warps=warps))
    for act, code in ACTS.items():
        for block in (1 << k for k in range(4, ACT_BLOCK.bit_length())):
            inter = 14336 if block == ACT_BLOCK else block  # Gemma-2-9B's MLP is 14336 wide
            gated = 2 if act == "gelu_tanh" else 1
            config = f"BLOCK_I={block} warps=4"
            out.append(Launch(_act_fwd_kernel, f"{act}_fwd", config, dtype,
                              dict(GU=Ptr(dt), M=Ptr(dt), stride_gu=Int(gated * inter),
                                   stride_m=Int(inter), I=Int(inter)),
                              dict(ACT=code, BLOCK_I=block), num_warps=4))
            out.append(Launch(_act_bwd_kernel, f"{act}_bwd", config, dtype,
                              dict(GU=Ptr(dt), DM=Ptr(dt), DGU=Ptr(dt),
                                   stride_gu=Int(gated * inter), stride_dm=Int(inter),
                                   stride_dgu=Int(gated * inter), I=Int(inter)),
                              dict(ACT=code, BLOCK_I=block), num_warps=4))
    return out
