"""Llama's RMSNorm with the residual add fused: the "rms" mode of kernels/norm.py under the
names the layer has always called (see norm.py for the meaning and the kernel)."""
from __future__ import annotations

from . import norm as _norm
from .modes import Norm

MAX_HIDDEN = _norm.MAX_HIDDEN
MAX_BLOCK_BYTES = _norm.MAX_BLOCK_BYTES
LOOP_BLOCK = _norm.LOOP_BLOCK


def rms_norm_fwd_ref(x, weight, eps, residual=None):
    """(y, s, rstd): the twin of rms_norm_fwd."""
    return _norm.norm_fwd_ref(x, weight, eps, Norm.RMS, residual=residual)


def rms_norm_bwd_ref(dy, s, weight, rstd, dres=None):
    """The twin of rms_norm_bwd."""
    return _norm.norm_bwd_ref(dy, s, weight, rstd, Norm.RMS, dres)


def launch_params(n: int, element_size: int = 2):
    """(BLOCK_N, num_warps, one_pass) of the "rms" mode for rows of n columns."""
    return _norm.launch_params(n, element_size, Norm.RMS)


def rms_norm_fwd(x, weight, eps: float, residual=None):
    """(y, s, rstd): normalised output, the residual stream s (= x when residual is None) and
    the fp32 1/rms per row (shape x.shape[:-1])."""
    return _norm.norm_fwd(x, weight, eps, Norm.RMS, residual=residual)


def rms_norm_bwd(dy, s, weight, rstd, dres=None):
    """Gradient of rms_norm_fwd's input(s) for a frozen weight, plus dres when given."""
    return _norm.norm_bwd(dy, s, weight, rstd, Norm.RMS, dres)
