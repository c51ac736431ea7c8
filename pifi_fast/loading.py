"""Load one decoder layer of an LLM, and nothing more.

load_llm_layer(source, layer=-1) reads only the tensors of that layer:
  * a local Hugging Face folder: config.json, then the safetensors index (if sharded) tells
    which shard holds the layer; only those shards are opened, through safe_open;
  * a Hub repo id: config.json, the index, and only the shard(s) holding the layer are
    downloaded (with a progress bar);
  * a GGUF file: only that block's tensors are dequantized, with llama.cpp's q/k row
    permutation undone exactly as Transformers does; Q8_0 projections are also kept as their
    int8 blocks and scales (LLMLayer.quantized), which an int8 layer stores without requantizing.
Pickle checkpoints (.bin) load only with allow_pickle=True, and then with weights_only=True.
trust_remote_code is never turned on.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

_LAYER_KEY = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|h|blocks))\.(?P<idx>\d+)\.(?P<rest>.+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot give the requested layer (missing shard, missing keys, ...)."""


@dataclasses.dataclass
class LLMLayer:
    """One decoder layer of an LLM: its Hugging Face module (frozen) and what it needs to run."""

    config: object  # the LLM's PretrainedConfig
    index: int  # absolute layer index in the LLM
    module: nn.Module  # the Hugging Face decoder layer, weights loaded, requires_grad=False
    rotary: nn.Module | None  # the LLM's own rotary embedding module (None if it has none)
    source: str = ""
    # projection weights the file already stores in 8 bits (GGUF Q8_0): Hugging Face key ->
    # (q int8 (R, C), scale float32 (R, C // 32)), for an int8 FrozenLlamaLayer to take as they
    # are; the module above holds their dequantized values
    quantized: dict = dataclasses.field(default_factory=dict)

    @property
    def model_type(self) -> str:
        return self.config.model_type


# -- classes of the architecture -------------------------------------------------------------------
def _modeling_module(config):
    from transformers import AutoModelForCausalLM

    mapping = AutoModelForCausalLM._model_mapping
    try:
        model_cls = mapping[type(config)]
    except KeyError as exc:
        raise ValueError(f"no causal-LM class in Transformers for model_type "
                         f"{config.model_type!r}") from exc
    return model_cls, sys.modules[model_cls.__module__]


def decoder_layer_class(config):
    model_cls, module = _modeling_module(config)
    for name in getattr(model_cls, "_no_split_modules", None) or []:
        cls = getattr(module, name, None)
        if cls is not None and ("DecoderLayer" in name or "Block" in name):
            return cls
    raise ValueError(f"cannot find the decoder-layer class of {config.model_type!r}")


def make_rotary(config, device=None):
    """The LLM's own rotary module (so every rope_scaling type, llama3 included, is honoured)."""
    _, module = _modeling_module(config)
    names = [n for n in dir(module) if n.endswith("RotaryEmbedding")]
    prefix = type(config).__name__.replace("Config", "")
    names.sort(key=lambda n: (not n.startswith(prefix), len(n)))
    if not names:
        return None
    rotary_cls = getattr(module, names[0])
    if _takes_device(rotary_cls):
        return rotary_cls(config, device=device)
    return rotary_cls(config)


def _takes_device(cls) -> bool:
    import inspect

    return "device" in inspect.signature(cls.__init__).parameters


def build_layer(config, index: int, state_dict: dict[str, torch.Tensor], dtype=None,
                source: str = "", origins: dict[str, str] | None = None) -> LLMLayer:
    """Instantiate the architecture's own decoder layer from its tensors (no random init).
    ``origins`` maps a layer-local key to the file it came from (for error messages)."""
    layer_cls = decoder_layer_class(config)
    if getattr(config, "_attn_implementation", None) in (None, "eager") and \
            getattr(config, "_attn_implementation_autoset", True):
        config._attn_implementation = "sdpa"
    with torch.device("meta"):
        module = layer_cls(config, layer_idx=index)
    expected = set(module.state_dict().keys())
    missing = sorted(expected - set(state_dict))
    if missing:
        raise CheckpointError(f"{source or 'checkpoint'}: layer {index} lacks tensors {missing[:6]}"
                              f"{' ...' if len(missing) > 6 else ''}")
    dtype = dtype or _config_dtype(config)
    sd = {}
    for k in expected:
        t = state_dict[k]
        want = module.state_dict()[k].shape
        if tuple(t.shape) != tuple(want):
            where = (origins or {}).get(k) or source or "checkpoint"
            raise CheckpointError(
                f"{where}: tensor {k} of layer {index} has shape {tuple(t.shape)} but the config "
                f"(hidden_size {config.hidden_size}, intermediate_size "
                f"{getattr(config, 'intermediate_size', '?')}, heads "
                f"{config.num_attention_heads}/{getattr(config, 'num_key_value_heads', None)}) "
                f"needs {tuple(want)}")
        sd[k] = t.to(dtype) if t.is_floating_point() else t
    module.load_state_dict(sd, assign=True, strict=True)
    for p in module.parameters():
        p.requires_grad_(False)
    rotary = make_rotary(config)
    return LLMLayer(config=config, index=index, module=module, rotary=rotary, source=source)


def random_layer(config, index: int = -1, dtype=torch.float32, seed: int | None = None) -> LLMLayer:
    """A layer with random weights of the given architecture (tests and speed benchmarks)."""
    index = resolve_index(config, index)
    layer_cls = decoder_layer_class(config)
    if getattr(config, "_attn_implementation", None) is None:
        config._attn_implementation = "sdpa"
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    with torch.device("meta"):
        meta = layer_cls(config, layer_idx=index)
    std = getattr(config, "initializer_range", 0.02)
    sd = {}
    for k, t in meta.state_dict().items():
        if k.endswith("norm.weight") or "layernorm" in k:
            sd[k] = 1.0 + 0.1 * torch.randn(t.shape, generator=gen)
        else:
            sd[k] = std * torch.randn(t.shape, generator=gen)
    return build_layer(config, index, sd, dtype=dtype, source="random")


def _config_dtype(config):
    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(d, str):
        d = getattr(torch, d, None)
    return d if isinstance(d, torch.dtype) else torch.float32


def resolve_index(config, layer: int) -> int:
    n = config.num_hidden_layers
    if not -n <= layer < n:
        raise IndexError(f"layer {layer} is out of range: the LLM has {n} layers "
                         f"(valid: {-n} .. {n - 1})")
    return layer % n


def _load_config(path_or_dir, **kw):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path_or_dir, trust_remote_code=False, **kw)


# -- safetensors folders (local or Hub) -------------------------------------------------------------
_SAFE_INDEX = "model.safetensors.index.json"
_SAFE_SINGLE = "model.safetensors"
_BIN_INDEX = "pytorch_model.bin.index.json"
_BIN_SINGLE = "pytorch_model.bin"


def _layer_keys(all_keys, index: int, source: str):
    """Map checkpoint key -> layer-local key for the keys of layer `index`."""
    chosen = {}
    prefixes = set()
    for key in all_keys:
        m = _LAYER_KEY.match(key)
        if m and int(m.group("idx")) == index:
            prefixes.add(m.group("prefix"))
            chosen[key] = m.group("rest")
    if len(prefixes) > 1:
        # e.g. a vision tower next to the language model: keep the language model's layers.
        lm = [p for p in prefixes if "vision" not in p and "encoder" not in p]
        prefixes = set(sorted(lm or prefixes, key=len)[:1])
        chosen = {k: v for k, v in chosen.items() if _LAYER_KEY.match(k).group("prefix") in prefixes}
    if not chosen:
        raise CheckpointError(f"{source}: the checkpoint has no tensors for layer {index}")
    return chosen


def check_safetensors_file(path) -> None:
    """Raise CheckpointError naming the file and the first tensor that does not fit when a
    safetensors file is shorter than its own header says (a cut download or copy)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated: {size} bytes, not even the 8-byte header "
                                  "length of a safetensors file")
        n = int.from_bytes(head, "little")
        if 8 + n > size:
            raise CheckpointError(f"{path}: truncated: the header declares {n:,} bytes of "
                                  f"metadata but the file has {size:,} bytes in all")
        try:
            header = json.loads(f.read(n))
        except ValueError as exc:
            raise CheckpointError(f"{path}: not a safetensors file (unreadable header: {exc})")
    spans = sorted((v["data_offsets"][0], v["data_offsets"][1], k) for k, v in header.items()
                   if k != "__metadata__")
    expected = 8 + n + (max(end for _, end, _ in spans) if spans else 0)
    for start, end, name in spans:
        if 8 + n + end > size:
            raise CheckpointError(
                f"{path}: truncated: tensor {name} needs bytes {8 + n + start:,}..{8 + n + end:,}"
                f" but the file has {size:,} bytes (expected {expected:,})")


def _read_safetensors(files_and_keys: dict[str, dict[str, str]]):
    from safetensors import safe_open

    out = {}
    for path, keys in files_and_keys.items():
        check_safetensors_file(path)
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                for ckpt_key, local in keys.items():
                    out[local] = f.get_tensor(ckpt_key)
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors' own errors do not name the file
            raise CheckpointError(f"{path}: cannot read {sorted(keys)[:3]}...: {exc}") from exc
    return out


def _origins(files_and_keys: dict[str, dict[str, str]]) -> dict[str, str]:
    return {local: path for path, keys in files_and_keys.items() for local in keys.values()}


def _load_from_files(config, index, source, fetch, allow_pickle, dtype):
    """Shared by local folders and Hub repos: `fetch(name)` returns a local path or None."""
    idx_path = fetch(_SAFE_INDEX)
    if idx_path is not None:
        weight_map = json.loads(Path(idx_path).read_text())["weight_map"]
        keys = _layer_keys(weight_map, index, source)
        by_file: dict[str, dict[str, str]] = {}
        for ckpt_key, local in keys.items():
            by_file.setdefault(weight_map[ckpt_key], {})[ckpt_key] = local
        files = {}
        for name in sorted(by_file):
            path = fetch(name)
            if path is None:
                raise CheckpointError(f"{source}: shard {name} (holding layer {index}) is missing")
            files[path] = by_file[name]
        return build_layer(config, index, _read_safetensors(files), dtype, source,
                           _origins(files))
    single = fetch(_SAFE_SINGLE)
    if single is not None:
        from safetensors import safe_open

        check_safetensors_file(single)
        with safe_open(single, framework="pt") as f:
            keys = _layer_keys(list(f.keys()), index, source)
        files = {single: keys}
        return build_layer(config, index, _read_safetensors(files), dtype, source,
                           _origins(files))
    bin_index, bin_single = fetch(_BIN_INDEX), None
    if bin_index is None:
        bin_single = fetch(_BIN_SINGLE)
    if bin_index is None and bin_single is None:
        raise CheckpointError(f"{source}: no safetensors (or .bin) weights found")
    if not allow_pickle:
        raise CheckpointError(f"{source}: only pickle (.bin) weights found; pass allow_pickle=True "
                              "to load them (they are read with torch.load(weights_only=True))")
    if bin_index is not None:
        weight_map = json.loads(Path(bin_index).read_text())["weight_map"]
        keys = _layer_keys(weight_map, index, source)
        names = sorted({weight_map[k] for k in keys})
    else:
        names, keys = [_BIN_SINGLE], None
    tensors = {}
    for name in names:
        path = fetch(name)
        if path is None:
            raise CheckpointError(f"{source}: shard {name} (holding layer {index}) is missing")
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        layer_keys = keys if keys is not None else _layer_keys(list(sd), index, source)
        tensors.update({local: sd[k] for k, local in layer_keys.items() if k in sd})
    return build_layer(config, index, tensors, dtype, source)


def _load_local_folder(folder: Path, layer: int, dtype, allow_pickle: bool) -> LLMLayer:
    config = _load_config(str(folder))
    index = resolve_index(config, layer)

    def fetch(name):
        p = folder / name
        return str(p) if p.exists() else None

    return _load_from_files(config, index, str(folder), fetch, allow_pickle, dtype)


def _load_hub(repo_id: str, layer: int, dtype, allow_pickle: bool, revision=None) -> LLMLayer:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    from huggingface_hub.errors import LocalEntryNotFoundError

    ensure_hub_reachable()

    def fetch(name):
        try:
            # hf_hub_download shows its own tqdm progress bar for each file.
            return hf_hub_download(repo_id, name, revision=revision)
        except LocalEntryNotFoundError:  # (a subclass of EntryNotFoundError: caught first)
            if hub_offline():
                return None  # not in the cache
            raise ConnectionError(HUB_UNREACHABLE) from None
        except EntryNotFoundError:  # the repository has no such file
            return None

    config_path = fetch("config.json")
    if config_path is None:
        where = ("is not in the local Hub cache (HF_HUB_OFFLINE=1)" if hub_offline()
                 else "has no config.json")
        raise CheckpointError(f"{repo_id}: the repository {where}")
    config = _load_config(str(Path(config_path).parent))
    index = resolve_index(config, layer)
    return _load_from_files(config, index, repo_id, fetch, allow_pickle, dtype)


# -- reaching the Hub -----------------------------------------------------------------------------
HUB_UNREACHABLE = ("cannot reach the Hugging Face Hub; pass a local folder, or set "
                   "HF_HUB_OFFLINE=1 to use the cache")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE=1: huggingface_hub answers from its cache only."""
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    return flag or bool(constants.HF_HUB_OFFLINE)


def ensure_hub_reachable(timeout: float = 3.0) -> None:
    """One TCP connection to the Hub's endpoint, within `timeout` seconds, before any download
    (huggingface_hub itself retries for about 25 s before it gives up): a ConnectionError with
    one clear line when it fails. Skipped offline (the cache answers) and behind a proxy (whose
    route a direct connection does not test)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if hub_offline() or any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy",
                                                          "ALL_PROXY", "all_proxy")):
        return
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        raise ConnectionError(f"{HUB_UNREACHABLE} ({host}:{port}: {exc})") from None


# -- GGUF -----------------------------------------------------------------------------------------
_GGUF_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def unpermute_gguf_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation. Per head, llama.cpp interleaves the two rotary
    halves (rows r and r + D/2 become rows 2r and 2r+1); this puts them back in halves."""
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _gguf_header(path: Path):
    """The file's GGUF header (pifi_fast.gguf_file), or a CheckpointError naming the file and,
    for a cut file, the first tensor that does not fit."""
    from pifi_fast.gguf_file import GGUFFormatError, read_header

    try:
        header = read_header(path)
    except GGUFFormatError as exc:
        raise CheckpointError(f"{path}: unreadable GGUF file ({path.stat().st_size:,} bytes): "
                              f"{exc}") from exc
    cut = header.truncated()
    if cut is not None:
        raise CheckpointError(f"{path}: truncated: tensor {cut.name} needs bytes {cut.start:,}.."
                              f"{cut.start + cut.nbytes:,} but the file has "
                              f"{header.file_size:,} bytes")
    return header


def _gguf_config(path: Path):
    """Transformers' config of a GGUF file. Its parser is the authority on how GGUF keys map to
    config fields, but it decodes the whole header, tokenizer included (~5 s for SmolLM2 on 2
    CPU cores), so its result is cached on disk under pifi_fast's cache folder, keyed by the
    file's path, size and modification time and the Transformers version; a damaged or
    unwritable cache only means parsing again."""
    import hashlib
    import shutil
    import tempfile

    import transformers

    from pifi_fast.offline import cache_root

    stat = path.stat()
    identity = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
    folder = cache_root() / "gguf-configs" / hashlib.sha256(identity.encode()).hexdigest()[:32]
    if (folder / "config.json").is_file():
        try:
            config = _load_config(str(folder))
            config.name_or_path = str(path.parent)  # as Transformers' parser names it
            return config
        except (OSError, ValueError):
            shutil.rmtree(folder, ignore_errors=True)  # damaged: parse and write it again
    config = _load_config(str(path.parent), gguf_file=path.name)
    tmp = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent)
        config.save_pretrained(tmp)
        os.replace(tmp, folder)  # complete or absent; a concurrent writer's entry wins
    except OSError:
        pass
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return config


def _load_gguf(path: Path, layer: int, dtype) -> LLMLayer:
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize

    from pifi_fast.gguf_file import tensor_bytes

    header = _gguf_header(path)  # first: Transformers' parser fails unclearly on a cut file
    config = _gguf_config(path)
    index = resolve_index(config, layer)
    arch = header.fields.get("general.architecture")
    prefix = f"blk.{index}."
    tensors, quantized = {}, {}
    for t in header.tensors:
        if not t.name.startswith(prefix):
            continue
        local = _GGUF_NAMES.get(t.name[len(prefix):])
        if local is None:
            raise CheckpointError(f"{path}: unknown GGUF tensor {t.name} for architecture {arch}")
        data = tensor_bytes(header, t)
        w = torch.from_numpy(dequantize(data, t.ggml_type).copy())
        shape = tuple(reversed(t.dims))
        w = w.reshape(shape[0], -1) if len(shape) == 2 else w.reshape(shape)
        pair = (_q8_0_blocks(data, shape) if t.ggml_type == GGMLQuantizationType.Q8_0
                and local.endswith("proj.weight") else None)
        if arch == "llama" and local in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
            heads = config.num_attention_heads if "q_proj" in local else config.num_key_value_heads
            w = unpermute_gguf_rows(w, heads)
            if pair is not None:  # rows move with their scales
                pair = tuple(unpermute_gguf_rows(p, heads) for p in pair)
        tensors[local] = w
        if pair is not None:
            quantized[local] = pair
    if not tensors:
        raise CheckpointError(f"{path}: the GGUF file has no tensors for block {index}")
    llm = build_layer(config, index, tensors, dtype or torch.float32, str(path),
                      {k: str(path) for k in tensors})
    llm.quantized = quantized
    return llm


def _q8_0_blocks(data, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (R, C), scale float32 (R, C // 32)) from a GGUF Q8_0 tensor's raw blocks: each
    block of 32 inputs is a float16 scale d then 32 int8 values, and W = d * q exactly."""
    import numpy as np

    rows, cols = shape
    blocks = np.ascontiguousarray(data).view(np.uint8).reshape(rows, cols // 32, 34)
    d = blocks[..., :2].copy().view(np.float16).reshape(rows, cols // 32)
    q = blocks[..., 2:].copy().view(np.int8).reshape(rows, cols)
    return torch.from_numpy(q), torch.from_numpy(d.astype(np.float32))


# -- the entry point ------------------------------------------------------------------------------
def load_llm_layer(source, layer: int = -1, dtype: torch.dtype | None = None, *,
                   allow_pickle: bool = False, revision: str | None = None) -> LLMLayer:
    """Load decoder layer `layer` (default: the last) of an LLM, reading only that layer.

    source: a local Hugging Face folder, a Hub repo id ("meta-llama/Llama-3.1-8B"), or a .gguf
    file. dtype: the layer's dtype (default: the checkpoint's; float32 for GGUF).
    """
    if isinstance(source, LLMLayer):
        return source
    path = Path(os.fspath(source)).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return _load_gguf(path, layer, dtype)
    if path.is_dir():
        return _load_local_folder(path, layer, dtype, allow_pickle)
    if path.exists() or str(source).startswith((".", "/", "~")) or str(source).count("/") > 1:
        raise FileNotFoundError(f"{source}: not a checkpoint folder, GGUF file or Hub repo id")
    return _load_hub(str(source), layer, dtype, allow_pickle, revision)


def warn_unfused(config) -> None:
    warnings.warn(
        f"pifi_fast: model_type {config.model_type!r} has no fused path; its own Hugging Face "
        "decoder layer runs unfused (correct, not accelerated)", UserWarning, stacklevel=3)
