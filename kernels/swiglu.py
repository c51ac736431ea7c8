"""SwiGLU on a merged gate/up buffer: forward silu(g) * u, backward dg and du.

The gate/up projection writes one (T, 2I) buffer gu = [g | u] (the merged GEMM). Meaning (the
twins below), elementwise, in fp32 then cast back:

    m  = silu(g) * u                       (silu rounded to the dtype first, as F.silu(g) * u)
    dg = dm * u * sig(g) * (1 + g * (1 - sig(g)))
    du = dm * silu(g)

Backward writes [dg | du] into one (T, 2I) buffer so the gate/up input-gradient GEMM consumes
it in a single call. Offsets are 64-bit: T * 2I may exceed 2^31.
"""
from __future__ import annotations

import torch

from .common import HAS_TRITON
from .common import acc_dtype as _acc
from .common import as_rows as _rows
from ._spec import DTYPE_NAMES, Int, Launch, Ptr

BLOCK = 1024


# -- plain PyTorch twins ---------------------------------------------------------------------------
def swiglu_fwd_ref(gu: torch.Tensor) -> torch.Tensor:
    g, u = gu.chunk(2, dim=-1)
    return torch.nn.functional.silu(g) * u


def swiglu_bwd_ref(gu: torch.Tensor, dm: torch.Tensor) -> torch.Tensor:
    g, u = (_acc(t) for t in gu.chunk(2, dim=-1))
    dm = _acc(dm)
    # This twin is the CPU's production path: aten's fused silu_backward (the same formula,
    # sig(g) * (1 + g * (1 - sig(g))), in one pass) and results written straight into the
    # halves of one buffer instead of six elementwise passes and a concatenation (measured
    # alone on 2 CPU cores, 2048 tokens of the Qwen2-0.5B MLP, fp32: 155 ms -> 61 ms a call).
    dgu = torch.empty(gu.shape, dtype=g.dtype, device=gu.device)
    dg, du = dgu.chunk(2, dim=-1)
    torch.ops.aten.silu_backward.grad_input(dm * u, g, grad_input=dg)
    torch.mul(dm, torch.nn.functional.silu(g), out=du)
    return dgu.to(gu.dtype)


# -- Triton ----------------------------------------------------------------------------------------
if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._round import to_dtype

    @triton.jit
    def _swiglu_fwd_kernel(GU, M, stride_gu, stride_m, I, BLOCK_I: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
        msk = cols < I
        g = tl.load(GU + row * stride_gu + cols, mask=msk, other=0.0)
        u = tl.load(GU + row * stride_gu + I + cols, mask=msk, other=0.0)
        g32 = g.to(tl.float32)
        act = to_dtype(g32 * tl.sigmoid(g32), g.dtype).to(tl.float32)
        tl.store(M + row * stride_m + cols, to_dtype(act * u.to(tl.float32), M.dtype.element_ty),
                 mask=msk)

    @triton.jit
    def _swiglu_bwd_kernel(GU, DM, DGU, stride_gu, stride_dm, stride_dgu, I,
                           BLOCK_I: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
        msk = cols < I
        g = tl.load(GU + row * stride_gu + cols, mask=msk, other=0.0).to(tl.float32)
        u = tl.load(GU + row * stride_gu + I + cols, mask=msk, other=0.0).to(tl.float32)
        dm = tl.load(DM + row * stride_dm + cols, mask=msk, other=0.0).to(tl.float32)
        sg = tl.sigmoid(g)
        dg = dm * u * sg * (1.0 + g * (1.0 - sg))
        du = dm * g * sg
        tl.store(DGU + row * stride_dgu + cols, to_dtype(dg, DGU.dtype.element_ty), mask=msk)
        tl.store(DGU + row * stride_dgu + I + cols, to_dtype(du, DGU.dtype.element_ty), mask=msk)


def _grid(rows: int, inter: int):
    block = min(BLOCK, triton.next_power_of_2(inter))
    return (rows, triton.cdiv(inter, block)), block


def compile_launches(arch: int, dtype: str):
    """Every configuration (pifi_fast.kernels.compile_report): one per block width, 16 to
    BLOCK columns of the intermediate size (BLOCK for every real MLP), forward and backward."""
    dt = DTYPE_NAMES[dtype]
    out = []
    for block in (1 << k for k in range(4, BLOCK.bit_length())):
        inter = 14336 if block == BLOCK else block  # Llama-3.1-8B's MLP for the full block
        config = f"BLOCK_I={block} warps=4"
        out.append(Launch(_swiglu_fwd_kernel, "swiglu_fwd", config, dtype,
                          dict(GU=Ptr(dt), M=Ptr(dt), stride_gu=Int(2 * inter),
                               stride_m=Int(inter), I=Int(inter)),
                          dict(BLOCK_I=block), num_warps=4))
        out.append(Launch(_swiglu_bwd_kernel, "swiglu_bwd", config, dtype,
                          dict(GU=Ptr(dt), DM=Ptr(dt), DGU=Ptr(dt), stride_gu=Int(2 * inter),
                               stride_dm=Int(inter), stride_dgu=Int(2 * inter), I=Int(inter)),
                          dict(BLOCK_I=block), num_warps=4))
    return out


def swiglu_fwd(gu: torch.Tensor) -> torch.Tensor:
    """silu(g) * u for gu = [g | u] along the last dim; returns (..., I)."""
    if gu.shape[-1] % 2:
        raise ValueError(f"swiglu expects an even last dim [gate | up], got {gu.shape[-1]}")
    inter = gu.shape[-1] // 2
    gu2 = _rows(gu, 2 * inter)
    m = torch.empty(gu2.shape[0], inter, dtype=gu.dtype, device=gu.device)
    if gu2.shape[0]:
        grid, block = _grid(gu2.shape[0], inter)
        _swiglu_fwd_kernel[grid](gu2, m, gu2.stride(0), m.stride(0), inter, BLOCK_I=block,
                                 num_warps=4)
    return m.view(*gu.shape[:-1], inter)


def swiglu_bwd(gu: torch.Tensor, dm: torch.Tensor) -> torch.Tensor:
    """[dg | du] (same shape as gu) from the saved gu and the upstream gradient dm."""
    inter = gu.shape[-1] // 2
    gu2, dm2 = _rows(gu, 2 * inter), _rows(dm, inter)
    dgu = torch.empty_like(gu2)
    if gu2.shape[0]:
        grid, block = _grid(gu2.shape[0], inter)
        _swiglu_bwd_kernel[grid](gu2, dm2, dgu, gu2.stride(0), dm2.stride(0), dgu.stride(0),
                                 inter, BLOCK_I=block, num_warps=4)
    return dgu.view(gu.shape)
