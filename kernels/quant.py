"""8-bit frozen weights: quantization, and a GEMM that dequantizes them in its load path.

A frozen projection weight W (R, C) (R output channels, C inputs) is stored once, at load time,
as q (R, C) in 8 bits with float32 scales s (R, C // G), one per output channel and group of G
consecutive inputs (G = C: one scale per channel):

    int8   q = round(W / s) in [-127, 127],  s = max |W| over the group / 127    (symmetric)
    fp8    q = fp8_e4m3(W / s),               s = max |W| over the channel / 448

    W  ~  q * s[r, c // G]                                    (dequantize, the meaning)

dequant_gemm computes, with fp32 accumulation,

    forward       C = A @ W^T (+ bias) (+ residual)     A (M, C): activations; B = q^T
    input grad    C = A @ W                              A (M, R): dY;          B = q

reading q in 8 bits (half the bytes of bf16) and converting each tile to A's dtype right after
the load (q * s in fp32, rounded to A's dtype: exactly what the twin does), so one stored weight
serves both directions with no transposed copy. Any group G that divides C works: groups that
are multiples of 64 (or a whole row) take one scale per K tile, finer ones (GGUF Q8_0 blocks of
32, loaded as the file stores them) one per input. This is the W8A16 path: INT8 weights on every
target, FP8 weights' input gradient, and the q/k/v projections of the FP8 mode (whose error they
dominate); the FP8 mode's other forward GEMMs run through torch._scaled_mm (pifi_fast.ops).

FP8 tensors are passed to the kernel as uint8 views and bitcast inside it (Triton's interpreter,
which checks the kernel on CPUs, has no fp8 numpy type; on GPUs the bitcast is free).
"""
from __future__ import annotations

import itertools

import torch

from . import _tiles
from .common import HAS_TRITON, interpreting
from ._spec import DTYPE_NAMES, Int, Launch, Ptr

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
MODES = ("int8", "fp8")


# -- quantization (once, at load time) ------------------------------------------------------------
def group_size(columns: int, preferred: int = 128) -> int:
    """The scale group along the input dimension: the preferred size (or 64) when it divides
    the row, else the whole row (one scale per channel)."""
    for g in (preferred, 64):
        if columns % g == 0 and g < columns:
            return g
    return columns


def fine_groups(group: int, columns: int) -> bool:
    """Whether the forward GEMM loads one scale per input within a K tile (groups finer than or
    not aligned to its 64-deep tiles: GGUF Q8_0's blocks of 32) instead of one per tile."""
    return group != columns and group % 64 != 0


def quantize(w: torch.Tensor, mode: str, group: int | None = None):
    """(q, scale) for a weight (R, C): int8 with per-(channel, group) scales (group: default
    group_size(C)), or fp8 e4m3 with per-channel scales. Computed in float32."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if w.dim() != 2:
        raise ValueError(f"quantize expects a 2-D weight, got shape {tuple(w.shape)}")
    rows, cols = w.shape
    g = cols if mode == "fp8" else (group or group_size(cols))
    if cols % g:
        raise ValueError(f"group {g} does not divide the {cols} inputs of the weight")
    w32 = w.detach().float().reshape(rows, cols // g, g)
    peak = w32.abs().amax(-1, keepdim=True)
    if mode == "int8":
        scale = (peak / 127.0).clamp_min(torch.finfo(torch.float32).tiny)
        q = torch.round(w32 / scale).clamp_(-127, 127).to(torch.int8)
    else:
        scale = (peak / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
        q = (w32 / scale).to(FP8)
    return q.reshape(rows, cols).contiguous(), scale.reshape(rows, cols // g).contiguous()


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float32 weight q * s (the meaning of the stored pair)."""
    rows, cols = q.shape
    g = cols // scale.shape[1]
    return (q.float().reshape(rows, cols // g, g) * scale.reshape(rows, -1, 1)).reshape(rows, cols)


# -- plain PyTorch twin ----------------------------------------------------------------------------
def dequant_gemm_ref(a, q, scale, transposed: bool, bias=None, residual=None):
    """A @ W^T (transposed, forward) or A @ W (input gradient) with W = dequantize(q, scale)
    rounded to A's dtype, as the kernel does."""
    w = dequantize(q, scale).to(a.dtype)
    c = a @ (w.t() if transposed else w)
    if bias is not None:
        c = c + bias
    return c if residual is None else c + residual


# -- tile configurations per target (kernels/_tiles.py) ------------------------------------------
TILES = _tiles.DQ_TILES
GPU_ARCHS = _tiles.GPU_ARCHS
FP8_MIN_ARCH = 89  # e4m3 storage is a Hopper/Ada format; older GPUs use int8


def tiles(arch: int, storage: str, dtype: str,
          fine: bool = False) -> list[tuple[int, int, int, int, int]]:
    """The tiles of the dequantizing GEMM on a target for a storage ("int8" / "fp8") and an
    activation dtype name (fine: the forward with fine_groups scales); [] means the plain path
    (dequantize, then cuBLAS)."""
    if storage not in MODES:
        raise ValueError(f"storage must be one of {MODES}, got {storage!r}")
    if dtype == "fp32" or (dtype == "bf16" and arch < 80):
        return []
    if storage == "fp8" and arch < FP8_MIN_ARCH:
        return []
    table = TILES.get(arch, {}).get(storage, [])
    if not fine:
        return list(table)
    kept = [t for t in table if t not in _tiles.DQ_FINE_SPILLS.get(arch, ())]
    return kept + (_tiles.DQ_FINE_ONLY.get(arch, []) if storage == "int8" else [])




def supported(a: torch.Tensor, storage: str) -> bool:
    """Whether the Triton kernel runs for these activations and storage (always under the
    interpreter), else callers dequantize and use a dense GEMM."""
    if interpreting():
        return HAS_TRITON
    if not (HAS_TRITON and a.is_cuda):
        return False
    arch = _tiles.device_arch(a.device)
    return arch is not None and bool(tiles(arch, storage, _tiles.DTYPE_NAME.get(a.dtype, "")))


def prune_configs(all_configs, named_args, **kwargs):
    """Autotuner hook: keep the launching device's tiles for this storage and dtype."""
    a = named_args["A"]
    arch = _tiles.device_arch(a.device)
    storage = "fp8" if kwargs["FP8"] else "int8"
    wanted = tiles(arch, storage, _tiles.DTYPE_NAME[a.dtype], kwargs["FINE"]) if arch else []
    return _tiles.prune(all_configs, wanted)


def all_configs():
    """Every tile of every target, storage and group kind, or the interpreter's one tile."""
    return _tiles.pool((tiles(arch, storage, "fp16", fine) for arch in GPU_ARCHS
                        for storage, fine in itertools.product(MODES, (False, True))),
                       interpreting())


# -- Triton ----------------------------------------------------------------------------------------
if HAS_TRITON:
    import triton  # deferred: a Triton-only path (configs need triton installed)
    import triton.language as tl

    from ._round import to_dtype
    from ._tiles import grouped_tile

    @triton.autotune(configs=all_configs(),
                     key=["M_BUCKET", "N", "K", "TRANSPOSED", "FP8", "FINE"],
                     prune_configs_by={"early_config_prune": prune_configs})
    @triton.jit
    def _dequant_gemm_kernel(A, Q, S, C, BIAS, R, M, M_BUCKET, N, K, stride_am, stride_qr,
                             stride_sr, stride_cm, stride_rm, G,
                             TRANSPOSED: tl.constexpr, FP8: tl.constexpr, FINE: tl.constexpr,
                             HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, IEEE: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        row0 = (pid_m * BLOCK_M).to(tl.int64)
        lm = tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        mm, mn = (row0 + lm) < M, rn < N
        a_ptr = (A + row0 * stride_am) + (lm[:, None] * stride_am + rk[None, :])
        if TRANSPOSED:  # b[k, n] = q[n, k]: the weight's rows are the output channels
            q_ptr = Q + (rn[None, :].to(tl.int64) * stride_qr + rk[:, None])
        else:  # b[k, n] = q[k, n]: the weight's rows are the contraction
            q_ptr = Q + (rk[:, None].to(tl.int64) * stride_qr + rn[None, :])
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            mk = (rk + k0) < K
            a = tl.load(a_ptr, mask=mm[:, None] & mk[None, :], other=0.0)
            q = tl.load(q_ptr, mask=mk[:, None] & mn[None, :], other=0)
            if FP8:
                b = q.to(tl.float8e4nv, bitcast=True).to(tl.float32)
            else:
                b = q.to(tl.float32)
            if TRANSPOSED and FINE:  # scale s[n, k // G] per input: groups finer than the tile
                s = tl.load(S + rn[None, :] * stride_sr + (rk[:, None] + k0) // G,
                            mask=mk[:, None] & mn[None, :], other=0.0)
                b = b * s
            elif TRANSPOSED:  # scale s[n, k // G]: one per column within a BLOCK_K | G tile
                s = tl.load(S + rn * stride_sr + k0 // G, mask=mn, other=0.0)
                b = b * s[None, :]
            else:  # scale s[k, n // G]
                s = tl.load(S + (rk[:, None] + k0).to(tl.int64) * stride_sr + rn[None, :] // G,
                            mask=mk[:, None] & mn[None, :], other=0.0)
                b = b * s
            if IEEE:  # fp32 activations: full-precision products, as torch's fp32 matmul
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:  # the dequantized tile rounded to A's dtype, as the twin rounds W
                acc = tl.dot(a, to_dtype(b, A.dtype.element_ty), acc)
            a_ptr += BLOCK_K
            if TRANSPOSED:
                q_ptr += BLOCK_K
            else:
                q_ptr += BLOCK_K * stride_qr
        if HAS_BIAS:
            acc += tl.load(BIAS + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
        m2 = mm[:, None] & mn[None, :]
        if HAS_RES:
            r_ptr = (R + row0 * stride_rm) + (lm[:, None] * stride_rm + rn[None, :])
            acc += tl.load(r_ptr, mask=m2, other=0.0).to(tl.float32)
        c_ptr = (C + row0 * stride_cm) + (lm[:, None] * stride_cm + rn[None, :])
        tl.store(c_ptr, to_dtype(acc, C.dtype.element_ty), mask=m2)


# the launches the layer makes (pifi_fast.ops): (name, transposed, has_bias, has_residual)
LAYER_LAUNCHES = (
    ("dq_gemm_fwd", True, False, False),  # qkv (and gate/up in the int8 mode)
    ("dq_gemm_fwd+bias", True, True, False),  # qkv with q/k/v bias (Qwen2)
    ("dq_gemm_fwd+residual", True, False, True),  # o and down, residual fused
    ("dq_gemm_igrad", False, False, False),  # dY @ W for every projection
)


def compile_launches(arch: int, dtype: str, tile_list=None):
    """Every configuration (pifi_fast.kernels.compile_report): each tile of each storage this
    target runs, for each launch the layer makes, specialized at the Llama-3.1-8B shape (scale
    groups of 128; int8 forward launches also with GGUF Q8_0's groups of 32, "int8-g32").
    ``tile_list`` overrides the tables (exploring candidates)."""
    dt = DTYPE_NAMES[dtype]
    out = []
    # (storage, its name in the report, scale group: None = one per channel)
    variants = [("int8", "int8", 128), ("int8", "int8-g32", 32), ("fp8", "fp8", None)]
    for storage, label, group in variants:
        for name, transposed, bias, res in LAYER_LAUNCHES:
            rows, cols = (4096, 14336) if res else (6144, 4096)  # the weight (R, C)
            n, k = (rows, cols) if transposed else (cols, rows)
            g = group or cols
            fine = transposed and fine_groups(g, cols)
            if group == 32 and not fine:
                continue  # the input gradient's code does not depend on the group
            table = tiles(arch, storage, dtype, fine) if tile_list is None else (
                [] if dtype == "fp32" or (storage == "fp8" and arch < FP8_MIN_ARCH)
                else tile_list)
            for bm, bn, bk, stages, warps in table:
                out.append(Launch(
                    _dequant_gemm_kernel.fn, f"{name}.{label}",
                    f"{bm}x{bn}x{bk} stages={stages} warps={warps}", dtype,
                    dict(A=Ptr(dt), Q=Ptr(torch.int8 if storage == "int8" else torch.uint8),
                         S=Ptr(torch.float32), C=Ptr(dt), BIAS=Ptr(dt), R=Ptr(dt), M=Int(4099),
                         M_BUCKET=Int(8192), N=Int(n), K=Int(k), stride_am=Int(k),
                         stride_qr=Int(cols), stride_sr=Int(cols // g), stride_cm=Int(n),
                         stride_rm=Int(n), G=Int(g)),
                    dict(TRANSPOSED=transposed, FP8=storage == "fp8", FINE=fine, HAS_BIAS=bias,
                         HAS_RES=res, IEEE=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                         GROUP_M=8),
                    num_warps=warps, num_stages=stages, uses_dot=True))
    return out


def dequant_gemm(a: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, transposed: bool,
                 bias=None, residual=None) -> torch.Tensor:
    """a @ W^T (transposed=True; a (M, C)) or a @ W (a (M, R)) for the stored 8-bit weight
    W ~ q * scale (q (R, C) int8 or float8_e4m3fn, scale (R, C // G) float32)."""
    if q.dtype not in (torch.int8, FP8):
        raise ValueError(f"dequant_gemm: q must be int8 or float8_e4m3fn, got {q.dtype}")
    rows, cols = q.shape
    k, n = (cols, rows) if transposed else (rows, cols)
    if a.dim() != 2 or a.shape[1] != k:
        raise ValueError(f"dequant_gemm: activations {tuple(a.shape)} do not chain with the "
                         f"weight {tuple(q.shape)} ({'forward' if transposed else 'input grad'})")
    if scale.dtype != torch.float32 or scale.shape[0] != rows or cols % scale.shape[1]:
        raise ValueError(f"dequant_gemm: scale {tuple(scale.shape)} {scale.dtype} does not fit "
                         f"the weight {tuple(q.shape)}")
    group = cols // scale.shape[1]
    storage = "fp8" if q.dtype == FP8 else "int8"
    if not supported(a, storage):
        raise RuntimeError(f"dequant_gemm: no verified tiles for {storage} weights with {a.dtype}"
                           f" activations on this device; use dequant_gemm_ref")
    if residual is not None and residual.shape != (a.shape[0], n):
        raise ValueError("residual must have shape (M, N)")
    a = a if a.stride(-1) == 1 else a.contiguous()
    m = a.shape[0]
    c = torch.empty(m, n, dtype=a.dtype, device=a.device)
    if m == 0:
        return c
    res = residual.contiguous() if residual is not None else c
    qv = q.view(torch.uint8) if q.dtype == FP8 else q

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    _tiles.launch(_dequant_gemm_kernel, grid, prune_configs, {"A": a},
                  (a, qv, scale, c, bias if bias is not None else c, res, m,
                   min(triton.next_power_of_2(m), 1 << 16), n, k, a.stride(0), q.stride(0),
                   scale.stride(0), c.stride(0), res.stride(0), group),
                  dict(TRANSPOSED=transposed, FP8=q.dtype == FP8,
                       FINE=transposed and fine_groups(group, cols), HAS_BIAS=bias is not None,
                       HAS_RES=residual is not None, IEEE=a.dtype == torch.float32))
    return c
