"""Autograd for the frozen decoder layer: forward and an explicit input-gradient-only backward.

The layer runs on packed tokens: x is (T, H), the real tokens of the batch only (see
pifi_fast.attention.Segments), so padding costs nothing in any GEMM or kernel. Elementwise work
goes to the Triton kernels of pifi_fast.kernels when they can run (CUDA tensors, or CPU tensors
under Triton's interpreter) and to their plain PyTorch twins otherwise; ``kernels="torch"``
forces the twins, ``"triton"`` the kernels. layer_kernels / describe_kernels say, per op of a
family's layer, which function that is on a device, read from the same tables (_TWINS, _TRITON).
Projections (``gemm`` option):
    "cublas"  torch.ops.pifi_fast.frozen_linear (the compiled extension; bias and residual
              fused into the cuBLAS/cuBLASLt GEMM) forward, dy @ W backward; the default
    "triton"  pifi_fast.kernels.gemm with fused epilogues: residual adds on O and down, SwiGLU
              on the gate/up output when gu need not be kept (inference, recompute="mlp"),
              SwiGLU-backward on the down projection's input gradient. Where the GEMM has no
              verified tile configuration (pifi_fast.kernels.gemm.tiles: sm_75, fp32, GPUs we
              have no report for) that projection takes the cuBLAS path instead, and the layer
              says so once.

Chain rule (weights frozen, so only d/dx; ``@W`` is x @ W^T forward and dy @ W backward):

    h   = rms(x; w_in)                      dx  = rms_bwd(x; dh) + dx2      (dres folded in)
    qkv = rope(h @Wqkv (+b))                dh  = rope^T(dqkv) @Wqkv         (rope^T in place)
    a   = attn(q, k, v)                     dq, dk, dv = attn_bwd(da)       (recomputed fwd)
    x2  = x + a @Wo                         da  = dx2 @Wo
    gu  = rms(x2; w_post) @Wgu              dx2 = rms_bwd(x2; dgu @Wgu) + dout
    out = x2 + swiglu(gu) @Wd               dgu = swiglu_bwd(gu, dout @Wd)

Saved between forward and backward (memory modes):
    recompute="none"  x, x2, the rotated qkv, gu (all in the compute dtype), the two fp32 1/rms
                      vectors and the int64 positions: at the Llama-3.1-8B shape in bf16
                      8192 + 8192 + 12288 + 57344 + 8 + 8 = 86,032 B per token (measured the
                      same way, the Hugging Face layer with SDPA keeps 152,456 B).
    recompute="mlp"   the same without gu (re-made in backward from x2 with one extra gate/up
                      GEMM): 28,688 B per token.
On GPU attention keeps nothing of its own: backward re-runs the attention forward under
autograd and differentiates it. That costs one extra attention forward (about 2 % of the layer's
FLOPs at 512 tokens) and lets every backend (flash-attn, PyTorch varlen, SDPA) be used unchanged.
On CPU (eager, recompute="none") the attention's autograd graph is kept from forward instead
(its output and log-sum-exp, and with padding SDPA's padded q/k/v copies), because there the
re-run forward cost 3-6 % of the layer's forward + backward; see _forward.

CLS mode (every sequence is one token) takes the exact shortcut: softmax over one key is 1 and
RoPE never touches v, so attention is v repeated over each KV head's query group (soft-capping
and windows change nothing there).

Other families (the layer's LayerSpec, pifi_fast.families) change three things in the chain
above, each with its backward beside it:
    norms       Gemma's (1 + w) RMSNorm and Falcon's LayerNorm (kernels/family_ops)
    block       sandwich (Gemma-2/3): x2 = x + na(a @Wo), out = x2 + nm(mlp); saved besides:
                the two normed inputs (a @Wo and the MLP's output) and their 1/std ("extra",
                2H per token, and "extra_stats");
                parallel (Falcon): x2 = x + a @Wo, out = x2 + mlp(n2(x)): the MLP reads x, so
                x2 is not saved and dx gets the MLP branch's input gradient added
    activation  gelu_tanh(g) * u or gelu(u) instead of silu(g) * u (kernels/family_ops, and
                the Triton GEMM's geglu_tanh / gelu epilogues and their backward)
Soft-capped scores (Gemma-2) go to pifi_fast.attention with the softcap.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import os
import warnings
import weakref
from types import SimpleNamespace
from typing import NamedTuple, Optional

import torch

from pifi_fast import attention as attn
from pifi_fast.kernels import common as kernels
from pifi_fast._ext import frozen_linear
from pifi_fast.kernels import family_ops as _fam
from pifi_fast.kernels import gemm as _gemm
from pifi_fast.kernels import quant as _quant
from pifi_fast.kernels import rms_norm as _rms
from pifi_fast.kernels import rope as _rope
from pifi_fast.kernels import swiglu as _swiglu

KERNEL_CHOICES = ("auto", "triton", "torch")
RECOMPUTE_CHOICES = ("none", "mlp")
GEMM_CHOICES = ("cublas", "triton")
WEIGHT_CHOICES = ("auto", "int8", "int8-channel", "fp8")


class QuantWeight(NamedTuple):
    """An 8-bit frozen projection weight (pifi_fast.kernels.quant): q (R, C) int8 or fp8 e4m3,
    scale (R, C // G) float32; W ~ q * scale."""

    q: torch.Tensor
    scale: torch.Tensor

    @property
    def storage(self) -> str:
        return "fp8" if self.q.dtype == _quant.FP8 else "int8"


_TWINS = SimpleNamespace(rms_fwd=_rms.rms_norm_fwd_ref, rms_bwd=_rms.rms_norm_bwd_ref,
                         swiglu_fwd=_swiglu.swiglu_fwd_ref, swiglu_bwd=_swiglu.swiglu_bwd_ref,
                         norm_fwd=_fam.norm_fwd_ref, norm_bwd=_fam.norm_bwd_ref,
                         act_fwd=_fam.act_fwd_ref, act_bwd=_fam.act_bwd_ref,
                         rope_=_rope.rope_ref_, name="torch")
_TRITON = (SimpleNamespace(rms_fwd=_rms.rms_norm_fwd, rms_bwd=_rms.rms_norm_bwd,
                           swiglu_fwd=_swiglu.swiglu_fwd, swiglu_bwd=_swiglu.swiglu_bwd,
                           norm_fwd=_fam.norm_fwd, norm_bwd=_fam.norm_bwd,
                           act_fwd=_fam.act_fwd, act_bwd=_fam.act_bwd,
                           rope_=_rope.rope_, name="triton") if kernels.HAS_TRITON else None)
# The Triton GEMM's epilogue for each MLP activation (pifi_fast.kernels.gemm); the one named
# "<epilogue>_bwd" applies the activation's backward to the down projection's input gradient.
ACT_EPILOGUE = {"silu": "swiglu", "gelu_tanh": "geglu_tanh", "gelu": "gelu"}


def _kernel_choice(choice: str) -> str:
    """The layer's kernels option with $PIFI_FAST_KERNELS applied (it overrides "auto")."""
    return os.environ.get("PIFI_FAST_KERNELS", "auto") if choice == "auto" else choice


def elementwise_impl(x: torch.Tensor, choice: str = "auto") -> SimpleNamespace:
    """The kernels or their twins for tensor x. $PIFI_FAST_KERNELS overrides "auto"."""
    return impl_on(x.device.type, choice)


def impl_on(device_type: str, choice: str = "auto") -> SimpleNamespace:
    """What elementwise_impl picks for a tensor of this device type ("cuda", "cpu", ...): _TRITON
    or _TWINS. Needs no tensor, so CUDA's choice can be described on a machine without one."""
    choice = _kernel_choice(choice)
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {choice!r}")
    if choice == "torch":
        return _TWINS
    if choice == "triton":
        if not (kernels.HAS_TRITON and (device_type == "cuda" or kernels.interpreting())):
            raise RuntimeError(
                f"kernels='triton' needs triton and a CUDA tensor (or TRITON_INTERPRET=1 set "
                f"before triton is imported); got a {device_type} tensor, triton "
                f"{'present' if kernels.HAS_TRITON else 'missing'}")
        return _TRITON
    return _TRITON if (device_type == "cuda" and kernels.HAS_TRITON) else _TWINS


class LayerRun(SimpleNamespace):
    """What one call of the layer needs besides x: the layer, the segments, the RoPE tables,
    the options (kernels, recompute, attention backend, gemm, chunk_tokens, causal), whether a
    backward will
    follow (needs_grad) and, once forward starts, the elementwise implementation (impl)."""


_fallback_warned: set = set()


def _triton_gemm(run, x, epilogue="none") -> bool:
    """Whether this projection runs on the Triton GEMM: asked for (gemm="triton") and verified
    for x's device and dtype (else cuBLAS, with one warning per device and dtype)."""
    if run.gemm != "triton":
        return False
    if _gemm.supported(x, epilogue):
        return True
    key = (str(x.device), x.dtype, epilogue)
    if key not in _fallback_warned:
        _fallback_warned.add(key)
        arch = torch.cuda.get_device_capability(x.device) if x.is_cuda else None
        warnings.warn(f"gemm='triton': no verified tile configuration for the {epilogue!r} "
                      f"epilogue on compute capability {arch} in {x.dtype} (see `pifi-fast "
                      "kernels`); that projection uses cuBLAS", RuntimeWarning, stacklevel=4)
    return False


def gemm_path(device, dtype) -> str:
    """Which projections gemm="triton" runs on a device and dtype: "triton", "cuBLAS" or
    "triton (+ cuBLAS for <epilogues>)" (for pifi-fast info and the benchmark report)."""
    probe = torch.empty(0, device=device, dtype=dtype)
    if not kernels.can_run(probe):
        return "cuBLAS"
    missing = [e for e in _gemm.EPILOGUES if not _gemm.supported(probe, e)]
    if len(missing) == len(_gemm.EPILOGUES):
        return "cuBLAS"
    return "triton" + (f" (+ cuBLAS for {', '.join(missing)})" if missing else "")


# Device types on which the eager layer keeps attention's autograd graph for backward instead of
# re-running the attention forward there (recompute="none" only; see _forward).
KEEP_ATTENTION_GRAPH = {"cpu"}


class FrozenLayerFunction(torch.autograd.Function):
    """The whole frozen decoder layer on packed tokens as one autograd node; backward returns
    only dx. apply(x (T, H), positions (T,), run: LayerRun)."""

    @staticmethod
    def forward(ctx, x, positions, run):
        run.impl = elementwise_impl(x, run.kernels)
        if run.gemm == "triton" and not kernels.can_run(x):
            raise RuntimeError("gemm='triton' needs triton and a CUDA tensor (or Triton's "
                               f"interpreter); got a {x.device.type} tensor. Use gemm='cublas'.")
        # CPU: attention's autograd graph is kept for backward (see _forward)
        keep = (run.needs_grad and run.recompute == "none"
                and x.device.type in KEEP_ATTENTION_GRAPH)
        out, saved = _forward(run, x, positions, keep_attention=keep)
        ctx.run = run
        ctx.save_for_backward(*saved)
        return out

    @staticmethod
    def backward(ctx, dout):
        # the layer computes in its own dtype (pifi_fast.layer: the mixed-precision rule), also
        # when backward is called inside an autocast region
        with torch.autocast(dout.device.type, enabled=False):
            x = ctx.saved_tensors[0]
            dx = _input_grad(ctx.run, dout.to(x.dtype).contiguous(), *ctx.saved_tensors)
        return dx, None, None


def _proj(run, x, w, b=None, residual=None, epilogue="none"):
    """x @ w^T (+ b) (+ residual), or with an activation epilogue (ACT_EPILOGUE: the layer's
    MLP activation on the gate/up output)."""
    if isinstance(w, QuantWeight):
        y = _quant_linear(x, w, b, residual, triton=run.impl.name == "triton",
                          cpu_int8=not _twins_forced(run))
    elif _triton_gemm(run, x, epilogue):
        return _gemm.gemm(x, w.t(), epilogue, bias=b, residual=residual)
    else:
        y = frozen_linear(x, w, b, residual=residual)
    return y if epilogue == "none" else _act_fwd(run, y)


def _proj_input_grad(run, dy, w, epilogue="none", aux=None):
    """dy @ w, or with an activation's backward epilogue ("<epilogue>_bwd"): its input
    gradient ([dg | du] for the gated ones) from dm = dy @ w and the saved gate/up output aux."""
    if isinstance(w, QuantWeight):  # the stored 8-bit weight, dequantized in the GEMM's loads
        dx = (_quant.dequant_gemm(dy, w.q, w.scale, transposed=False)
              if run.impl.name == "triton" and _quant.supported(dy, w.storage) else
              _quant.dequant_gemm_ref(dy, w.q, w.scale, transposed=False))
    elif _triton_gemm(run, dy, epilogue):
        return _gemm.gemm(dy, w, epilogue, aux=aux)
    else:
        dx = dy @ w
    return dx if epilogue == "none" else _act_bwd(run, aux, dx)


def fp8_matmul_available(x: torch.Tensor) -> bool:
    """torch._scaled_mm runs FP8 GEMMs with per-row and per-column scales on CUDA from sm_89
    (Ada, Hopper) and on the CPU of recent torch (2.14; 2.11's CPU kernel asserts per-tensor
    scales only, so it is tried once per device)."""
    if not hasattr(torch, "_scaled_mm"):
        return False
    if x.is_cuda and torch.cuda.get_device_capability(x.device) < (8, 9):
        return False
    return _rowwise_scaled_mm_runs(str(x.device))


@functools.lru_cache(maxsize=None)
def _rowwise_scaled_mm_runs(device: str) -> bool:
    a = torch.zeros(16, 16, device=device).to(_quant.FP8)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1, device=device),
                         scale_b=torch.ones(1, 16, device=device), out_dtype=torch.float32)
    except RuntimeError:
        return False
    return True


def _twins_forced(run) -> bool:
    """kernels="torch" (or $PIFI_FAST_KERNELS=torch under "auto"): every step runs its plain
    PyTorch twin, the 8-bit projections included (no CPU int8 kernel)."""
    return _kernel_choice(run.kernels) == "torch"


def _quant_linear(x, w: QuantWeight, bias=None, residual=None, triton: bool = True,
                  cpu_int8: bool = True):
    """x @ W^T (+ bias) (+ residual) for an 8-bit weight: FP8 storage through torch._scaled_mm
    with the activations quantized per token (W8A8: FP8 tensor cores), INT8 storage (and FP8
    where _scaled_mm cannot run) through the dequantizing GEMM (W8A16); on the CPU, INT8 with
    one scale per output channel (weights="int8-channel", or "int8" rows whose inputs are no
    multiple of 64) through torch's weight-only int8 GEMM (int8_cpu_linear; ``cpu_int8=False``:
    kernels="torch" keeps the twin); else the twin, which dequantizes and multiplies
    (``triton=False``: kernels="torch", or CPU tensors)."""
    if w.storage == "fp8" and fp8_matmul_available(x) and x.shape[1] % 16 == 0 \
            and w.q.shape[0] % 16 == 0:
        return fp8_linear(x, w, bias, residual)
    if triton and _quant.supported(x, w.storage):
        return _quant.dequant_gemm(x, w.q, w.scale, transposed=True, bias=bias,
                                   residual=residual)
    if cpu_int8 and int8_cpu_applies(x, w):
        return int8_cpu_linear(x, w, bias, residual)
    return _quant.dequant_gemm_ref(x, w.q, w.scale, transposed=True, bias=bias,
                                   residual=residual)


# The CPU kernel's inner loop steps through K 16 inputs at a time with aligned vector loads (8
# on AVX2 and Arm): other K read past the row and return garbage or crash (measured under torch
# 2.14: K = 72 and 136 give errors of 1e9 and more, or a segfault), so those take the twin.
INT8_CPU_K_MULTIPLE = 16


def int8_cpu_applies(x: torch.Tensor, w: QuantWeight) -> bool:
    """Whether int8_cpu_linear serves x @ W^T: CPU activations (M, K) with K a multiple of 16,
    an int8 weight with one scale per output channel, and a torch whose
    _weight_int8pack_mm runs and computes what it should (probed once)."""
    return (x.device.type == "cpu" and w.q.dtype == torch.int8 and w.scale.shape[1] == 1
            and x.dim() == 2 and x.shape[0] > 0 and x.shape[1] % INT8_CPU_K_MULTIPLE == 0
            and w.q.is_contiguous() and w.q.data_ptr() % 16 == 0 and _int8pack_mm_runs())


@functools.lru_cache(maxsize=None)
def _int8pack_mm_runs() -> bool:
    """torch._weight_int8pack_mm on the CPU: present (checked on torch 2.14), and right on
    a small product (an unexpected build gives the twin, not wrong numbers)."""
    if not hasattr(torch, "_weight_int8pack_mm"):
        return False
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 32, generator=g).to(torch.bfloat16)
    q = torch.randint(-127, 128, (24, 32), generator=g, dtype=torch.int8)
    s = (torch.rand(24, generator=g) + 0.5).to(torch.bfloat16)
    try:
        y = torch._weight_int8pack_mm(a, q, s)
    except (RuntimeError, NotImplementedError):
        return False
    want = a.float() @ (q.float() * s.float()[:, None]).t()
    return (y.shape == want.shape and y.dtype == torch.bfloat16
            and bool(((y.float() - want).abs() <= 0.02 * want.abs().max()).all()))


def int8_cpu_linear(x, w: QuantWeight, bias=None, residual=None):
    """x @ W^T (+ bias) (+ residual) on the CPU for an int8 weight with per-channel scales
    (scale (N, 1)), through torch._weight_int8pack_mm(a (M, K), q (N, K), s (N,)): it converts
    the int8 rows in registers and accumulates in fp32, reading the weight in one byte. Output,
    bias and residual in x's dtype."""
    # bf16 activations: the kernel takes activations and scales in one dtype, and only its bf16
    # variant is vectorized on x86 (AVX-512 / AVX2); fp32 (and fp16) run a scalar loop slower
    # than fp32 F.linear. At 1 x 4096 -> 14336 (2 cores) the bf16 call takes 1.8-2.0 ms against
    # fp32 F.linear's 10.4 ms (17-34 ms vs 45-89 ms at 32 tokens, by machine load). The price:
    # x, the scales and the output rounded to bf16 (2^-9 relative each): 0.28-0.30 % relative
    # error on a product, against 0.65-0.87 % for the per-channel int8 weights themselves.
    # (The scales' bf16 cast costs 3 us at N = 14336: not cached.)
    a = x.to(torch.bfloat16).contiguous()
    if a.data_ptr() % 32:  # a view at an odd offset: the kernel's aligned loads need a copy
        a = a.clone()
    y = torch._weight_int8pack_mm(a, w.q, w.scale[:, 0].to(torch.bfloat16)).to(x.dtype)
    if bias is not None:
        y = y + bias
    return y if residual is None else y + residual


def fp8_linear(x, w: QuantWeight, bias=None, residual=None):
    """W8A8 FP8: x quantized per token (row scale max|x| / 448), the stored e4m3 weight with its
    per-channel scales, one torch._scaled_mm with rowwise scales, fp32 accumulation, output in
    x's dtype. cuBLASLt's contract, asserted here so that what passes on the CPU (which accepts
    any layout) also runs on a GPU: the second operand column-major (the transpose of the
    row-major weight, a view), K and N multiples of 16 (other shapes take the W8A16 path in
    _quant_linear); M is padded to a multiple of 16."""
    m, k = x.shape
    n = w.q.shape[0]
    if k % 16 or n % 16 or w.scale.shape[1] != 1:
        raise ValueError(f"fp8_linear needs K ({k}) and N ({n}) multiples of 16 and one scale per "
                         f"channel, got scales {tuple(w.scale.shape)}")
    x32 = x.float()
    sx = (x32.abs().amax(1, keepdim=True) / _quant.FP8_MAX).clamp_min(1e-12)
    pad = -m % 16
    xq = (x32 / sx).to(_quant.FP8)
    if pad:
        xq = torch.cat((xq, xq.new_zeros(pad, k)))
        sx = torch.cat((sx, sx.new_ones(pad, 1)))
    wt = w.q.t()
    assert wt.stride(0) == 1, "the FP8 weight operand must be column-major (a transposed view)"
    y = torch._scaled_mm(xq, wt, scale_a=sx, scale_b=w.scale.t(), out_dtype=x.dtype)[:m]
    if bias is not None:
        y = y + bias
    return y if residual is None else y + residual


# -- the family's steps (LayerSpec): norms, the MLP's activation, q/k norms -----------------------
def norm_op(spec) -> str:
    """Which of the table's norms (_TWINS / _TRITON) a LayerSpec's norms run through: "rms"
    (rms_fwd / rms_bwd: Llama's RMSNorm) or "norm" (norm_fwd / norm_bwd: Gemma's (1 + w)
    RMSNorm, Falcon's LayerNorm)."""
    return "rms" if spec.norm == "rms" else "norm"


def act_op(spec) -> str:
    """Which of the table's MLP activations a LayerSpec runs through: "swiglu" (swiglu_fwd /
    swiglu_bwd) or "act" (act_fwd / act_bwd: GeGLU-tanh, Falcon's GELU)."""
    return "swiglu" if spec.act == "silu" else "act"


# per-head q/k norms (LayerSpec.qk_norm): (forward, backward), plain PyTorch on every device
QK_NORMS = {"rms": (_rms.rms_norm_fwd_ref, _rms.rms_norm_bwd_ref),
            "rms_1p": (_fam.rms_norm_1p_fwd_ref, _fam.rms_norm_1p_bwd_ref)}


def layer_kernels(spec, device_type: str, choice: str = "auto") -> dict:
    """What runs each elementwise op of the fused layer that follows `spec` (a LayerSpec) on a
    device type under the kernels option `choice`: {"<norm> norm", "<act> MLP", "RoPE" and, with
    per-head q/k norms, "<kind> q/k norm": the forward function}. Read from the table the layer
    gets there (impl_on) through the norm_op / act_op it calls, so it is what runs (each
    forward's backward sits beside it in the same table). Raises impl_on's RuntimeError for
    kernels="triton" where Triton cannot run."""
    impl = impl_on(device_type, choice)
    found = {f"{spec.norm} norm": getattr(impl, norm_op(spec) + "_fwd"),
             f"{spec.act} MLP": getattr(impl, act_op(spec) + "_fwd"),
             "RoPE": impl.rope_}
    if spec.qk_norm:
        found[f"{spec.qk_norm} q/k norm"] = QK_NORMS[spec.qk_norm][0]
    return found


def kernel_name(fn) -> str:
    """A kernel or twin as describe_kernels names it: "<kernels module>.<function>"."""
    return f"{fn.__module__.rpartition('.')[2]}.{fn.__name__}"


def _listing(found: dict, labels: bool) -> str:
    """"Triton a (op), b (op), PyTorch c (op)": the functions in order, each run of one kind
    (a Triton kernel: in _TRITON; else a PyTorch twin) headed by its kind."""
    triton = [] if _TRITON is None else [f for f in vars(_TRITON).values() if callable(f)]
    text, kind = [], None
    for op, fn in found.items():
        now = "Triton" if any(fn is f for f in triton) else "PyTorch"
        name = kernel_name(fn) + (f" ({op})" if labels else "")
        text.append(name if now == kind else f"{now} {name}")
        kind = now
    return ", ".join(text)


def describe_kernels(spec, device_type: str | None = None, choice: str = "auto") -> str:
    """In words, what runs the fused layer's elementwise ops (layer_kernels) on CUDA and, when
    elsewhere, on `device_type` (default: CUDA when there is one, else the CPU), under the
    kernels option `choice`: the clause pifi-fast info --llm and the model's repr print."""
    here = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if _TRITON is None:
        devices, heads = (here,), {here: "on every device (triton not installed)"}
    else:
        devices = ("cuda",) if here == "cuda" else ("cuda", here)
        heads = {d: f"on {d.upper() if d in ('cuda', 'cpu') else d}"
                 + (" (here)" if d == here else "") for d in devices}
    parts = []
    for i, device in enumerate(devices):
        try:
            found = _listing(layer_kernels(spec, device, choice), labels=i == 0)
        except RuntimeError:
            found = "none, kernels='triton' cannot run there (the layer raises)"
        parts.append(f"{heads[device]}: {found}")
    return "; ".join(parts)


def _norm_fwd(run, x, name):
    """(y, fp32 1/std) of the layer's norm `name` ("input_norm", "post_norm", "attn_out_norm",
    "mlp_out_norm") on x: Llama's RMSNorm, Gemma's (1 + w) RMSNorm or LayerNorm with bias,
    through the kernels or their twins (run.impl)."""
    layer = run.layer
    w = getattr(layer, name + "_weight")
    if norm_op(layer.spec) == "rms":
        y, _, rstd = run.impl.rms_fwd(x, w, layer.eps)
        return y, rstd
    return run.impl.norm_fwd(x, w, layer.eps, layer.spec.norm, getattr(layer, name + "_bias"))


def _norm_bwd(run, dy, x, name, rstd, dres=None):
    """dx of the norm `name` at input x (+ dres, the gradient along the residual stream)."""
    layer = run.layer
    w = getattr(layer, name + "_weight")
    if norm_op(layer.spec) == "rms":
        return run.impl.rms_bwd(dy, x, w, rstd, dres)
    return run.impl.norm_bwd(dy, x, w, rstd, layer.spec.norm, dres)


def _act_fwd(run, gu):
    """The MLP's activation on the gate/up GEMM's output: silu(g) * u, gelu_tanh(g) * u or
    gelu(u), through the kernels or their twins."""
    spec = run.layer.spec
    return run.impl.swiglu_fwd(gu) if act_op(spec) == "swiglu" else run.impl.act_fwd(gu, spec.act)


def _act_bwd(run, gu, dm):
    spec = run.layer.spec
    return (run.impl.swiglu_bwd(gu, dm) if act_op(spec) == "swiglu"
            else run.impl.act_bwd(gu, dm, spec.act))


def _mlp_norm(layer) -> str:
    """The norm the MLP reads through: its own, or (Falcon-7B's parallel block) the input's."""
    return "post_norm" if layer.post_norm_weight is not None else "input_norm"


def _gate_up(run, src):
    """gu = norm(src) @Wgu, re-made in backward under recompute="mlp"."""
    layer = run.layer
    h2, _ = _norm_fwd(run, src, _mlp_norm(layer))
    return _proj(run, h2, layer.weight("gate_up"), layer.gate_up_bias)


def _qkv_rotated(run, impl, qkv, positions):
    """Per-head q/k norms (Qwen3, Gemma-3; plain PyTorch), then RoPE in place. qkv (T, W) is the
    raw projection; returns the rotated buffer (a new one when q/k norms apply)."""
    layer = run.layer
    if layer.q_norm_weight is not None:
        qkv = _qk_normed(layer, qkv)
    return impl.rope_(qkv, positions, run.cos, run.sin, layer.num_heads, layer.num_kv_heads,
                      layer.head_dim)


def _qk_norm_fwd(layer, x, w):
    out = QK_NORMS[layer.spec.qk_norm][0](x, w, layer.eps)  # (y, rstd) or (y, _, rstd)
    return out[0], out[-1]


def _qk_normed(layer, qkv):
    t, d = qkv.shape[0], layer.head_dim
    q, k, v = qkv.split([layer.q_size, layer.kv_size, layer.kv_size], -1)
    qn = _qk_norm_fwd(layer, q.reshape(t, -1, d), layer.q_norm_weight)[0]
    kn = _qk_norm_fwd(layer, k.reshape(t, -1, d), layer.k_norm_weight)[0]
    return torch.cat((qn.reshape(t, -1), kn.reshape(t, -1), v), -1)


def _heads(layer, qkv):
    t, d = qkv.shape[0], layer.head_dim
    q, k, v = qkv.split([layer.q_size, layer.kv_size, layer.kv_size], -1)
    return q.view(t, -1, d), k.view(t, -1, d), v.view(t, -1, d)


def _attend(run, q, k, v):
    layer = run.layer
    return attn.attention(q, k, v, run.segments, layer.scaling, run.causal, run.attention,
                          window=layer.window, softcap=layer.spec.softcap)


def _forward(run, x, positions, keep_attention: bool = False):
    """(out, saved tensors). keep_attention: attention runs under autograd and its graph is
    kept in run.attention_graph, so backward differentiates it instead of re-running the
    attention forward. FrozenLayerFunction asks for it on CPU with recompute="none"
    (KEEP_ATTENTION_GRAPH): there the re-run forward cost 3-6 % of a layer's forward + backward
    (2 cores, 4 x 512 tokens, SmolLM2 and Qwen2-0.5B shapes) and memory rarely binds; the GPU
    and recompute="mlp" keep the recompute (no extra saved bytes). The custom op that
    torch.compile traces cannot carry a graph from forward to backward: it recomputes."""
    layer, impl, spec = run.layer, run.impl, run.layer.spec
    t = x.shape[0]
    h, rstd1 = _norm_fwd(run, x, "input_norm")
    if run.segments.seq == 1:
        w_v, b_v = layer.v_weight_and_bias()
        v = _proj(run, h, w_v, b_v).view(t, layer.num_kv_heads, 1, layer.head_dim)
        a = v.expand(t, layer.num_kv_heads, layer.num_kv_groups, layer.head_dim)
        a = a.reshape(t, layer.q_size)
        qkv = None
    else:
        qkv = _proj(run, h, layer.weight("qkv"), layer.qkv_bias)
        rotated = _qkv_rotated(run, impl, qkv, positions)
        if keep_attention:
            with torch.enable_grad():
                q, k, v = (p.detach().requires_grad_() for p in _heads(layer, rotated))
                o = _attend(run, q, k, v)
            run.attention_graph = (o, (q, k, v))
            a = o.detach().reshape(t, layer.q_size)
        else:
            a = _attend(run, *_heads(layer, rotated)).reshape(t, layer.q_size)
        if layer.q_norm_weight is None:
            qkv = rotated  # save the rotated buffer: backward needs no re-rotation
    empty = x.new_empty(0)
    extra, extra_stats = empty, empty
    if spec.block == "sandwich":  # x2 = x + norm(attention's output)
        o = _proj(run, a, layer.weight("o"), layer.o_bias)
        no, rstd_o = _norm_fwd(run, o, "attn_out_norm")
        x2 = x + no
    else:  # x2 = x + attention's output (for the parallel block, out = x2 + mlp(norm(x)))
        x2 = _proj(run, a, layer.weight("o"), layer.o_bias, residual=x)
    keep_gu = run.needs_grad and run.recompute == "none"
    src = x if spec.block == "parallel" else x2
    out, rstd2, gu, m, rstd_m = _mlp_forward(run, x2, src, keep_gu)
    if spec.block == "sandwich" and run.needs_grad:  # the two norms' inputs and statistics
        extra = torch.cat((o, m), -1)
        extra_stats = torch.stack((rstd_o, rstd_m), -1)
    saved = [x, rstd1, empty if spec.block == "parallel" else x2, rstd2, positions,
             qkv if qkv is not None else empty, gu if keep_gu else empty, extra, extra_stats]
    return out, saved


def _chunks(run, t: int):
    """Token ranges for the MLP block: its (T, I)-sized temporaries (the activation's output,
    dm, [dg | du], a recomputed gu) then exist for one chunk at a time, which bounds the layer's
    peak memory; chunks of a few thousand tokens keep the GEMMs large."""
    most = run.chunk_tokens or t
    step = -(-t // -(-t // most))  # equal chunks of at most `most` (no short tail chunk)
    return [(s, min(s + step, t)) for s in range(0, t, step)]


def _mlp_forward(run, x2, src, keep_gu):
    """out = x2 + mlp(norm(src)) (sandwich: x2 + norm(mlp(...))), chunked over tokens; src is x2,
    or x for the parallel block. Returns out, the MLP norm's fp32 1/std, gu when it is to be kept
    for backward, and for the sandwich block the MLP's output before its norm and that norm's
    1/std (else None, None)."""
    layer = run.layer
    t, width = x2.shape[0], layer.gate_up_weight.shape[0]
    sandwich = layer.spec.block == "sandwich"
    chunks = _chunks(run, t)
    if len(chunks) == 1:  # one chunk: its results are the outputs (no copies into buffers)
        out, rstd2, gu, m, rstd_m = _mlp_chunk(run, x2, src, keep_gu)
        if gu is not None and gu.untyped_storage().nbytes() > gu.numel() * gu.element_size():
            gu = gu.clone()  # a row-padded GEMM output (fp8_linear): keep only the real rows
        return out, rstd2, gu, m, rstd_m
    stat = torch.promote_types(x2.dtype, torch.float32)
    out = torch.empty_like(x2)
    rstd2 = torch.empty(t, dtype=stat, device=x2.device)
    gu = torch.empty(t, width, dtype=x2.dtype, device=x2.device) if keep_gu else None
    m = torch.empty_like(x2) if sandwich else None
    rstd_m = torch.empty(t, dtype=stat, device=x2.device) if sandwich else None
    for s, e in chunks:
        out[s:e], rstd2[s:e], g, mc, rc = _mlp_chunk(run, x2[s:e], src[s:e], keep_gu)
        if keep_gu:
            gu[s:e] = g
        if sandwich:
            m[s:e], rstd_m[s:e] = mc, rc
    return out, rstd2, gu, m, rstd_m


def _mlp_chunk(run, x2, src, keep_gu):
    """(out, rstd2, gu or None, m or None, rstd_m or None) of the MLP block on these tokens."""
    layer = run.layer
    h2, rstd2 = _norm_fwd(run, src, _mlp_norm(layer))
    g, epilogue = None, ACT_EPILOGUE[layer.spec.act]
    if not keep_gu and _triton_gemm(run, h2, epilogue):
        # gu is not needed later: gate/up GEMM and activation in one pass, gu never written
        mm = _proj(run, h2, layer.weight("gate_up"), layer.gate_up_bias, epilogue=epilogue)
    else:
        g = _proj(run, h2, layer.weight("gate_up"), layer.gate_up_bias)
        mm = _act_fwd(run, g)
    if layer.spec.block == "sandwich":
        m = _proj(run, mm, layer.weight("down"), layer.down_bias)
        nm, rstd_m = _norm_fwd(run, m, "mlp_out_norm")
        return x2 + nm, rstd2, g if keep_gu else None, m, rstd_m
    out = _proj(run, mm, layer.weight("down"), layer.down_bias, residual=x2)
    return out, rstd2, g if keep_gu else None, None, None


def _mlp_input_grad(run, dout, src, rstd2, gu, m=None, rstd_m=None):
    """The MLP block's input gradient, chunked over tokens (see _chunks): with respect to src
    through the MLP's norm, plus dout along the residual where src is x2 (the parallel block's
    residual gradient is added by the caller)."""
    layer = run.layer
    name, parallel = _mlp_norm(layer), layer.spec.block == "parallel"
    epilogue = ACT_EPILOGUE[layer.spec.act] + "_bwd"
    dsrc = torch.empty_like(src)
    for s, e in _chunks(run, src.shape[0]):
        # recompute="mlp": one extra gate/up GEMM per chunk instead of keeping gu
        g = gu[s:e] if gu.numel() else _gate_up(run, src[s:e])
        dy = dout[s:e]
        if m is not None:  # sandwich: through the norm of the MLP's output first
            dy = _norm_bwd(run, dy, m[s:e], "mlp_out_norm", rstd_m[s:e])
        dgu = _proj_input_grad(run, dy, layer.weight("down"), epilogue, aux=g)
        dh2 = _proj_input_grad(run, dgu, layer.weight("gate_up"))
        dsrc[s:e] = _norm_bwd(run, dh2, src[s:e], name, rstd2[s:e],
                              None if parallel else dout[s:e])
    return dsrc


def _input_grad(run, dout, x, rstd1, x2, rstd2, positions, qkv, gu, extra, extra_stats):
    layer, impl, spec = run.layer, run.impl, run.layer.spec
    t = x.shape[0]
    if spec.block == "parallel":  # out = x2 + mlp(norm(x)), x2 = x + attn: d/dx2 is dout
        dx_mlp = _mlp_input_grad(run, dout, x, rstd2, gu)
        dx2 = dout
        da = _proj_input_grad(run, dx2, layer.weight("o"))
    elif spec.block == "sandwich":
        o, m = extra.split(layer.hidden_size, -1)
        dx2 = _mlp_input_grad(run, dout, x2, rstd2, gu, m, extra_stats[:, 1])
        do = _norm_bwd(run, dx2, o, "attn_out_norm", extra_stats[:, 0])
        da = _proj_input_grad(run, do, layer.weight("o"))
    else:
        dx2 = _mlp_input_grad(run, dout, x2, rstd2, gu)
        da = _proj_input_grad(run, dx2, layer.weight("o"))
    if run.segments.seq == 1:
        w_v, _ = layer.v_weight_and_bias()
        dv = da.view(t, layer.num_kv_heads, layer.num_kv_groups, layer.head_dim).sum(2)
        dh = _proj_input_grad(run, dv.reshape(t, layer.kv_size), w_v)
    else:
        qk_norm = layer.q_norm_weight is not None
        graph = getattr(run, "attention_graph", None)
        if graph is not None:  # kept by forward (keep_attention); usable for one backward
            run.attention_graph = None
            o, leaves = graph
            dq, dk, dv = torch.autograd.grad(o, leaves, da.view_as(o))
        else:
            rotated = _qkv_rotated(run, impl, qkv, positions) if qk_norm else qkv
            with _autograd_admitted(), torch.enable_grad():
                q, k, v = (p.detach().requires_grad_() for p in _heads(layer, rotated))
                o = _attend(run, q, k, v)
                dq, dk, dv = torch.autograd.grad(o, (q, k, v), da.view_as(o))
        dqkv = torch.cat((dq.reshape(t, -1), dk.reshape(t, -1), dv.reshape(t, -1)), -1)
        impl.rope_(dqkv, positions, run.cos, run.sin, layer.num_heads, layer.num_kv_heads,
                   layer.head_dim, transpose=True)
        if qk_norm:
            dqkv = _qk_norm_input_grad(layer, qkv, dqkv)
        dh = _proj_input_grad(run, dqkv, layer.weight("qkv"))
    dres = dx2 if spec.block != "parallel" else dx2 + dx_mlp
    return _norm_bwd(run, dh, x, "input_norm", rstd1, dres)


@contextlib.contextmanager
def _autograd_admitted():
    """Autograd recording even inside a custom op's implementation (pifi_fast::frozen_layer_
    backward under torch.compile), where PyTorch excludes autograd's dispatch keys: the attention
    backward differentiates its recomputed forward with autograd, whatever the backend."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    if not (exclude.has(torch._C.DispatchKey.AutogradOther)
            or exclude.has(torch._C.DispatchKey.AutogradCPU)):
        yield  # the usual case: nothing excluded
        return
    autograd = (torch._C.DispatchKeySet(torch._C.DispatchKey.AutogradCPU)
                | torch._C.DispatchKeySet(torch._C.DispatchKey.ADInplaceOrView))
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(),
                                         exclude - autograd):
        yield


def _qk_norm_input_grad(layer, qkv_raw, dqkv):
    t, d = qkv_raw.shape[0], layer.head_dim
    raw = qkv_raw.split([layer.q_size, layer.kv_size, layer.kv_size], -1)
    grads = dqkv.split([layer.q_size, layer.kv_size, layer.kv_size], -1)
    out = []
    for r, g, w in ((raw[0], grads[0], layer.q_norm_weight),
                    (raw[1], grads[1], layer.k_norm_weight)):
        r = r.reshape(t, -1, d)
        _, rstd = _qk_norm_fwd(layer, r, w)
        bwd = QK_NORMS[layer.spec.qk_norm][1]
        out.append(bwd(g.reshape(t, -1, d), r, w, rstd).reshape(t, -1))
    return torch.cat((out[0], out[1], grads[2]), -1)


# -- the layer as one custom op, for torch.compile -----------------------------------------------
# Under torch.compile the whole layer (unpadding with its host sync, every data-dependent size,
# the kernels and GEMMs) is the opaque op pifi_fast::frozen_layer, so the model around it traces
# into one graph. The backward is a second op fed by what the forward returns besides the output:
# the tensors FrozenLayerFunction saves (x is the op's own input, re-packed in backward from the
# mask). Those hold the T real tokens in their first T rows of B*S: static shapes, so a plain
# torch.compile needs no data-dependent sizes (the price, in compiled mode with padding only: the
# saved tensors are sized for every position and copied there once). Frozen weights are read
# from the layer object, found through a registry of live layers by an integer id, which each
# layer object gets when it is built, copied or unpickled (register_layer): an int attribute
# Dynamo reads as a constant of the graph. (Computing it lazily inside the traced call, as an
# assume_constant_result function of the layer, works on torch 2.14 but fails to trace on 2.11,
# the GPU image's: "UnspecializedNNModuleVariable(FrozenLlamaLayer) is not a constant".)
_LAYER_IDS = itertools.count()
_LAYERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def register_layer(layer) -> int:
    """Give a layer object its own registry id (FrozenLlamaLayer calls it when it is built, and
    when it is copied or unpickled: a copy, perhaps with other options, never runs as its
    original)."""
    lid = next(_LAYER_IDS)
    _LAYERS[lid] = layer
    layer._op_id = lid
    return lid


def _layer_id(layer) -> int:
    """The layer's registry id; in eager mode also checked (a layer object made some way that
    bypassed __init__ and __setstate__ gets its own id here; torch.compile reads the attribute)."""
    lid = layer._op_id
    if not torch.compiler.is_compiling() and _LAYERS.get(lid) is not layer:
        lid = register_layer(layer)
    return lid


def _lookup(layer_id: int):
    layer = _LAYERS.get(layer_id)
    if layer is None:
        raise RuntimeError(f"pifi_fast::frozen_layer: layer {layer_id} no longer exists")
    return layer


def frozen_layer_op(layer, x, attention_mask, position_ids):
    """The layer through pifi_fast::frozen_layer (the path torch.compile traces), or through
    pifi_fast::frozen_layer_dense when nothing in the call needs the host: no padding mask to
    unpad (none given, or one token per row as in [CLS] mode) and no position ids to bound."""
    mask = None if attention_mask is None or x.shape[1] == 1 else attention_mask
    needs_grad = torch.is_grad_enabled() and x.requires_grad
    op = (torch.ops.pifi_fast.frozen_layer if mask is not None or position_ids is not None
          else torch.ops.pifi_fast.frozen_layer_dense)
    return op(x, mask, position_ids, _layer_id(layer), needs_grad)[0]


def _frozen_layer(x: torch.Tensor, mask: Optional[torch.Tensor],
                  position_ids: Optional[torch.Tensor], layer_id: int,
                  needs_grad: bool) -> list[torch.Tensor]:
    layer = _lookup(layer_id)
    flat, positions, seg, run = layer.pack(x, mask, position_ids, needs_grad)
    run.impl = elementwise_impl(flat, run.kernels)
    out, saved = _forward(run, flat, positions)
    _, rstd1, x2, rstd2, _, qkv, gu, extra, extra_stats = saved
    rows = x.shape[0] * x.shape[1]
    return [layer.unpack(x, out, seg)] + [_padded(t, rows) for t in (rstd1, x2, rstd2, qkv, gu,
                                                                      extra, extra_stats)]


def _padded(t: torch.Tensor, rows: int) -> torch.Tensor:
    """t's T rows as the first rows of a (rows, ...) tensor (t itself when nothing is padded;
    an empty placeholder stays empty, a fresh one: a custom op's outputs may not alias)."""
    if t.numel() == 0:
        return t.new_empty(0)
    if t.shape[0] == rows:
        return t
    full = t.new_empty((rows,) + tuple(t.shape[1:]))
    full[: t.shape[0]] = t
    return full


def _frozen_layer_fake(x, mask, position_ids, layer_id, needs_grad):
    layer = _lookup(layer_id)
    b, s, h = x.shape
    t = b * s  # saved rows are padded to every position (see above)
    stat = torch.promote_types(x.dtype, torch.float32)
    block = layer.spec.block
    qkv = (x.new_empty(t, layer.q_size + 2 * layer.kv_size) if s > 1 else x.new_empty(0))
    keep_gu = needs_grad and layer.recompute == "none"
    gu = x.new_empty(t, layer.gate_up_weight.shape[0]) if keep_gu else x.new_empty(0)
    x2 = x.new_empty(0) if block == "parallel" else x.new_empty(t, h)
    sandwich = block == "sandwich" and needs_grad  # (what _forward saves for backward)
    extra = x.new_empty(t, 2 * h) if sandwich else x.new_empty(0)
    extra_stats = x.new_empty(t, 2, dtype=stat) if sandwich else x.new_empty(0)
    return [torch.empty_like(x), x.new_empty(t, dtype=stat), x2, x.new_empty(t, dtype=stat), qkv,
            gu, extra, extra_stats]


def _frozen_layer_backward(dout: torch.Tensor, x: torch.Tensor, mask: Optional[torch.Tensor],
                           position_ids: Optional[torch.Tensor], rstd1: torch.Tensor,
                           x2: torch.Tensor, rstd2: torch.Tensor, qkv: torch.Tensor,
                           gu: torch.Tensor, extra: torch.Tensor, extra_stats: torch.Tensor,
                           layer_id: int) -> torch.Tensor:
    layer = _lookup(layer_id)
    flat, positions, seg, run = layer.pack(x, mask, position_ids, True)
    run.impl = elementwise_impl(flat, run.kernels)
    t = flat.shape[0]  # the saved tensors' first t rows are the real tokens'
    rstd1, rstd2 = rstd1[:t], rstd2[:t]
    x2, qkv, gu, extra, extra_stats = (v[:t] if v.numel() else v
                                       for v in (x2, qkv, gu, extra, extra_stats))
    b, s, h = x.shape
    d = dout.reshape(b * s, h)
    if seg.indices is not None:
        d = d.index_select(0, seg.indices)
    with torch.autocast(dout.device.type, enabled=False):
        dx = _input_grad(run, d.to(flat.dtype).contiguous(), flat, rstd1, x2, rstd2,
                         positions, qkv, gu, extra, extra_stats)
    if seg.indices is not None:  # padding passes its gradient straight through
        return dout.reshape(b * s, h).index_copy(0, seg.indices, dx.to(dout.dtype)).view(b, s, h)
    return dx.view(b, s, h).to(dout.dtype)


def _frozen_layer_backward_fake(dout, x, mask, position_ids, rstd1, x2, rstd2, qkv, gu, extra,
                                extra_stats, layer_id):
    return torch.empty_like(x)


def _frozen_layer_setup(ctx, inputs, output):
    x, mask, position_ids, layer_id, _ = inputs
    ctx.layer_id = layer_id
    ctx.save_for_backward(x, mask, position_ids, *output[1:])


def _register_layer_op(name: str, tags: tuple):
    """pifi_fast::<name> and pifi_fast::<name>_backward: the same Python bodies, own tags."""
    forward = torch.library.custom_op(f"pifi_fast::{name}", _frozen_layer, mutates_args=(),
                                      tags=tags)
    forward.register_fake(_frozen_layer_fake)
    backward = torch.library.custom_op(f"pifi_fast::{name}_backward", _frozen_layer_backward,
                                       mutates_args=(), tags=tags)
    backward.register_fake(_frozen_layer_backward_fake)

    def grad(ctx, grads):
        x, mask, position_ids, *saved = ctx.saved_tensors
        dx = backward(grads[0], x, mask, position_ids, *saved, ctx.layer_id)
        return dx, None, None, None, None

    forward.register_autograd(grad, setup_context=_frozen_layer_setup)


# Two registrations of one layer op, told apart for CUDA graphs (mode="reduce-overhead"):
# frozen_layer unpads a padding mask or bounds position ids, each a host sync, which a CUDA graph
# capture cannot hold; it is tagged cudagraph_unsafe, so Inductor's graph partition runs it
# eagerly between captured graphs of the model around it. frozen_layer_dense has no host sync
# (no mask to unpad: [CLS] mode, dense batches) and is captured with the rest of the model.
_register_layer_op("frozen_layer", (torch.Tag.cudagraph_unsafe,))
_register_layer_op("frozen_layer_dense", ())
