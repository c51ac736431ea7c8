"""The kernels' modes as named constants: which norm, which activation, what follows a GEMM's dot.

A mode is a compile-time constant of a kernel (a ``tl.constexpr`` argument). Kernels compare it
with these members, never with a bare integer (``if NORM == modes.Norm.LAYER``), and launchers
choose it by name (``Norm.named("layer")``). Triton's compiler lets a kernel read a global only
through a module, so kernels import this module and spell ``modes.Norm.LAYER``; each member is an
``int`` underneath, which is what a launch passes (``int(member)``) and what the compile report
records.

This module needs neither torch nor triton: the launchers and the plain PyTorch twins use the
same names on a CPU-only install.
"""
from __future__ import annotations

import enum


class _Named(enum.IntEnum):
    """An IntEnum whose members are also chosen by their lower-case name."""

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def named(cls, value):
        """The member called ``value`` (a member, or its lower-case name)."""
        if isinstance(value, cls):
            return value
        try:
            return cls[str(value).upper()]
        except KeyError:
            names = ", ".join(repr(m.label) for m in cls)
            raise ValueError(f"{cls.__name__.lower()} must be one of {names}, "
                             f"got {value!r}") from None


class Norm(_Named):
    """The row norms of kernels/norm.py, statistics in fp32 for each."""

    RMS = 1  # Llama's RMSNorm: (s * rstd) cast to the input dtype, then times w
    RMS_1P = 2  # Gemma's: s * rstd * (1 + w) in fp32, cast last
    LAYER = 3  # LayerNorm with bias: (s - mean) * rstd * w + b


class Activation(_Named):
    """The activations of kernels/activations.py (each a function and its derivative there).

    ``glu`` is the name of the gated form f(g) * u as the GEMM's epilogues spell it."""

    def __new__(cls, value: int, glu: str):
        member = int.__new__(cls, value)
        member._value_ = value
        member.glu = glu
        return member

    SILU = 1, "swiglu"
    GELU_TANH = 2, "geglu_tanh"
    GELU = 3, "geglu"


class Epilogue(_Named):
    """What the projection GEMM does with its fp32 accumulator before the store."""

    NONE = 0  # C = A @ B (+ bias) (+ residual)
    ACT = 1  # C = f(A @ B + bias), or f(gate) * up when gated
    ACT_GRAD = 2  # A @ B is dm; with the saved pre-activation: f'(g) * dm (and du when gated)


__all__ = ["Norm", "Activation", "Epilogue"]
