"""Projection GEMM with fused epilogues, for the frozen weights of the layer.

    C = A @ B (+ bias) (+ residual),  A (M, K), B (K, N) given by strides

so one kernel serves the forward projection (B = W^T, W the (N, K) frozen weight) and the input
gradient (B = W). Epilogues, chosen by name at compile time, for each activation f of
kernels/activations.py (silu, gelu_tanh, gelu):

    "none"          C = A @ B (+ bias) (+ residual)
    f's glu name    ("swiglu", "geglu_tanh", "geglu") B holds [gate | up] columns (2N of them);
                    C = f(A @ Bg + bg) * (A @ Bu + bu): the gate/up projection and the gated
                    activation in one pass, gu never written (inference and recompute="mlp")
    ... + "_bwd"    dm = A @ B is the input gradient of the down projection; with the saved gu
                    (aux, (M, 2N)) it writes [dg | du] (M, 2N) directly, dm never written
    f's name        ("silu", "gelu_tanh", "gelu") C = f(A @ B + bias) (Falcon's plain MLP)
    ... + "_bwd"    with the saved up output u (aux, (M, N)): du = (A @ B) * f'(u)

Meaning: the twins below (plain matmul, then the same activation's twin from activations.py).
Accumulation is fp32 and the epilogue works on the fp32 accumulator (one rounding at the store,
one fewer than the unfused path). Row offsets are 64-bit.

Whether this kernel or cuBLAS plus a separate elementwise kernel is faster is a per-shape
question for a GPU; the layer uses cuBLAS unless asked (gemm="triton"). Tile configurations
come from one table per GPU target (kernels/_tiles.py, through tiles() and configs()), each
entry compiled and checked by pifi_fast.kernels.compile_report. The autotuner holds every
target's tiles and prunes to the launching device's list, then tunes once per (M rounded up to a
power of two, N, K, epilogue, dtypes); under torch.use_deterministic_algorithms(True) (or
PIFI_FAST_GEMM_TUNE=0) it takes the list's first tile and tunes nothing (_tiles.launch). Under
Triton's interpreter tl.dot on bf16 is wrong (triton-lang/triton#11584), so CI tests this
kernel in fp32 and fp16 only.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from . import _tiles, modes
from . import activations as _act
from .common import HAS_TRITON, interpreting
from ._spec import DTYPE_NAMES, Int, Launch, Ptr
from ._tiles import GPU_ARCHS, device_arch  # noqa: F401  (the module's public names)
from .modes import Activation, Epilogue


class EpilogueSpec(NamedTuple):
    """An epilogue's compile-time constants: what follows the dot, the activation (NO_ACT,
    which the kernel never reads, for the plain epilogue) and whether B holds [gate | up]."""

    epilogue: Epilogue
    act: int
    gated: bool

    @property
    def constexprs(self) -> dict:
        return dict(EPILOGUE=int(self.epilogue), ACT=int(self.act), GATED=self.gated)


NO_ACT = 0  # the ACT constant of the plain epilogue: no member of Activation


def _epilogues() -> dict[str, EpilogueSpec]:
    out = {"none": EpilogueSpec(Epilogue.NONE, NO_ACT, False)}
    for act in Activation:
        for gated in (True, False):
            name = _act.launch_name(act, gated)
            out[name] = EpilogueSpec(Epilogue.ACT, act, gated)
            out[name + "_bwd"] = EpilogueSpec(Epilogue.ACT_GRAD, act, gated)
    return out


SPECS = _epilogues()
EPILOGUES = tuple(SPECS)  # every epilogue's name
GATED = tuple(n for n, e in SPECS.items() if e.gated and e.epilogue == Epilogue.ACT)
GATED_BWD = tuple(n for n, e in SPECS.items() if e.gated and e.epilogue == Epilogue.ACT_GRAD)
TILES = _tiles.GEMM_TILES


def _spec(epilogue: str) -> EpilogueSpec:
    if epilogue not in SPECS:
        raise ValueError(f"epilogue must be one of {EPILOGUES}, got {epilogue!r}")
    return SPECS[epilogue]


# -- plain PyTorch twin ----------------------------------------------------------------------------
def gemm_ref(a, b, epilogue="none", bias=None, residual=None, aux=None):
    c = a @ b
    if bias is not None:
        c = c + bias
    spec = _spec(epilogue)
    if spec.epilogue == Epilogue.NONE:
        return c if residual is None else c + residual
    if spec.epilogue == Epilogue.ACT:
        return _act.act_fwd_ref(c, spec.act, spec.gated)
    return _act.act_bwd_ref(aux, c, spec.act, spec.gated)


def tiles(arch: int, epilogue: str, dtype: str) -> list[tuple[int, int, int, int, int]]:
    """The tile configurations the GEMM may use on a target (Triton arch number, e.g. 90 for
    sm_90a), for an epilogue and a dtype name ("bf16", "fp16", "fp32"); [] means cuBLAS."""
    spec = _spec(epilogue)
    if dtype == "fp32" or (dtype == "bf16" and arch < 80):
        return []
    # the tiles of the epilogue with the same accumulators, loads and stores
    if spec.epilogue == Epilogue.ACT_GRAD:
        shape = "swiglu_bwd"  # one accumulator and an aux tile ([g | u] or u)
    else:
        shape = "swiglu" if spec.gated else "none"
    out = list(TILES.get(arch, {}).get(shape, []))
    if spec.epilogue == Epilogue.ACT and not spec.gated:
        out = [t for t in out if t[0] * t[1] <= _tiles.ACT_MAX_TILE_AREA]
    return out


def configs(arch: int, epilogue: str, dtype: str) -> list:
    """The one source of the GEMM's autotuner configs: tiles() as triton.Config objects."""
    return [_tiles.config_of(t) for t in tiles(arch, epilogue, dtype)]


# (EPILOGUE, ACT, GATED) -> name, for the autotuner's prune hook
_NAME_OF = {tuple(spec.constexprs.values()): name for name, spec in SPECS.items()}


def supported(a: torch.Tensor, epilogue: str = "none") -> bool:
    """Whether the Triton GEMM has verified tiles for this tensor's device and dtype (always
    true under the interpreter, which runs one small tile); otherwise callers use cuBLAS."""
    if interpreting():
        return HAS_TRITON
    if not (HAS_TRITON and a.is_cuda):
        return False
    arch = device_arch(a.device)
    return arch is not None and bool(tiles(arch, epilogue, _tiles.DTYPE_NAME.get(a.dtype, "")))


def prune_configs(all_configs, named_args, **kwargs):
    """Autotuner hook: keep the launching device's tiles for this epilogue and dtype."""
    a = named_args["A"]
    arch = device_arch(a.device)
    name = _NAME_OF[(kwargs["EPILOGUE"], kwargs["ACT"], kwargs["GATED"])]
    return _tiles.prune(all_configs,
                        tiles(arch, name, _tiles.DTYPE_NAME[a.dtype]) if arch else [])


def all_configs():
    """Every tile of every target and epilogue, or the interpreter's one small tile."""
    return _tiles.pool((tiles(arch, e, "fp16") for arch in GPU_ARCHS for e in EPILOGUES),
                       interpreting())


# -- Triton ----------------------------------------------------------------------------------------
if HAS_TRITON:
    import triton  # deferred: a Triton-only path (configs need triton installed)
    import triton.language as tl

    from ._round import to_dtype
    from ._tiles import grouped_tile
    from .activations import activation, activation_bwd

    # Tuned once per (rounded-up M, N, K, epilogue, dtypes): packed batches change M with every
    # batch, and re-tuning for each exact M would cost more than it gains.
    @triton.autotune(configs=all_configs(),
                     key=["M_BUCKET", "N", "K", "EPILOGUE", "ACT", "GATED", "IEEE"],
                     prune_configs_by={"early_config_prune": prune_configs})
    @triton.jit
    def _gemm_kernel(A, B, C, BIAS, R, AUX, M, M_BUCKET, N, K,
                     stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_rm, stride_auxm,
                     EPILOGUE: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr,
                     HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
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
            if EPILOGUE == modes.Epilogue.ACT and GATED:  # up columns sit N after the gate's
                b_up = tl.load(b_ptr + N * stride_bn, mask=mk[:, None] & mn[None, :], other=0.0)
                if IEEE:
                    acc_up = tl.dot(a, b_up, acc_up, input_precision="ieee")
                else:
                    acc_up = tl.dot(a, b_up, acc_up)
            a_ptr += BLOCK_K * stride_ak
            b_ptr += BLOCK_K * stride_bk
        if HAS_BIAS:
            acc += tl.load(BIAS + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
            if EPILOGUE == modes.Epilogue.ACT and GATED:
                acc_up += tl.load(BIAS + N + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
        m2 = mm[:, None] & mn[None, :]
        c_ptr = (C + row0 * stride_cm) + (lm[:, None] * stride_cm + rn[None, :])
        if EPILOGUE == modes.Epilogue.ACT:
            out = activation(acc, ACT)
            if GATED:
                out = out * acc_up
        elif EPILOGUE == modes.Epilogue.ACT_GRAD:
            aux = (AUX + row0 * stride_auxm) + (lm[:, None] * stride_auxm + rn[None, :])
            g = tl.load(aux, mask=m2, other=0.0).to(tl.float32)
            if GATED:  # aux is [g | u]; du goes N columns after dg
                u = tl.load(aux + N, mask=m2, other=0.0).to(tl.float32)
                out, du = activation_bwd(g, acc, u, ACT)
                tl.store(c_ptr + N, to_dtype(du, C.dtype.element_ty), mask=m2)
            else:
                out, _ = activation_bwd(g, acc, 1.0, ACT)
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
        spec = _spec(epilogue)
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
                     stride_auxm=Int(2 * n if spec.gated else n)),
                dict(spec.constexprs, HAS_BIAS=bias, HAS_RES=res,
                     IEEE=dtype == "fp32", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8),
                num_warps=warps, num_stages=stages, uses_dot=True))
    return out


def gemm(a: torch.Tensor, b: torch.Tensor, epilogue: str = "none", bias=None, residual=None,
         aux=None) -> torch.Tensor:
    """a (M, K) @ b (K, N) with the epilogue (see the module docstring). b may be any strided
    view, e.g. weight.t(). For a gated epilogue ("swiglu", "geglu_tanh"), b has 2N columns
    [gate | up] and the result N; for its backward ("swiglu_bwd"), aux is the saved gu (M, 2N)
    and the result is [dg | du] (M, 2N); for a plain activation's backward ("gelu_bwd"), aux is
    the saved up output (M, N)."""
    spec = _spec(epilogue)
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
    if (spec.epilogue == Epilogue.ACT_GRAD and not spec.gated
            and (aux is None or aux.shape != (m, n))):
        raise ValueError(f"{epilogue} needs aux = the saved up output of shape (M, N)")
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
    _tiles.launch(_gemm_kernel, grid, prune_configs, {"A": a},
                  (a, b, c, bias if bias is not None else c, res_, aux_, m, m_bucket, n, k,
                   a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0),
                   res_.stride(0), aux_.stride(0)),
                  dict(spec.constexprs, HAS_BIAS=bias is not None, HAS_RES=residual is not None,
                       IEEE=a.dtype == torch.float32))
    return c
