"""SwiGLU on a merged gate/up buffer gu = [g | u]: silu(g) * u and its [dg | du], the gated
silu of kernels/activations.py under the names the layer has always called (see activations.py
for the meaning and the kernel)."""
from __future__ import annotations

from . import activations as _act
from .modes import Activation

BLOCK = _act.BLOCK


def swiglu_fwd_ref(gu):
    return _act.act_fwd_ref(gu, Activation.SILU, gated=True)


def swiglu_bwd_ref(gu, dm):
    """[dg | du] in one buffer of gu's shape: the CPU's production path (see act_bwd_ref)."""
    return _act.act_bwd_ref(gu, dm, Activation.SILU, gated=True)


def swiglu_fwd(gu):
    """silu(g) * u for gu = [g | u] along the last dim; returns (..., I)."""
    return _act.act_fwd(gu, Activation.SILU, gated=True)


def swiglu_bwd(gu, dm):
    """[dg | du] (same shape as gu) from the saved gu and the upstream gradient dm."""
    return _act.act_bwd(gu, dm, Activation.SILU, gated=True)
