"""The elementwise steps the Gemma and Falcon layers need beyond Llama's, as plain PyTorch.

These are the twins, the meaning: no Triton kernel computes them yet, so pifi_fast.ops runs them
on every device (as PyTorch ops; the projections and attention around them are the same fast
paths as Llama's). Each forward returns what its input-gradient-only backward needs.

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
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import acc_dtype as _acc


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
