"""The norms and activations the Gemma and Falcon layers need beyond Llama's, under the names
the layer has always called: Gemma's (1 + w) RMSNorm and LayerNorm with bias are modes of
kernels/norm.py, GeGLU-tanh and GELU forms of kernels/activations.py (the meaning and the
kernels are there).

    norm_fwd / norm_bwd   kind "rms_1p" or "layer": (y, rstd) and dx (no residual add)
    act_fwd / act_bwd     act "gelu_tanh" (gated, on [g | u]) or "gelu" (plain)

each with a *_ref twin of the same signature.
"""
from __future__ import annotations

from . import activations as _act
from . import norm as _norm
from .modes import Activation, Norm

# the gated form of each activation the families use ("gelu": Falcon's plain MLP)
ACTS = {"gelu_tanh": True, "gelu": False}


def rms_norm_1p_fwd_ref(x, weight, eps):
    """(y, rstd): Gemma's RMSNorm of x (T, H) with stored weight w (the module's (1 + w))."""
    y, _, rstd = _norm.norm_fwd_ref(x, weight, eps, Norm.RMS_1P)
    return y, rstd


def rms_norm_1p_bwd_ref(dy, x, weight, rstd, dres=None):
    return _norm.norm_bwd_ref(dy, x, weight, rstd, Norm.RMS_1P, dres)


def layer_norm_fwd_ref(x, weight, bias, eps):
    """(y, rstd): F.layer_norm itself and the fp32 1 / std its backward needs."""
    y, _, rstd = _norm.norm_fwd_ref(x, weight, eps, Norm.LAYER, bias)
    return y, rstd


def layer_norm_bwd_ref(dy, x, weight, rstd, dres=None):
    return _norm.norm_bwd_ref(dy, x, weight, rstd, Norm.LAYER, dres)


def geglu_tanh_fwd_ref(gu):
    return _act.act_fwd_ref(gu, Activation.GELU_TANH, gated=True)


def geglu_tanh_bwd_ref(gu, dm):
    """[dg | du] in one (T, 2I) buffer, as swiglu_bwd writes it."""
    return _act.act_bwd_ref(gu, dm, Activation.GELU_TANH, gated=True)


def gelu_fwd_ref(u):
    return _act.act_fwd_ref(u, Activation.GELU, gated=False)


def gelu_bwd_ref(u, dm):
    return _act.act_bwd_ref(u, dm, Activation.GELU, gated=False)


def norm_fwd_ref(x, weight, eps, kind: str, bias=None):
    """The twin of norm_fwd: kind "rms_1p" (Gemma) or "layer" (LayerNorm with bias)."""
    y, _, rstd = _norm.norm_fwd_ref(x, weight, eps, kind, bias)
    return y, rstd


def norm_bwd_ref(dy, x, weight, rstd, kind: str, dres=None):
    return _norm.norm_bwd_ref(dy, x, weight, rstd, kind, dres)


def act_fwd_ref(gu, act: str):
    """The twin of act_fwd."""
    return _act.act_fwd_ref(gu, act, ACTS[act])


def act_bwd_ref(gu, dm, act: str):
    return _act.act_bwd_ref(gu, dm, act, ACTS[act])


def norm_fwd(x, weight, eps: float, kind: str, bias=None):
    """(y, rstd) of Gemma's RMSNorm (kind "rms_1p") or LayerNorm ("layer", with bias) over the
    last dim; rstd is fp32, shape x.shape[:-1]."""
    y, _, rstd = _norm.norm_fwd(x, weight, eps, kind, bias)
    return y, rstd


def norm_bwd(dy, x, weight, rstd, kind: str, dres=None):
    """dx of norm_fwd for a frozen weight (and bias), plus dres when given."""
    return _norm.norm_bwd(dy, x, weight, rstd, kind, dres)


def act_fwd(gu, act: str):
    """gelu_tanh(g) * u for gu = [g | u] (act "gelu_tanh"; returns (..., I)) or gelu(u)
    ("gelu", same shape as gu)."""
    return _act.act_fwd(gu, act, ACTS[act])


def act_bwd(gu, dm, act: str):
    """The activation's input gradient, gu's shape: [dg | du] for "gelu_tanh", du for "gelu"."""
    return _act.act_bwd(gu, dm, act, ACTS[act])
