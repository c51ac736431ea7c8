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
    "geglu_tanh", "geglu_tanh_bwd"   the same with gelu_tanh(g) * u (Gemma's MLP)
    "gelu"        C = gelu(A @ B + bias), exact erf (Falcon's plain MLP)
    "gelu_bwd"    with the saved up output u (aux, (M, N)): du = (A @ B) * gelu'(u)

Meaning: the twins below (plain matmul, then the same epilogue from pifi_fast.kernels.swiglu or
family_ops).
Accumulation is fp32 and the epilogue works on the fp32 accumulator (one rounding at the store,
one fewer than the unfused path). Row offsets are 64-bit.

Whether this kernel or cuBLAS plus a separate elementwise kernel is faster is a per-shape
question for a GPU (GUIDE §4); the layer uses cuBLAS unless asked (gemm="triton").
Tile configurations come from one table per GPU target (TILES, through tiles() and configs()),
each entry compiled and checked by pifi_fast.kernels.compile_report (tensor cores, no spills,
shared memory within the target's limit). The autotuner holds every target's tiles and prunes
to the launching device's list, then tunes once per (M rounded up to a power of two, N, K,
epilogue, dtypes); PIFI_FAST_GEMM_TUNE=0 takes the list's first tile and tunes nothing (tests).
Under Triton's interpreter tl.dot on bf16 is wrong (triton-lang/triton#11584), so CI tests this
kernel in fp32 and fp16 only.
"""
from __future__ import annotations

import os

import torch

from .common import HAS_TRITON, interpreting
from ._spec import DTYPE_NAMES, Int, Launch, Ptr
from .family_ops import geglu_tanh_bwd_ref, geglu_tanh_fwd_ref, gelu_bwd_ref, gelu_fwd_ref
from .swiglu import swiglu_bwd_ref, swiglu_fwd_ref

EPILOGUES = ("none", "swiglu", "swiglu_bwd", "geglu_tanh", "geglu_tanh_bwd", "gelu", "gelu_bwd")
# the twin of each epilogue: (function, whether it takes the saved aux first)
_EPILOGUE_REFS = {"swiglu": (swiglu_fwd_ref, False), "swiglu_bwd": (swiglu_bwd_ref, True),
                  "geglu_tanh": (geglu_tanh_fwd_ref, False),
                  "geglu_tanh_bwd": (geglu_tanh_bwd_ref, True), "gelu": (gelu_fwd_ref, False),
                  "gelu_bwd": (gelu_bwd_ref, True)}
GATED = ("swiglu", "geglu_tanh")  # B holds [gate | up]: two accumulators
GATED_BWD = ("swiglu_bwd", "geglu_tanh_bwd")  # writes [dg | du], twice the columns


# -- plain PyTorch twin ----------------------------------------------------------------------------
def gemm_ref(a, b, epilogue="none", bias=None, residual=None, aux=None):
    c = a @ b
    if bias is not None:
        c = c + bias
    if epilogue == "none":
        return c if residual is None else c + residual
    ref, takes_aux = _EPILOGUE_REFS[epilogue]
    return ref(aux, c) if takes_aux else ref(c)


# -- tile configurations per GPU target -----------------------------------------------------------
# (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps) per (target, epilogue), for 16-bit inputs.
# Every entry is compiled by pifi_fast.kernels.compile_report for its target and must use
# tensor-core instructions, spill nothing and fit the target's shared memory, under Triton 3.8
# (ptxas 12.9) and 3.6 (ptxas 12.8, torch 2.11's); the CI test tests/test_compile_report.py
# fails otherwise (`make test-gpu-image` runs it under 3.6). Before sm_90a, the 128x256 tile
# is 32 deep: at 64 deep it needs all 255 registers under 3.8 and spills 16-44 B under 3.6.
# BLOCK_N counts output columns: the "swiglu" epilogue keeps two accumulators (gate and up) and
# loads two B tiles, so its tiles are half as wide for the same registers and shared memory.
# No entry: the layer uses cuBLAS there (sm_75: Triton 3.8 compiles tl.dot to FMA on Turing,
# where even a 64x64x32 tile spills; fp32: the IEEE-exact dot runs on FMA units too, and cuBLAS
# is faster on every target).
_SMALL_M = [(32, 64, 128, 3, 4), (16, 128, 64, 4, 4)]  # CLS mode: 32 rows per batch
TILES: dict[int, dict[str, list[tuple[int, int, int, int, int]]]] = {
    90: {  # sm_90a: wgmma; 227 KB shared memory
        "none": [(128, 256, 64, 3, 8), (128, 128, 64, 4, 8), (64, 256, 64, 3, 8),
                 (128, 64, 64, 3, 8), (64, 128, 64, 3, 8), (32, 64, 128, 3, 4),
                 (16, 128, 128, 4, 4)],
        "swiglu": [(128, 128, 64, 3, 8), (128, 64, 64, 3, 8), (64, 128, 64, 3, 8),
                   (64, 64, 64, 4, 4), (16, 128, 64, 4, 4)],  # (32x64x128 spills 16 B here)
        "swiglu_bwd": [(128, 64, 64, 3, 8), (64, 128, 64, 3, 8), (64, 64, 64, 4, 4)] + _SMALL_M,
    },
    80: {  # sm_80: mma.sync; 163 KB shared memory
        "none": [(128, 256, 32, 3, 8), (128, 128, 64, 4, 8), (64, 256, 64, 3, 8),
                 (128, 64, 64, 3, 8), (64, 128, 64, 3, 8), (32, 64, 128, 3, 4),
                 (16, 128, 128, 4, 4)],
        "swiglu": [(128, 64, 64, 3, 8), (64, 128, 64, 3, 8), (64, 64, 64, 4, 4)] + _SMALL_M,
        "swiglu_bwd": [(128, 64, 64, 3, 8), (64, 128, 64, 3, 8), (64, 64, 64, 4, 4)] + _SMALL_M,
    },
}
# sm_86 and sm_89: as sm_80 but 99 KB of shared memory: fewer stages and no 16x128x128 tile
TILES[86] = TILES[89] = {
    "none": [(128, 256, 32, 3, 8), (128, 128, 64, 3, 8), (64, 256, 64, 3, 8),
             (128, 64, 64, 3, 8), (64, 128, 64, 3, 8), (32, 64, 128, 3, 4),
             (16, 64, 128, 4, 4)],
    "swiglu": [(128, 64, 64, 3, 8), (64, 128, 64, 3, 8), (64, 64, 64, 3, 4),
               (32, 64, 128, 3, 4), (32, 64, 64, 5, 2)],  # (16x128x64 needs 102 KB here)
    "swiglu_bwd": [(128, 64, 64, 3, 8), (64, 128, 64, 3, 8), (64, 64, 64, 3, 4)] + _SMALL_M,
}
GPU_ARCHS = (75, 80, 86, 89, 90)
# The Gemma and Falcon epilogues take the tiles of the one with the same accumulators, loads and
# stores (GeGLU's as SwiGLU's; gelu's one accumulator as the plain one's; gelu_bwd's one
# accumulator and one aux tile as swiglu_bwd's), each verified again by the compile report.
TILES_OF = {"geglu_tanh": "swiglu", "geglu_tanh_bwd": "swiglu_bwd", "gelu": "none",
            "gelu_bwd": "swiglu_bwd"}


def tiles(arch: int, epilogue: str, dtype: str) -> list[tuple[int, int, int, int, int]]:
    """The tile configurations the GEMM may use on a target (Triton arch number, e.g. 90 for
    sm_90a), for an epilogue and a dtype name ("bf16", "fp16", "fp32"); [] means cuBLAS."""
    if epilogue not in EPILOGUES:
        raise ValueError(f"epilogue must be one of {EPILOGUES}, got {epilogue!r}")
    if dtype == "fp32" or (dtype == "bf16" and arch < 80):
        return []
    out = list(TILES.get(arch, {}).get(TILES_OF.get(epilogue, epilogue), []))
    if epilogue == "gelu":  # erf's registers: the 128x256 tile spilled 176-520 B on every target
        out = [t for t in out if t[0] * t[1] <= 128 * 128]
    return out


def configs(arch: int, epilogue: str, dtype: str) -> list:
    """The one source of the GEMM's autotuner configs: tiles() as triton.Config objects."""
    import triton  # deferred: a Triton-only path (configs need triton installed)

    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                          num_stages=st, num_warps=w)
            for bm, bn, bk, st, w in tiles(arch, epilogue, dtype)]


def device_arch(device) -> int | None:
    """The Triton arch number of a CUDA device whose tile lists we verified, else None."""
    major, minor = torch.cuda.get_device_capability(device)
    arch = 10 * major + minor
    return arch if arch in GPU_ARCHS else None


_DTYPE_NAME = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def supported(a: torch.Tensor, epilogue: str = "none") -> bool:
    """Whether the Triton GEMM has verified tiles for this tensor's device and dtype (always
    true under the interpreter, which runs one small tile); otherwise callers use cuBLAS."""
    if interpreting():
        return HAS_TRITON
    if not (HAS_TRITON and a.is_cuda):
        return False
    arch = device_arch(a.device)
    return arch is not None and bool(tiles(arch, epilogue, _DTYPE_NAME.get(a.dtype, "")))


def _tile_of(config) -> tuple:
    kw = config.kwargs
    return (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], config.num_stages, config.num_warps)


def _prune(all_configs, named_args, **kwargs):
    """Autotuner hook: keep the launching device's tiles for this epilogue and dtype (only the
    first with PIFI_FAST_GEMM_TUNE=0, so tests run one tile and tune nothing)."""
    a = named_args["A"]
    arch = device_arch(a.device)
    wanted = tiles(arch, EPILOGUES[kwargs["EPILOGUE"]], _DTYPE_NAME[a.dtype]) if arch else []
    if os.environ.get("PIFI_FAST_GEMM_TUNE") == "0":
        wanted = wanted[:1]
    by_tile = {_tile_of(c): c for c in all_configs}
    return [by_tile[t] for t in wanted if t in by_tile]  # in the table's order


def _all_configs():
    """Every tile of every target (the autotuner prunes to the device's list at launch); one
    small tile under the interpreter, which would otherwise run every config."""
    import triton  # deferred: a Triton-only path (configs need triton installed)

    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 4})]
    seen, out = set(), []
    for arch in GPU_ARCHS:
        for epilogue in EPILOGUES:
            for c in configs(arch, epilogue, "fp16"):
                if _tile_of(c) not in seen:
                    seen.add(_tile_of(c))
                    out.append(c)
    return out


# -- Triton ----------------------------------------------------------------------------------------
if HAS_TRITON:
    import triton  # deferred: a Triton-only path (configs need triton installed)
    import triton.language as tl

    from ._round import to_dtype
    from .family_ops import gelu_f32, gelu_grad_f32, gelu_tanh_f32, gelu_tanh_grad_f32

    @triton.jit
    def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """(pid_m, pid_n) of this program in grouped order: consecutive programs share rows of
        A in L2 (the GEMMs here and in quant.py)."""
        pid = tl.program_id(0)
        n_m, n_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        group = GROUP_M * n_n
        first_m = (pid // group) * GROUP_M
        size_m = min(n_m - first_m, GROUP_M)
        return first_m + (pid % group) % size_m, (pid % group) // size_m

    # Tuned once per (rounded-up M, N, K, epilogue, dtypes): packed batches change M with every
    # batch, and re-tuning for each exact M would cost more than it gains.
    @triton.autotune(configs=_all_configs(), key=["M_BUCKET", "N", "K", "EPILOGUE", "IEEE"],
                     prune_configs_by={"early_config_prune": _prune})
    @triton.jit
    def _gemm_kernel(A, B, C, BIAS, R, AUX, M, M_BUCKET, N, K,
                     stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_rm, stride_auxm,
                     EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                     IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        # 64-bit offsets only in the per-program scalar bases; in-tile offsets stay 32-bit
        # (BLOCK x row stride < 2^31), which halves the registers the epilogue's address tiles
        # take and keeps the SwiGLU-backward epilogue out of local memory
        row0 = (pid_m * BLOCK_M).to(tl.int64)
        col0 = pid_n * BLOCK_N
        lm = tl.arange(0, BLOCK_M)
        rn = col0 + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        mm, mn = (row0 + lm) < M, rn < N
        a_ptr = (A + row0 * stride_am) + (lm[:, None] * stride_am + rk[None, :] * stride_ak)
        b_ptr = B + (rk[:, None] * stride_bk + rn[None, :].to(tl.int64) * stride_bn)
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
            if EPILOGUE == 1 or EPILOGUE == 3:  # the up columns sit N after the gate columns
                b_up = tl.load(b_ptr + N * stride_bn, mask=mk[:, None] & mn[None, :], other=0.0)
                if IEEE:
                    acc_up = tl.dot(a, b_up, acc_up, input_precision="ieee")
                else:
                    acc_up = tl.dot(a, b_up, acc_up)
            a_ptr += BLOCK_K * stride_ak
            b_ptr += BLOCK_K * stride_bk
        if HAS_BIAS:
            acc += tl.load(BIAS + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
            if EPILOGUE == 1 or EPILOGUE == 3:
                acc_up += tl.load(BIAS + N + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
        m2 = mm[:, None] & mn[None, :]
        c_ptr = (C + row0 * stride_cm) + (lm[:, None] * stride_cm + rn[None, :])
        if EPILOGUE == 1:
            out = acc * tl.sigmoid(acc) * acc_up
        elif EPILOGUE == 3:
            out = gelu_tanh_f32(acc) * acc_up
        elif EPILOGUE == 2 or EPILOGUE == 4:
            aux = (AUX + row0 * stride_auxm) + (lm[:, None] * stride_auxm + rn[None, :])
            g = tl.load(aux, mask=m2, other=0.0).to(tl.float32)
            u = tl.load(aux + N, mask=m2, other=0.0).to(tl.float32)
            if EPILOGUE == 2:
                sg = tl.sigmoid(g)
                tl.store(c_ptr + N, to_dtype(acc * g * sg, C.dtype.element_ty), mask=m2)
                out = acc * u * sg * (1.0 + g * (1.0 - sg))
            else:
                tl.store(c_ptr + N, to_dtype(acc * gelu_tanh_f32(g), C.dtype.element_ty),
                         mask=m2)
                out = acc * u * gelu_tanh_grad_f32(g)
        elif EPILOGUE == 5:
            out = gelu_f32(acc)
        elif EPILOGUE == 6:
            aux = (AUX + row0 * stride_auxm) + (lm[:, None] * stride_auxm + rn[None, :])
            out = acc * gelu_grad_f32(tl.load(aux, mask=m2, other=0.0).to(tl.float32))
        else:
            out = acc
        if HAS_RES:
            r_ptr = (R + row0 * stride_rm) + (lm[:, None] * stride_rm + rn[None, :])
            out += tl.load(r_ptr, mask=m2, other=0.0).to(tl.float32)
        tl.store(c_ptr, to_dtype(out, C.dtype.element_ty), mask=m2)



# the launches the layer makes (pifi_fast.ops), as compile_launches describes them:
# (name, orientation, epilogue, has_bias, has_residual)
LAYER_LAUNCHES = (
    ("gemm_fwd", "forward", "none", False, False),  # qkv
    ("gemm_fwd+bias", "forward", "none", True, False),  # qkv with q/k/v bias (Qwen2)
    ("gemm_fwd+residual", "forward", "none", False, True),  # o and down, residual fused
    ("gemm_fwd+swiglu", "forward", "swiglu", False, False),  # gate/up + SwiGLU
    ("gemm_fwd+swiglu+bias", "forward", "swiglu", True, False),  # with mlp_bias
    ("gemm_igrad", "input_grad", "none", False, False),  # dy @ W
    ("gemm_igrad+swiglu_bwd", "input_grad", "swiglu_bwd", False, False),  # down's dX + SwiGLU'
    ("gemm_fwd+geglu_tanh", "forward", "geglu_tanh", False, False),  # Gemma's gate/up + GeGLU
    ("gemm_igrad+geglu_tanh_bwd", "input_grad", "geglu_tanh_bwd", False, False),
    ("gemm_fwd+gelu", "forward", "gelu", False, False),  # Falcon's up + GELU
    ("gemm_fwd+gelu+bias", "forward", "gelu", True, False),  # with Falcon's `bias`
    ("gemm_igrad+gelu_bwd", "input_grad", "gelu_bwd", False, False),  # down's dX + GELU'
)


def compile_launches(arch: int, dtype: str, tile_list=None):
    """Every configuration (pifi_fast.kernels.compile_report): each tile of tiles(arch, ...)
    for each launch the layer makes, specialized as at the Llama-3.1-8B shape: forward B = W^T
    (unit stride along K), input gradient B = W (unit stride along N). ``tile_list`` overrides
    the table (for exploring candidates)."""
    dt = DTYPE_NAMES[dtype]
    m = 4099  # a packed token count: not a multiple of 16
    out = []
    for name, orientation, epilogue, bias, res in LAYER_LAUNCHES:
        n, k = (14336, 4096) if epilogue != "none" else (4096, 14336) if res else (6144, 4096)
        if orientation == "input_grad":
            n, k = (14336, 4096) if epilogue != "none" else (4096, 6144)
        width = 2 * n if epilogue in GATED_BWD else n
        b_cols = 2 * n if epilogue in GATED else n
        stride_bk, stride_bn = (1, k) if orientation == "forward" else (b_cols, 1)
        for bm, bn, bk, stages, warps in (tile_list if tile_list is not None
                                          else tiles(arch, epilogue, dtype)):
            out.append(Launch(
                _gemm_kernel.fn, name, f"{bm}x{bn}x{bk} stages={stages} warps={warps}", dtype,
                dict(A=Ptr(dt), B=Ptr(dt), C=Ptr(dt), BIAS=Ptr(dt), R=Ptr(dt), AUX=Ptr(dt),
                     M=Int(m), M_BUCKET=Int(8192), N=Int(n), K=Int(k), stride_am=Int(k),
                     stride_ak=Int(1), stride_bk=Int(stride_bk), stride_bn=Int(stride_bn),
                     stride_cm=Int(width), stride_rm=Int(n),
                     stride_auxm=Int(n if epilogue == "gelu_bwd" else 2 * n)),
                dict(EPILOGUE=EPILOGUES.index(epilogue), HAS_BIAS=bias, HAS_RES=res,
                     IEEE=dtype == "fp32", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8),
                num_warps=warps, num_stages=stages, uses_dot=True))
    return out


def gemm(a: torch.Tensor, b: torch.Tensor, epilogue: str = "none", bias=None, residual=None,
         aux=None) -> torch.Tensor:
    """a (M, K) @ b (K, N) with the epilogue (see the module docstring). b may be any strided
    view, e.g. weight.t(). For "swiglu" and "geglu_tanh", b has 2N columns [gate | up] and the
    result N; for "swiglu_bwd" and "geglu_tanh_bwd", aux is the saved gu (M, 2N) and the result
    is [dg | du] (M, 2N); for "gelu_bwd", aux is the saved up output (M, N)."""
    if epilogue not in EPILOGUES:
        raise ValueError(f"epilogue must be one of {EPILOGUES}, got {epilogue!r}")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"gemm: shapes {tuple(a.shape)} @ {tuple(b.shape)} do not chain")
    if not supported(a, epilogue):
        where = (f"compute capability {torch.cuda.get_device_capability(a.device)}" if a.is_cuda
                 else f"a {a.device.type} tensor without Triton's interpreter")
        raise RuntimeError(f"gemm: no verified tile configuration for {a.dtype} on {where} "
                           f"({epilogue!r} epilogue; see tiles() and `pifi-fast kernels`); "
                           "use cuBLAS there")
    if a.stride(-1) != 1:
        a = a.contiguous()
    m, k = a.shape
    n = b.shape[1] // 2 if epilogue in GATED else b.shape[1]
    width = 2 * n if epilogue in GATED_BWD else n
    if epilogue in GATED_BWD and (aux is None or aux.shape != (m, 2 * n)):
        raise ValueError(f"{epilogue} needs aux = the saved gate/up output of shape (M, 2N)")
    if epilogue == "gelu_bwd" and (aux is None or aux.shape != (m, n)):
        raise ValueError("gelu_bwd needs aux = the saved up output of shape (M, N)")
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
