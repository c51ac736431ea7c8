"""The frozen layer's options: enums, one frozen dataclass validated once, and the one reader
of the layer's PIFI_FAST_* environment variables.

    PIFI_FAST_KERNELS     overrides kernels="auto" ("triton" or "torch"), read at each call
    PIFI_FAST_ATTENTION   overrides attention=None (a backend of pifi_fast.attention.BACKENDS)

Each option is a StrEnum, so a plain string ("mlp") compares equal to its member and prints as
itself: saved configs and user code that pass strings keep working.
"""
from __future__ import annotations

import dataclasses
import os
from enum import StrEnum

from pifi_fast.attention import BACKENDS


class Kernels(StrEnum):
    """What runs the elementwise steps: Triton on CUDA and the PyTorch twins elsewhere (AUTO),
    or one of them everywhere."""

    AUTO = "auto"
    TRITON = "triton"
    TORCH = "torch"


class Recompute(StrEnum):
    """What backward re-makes instead of keeping: nothing, or the MLP's gate/up output."""

    NONE = "none"
    MLP = "mlp"


class Gemm(StrEnum):
    """What runs the dense projections: the compiled cuBLAS op, or the Triton GEMM with fused
    epilogues."""

    CUBLAS = "cublas"
    TRITON = "triton"


class Weights(StrEnum):
    """How the four projection weights are stored: the compute dtype, or 8 bits."""

    AUTO = "auto"
    INT8 = "int8"
    INT8_CHANNEL = "int8-channel"
    FP8 = "fp8"


KERNEL_CHOICES = tuple(k.value for k in Kernels)
RECOMPUTE_CHOICES = tuple(r.value for r in Recompute)
GEMM_CHOICES = tuple(g.value for g in Gemm)
WEIGHT_CHOICES = tuple(w.value for w in Weights)


# Every PIFI_FAST_* variable the layer reads, and the option it overrides (docs/fused-layer.md
# lists them; tests/test_options.py checks that no other module of the package reads one).
ENVIRONMENT = {"PIFI_FAST_KERNELS": "kernels (when it is 'auto')",
               "PIFI_FAST_ATTENTION": "attention (when it is None)"}


def _member(enum, value, name: str, choices: tuple):
    try:
        return enum(value)
    except ValueError:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}") from None


@dataclasses.dataclass(frozen=True)
class LayerOptions:
    """How the frozen layer runs (the constructor keywords of FrozenLlamaLayer, the options of
    PiFiModel.from_parts and of `pifi-fast train`). Strings are taken and turned into the
    enums here, once; an unknown value is a ValueError naming the choices."""

    kernels: Kernels = Kernels.AUTO
    recompute: Recompute = Recompute.NONE
    attention: str | None = None
    gemm: Gemm = Gemm.CUBLAS
    chunk_tokens: int | str | None = "auto"
    causal: bool = False
    weights: Weights = Weights.AUTO

    def __post_init__(self):
        # the order of the checks is the order FrozenLlamaLayer always raised them in
        set_ = object.__setattr__  # a frozen dataclass: the coercion happens here, once
        set_(self, "weights", _member(Weights, self.weights, "weights", WEIGHT_CHOICES))
        set_(self, "kernels", _member(Kernels, self.kernels, "kernels", KERNEL_CHOICES))
        set_(self, "recompute", _member(Recompute, self.recompute, "recompute",
                                        RECOMPUTE_CHOICES))
        set_(self, "gemm", _member(Gemm, self.gemm, "gemm", GEMM_CHOICES))
        chunk = self.chunk_tokens
        if chunk not in (None, "auto") and (not isinstance(chunk, int) or isinstance(chunk, bool)
                                            or chunk < 1):
            raise ValueError(f"chunk_tokens must be a positive int, 'auto' or None, got "
                             f"{chunk!r}")
        if self.attention is not None and self.attention not in BACKENDS:
            raise ValueError(f"attention must be None or one of {BACKENDS}, got "
                             f"{self.attention!r}")
        set_(self, "causal", bool(self.causal))

    @classmethod
    def of(cls, options: LayerOptions | None = None, **overrides) -> LayerOptions:
        """`options` with some fields replaced (keywords as in the constructor)."""
        return dataclasses.replace(options or cls(), **overrides)

    @classmethod
    def from_command_line(cls, *, kernels: str = "auto", recompute: str = "none",
                          attention: str = "auto", gemm: str = "cublas", chunk_tokens: int = -1,
                          weights: str = "auto", causal: bool = False) -> LayerOptions:
        """The options from `pifi-fast train`'s spellings (TrainConfig's fields): attention
        "auto" is None, chunk_tokens -1 is "auto" and 0 the whole batch at once."""
        return cls(kernels=kernels, recompute=recompute, gemm=gemm, weights=weights,
                   attention=None if attention == "auto" else attention, causal=causal,
                   chunk_tokens={-1: "auto", 0: None}.get(chunk_tokens, chunk_tokens))

    def as_dict(self) -> dict:
        """The options as plain values (strings, ints, None), as keywords or a saved config
        take them."""
        return {f.name: (v.value if isinstance(v, StrEnum) else v)
                for f in dataclasses.fields(self) for v in (getattr(self, f.name),)}


def effective_kernels(choice: str) -> Kernels:
    """The kernels option with $PIFI_FAST_KERNELS applied: it overrides "auto" only."""
    if choice == Kernels.AUTO:
        choice = os.environ.get("PIFI_FAST_KERNELS", "auto")
    return _member(Kernels, choice, "kernels", KERNEL_CHOICES)


def effective_attention(choice: str | None) -> str | None:
    """The attention option with $PIFI_FAST_ATTENTION applied: it overrides None only (the
    backend then counts as asked for by name: its errors are the user's)."""
    return choice or os.environ.get("PIFI_FAST_ATTENTION") or None
