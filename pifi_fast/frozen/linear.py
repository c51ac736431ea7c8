"""The frozen layer's projections, dense and 8-bit, each path beside the probe that admits it.

    dense    cuBLAS through the compiled op torch.ops.pifi_fast.frozen_linear (bias and residual
             fused into the GEMM) or the Triton GEMM of pifi_fast.kernels.gemm with a fused
             epilogue (residual add, the MLP activation, the activation's backward) where that
             GEMM has a verified tile configuration (triton_gemm_applies)
    8-bit    QuantWeight (q, scale): FP8 W8A8 through torch._scaled_mm (fp8_linear, probed by
             fp8_matmul_available), W8A16 through the dequantizing Triton GEMM, on the CPU
             torch's weight-only int8 GEMM (int8_cpu_linear, probed by int8_cpu_applies), else
             the dequantizing twin (quant_linear picks)

project / project_input_grad are what the layer's blocks call: x @ W^T forward and dy @ W
backward, with an optional activation epilogue applied by the caller's `act` pair when the
Triton GEMM does not fuse it.
"""
from __future__ import annotations

import functools
import warnings
from typing import Callable, NamedTuple

import torch

from pifi_fast._ext import frozen_linear
from pifi_fast.kernels import common as kernels
from pifi_fast.kernels import gemm as _gemm
from pifi_fast.kernels import quant as _quant


class QuantWeight(NamedTuple):
    """An 8-bit frozen projection weight (pifi_fast.kernels.quant): q (R, C) int8 or fp8 e4m3,
    scale (R, C // G) float32; W ~ q * scale."""

    q: torch.Tensor
    scale: torch.Tensor

    @property
    def storage(self) -> str:
        return "fp8" if self.q.dtype == _quant.FP8 else "int8"


class LinearPath(NamedTuple):
    """How one call's projections run: gemm ("cublas" or "triton"), whether the elementwise
    steps run on Triton (the 8-bit weights then take the dequantizing Triton GEMM), and whether
    the PyTorch twins are forced (kernels="torch": no CPU int8 kernel either)."""

    gemm: str = "cublas"
    triton: bool = False
    twins_forced: bool = False


_fallback_warned: set = set()


def triton_gemm_applies(path: LinearPath, x: torch.Tensor, epilogue: str = "none") -> bool:
    """Whether this projection runs on the Triton GEMM: asked for (gemm="triton") and verified
    for x's device and dtype (else cuBLAS, with one warning per device, dtype and epilogue)."""
    if path.gemm != "triton":
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


def project(path: LinearPath, x, w, b=None, residual=None, epilogue: str = "none",
            act: Callable | None = None):
    """x @ w^T (+ b) (+ residual); with an activation epilogue (the layer's MLP activation on
    the gate/up output), fused into the Triton GEMM where it runs, else `act` applied after."""
    if isinstance(w, QuantWeight):
        y = quant_linear(x, w, b, residual, triton=path.triton, cpu_int8=not path.twins_forced)
    elif triton_gemm_applies(path, x, epilogue):
        return _gemm.gemm(x, w.t(), epilogue, bias=b, residual=residual)
    else:
        y = frozen_linear(x, w, b, residual=residual)
    return y if epilogue == "none" else act(y)


def project_input_grad(path: LinearPath, dy, w, epilogue: str = "none", aux=None,
                       act_bwd: Callable | None = None):
    """dy @ w; with an activation's backward epilogue ("<epilogue>_bwd"), its input gradient
    ([dg | du] for the gated ones) from dm = dy @ w and the saved gate/up output aux, fused
    into the Triton GEMM where it runs, else act_bwd(aux, dm) after."""
    if isinstance(w, QuantWeight):  # the stored 8-bit weight, dequantized in the GEMM's loads
        dx = (_quant.dequant_gemm(dy, w.q, w.scale, transposed=False)
              if path.triton and _quant.supported(dy, w.storage) else
              _quant.dequant_gemm_ref(dy, w.q, w.scale, transposed=False))
    elif triton_gemm_applies(path, dy, epilogue):
        return _gemm.gemm(dy, w, epilogue, aux=aux)
    else:
        dx = dy @ w
    return dx if epilogue == "none" else act_bwd(aux, dx)


def fp8_matmul_available(x: torch.Tensor) -> bool:
    """torch._scaled_mm runs FP8 GEMMs with per-row and per-column scales on CUDA from sm_89
    (Ada, Hopper) and on the CPU of recent torch (2.14; 2.11's CPU kernel asserts per-tensor
    scales only, so it is tried once per device)."""
    if not hasattr(torch, "_scaled_mm"):
        return False
    if x.is_cuda and torch.cuda.get_device_capability(x.device) < (8, 9):
        return False
    return rowwise_scaled_mm_runs(str(x.device))


@functools.lru_cache(maxsize=None)
def rowwise_scaled_mm_runs(device: str) -> bool:
    """Whether torch._scaled_mm takes per-row and per-column scales on this device."""
    a = torch.zeros(16, 16, device=device).to(_quant.FP8)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1, device=device),
                         scale_b=torch.ones(1, 16, device=device), out_dtype=torch.float32)
    except RuntimeError:
        return False
    return True


def quant_linear(x, w: QuantWeight, bias=None, residual=None, triton: bool = True,
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
# on AVX2 and Arm): any other K reads past the row, so those take the twin.
INT8_CPU_K_MULTIPLE = 16


def int8_cpu_applies(x: torch.Tensor, w: QuantWeight) -> bool:
    """Whether int8_cpu_linear serves x @ W^T: CPU activations (M, K) with K a multiple of 16,
    an int8 weight with one scale per output channel, and a torch whose
    _weight_int8pack_mm runs and computes what it should (probed once)."""
    return (x.device.type == "cpu" and w.q.dtype == torch.int8 and w.scale.shape[1] == 1
            and x.dim() == 2 and x.shape[0] > 0 and x.shape[1] % INT8_CPU_K_MULTIPLE == 0
            and w.q.is_contiguous() and w.q.data_ptr() % 16 == 0 and int8pack_mm_runs())


@functools.lru_cache(maxsize=None)
def int8pack_mm_runs() -> bool:
    """torch._weight_int8pack_mm on the CPU: present, and right on a small product (an
    unexpected build gives the twin, not wrong numbers)."""
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
    # variant is vectorized on x86 (AVX-512 / AVX2); its fp32 variant is a scalar loop slower
    # than fp32 F.linear. The price: x, the scales and the output rounded to bf16 (2^-9
    # relative each), below the per-channel int8 weights' own error.
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
    quant_linear); M is padded to a multiple of 16."""
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
