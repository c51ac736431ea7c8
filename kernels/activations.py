"""The MLP activations, each written once: a Triton function and its derivative, used by the
elementwise kernels here and by the GEMM's epilogues (kernels/gemm.py), and the plain PyTorch
pair that defines their meaning.

    silu        f(x) = x * sig(x)                       f'(x) = sig(x) * (1 + x * (1 - sig(x)))
    gelu_tanh   f(x) = x * sig(2 z), z = c (x + 0.044715 x^3), c = sqrt(2 / pi)
                                                        f'(x) = s + 2 x s (1 - s) z',  s = sig(2 z)
    gelu        f(x) = x * Phi(x) (erf)                 f'(x) = Phi(x) + x * phi(x)

An activation is used plain, m = f(u), or gated on a merged gate/up buffer gu = [g | u]:
m = f(g) * u (SwiGLU with silu, Gemma's GeGLU with gelu_tanh). Each backward function returns
the gradient of the gated form, (dg, du) = (dm * u * f'(g), dm * f(g)); the plain form is the
gated one with u = 1, which is exact (a product with 1.0 rounds to itself).

Elementwise kernels (act_fwd / act_bwd; twins act_fwd_ref / act_bwd_ref): gated, the forward
rounds f(g) to the storage dtype before the product, as ``F.silu(g) * u`` does in PyTorch, and
the backward writes [dg | du] into one buffer of gu's shape, so the gate/up input-gradient GEMM
consumes it in one call; plain, m = f(u) and du. Offsets are 64-bit (T * 2I may exceed 2^31).

Adding an activation: a member of modes.Activation, its pair of Triton functions below (with
its branch in activation() and activation_bwd(): Triton resolves those at compile time) and its
PyTorch pair in _TWINS; the GEMM's epilogues follow from the enum (docs/fused-layer.md).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import modes
from .common import HAS_TRITON
from .common import acc_dtype as _acc
from .common import as_rows as _rows
from ._spec import DTYPE_NAMES, Int, Launch, Ptr

Activation = modes.Activation
BLOCK = 1024  # columns of the intermediate size per program


# -- plain PyTorch pairs: the meaning --------------------------------------------------------------
_K = math.sqrt(2.0 / math.pi)


def _silu_grad(g, d, out):
    """d * silu'(g) into out: aten's fused silu_backward (one pass over g)."""
    return torch.ops.aten.silu_backward.grad_input(d, g, grad_input=out)


def _gelu_tanh(g):
    return F.gelu(g, approximate="tanh")


def _gelu_tanh_grad(g, d, out):
    inner = _K * (g + 0.044715 * g ** 3)
    t = torch.tanh(inner)
    grad = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * _K * (1.0 + 3 * 0.044715 * g * g)
    return torch.mul(d, grad, out=out)


def _gelu_grad(g, d, out):
    cdf = 0.5 * (1.0 + torch.erf(g / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * g * g) / math.sqrt(2.0 * math.pi)
    return torch.mul(d, cdf + g * pdf, out=out)


# activation -> (f, (g, d, out) -> d * f'(g) written into out)
_TWINS = {Activation.SILU: (F.silu, _silu_grad),
          Activation.GELU_TANH: (_gelu_tanh, _gelu_tanh_grad),
          Activation.GELU: (F.gelu, _gelu_grad)}


def act_fwd_ref(gu: torch.Tensor, act, gated: bool) -> torch.Tensor:
    """The twin of act_fwd: f(g) * u for gu = [g | u] (gated; returns (..., I)) or f(gu)."""
    f = _TWINS[Activation.named(act)][0]
    if not gated:
        return f(gu)
    g, u = gu.chunk(2, dim=-1)
    return f(g) * u


def act_bwd_ref(gu: torch.Tensor, dm: torch.Tensor, act, gated: bool) -> torch.Tensor:
    """The twin of act_bwd, in fp32 (the input's dtype above it), cast back: [dg | du] of gu's
    shape (gated) or du. Results are written straight into the halves of one buffer: for the
    SwiGLU this twin is the CPU's production path, and one fused pass per half beats separate
    elementwise passes and a concatenation."""
    f, grad = _TWINS[Activation.named(act)]
    dm = _acc(dm)
    if not gated:
        u = _acc(gu)
        return grad(u, dm, torch.empty_like(u)).to(gu.dtype)
    g, u = (_acc(t) for t in gu.chunk(2, dim=-1))
    dgu = torch.empty(gu.shape, dtype=g.dtype, device=gu.device)
    dg, du = dgu.chunk(2, dim=-1)
    grad(g, dm * u, dg)
    torch.mul(dm, f(g), out=du)
    return dgu.to(gu.dtype)


# -- Triton: each activation and its derivative ----------------------------------------------------
if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._round import to_dtype

    @triton.jit
    def silu(x):
        return x * tl.sigmoid(x)

    @triton.jit
    def silu_bwd(x, dm, u):
        """(dm * u * silu'(x), dm * silu(x)); sig(x) computed once for both."""
        s = tl.sigmoid(x)
        return dm * u * s * (1.0 + x * (1.0 - s)), dm * x * s

    @triton.jit
    def gelu_tanh(x):
        return x * tl.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))

    @triton.jit
    def gelu_tanh_bwd(x, dm, u):
        """d gelu_tanh / dx = s + 2 x s (1 - s) z', s = sig(2 z): the tanh written as a sigmoid,
        which is cheaper and exact at both tails."""
        s = tl.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))
        grad = s + x * s * (1.0 - s) * 1.5957691216057308 * (1.0 + 0.134145 * x * x)
        return dm * u * grad, dm * (x * s)

    @triton.jit
    def gelu(x):
        return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))

    @triton.jit
    def gelu_bwd(x, dm, u):
        """Phi(x) + x phi(x)."""
        grad = (0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
                + x * 0.3989422804014327 * tl.exp(-0.5 * x * x))
        return dm * u * grad, dm * gelu(x)

    @triton.jit
    def activation(x, ACT: tl.constexpr):
        """f(x) in fp32 for the activation ACT (a modes.Activation)."""
        if ACT == modes.Activation.SILU:
            y = silu(x)
        elif ACT == modes.Activation.GELU_TANH:
            y = gelu_tanh(x)
        else:
            tl.static_assert(ACT == modes.Activation.GELU, "unknown activation")
            y = gelu(x)
        return y

    @triton.jit
    def activation_bwd(x, dm, u, ACT: tl.constexpr):
        """(dm * u * f'(x), dm * f(x)): the gradient of f(x) * u, in fp32."""
        if ACT == modes.Activation.SILU:
            dx, du = silu_bwd(x, dm, u)
        elif ACT == modes.Activation.GELU_TANH:
            dx, du = gelu_tanh_bwd(x, dm, u)
        else:
            tl.static_assert(ACT == modes.Activation.GELU, "unknown activation")
            dx, du = gelu_bwd(x, dm, u)
        return dx, du

    # -- the elementwise kernels ------------------------------------------------------------------
    @triton.jit
    def _act_fwd_kernel(GU, M, stride_gu, stride_m, I, ACT: tl.constexpr, GATED: tl.constexpr,
                        BLOCK_I: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
        msk = cols < I
        g = tl.load(GU + row * stride_gu + cols, mask=msk, other=0.0)
        if GATED:
            # f(g) rounds to the dtype before the product, as F.silu(g) * u does
            a = to_dtype(activation(g.to(tl.float32), ACT), g.dtype).to(tl.float32)
            u = tl.load(GU + row * stride_gu + I + cols, mask=msk, other=0.0)
            out = a * u.to(tl.float32)
        else:
            out = activation(g.to(tl.float32), ACT)
        tl.store(M + row * stride_m + cols, to_dtype(out, M.dtype.element_ty), mask=msk)

    @triton.jit
    def _act_bwd_kernel(GU, DM, DGU, stride_gu, stride_dm, stride_dgu, I, ACT: tl.constexpr,
                        GATED: tl.constexpr, BLOCK_I: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
        msk = cols < I
        g = tl.load(GU + row * stride_gu + cols, mask=msk, other=0.0).to(tl.float32)
        if GATED:
            u = tl.load(GU + row * stride_gu + I + cols, mask=msk, other=0.0).to(tl.float32)
            dm = tl.load(DM + row * stride_dm + cols, mask=msk, other=0.0).to(tl.float32)
            dg, du = activation_bwd(g, dm, u, ACT)
            tl.store(DGU + row * stride_dgu + I + cols, to_dtype(du, DGU.dtype.element_ty),
                     mask=msk)
        else:
            dm = tl.load(DM + row * stride_dm + cols, mask=msk, other=0.0).to(tl.float32)
            dg, _ = activation_bwd(g, dm, 1.0, ACT)
        tl.store(DGU + row * stride_dgu + cols, to_dtype(dg, DGU.dtype.element_ty), mask=msk)


def _grid(rows: int, inter: int):
    block = min(BLOCK, triton.next_power_of_2(inter))
    return (rows, triton.cdiv(inter, block)), block


def _inter(width: int, gated: bool) -> int:
    if gated and width % 2:
        raise ValueError(f"a gated activation expects an even last dim [gate | up], got {width}")
    return width // 2 if gated else width


def act_fwd(gu: torch.Tensor, act, gated: bool) -> torch.Tensor:
    """f(g) * u for gu = [g | u] along the last dim (gated; returns (..., I)), or f(gu)."""
    code = int(Activation.named(act))
    width = gu.shape[-1]
    inter = _inter(width, gated)
    gu2 = _rows(gu, width)
    m = torch.empty(gu2.shape[0], inter, dtype=gu.dtype, device=gu.device)
    if gu2.shape[0]:
        grid, block = _grid(gu2.shape[0], inter)
        _act_fwd_kernel[grid](gu2, m, gu2.stride(0), m.stride(0), inter, ACT=code,
                              GATED=gated, BLOCK_I=block, num_warps=4)
    return m.view(*gu.shape[:-1], inter)


def act_bwd(gu: torch.Tensor, dm: torch.Tensor, act, gated: bool) -> torch.Tensor:
    """The input gradient, gu's shape: [dg | du] (gated) or du, from the saved gu and the
    upstream gradient dm."""
    code = int(Activation.named(act))
    width = gu.shape[-1]
    inter = _inter(width, gated)
    gu2, dm2 = _rows(gu, width), _rows(dm, inter)
    dgu = torch.empty_like(gu2)
    if gu2.shape[0]:
        grid, block = _grid(gu2.shape[0], inter)
        _act_bwd_kernel[grid](gu2, dm2, dgu, gu2.stride(0), dm2.stride(0), dgu.stride(0), inter,
                              ACT=code, GATED=gated, BLOCK_I=block, num_warps=4)
    return dgu.view(gu.shape)


def launch_name(act, gated: bool) -> str:
    """The form's name: the gated one's as the GEMM's epilogues spell it ("swiglu"), else the
    activation's ("gelu")."""
    act = Activation.named(act)
    return act.glu if gated else act.label


def compile_launches(arch: int, dtype: str):
    """Every configuration (pifi_fast.kernels.compile_report): each activation, plain and
    gated, forward and backward, per block width, 16 to BLOCK columns of the intermediate size
    (BLOCK for every real MLP)."""
    dt = DTYPE_NAMES[dtype]
    out = []
    for act_ in Activation:
        for gated in (True, False):
            name, k = launch_name(act_, gated), 2 if gated else 1
            const = dict(ACT=int(act_), GATED=gated)
            for block in (1 << e for e in range(4, BLOCK.bit_length())):
                inter = 14336 if block == BLOCK else block  # Llama-3.1-8B's MLP: a full block
                config = f"BLOCK_I={block} warps=4"
                out.append(Launch(_act_fwd_kernel, f"{name}_fwd", config, dtype,
                                  dict(GU=Ptr(dt), M=Ptr(dt), stride_gu=Int(k * inter),
                                       stride_m=Int(inter), I=Int(inter)),
                                  dict(const, BLOCK_I=block), num_warps=4))
                out.append(Launch(_act_bwd_kernel, f"{name}_bwd", config, dtype,
                                  dict(GU=Ptr(dt), DM=Ptr(dt), DGU=Ptr(dt),
                                       stride_gu=Int(k * inter), stride_dm=Int(inter),
                                       stride_dgu=Int(k * inter), I=Int(inter)),
                                  dict(const, BLOCK_I=block), num_warps=4))
    return out
