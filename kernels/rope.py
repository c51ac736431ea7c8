"""Rotary position embedding applied in place to the q and k heads of a packed QKV buffer.

Layout: qkv is (T, W) with rows [q heads | k heads | v heads], head_dim D each; the first
(num_q_heads + num_kv_heads) heads are rotated, v is left alone, so GQA needs nothing special.
Every token t has its own position positions[t] (packed / varlen batches work), and cos/sin are
rows of tables (P, D) built from the model's own rotary module (llama3 scaling included).
Meaning, per head with halves x = [x1 | x2] and c = [c1 | c2], s = [s1 | s2] at the position
(Hugging Face's rotate_half convention):

    forward    y1 = x1 c1 - x2 s1          y2 = x2 c2 + x1 s2
    transpose  y1 = x1 c1 + x2 s2          y2 = x2 c2 - x1 s1

The transpose is the backward (the rotation is linear); for the usual tables (c1 = c2, s1 = s2)
it is the rotation by -theta. Math in fp32, one rounding at the store.
"""
from __future__ import annotations

import torch

from .common import HAS_TRITON
from ._spec import DTYPE_NAMES, Int, Launch, Ptr


# -- plain PyTorch twin ----------------------------------------------------------------------------
def rope_ref_(qkv, positions, cos, sin, num_q_heads, num_kv_heads, head_dim, transpose=False):
    t = qkv.shape[0]
    n = num_q_heads + num_kv_heads
    half = head_dim // 2
    x = qkv[:, : n * head_dim].view(t, n, head_dim)
    c = cos[positions].to(qkv.dtype)[:, None, :]
    s = sin[positions].to(qkv.dtype)[:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    c1, c2, s1, s2 = c[..., :half], c[..., half:], s[..., :half], s[..., half:]
    if transpose:
        y = torch.cat((x1 * c1 + x2 * s2, x2 * c2 - x1 * s1), dim=-1)
    else:
        y = torch.cat((x1 * c1 - x2 * s1, x2 * c2 + x1 * s2), dim=-1)
    x.copy_(y)
    return qkv


# -- Triton ----------------------------------------------------------------------------------------
# One program rotates BLOCK_H = TILE // BLOCK_D heads (at most MAX_BLOCK_H) of one token
# (BLOCK_D = half the head dim, rounded up to a power of two): at most 2048 values per half,
# 16 per thread at 4 warps, whatever the head count (a 405B layer rotates 136 q and k heads per
# token), so registers never depend on the model. MAX_BLOCK_H caps the heads per program: tiny
# head dims would otherwise make long, thin tiles (1024 x 2) whose index arithmetic spills. Only
# head dims up to 16 reach the cap.
TILE = 2048
MAX_BLOCK_H = 128
MAX_HEAD_DIM = 256

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._round import to_dtype

    @triton.jit
    def _rope_kernel(QKV, POS, COS, SIN, stride_t, stride_cos, stride_sin, n_heads, half,
                     TRANSPOSE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        pos = tl.load(POS + row).to(tl.int64)
        heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
        cols = tl.arange(0, BLOCK_D)[None, :]
        m = (heads < n_heads) & (cols < half)
        base = QKV + row * stride_t + heads * (2 * half) + cols
        x1 = tl.load(base, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(base + half, mask=m, other=0.0).to(tl.float32)
        cm = cols < half
        c1 = tl.load(COS + pos * stride_cos + cols, mask=cm, other=0.0).to(tl.float32)
        c2 = tl.load(COS + pos * stride_cos + half + cols, mask=cm, other=0.0).to(tl.float32)
        s1 = tl.load(SIN + pos * stride_sin + cols, mask=cm, other=0.0).to(tl.float32)
        s2 = tl.load(SIN + pos * stride_sin + half + cols, mask=cm, other=0.0).to(tl.float32)
        if TRANSPOSE:
            y1 = x1 * c1 + x2 * s2
            y2 = x2 * c2 - x1 * s1
        else:
            y1 = x1 * c1 - x2 * s1
            y2 = x2 * c2 + x1 * s2
        tl.store(base, to_dtype(y1, QKV.dtype.element_ty), mask=m)
        tl.store(base + half, to_dtype(y2, QKV.dtype.element_ty), mask=m)


def launch_params(head_dim: int):
    """(BLOCK_H, BLOCK_D, num_warps) for a head dim: the tile is fixed by the head dim alone."""
    block_d = 1 << max(head_dim // 2 - 1, 0).bit_length()
    return min(max(TILE // block_d, 1), MAX_BLOCK_H), block_d, 4


def compile_launches(arch: int, dtype: str):
    """Every configuration (pifi_fast.kernels.compile_report): one per head dim class (2 to
    MAX_HEAD_DIM), forward and transpose; the cos/sin tables in the compute dtype."""
    dt = DTYPE_NAMES[dtype]
    out = []
    for head_dim in (1 << k for k in range(1, MAX_HEAD_DIM.bit_length())):
        block_h, block_d, warps = launch_params(head_dim)
        width = 40 * head_dim  # Llama-3.1-8B's 32 q + 8 k heads (+ v) as the row stride
        for transpose in (False, True):
            out.append(Launch(
                _rope_kernel, "rope" + ("_transpose" if transpose else ""),
                f"BLOCK_H={block_h} BLOCK_D={block_d} warps={warps}", dtype,
                dict(QKV=Ptr(dt), POS=Ptr(torch.int64), COS=Ptr(dt), SIN=Ptr(dt),
                     stride_t=Int(width + 8 * head_dim), stride_cos=Int(head_dim),
                     stride_sin=Int(head_dim), n_heads=Int(40), half=Int(head_dim // 2)),
                dict(TRANSPOSE=transpose, BLOCK_H=block_h, BLOCK_D=block_d), num_warps=warps))
    return out


def rope_(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
          num_q_heads: int, num_kv_heads: int, head_dim: int, transpose: bool = False):
    """Rotate the q and k heads of qkv (T, W) in place; returns qkv."""
    if qkv.dim() != 2 or qkv.stride(-1) != 1:
        raise ValueError("rope_ expects a (tokens, width) buffer with contiguous rows")
    if head_dim % 2 or cos.shape[-1] != head_dim or sin.shape[-1] != head_dim:
        raise ValueError(f"rope_: head_dim {head_dim} must be even and match the cos/sin tables "
                         f"({tuple(cos.shape)}, {tuple(sin.shape)})")
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"rope_: head_dim {head_dim} > {MAX_HEAD_DIM}, the largest the kernel "
                         "is compiled and checked for")
    if positions.shape != (qkv.shape[0],):
        raise ValueError(f"rope_: positions {tuple(positions.shape)} must be ({qkv.shape[0]},)")
    n = num_q_heads + num_kv_heads
    block_h, block_d, warps = launch_params(head_dim)
    if qkv.shape[0]:
        _rope_kernel[(qkv.shape[0], triton.cdiv(n, block_h))](
            qkv, positions, cos, sin, qkv.stride(0), cos.stride(0), sin.stride(0), n,
            head_dim // 2, TRANSPOSE=transpose, BLOCK_H=block_h, BLOCK_D=block_d,
            num_warps=warps)
    return qkv
