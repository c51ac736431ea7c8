"""What this installation runs here: versions, the compiled extension, the device, and which
path each part of the fused layer and the SLM takes on it (the lines `pifi-fast info` prints).

    from pifi_fast.environment import environment_lines
    print("\\n".join(environment_lines(llm="path/to/model.gguf")))
"""
from __future__ import annotations

import platform

import torch
import transformers

import pifi_fast
from pifi_fast import _ext, attention, families, packed_slm
from pifi_fast.frozen import function, linear
from pifi_fast.kernels import common as kernels
from pifi_fast.loading import load_llm_config, resolve_index

# What reading an LLM's config raises for a bad --llm (CheckpointError is a ValueError).
LLM_ERRORS = (ValueError, OSError, IndexError)


def cpu_bf16_instructions() -> str:
    """Which native bf16 instructions this CPU has, as torch sees them (private torch.cpu
    queries: "unknown" where they are missing)."""
    try:
        found = [name for name, has in (("AMX", torch.cpu._is_amx_tile_supported()),
                                        ("AVX512-BF16", torch.cpu._is_avx512_bf16_supported()))
                 if has]
    except AttributeError:
        return "unknown"
    return ", ".join(found) if found else "none (bf16 would be emulated; not measured)"


def _device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def host_lines() -> list[str]:
    """Versions, the extension, the device, and the paths the fused layer and the SLM take on
    it; the same on every call (no model read)."""
    device = _device_type()
    # Attributes read at call time, not imported names: tests switch them with monkeypatch.
    lines = [
        f"pifi_fast {pifi_fast.__version__}; python {platform.python_version()}; torch "
        f"{torch.__version__}; transformers {transformers.__version__}",
        f"compiled extension: {_ext.HAS_EXTENSION} (CUDA kernels: {_ext.EXTENSION_WITH_CUDA})"
        + ("" if _ext.HAS_EXTENSION else f": {_ext._IMPORT_ERROR}"),
        f"CUDA device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}",
    ]
    interp = ", interpreter on (TRITON_INTERPRET=1)" if kernels.interpreting() else ""
    lines.append("Triton kernels: "
                 + ("used on CUDA" + interp if kernels.HAS_TRITON else "not installed"))
    usable = ", ".join(attention.available_backends(device))
    lines.append(f"attention backends usable on {device}: {usable}")
    kept = device in function.KEEP_ATTENTION_GRAPH
    lines.append(
        f"fused layer backward on {device}: "
        + ("attention's graph kept from forward (recompute='none'; 'mlp' re-runs it)" if kept
           else "attention forward re-run (nothing of attention saved)")
        + "; MLP chunks (chunk_tokens='auto'): "
        + ("4096 tokens" if device == "cuda" else "one fp32 tokens x 2I temporary <= 128 MiB"))
    lines.append(
        f"SLM for classification on {device} (packed_slm='auto'): "
        + ("sentence vectors from the real tokens only (pifi_fast.packed_slm; model types "
           + ", ".join(packed_slm.PACKED_MODEL_TYPES) + "; eager and --compile alike, "
           "the padded layout under CUDA graphs), the SLM's own forward otherwise"
           if packed_slm.packs_by_default(device)
           else "the SLM's own forward (packed_slm=True packs)"))
    lines.append("CPU bf16 instructions: " + cpu_bf16_instructions()
                 + " (pifi-fast train --precision bf16 on a CPU autocasts to bf16: fast where "
                   "they are native; the CPU default stays fp32)")
    lines.append(f"fused frozen-layer families: {', '.join(families.FUSED_MODEL_TYPES)}; every "
                 "other decoder family Transformers ships runs its own Hugging Face layer, "
                 "unfused")
    return lines


def llm_line(llm: str, layer: int = -1) -> str:
    """Whether layer `layer` of the LLM `llm` (folder, .gguf file or Hub id) runs fused or
    unfused, and how (fused: which kernel or twin runs each op on CUDA and here, read from the
    layer's dispatch table); reads its config only. Raises one of LLM_ERRORS when it cannot."""
    config = load_llm_config(llm)
    index = resolve_index(config, layer)
    return f"--llm {llm}: {families.describe(config, index, _device_type())}"


def gpu_lines() -> list[str]:
    """On a GPU: the path gemm='triton' projections take in each dtype; nothing elsewhere."""
    if not torch.cuda.is_available():
        return []
    device = _device_type()
    return [f"projections with gemm='triton' in {str(dtype)[6:]}: {linear.gemm_path(device, dtype)}"
            for dtype in (torch.bfloat16, torch.float16, torch.float32)]


def environment_lines(llm: str | None = None, layer: int = -1) -> list[str]:
    """Every line of `pifi-fast info [--llm LLM --layer LAYER]`, in its order."""
    return host_lines() + ([llm_line(llm, layer)] if llm else []) + gpu_lines()
