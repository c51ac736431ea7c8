"""What every kernel module of pifi_fast.kernels shares: whether Triton is installed and runs
on a tensor, the accumulation dtype of the twins, and the row view a launch takes.

``pifi_fast.kernels`` is a namespace package without an ``__init__.py``, so that this folder
(``./kernels`` in a source checkout) can never shadow an installed top-level ``kernels`` package
(Hugging Face's, which Transformers imports): see docs/development.md. Each of its modules
holds plain launch functions (tensors in, tensors out, no autograd) and, beside each kernel, a
short pure-PyTorch twin that defines what the kernel computes:

    common          this module: what the others share
    modes           the kernels' modes as named constants (norm, activation, GEMM epilogue)
    norm            one row norm (Llama's and Gemma's RMSNorm, LayerNorm), residual add fused;
                    input-gradient-only backward
    activations     silu, gelu_tanh, gelu and their derivatives, written once for the
                    elementwise kernels (here) and the GEMM's epilogues; plain and gated forms
    rope            rotary embedding applied in place inside a packed QKV buffer; its transpose
    gemm            the projection GEMM with fused epilogues (an activation, its backward,
                    residual), chosen by name
    quant           8-bit frozen weights: quantization and the GEMM that dequantizes on load
    _tiles          the two GEMMs' tile tables, autotuner pool and pruning
    rms_norm, swiglu, family_ops   the names the layer has always called, on norm/activations
    compile_report  every kernel configuration compiled for five GPU targets, without a GPU
    _spec, _round   launch descriptions (for compiling without a GPU); in-kernel rounding

Kernels know nothing about models: the package imports nothing of pifi_fast outside it, and
pifi_fast.ops is its one user in the library (the benchmarks and the CLI call it too). They run
on CUDA tensors, or on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` set before
triton is imported), which is how CI checks them.
Without triton installed the package still imports; ``HAS_TRITON`` is then False and callers
(pifi_fast.ops) use the twins.
"""
from __future__ import annotations

import os

import torch

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # CPU-only torch builds come without triton
    HAS_TRITON = False


def acc_dtype(t):
    """t in its accumulation dtype: fp32 for 16-bit inputs, the input's own dtype above that
    (the twins compute in it)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def as_rows(t, n: int):
    """t as a (rows, n) matrix with unit column stride (a view when possible), for launches."""
    t = t.reshape(-1, n)
    return t if t.stride(-1) == 1 else t.contiguous()


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def can_run(t) -> bool:
    """Whether the Triton kernels can run on tensor ``t`` (a CUDA tensor, or any under the
    interpreter)."""
    return HAS_TRITON and (t.is_cuda or interpreting())


__all__ = ["HAS_TRITON", "interpreting", "can_run", "acc_dtype", "as_rows"]
