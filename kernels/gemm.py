"""Projection GEMM with fused epilogues, for the frozen weights of the layer.

    C = A @ B (+ bias) (+ residual),  A (M, K), B (K, N) given by strides

so one kernel serves the forward projection (B = W^T, W the (N, K) frozen weight) and the input
gradient (B = W). Epilogues, chosen at compile time:

    "none"        C = A @ B (+ bias) (+ residual)
    "swiglu"      B holds [gate | up] columns (2N of them); C = silu(A @ Bg + bg) * (A @ Bu + bu),
                  the gate/up projection and SwiGLU in one pass, gu never written (inference and
                  recompute="mlp" forward)
    "swiglu_bwd"  dm = A @ B is the input gradient of the down projection; with the saved gu
                  (aux, (M, 2N)) it writes [dg | du] (M, 2N) directly, dm never written

Meaning: the twins below (plain matmul, then the same epilogue from pifi_fast.kernels.swiglu).
Accumulation is fp32 and the epilogue works on the fp32 accumulator (one rounding at the store,
one fewer than the unfused path). Row offsets are 64-bit.

Whether this kernel or cuBLAS plus a separate elementwise kernel is faster is a per-shape
question for a GPU (GUIDE §4); the layer uses cuBLAS unless asked (gemm="triton").
Autotuned over a few tile shapes per (M rounded up to a power of two, N, K, epilogue);
PIFI_FAST_GEMM_TUNE=0 (set before import) uses one fixed tile, for tests.
Under Triton's interpreter tl.dot on bf16 is wrong (triton-lang/triton#11584), so CI tests this
kernel in fp32 and fp16 only.
"""
from __future__ import annotations

import os

import torch

from . import HAS_TRITON, interpreting
from .swiglu import swiglu_bwd_ref, swiglu_fwd_ref

EPILOGUES = ("none", "swiglu", "swiglu_bwd")


# -- plain PyTorch twin ----------------------------------------------------------------------------
def gemm_ref(a, b, epilogue="none", bias=None, residual=None, aux=None):
    c = a @ b
    if bias is not None:
        c = c + bias
    if epilogue == "swiglu":
        return swiglu_fwd_ref(c)
    if epilogue == "swiglu_bwd":
        return swiglu_bwd_ref(aux, c)
    return c if residual is None else c + residual


# -- Triton ----------------------------------------------------------------------------------------
if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._round import to_dtype

    def _configs():
        if interpreting():  # the interpreter runs every config: one small one
            return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 4})]
        if os.environ.get("PIFI_FAST_GEMM_TUNE") == "0":  # tests: one config, no tuning runs
            return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8},
                                  num_stages=3, num_warps=4)]
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                              num_stages=s, num_warps=w)
                for bm, bn, bk, s, w in ((128, 128, 64, 3, 8), (128, 256, 64, 3, 8),
                                         (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
                                         (64, 64, 64, 4, 4), (16, 128, 128, 4, 4))]

    # Tuned once per (rounded-up M, N, K, epilogue): packed batches change M with every batch,
    # and re-tuning for each exact M would cost more than it gains.
    @triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K", "EPILOGUE", "IEEE"])
    @triton.jit
    def _gemm_kernel(A, B, C, BIAS, R, AUX, M, M_BUCKET, N, K,
                     stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_rm, stride_auxm,
                     EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                     IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        # grouped tile order: consecutive programs share rows of A in L2
        pid = tl.program_id(0)
        n_m, n_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        group = GROUP_M * n_n
        first_m = (pid // group) * GROUP_M
        size_m = min(n_m - first_m, GROUP_M)
        pid_m = first_m + (pid % group) % size_m
        pid_n = (pid % group) // size_m
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        rm64 = rm.to(tl.int64)
        mm, mn = rm < M, rn < N
        a_ptr = A + rm64[:, None] * stride_am + rk[None, :] * stride_ak
        b_ptr = B + rk[:, None].to(tl.int64) * stride_bk + rn[None, :].to(tl.int64) * stride_bn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            mk = (rk + k) < K
            a = tl.load(a_ptr, mask=mm[:, None] & mk[None, :], other=0.0)
            b = tl.load(b_ptr, mask=mk[:, None] & mn[None, :], other=0.0)
            # fp32 inputs: full-precision products, as torch's fp32 matmul (not tf32)
            if IEEE:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
            if EPILOGUE == 1:  # the up columns sit N columns after the gate columns
                b_up = tl.load(b_ptr + N * stride_bn, mask=mk[:, None] & mn[None, :], other=0.0)
                if IEEE:
                    acc_up = tl.dot(a, b_up, acc_up, input_precision="ieee")
                else:
                    acc_up = tl.dot(a, b_up, acc_up)
            a_ptr += BLOCK_K * stride_ak
            b_ptr += BLOCK_K * stride_bk
        if HAS_BIAS:
            acc += tl.load(BIAS + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
            if EPILOGUE == 1:
                acc_up += tl.load(BIAS + N + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
        m2 = mm[:, None] & mn[None, :]
        c_ptr = C + rm64[:, None] * stride_cm + rn[None, :]
        if EPILOGUE == 1:
            out = acc * tl.sigmoid(acc) * acc_up
        elif EPILOGUE == 2:
            aux = AUX + rm64[:, None] * stride_auxm + rn[None, :]
            g = tl.load(aux, mask=m2, other=0.0).to(tl.float32)
            u = tl.load(aux + N, mask=m2, other=0.0).to(tl.float32)
            sg = tl.sigmoid(g)
            tl.store(c_ptr + N, to_dtype(acc * g * sg, C.dtype.element_ty), mask=m2)
            out = acc * u * sg * (1.0 + g * (1.0 - sg))
        else:
            out = acc
        if HAS_RES:
            out += tl.load(R + rm64[:, None] * stride_rm + rn[None, :], mask=m2,
                           other=0.0).to(tl.float32)
        tl.store(c_ptr, to_dtype(out, C.dtype.element_ty), mask=m2)


def gemm(a: torch.Tensor, b: torch.Tensor, epilogue: str = "none", bias=None, residual=None,
         aux=None) -> torch.Tensor:
    """a (M, K) @ b (K, N) with the epilogue (see the module docstring). b may be any strided
    view, e.g. weight.t(). For "swiglu", b has 2N columns [gate | up] and the result N; for
    "swiglu_bwd", aux is the saved gu (M, 2N) and the result is [dg | du] (M, 2N)."""
    if epilogue not in EPILOGUES:
        raise ValueError(f"epilogue must be one of {EPILOGUES}, got {epilogue!r}")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"gemm: shapes {tuple(a.shape)} @ {tuple(b.shape)} do not chain")
    if a.stride(-1) != 1:
        a = a.contiguous()
    m, k = a.shape
    n = b.shape[1] // 2 if epilogue == "swiglu" else b.shape[1]
    width = 2 * n if epilogue == "swiglu_bwd" else n
    if epilogue == "swiglu_bwd" and (aux is None or aux.shape != (m, 2 * n)):
        raise ValueError("swiglu_bwd needs aux = the saved gate/up output of shape (M, 2N)")
    if residual is not None and (epilogue != "none" or residual.shape != (m, n)):
        raise ValueError("residual applies to the plain epilogue, with shape (M, N)")
    c = torch.empty(m, width, dtype=a.dtype, device=a.device)
    if m == 0:
        return c
    aux_ = aux.contiguous() if aux is not None else c
    res_ = residual.contiguous() if residual is not None else c

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    m_bucket = min(triton.next_power_of_2(m), 1 << 16)
    _gemm_kernel[grid](a, b, c, bias if bias is not None else c, res_, aux_, m, m_bucket, n, k,
                       a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0),
                       res_.stride(0), aux_.stride(0), EPILOGUE=EPILOGUES.index(epilogue),
                       HAS_BIAS=bias is not None, HAS_RES=residual is not None,
                       IEEE=a.dtype == torch.float32)
    return c
