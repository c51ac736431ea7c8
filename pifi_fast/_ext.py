"""Access to the compiled extension pifi_fast._C, with a plain PyTorch stand-in.

Importing pifi_fast._C registers torch.ops.pifi_fast.*. When the extension is missing (built with
PIFI_FAST_NO_EXT=1, or a platform without a compiler) the package still works: frozen_linear
falls back to the autograd Function below, which has the same contract, and we say so once.
"""
from __future__ import annotations

import importlib.util
import warnings

import torch

def _release(version: str | None) -> str | None:
    return ".".join(version.split("+")[0].split(".")[:2]) if version else None


def _torch_mismatch() -> str | None:
    """Why the built extension cannot load with this torch (it was compiled against another
    release: loading it would fail with an undefined-symbol error), else None."""
    try:  # deferred: _build_info.py is written by setup.py, so only a built tree has it
        from pifi_fast import _build_info
    except ImportError:  # a source tree that was never built
        return None
    built = getattr(_build_info, "TORCH_VERSION", None)
    if built and _release(built) != _release(torch.__version__):
        return (f"it was compiled against torch {built} but torch {torch.__version__} is "
                "installed; rebuild it for this torch (pip install --no-build-isolation "
                "--force-reinstall --no-deps <pifi_fast source>) or install the pifi_fast wheel "
                f"built for torch {_release(torch.__version__)}")
    return None


def _not_built() -> bool:
    """Whether no pifi_fast._C exists at all (importing it anyway would then say "partially
    initialized module ... circular import", which misleads)."""
    try:
        return importlib.util.find_spec("pifi_fast._C") is None
    except ImportError:  # a finder refused it: the import below records why
        return False


_IMPORT_ERROR: Exception | str | None = _torch_mismatch()
HAS_EXTENSION = EXTENSION_WITH_CUDA = False
if _IMPORT_ERROR is None and _not_built():
    _IMPORT_ERROR = ("it was not built: this install skipped it (PIFI_FAST_NO_EXT=1, or no "
                     "torch or C++ compiler at build time); to build it, install again with "
                     "torch present: pip install --no-build-isolation <pifi_fast source>")
if _IMPORT_ERROR is None:
    try:
        from pifi_fast import _C  # noqa: F401  (import registers the ops)

        HAS_EXTENSION = True
        EXTENSION_WITH_CUDA = bool(getattr(_C, "with_cuda", 0))
    except ImportError as exc:  # pragma: no cover - exercised by the PIFI_FAST_NO_EXT test
        _IMPORT_ERROR = exc
        if "undefined symbol" in str(exc):
            _IMPORT_ERROR = (f"{exc.__class__.__name__}: {str(exc)[:120]} (built for another "
                             "torch? rebuild: pip install --no-build-isolation "
                             "--force-reinstall --no-deps <pifi_fast source>)")

_warned = False


def _warn_once() -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"pifi_fast: compiled extension pifi_fast._C not available ({_IMPORT_ERROR}); "
            "using the plain PyTorch path",
            RuntimeWarning,
            stacklevel=3,
        )


class FrozenLinearPython(torch.autograd.Function):
    """Plain PyTorch twin of torch.ops.pifi_fast.frozen_linear (same autograd contract)."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual):
        if weight.requires_grad or (bias is not None and bias.requires_grad):
            raise RuntimeError("frozen_linear: weight and bias must be frozen (requires_grad=False)")
        out = torch.nn.functional.linear(x, weight, bias)
        if residual is not None:
            out = out + residual
        ctx.save_for_backward(weight)
        ctx.has_residual = residual is not None
        return out

    @staticmethod
    def backward(ctx, dy):
        (weight,) = ctx.saved_tensors
        return dy @ weight, None, None, (dy if ctx.has_residual else None)


def frozen_linear(x, weight, bias=None, residual=None, use_extension: bool | None = None):
    """y = x @ weight.T + bias + residual; autograd returns only dx (and dresidual)."""
    if use_extension is None:
        use_extension = HAS_EXTENSION
    if use_extension:
        if not HAS_EXTENSION:
            raise RuntimeError("pifi_fast._C is not built; reinstall without PIFI_FAST_NO_EXT=1")
        return torch.ops.pifi_fast.frozen_linear(x, weight, bias, residual)
    if not HAS_EXTENSION:
        _warn_once()
    return FrozenLinearPython.apply(x, weight, bias, residual)
