"""How a kernel is launched, written down so it can be compiled without a GPU.

Each kernel module lists, in ``compile_launches(arch, dtype)``, every configuration its launch
functions can pick on a GPU target (block sizes, warps, stages) as ``Launch`` records, using the
same helpers the launch functions use. pifi_fast.kernels.compile_report compiles them for any
target on the CPU and reads registers, spills and shared memory off the result.

Runtime arguments are described by kind and a representative value, because Triton specializes
on values: an integer equal to 1 becomes a compile-time constant, integers and pointers divisible
by 16 get a divisibility hint (fresh CUDA allocations are 256-byte aligned; our row strides are
multiples of 16 for every real model's hidden size). ``triton_signature`` applies those rules.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

_TRITON_DTYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
                 torch.int64: "i64", torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8"}
DTYPE_NAMES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Ptr:
    """A tensor argument (passed as a pointer) of this element dtype."""

    dtype: torch.dtype


@dataclass(frozen=True)
class Int:
    """An integer argument with a representative value (shapes, strides)."""

    value: int


@dataclass(frozen=True)
class Float:
    """A float scalar argument (never specialized)."""


@dataclass
class Launch:
    """One compiled variant of a kernel: its runtime arguments in order, the constexprs, and
    the launch options."""

    kernel: Any  # the @triton.jit function (not the autotuner)
    name: str  # e.g. "rms_norm_fwd"
    config: str  # the tunables, e.g. "BLOCK_N=4096 warps=8"
    dtype: str  # "bf16" | "fp16" | "fp32": the data dtype of this launch
    args: dict[str, Ptr | Int | Float]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3
    uses_dot: bool = False  # a GEMM: tensor-core instructions expected
    extra: dict = field(default_factory=dict)


def triton_signature(launch: Launch):
    """(signature, constexprs, attrs) for triton.compile(ASTSource(...)), specialized the way a
    real launch with these argument values is (Triton's rules: int == 1 -> constexpr 1;
    int % 16 == 0 and 16-byte aligned pointers -> tt.divisibility 16)."""
    names = launch.kernel.arg_names
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(names):
        if name in launch.constexprs:
            signature[name] = "constexpr"
            constexprs[(i,)] = launch.constexprs[name]
            continue
        if name not in launch.args:
            raise KeyError(f"{launch.name}: argument {name!r} is not described")
        spec = launch.args[name]
        if isinstance(spec, Ptr):
            signature[name] = "*" + _TRITON_DTYPE[spec.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(spec, Int):
            v = spec.value
            if v == 1:
                signature[name] = "constexpr"
                constexprs[(i,)] = 1
                continue
            signature[name] = "i32" if -2**31 <= v < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(spec, Float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{launch.name}: unknown argument spec {spec!r}")
    extra = set(launch.args) | set(launch.constexprs)
    unknown = extra - set(names)
    if unknown:
        raise KeyError(f"{launch.name}: {sorted(unknown)} are not arguments of the kernel")
    return signature, constexprs, attrs
