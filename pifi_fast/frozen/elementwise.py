"""Which elementwise kernels run the frozen layer's steps: the Triton kernels of
pifi_fast.kernels or their plain PyTorch twins, chosen per device and kernels option, and said
in words (pifi-fast info --llm, the model's repr).

Both tables hold the same names (TWINS, TRITON): rms_fwd / rms_bwd (Llama's RMSNorm), norm_fwd /
norm_bwd (Gemma's (1 + w) RMSNorm, Falcon's LayerNorm), swiglu_fwd / swiglu_bwd, act_fwd /
act_bwd (GeGLU-tanh, GELU) and rope_. A family's spec picks among them through norm_op and
act_op, the only readers of which name serves which norm and activation.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from pifi_fast.frozen.options import Kernels, effective_kernels
from pifi_fast.frozen.spec import Activation, Norm
from pifi_fast.kernels import common as kernels
from pifi_fast.kernels import family_ops as _fam
from pifi_fast.kernels import rms_norm as _rms
from pifi_fast.kernels import rope as _rope
from pifi_fast.kernels import swiglu as _swiglu

TWINS = SimpleNamespace(rms_fwd=_rms.rms_norm_fwd_ref, rms_bwd=_rms.rms_norm_bwd_ref,
                        swiglu_fwd=_swiglu.swiglu_fwd_ref, swiglu_bwd=_swiglu.swiglu_bwd_ref,
                        norm_fwd=_fam.norm_fwd_ref, norm_bwd=_fam.norm_bwd_ref,
                        act_fwd=_fam.act_fwd_ref, act_bwd=_fam.act_bwd_ref,
                        rope_=_rope.rope_ref_, name="torch")
TRITON = (SimpleNamespace(rms_fwd=_rms.rms_norm_fwd, rms_bwd=_rms.rms_norm_bwd,
                          swiglu_fwd=_swiglu.swiglu_fwd, swiglu_bwd=_swiglu.swiglu_bwd,
                          norm_fwd=_fam.norm_fwd, norm_bwd=_fam.norm_bwd,
                          act_fwd=_fam.act_fwd, act_bwd=_fam.act_bwd,
                          rope_=_rope.rope_, name="triton") if kernels.HAS_TRITON else None)
# The Triton GEMM's epilogue for each MLP activation (pifi_fast.kernels.gemm, by name); the one
# named "<epilogue>_bwd" applies the activation's backward to the down projection's input
# gradient.
ACT_EPILOGUE = {"silu": "swiglu", "gelu_tanh": "geglu_tanh", "gelu": "gelu"}
# per-head q/k norms (LayerSpec.qk_norm): (forward, backward), plain PyTorch on every device
QK_NORMS = {"rms": (_rms.rms_norm_fwd_ref, _rms.rms_norm_bwd_ref),
            "rms_1p": (_fam.rms_norm_1p_fwd_ref, _fam.rms_norm_1p_bwd_ref)}


def elementwise_impl(x: torch.Tensor, choice: str = "auto") -> SimpleNamespace:
    """The kernels or their twins for tensor x. $PIFI_FAST_KERNELS overrides "auto"."""
    return impl_on(x.device.type, choice)


def impl_on(device_type: str, choice: str = "auto") -> SimpleNamespace:
    """What elementwise_impl picks for a tensor of this device type ("cuda", "cpu", ...): TRITON
    or TWINS. Needs no tensor, so CUDA's choice can be described on a machine without one."""
    choice = effective_kernels(choice)
    if choice == Kernels.TORCH:
        return TWINS
    if choice == Kernels.TRITON:
        if not (kernels.HAS_TRITON and (device_type == "cuda" or kernels.interpreting())):
            raise RuntimeError(
                f"kernels='triton' needs triton and a CUDA tensor (or TRITON_INTERPRET=1 set "
                f"before triton is imported); got a {device_type} tensor, triton "
                f"{'present' if kernels.HAS_TRITON else 'missing'}")
        return TRITON
    return TRITON if (device_type == "cuda" and kernels.HAS_TRITON) else TWINS


def norm_op(spec) -> str:
    """Which of the table's norms a LayerSpec's norms run through: "rms" (rms_fwd / rms_bwd:
    Llama's RMSNorm) or "norm" (norm_fwd / norm_bwd: Gemma's (1 + w) RMSNorm, LayerNorm)."""
    return "rms" if spec.norm == Norm.RMS else "norm"


def act_op(spec) -> str:
    """Which of the table's MLP activations a LayerSpec runs through: "swiglu" (swiglu_fwd /
    swiglu_bwd) or "act" (act_fwd / act_bwd: GeGLU-tanh, Falcon's GELU)."""
    return "swiglu" if spec.act == Activation.SILU else "act"


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
    (a Triton kernel: in TRITON; else a PyTorch twin) headed by its kind."""
    triton = [] if TRITON is None else [f for f in vars(TRITON).values() if callable(f)]
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
    if TRITON is None:
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
