"""Load one decoder layer of an LLM, and nothing more.

load_llm_layer(source, layer=-1) reads only the tensors of that layer:
  * a local Hugging Face folder: config.json, then the safetensors index (if sharded) tells
    which shard holds the layer; only those shards are opened, through safe_open;
  * a Hub repo id: config.json, the index, and only the shard(s) holding the layer are
    downloaded (with a progress bar);
  * a GGUF file: only that block's tensors are dequantized, named through gguf-py's table of
    llama.cpp's tensor names, with what llama.cpp rewrites on conversion undone (Llama's q/k
    row permutation, Gemma's +1 on norms, Falcon's q/k/v regrouping) and what Transformers'
    GGUF parser leaves at its defaults read from the file (both per family in
    pifi_fast.frozen.checkpoint); Q8_0 projections
    are also kept as their int8 blocks and scales (LLMLayer.quantized), which an int8 layer
    stores without requantizing.
Checkpoint keys are converted the way Transformers converts them on load (its conversion
mapping: MoE experts stacked, renamed keys), and the layer is built with the attention
implementation it supports (pifi_fast.families).
Pickle checkpoints (.bin) load only with allow_pickle=True, and then with weights_only=True.
trust_remote_code is never turned on.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import warnings
from pathlib import Path
from urllib.parse import urlparse

import huggingface_hub
import numpy as np
import torch
import transformers
from gguf import MODEL_ARCH_NAMES, get_tensor_name_map
from gguf.constants import GGMLQuantizationType
from gguf.quants import dequantize
from huggingface_hub import constants
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig

from pifi_fast import families
from pifi_fast.frozen.checkpoint import (HF_BLOCK_PREFIXES, fix_gguf_config, gguf_arch,
                                         gguf_rewrite)
from pifi_fast.gguf_file import GGUFFormatError, read_header, tensor_bytes
from pifi_fast.offline import cache_root

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


# -- building the layer ---------------------------------------------------------------------------
def build_layer(config, index: int, state_dict: dict[str, torch.Tensor], dtype=None,
                source: str = "", origins: dict[str, str] | None = None) -> LLMLayer:
    """Instantiate the architecture's own decoder layer from its tensors (no random init).
    ``state_dict``: the layer's tensors under layer-local keys, as the module names them or as
    the checkpoint stores them (converted the way Transformers converts them on load: per-expert
    MoE tensors fused, renamed keys). ``origins`` maps a layer-local key to the file it came
    from (for error messages)."""
    why = families.unsupported(config, index)
    if why:
        raise ValueError(f"{source or config.model_type}: {why}")
    layer_cls = families.decoder_layer_class(config)
    families.use_attention_implementation(config)
    with torch.device("meta"):
        module = layer_cls(config, layer_idx=index)
    expected = set(module.state_dict().keys())
    if expected - set(state_dict):
        state_dict = convert_checkpoint_keys(config, index, state_dict, source)
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
        t = t.to(dtype) if t.is_floating_point() else t
        # A tensor of its own, aligned as torch allocates: a tensor read from a file can be a view
        # at any byte offset of the file's buffer, and CPU GEMM kernels may round differently
        # with the alignment (one Mixtral layer read from two files gave different last bits).
        sd[k] = t.clone() if t.data_ptr() % 64 else t
    module.load_state_dict(sd, assign=True, strict=True)
    for p in module.parameters():
        p.requires_grad_(False)
    rotary = families.make_rotary(config)
    return LLMLayer(config=config, index=index, module=module, rotary=rotary, source=source)


def convert_checkpoint_keys(config, index: int, tensors: dict[str, torch.Tensor],
                            source: str = "") -> dict[str, torch.Tensor]:
    """The layer's tensors under the names its module uses, converted as Transformers converts a
    checkpoint on load (its conversion mapping for the family): renamed keys (Mixtral's
    block_sparse_moe -> mlp), and per-expert tensors stacked into the fused experts tensors
    (``experts.*.w1`` and ``experts.*.w3`` -> ``experts.gate_up_proj``). Keys are matched with
    the layer's prefix ("model.layers.<index>.") in front, as in the file. A conversion this
    function does not implement raises CheckpointError naming it."""
    # deferred: importing transformers.conversion_mapping costs 1.1 s (measured, 2 CPU cores)
    # and only checkpoints read key by key need it
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    transforms = get_checkpoint_conversion_mapping(config.model_type) or []
    prefix = f"model.layers.{index}."
    keyed = {prefix + k: t for k, t in tensors.items()}
    for transform in transforms:
        sources = list(getattr(transform, "_original_source_patterns", transform.source_patterns))
        targets = list(getattr(transform, "_original_target_patterns", transform.target_patterns))
        ops = [type(op).__name__ for op in getattr(transform, "operations", [])]
        if not ops:  # a renaming: regular expressions, applied in order
            for src, dst in zip(sources, targets):
                keyed = {re.sub(src, dst, k): t for k, t in keyed.items()}
            continue
        patterns = [re.compile(re.escape(p).replace(r"\*", r"(\d+)")) for p in sources]
        found: dict[str, dict[int, dict[int, torch.Tensor]]] = {}  # target -> source -> expert
        for key in list(keyed):
            for i, pattern in enumerate(patterns):
                m = pattern.search(key)
                if m:
                    target = key[:m.start()] + targets[0] + key[m.end():]
                    found.setdefault(target, {}).setdefault(i, {})[int(m.group(1))] = keyed.pop(key)
                    break
        if not found:
            continue
        if not set(ops) <= {"MergeModulelist", "Concatenate"} or len(targets) != 1:
            raise CheckpointError(f"{source or 'checkpoint'}: {config.model_type!r} checkpoints "
                                  f"need Transformers' conversion {ops} on {sources}, which "
                                  "pifi_fast does not apply to a single layer")
        dims = {type(op).__name__: op.dim for op in transform.operations}
        for target, by_source in found.items():
            stacked = []
            for i in range(len(patterns)):
                experts = by_source.get(i, {})
                if sorted(experts) != list(range(len(experts))) or not experts:
                    raise CheckpointError(f"{source or 'checkpoint'}: layer {index}: the experts "
                                          f"of {sources[i]!r} are {sorted(experts)}, not 0..n-1")
                stacked.append(torch.stack([experts[e] for e in sorted(experts)],
                                           dims.get("MergeModulelist", 0)))
            keyed[target] = (torch.cat(stacked, dims["Concatenate"]) if len(stacked) > 1
                             else stacked[0])
    return {k[len(prefix):] if k.startswith(prefix) else k: t for k, t in keyed.items()}


def random_layer(config, index: int = -1, dtype=torch.float32, seed: int | None = None) -> LLMLayer:
    """A layer with random weights of the given architecture (tests and speed benchmarks)."""
    index = resolve_index(config, index)
    why = families.unsupported(config, index)
    if why:
        raise ValueError(why)
    layer_cls = families.decoder_layer_class(config)
    families.use_attention_implementation(config)
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


def load_config(path_or_dir, **kw):
    try:
        return AutoConfig.from_pretrained(path_or_dir, trust_remote_code=False, **kw)
    except ValueError as exc:
        if "custom code" not in str(exc) and "trust_remote_code" not in str(exc):
            raise
        kind = _declared_model_type(path_or_dir)
        raise ValueError(
            f"{path_or_dir}: model_type {kind!r} exists only as code inside the checkpoint "
            f"(trust_remote_code), which pifi_fast never runs, and Transformers "
            f"{transformers.__version__} has no class for it. Use a release of Transformers that "
            "ships the architecture, or a checkpoint of a family it ships (Llama, Mistral, "
            "Qwen2, Gemma-2, Falcon, ...)") from None


def _declared_model_type(path_or_dir) -> str | None:
    try:
        return json.loads((Path(path_or_dir) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return None


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
            raise CheckpointError(
                f"{path}: not a safetensors file (unreadable header: {exc})") from exc
    spans = sorted((v["data_offsets"][0], v["data_offsets"][1], k) for k, v in header.items()
                   if k != "__metadata__")
    expected = 8 + n + (max(end for _, end, _ in spans) if spans else 0)
    for start, end, name in spans:
        if 8 + n + end > size:
            raise CheckpointError(
                f"{path}: truncated: tensor {name} needs bytes {8 + n + start:,}..{8 + n + end:,}"
                f" but the file has {size:,} bytes (expected {expected:,})")


def _read_safetensors(files_and_keys: dict[str, dict[str, str]]):
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
    config = load_config(str(folder))
    index = resolve_index(config, layer)

    def fetch(name):
        p = folder / name
        return str(p) if p.exists() else None

    return _load_from_files(config, index, str(folder), fetch, allow_pickle, dtype)


def _load_hub(repo_id: str, layer: int, dtype, allow_pickle: bool, revision=None) -> LLMLayer:
    ensure_hub_reachable()

    def fetch(name):
        try:
            # hf_hub_download shows its own tqdm progress bar for each file.
            return huggingface_hub.hf_hub_download(repo_id, name, revision=revision)
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
    config = load_config(str(Path(config_path).parent))
    index = resolve_index(config, layer)
    return _load_from_files(config, index, repo_id, fetch, allow_pickle, dtype)


# -- reaching the Hub -----------------------------------------------------------------------------
HUB_UNREACHABLE = ("cannot reach the Hugging Face Hub; pass a local folder, or set "
                   "HF_HUB_OFFLINE=1 to use the cache")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE=1: huggingface_hub answers from its cache only."""
    flag = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    return flag or bool(constants.HF_HUB_OFFLINE)


def ensure_hub_reachable(timeout: float = 3.0) -> None:
    """One TCP connection to the Hub's endpoint, within `timeout` seconds, before any download
    (huggingface_hub itself retries for about 25 s before it gives up): a ConnectionError with
    one clear line when it fails. Skipped offline (the cache answers) and behind a proxy (whose
    route a direct connection does not test)."""
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
# (the per-family names: HF_BLOCK_PREFIXES, gguf_arch and gguf_rewrite, in
# pifi_fast.frozen.checkpoint)


def _gguf_names(config, index: int, module_keys) -> dict[str, str]:
    """GGUF tensor name (blk.<i>.<name>[.weight|.bias]) -> the module's layer-local key, from
    gguf-py's table of llama.cpp's names for the architecture."""
    wanted = gguf_arch(config.model_type)
    arch = next((k for k, v in MODEL_ARCH_NAMES.items() if v == wanted), None)
    if arch is None:
        raise CheckpointError(f"llama.cpp's GGUF has no architecture {wanted!r} (gguf-py "
                              "knows none by that name)")
    table = get_tensor_name_map(arch, config.num_hidden_layers)
    names = {}
    for key in module_keys:
        base, suffix = (key.rsplit(".", 1) if key.endswith((".weight", ".bias")) else (key, ""))
        for prefix in HF_BLOCK_PREFIXES:
            gguf_name = table.get_name(prefix.format(i=index) + base)
            if gguf_name is not None:
                names[gguf_name + ("." + suffix if suffix else "")] = key
                break
    return names


def _gguf_header(path: Path):
    """The file's GGUF header (pifi_fast.gguf_file), or a CheckpointError naming the file and,
    for a cut file, the first tensor that does not fit."""
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


def gguf_config(path: Path):
    """Transformers' config of a GGUF file. Its parser is the authority on how GGUF keys map to
    config fields, but it decodes the whole header, tokenizer included (~5 s for SmolLM2 on 2
    CPU cores), so its result is cached on disk under pifi_fast's cache folder, keyed by the
    file's path, size and modification time and the Transformers version; a damaged or
    unwritable cache only means parsing again."""
    stat = path.stat()
    identity = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
    folder = cache_root() / "gguf-configs" / hashlib.sha256(identity.encode()).hexdigest()[:32]
    if (folder / "config.json").is_file():
        try:
            config = load_config(str(folder))
            config.name_or_path = str(path.parent)  # as Transformers' parser names it
            return config
        except (OSError, ValueError):
            shutil.rmtree(folder, ignore_errors=True)  # damaged: parse and write it again
    config = load_config(str(path.parent), gguf_file=path.name)
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
    header = _gguf_header(path)  # first: Transformers' parser fails unclearly on a cut file
    config = fix_gguf_config(gguf_config(path), header)
    index = resolve_index(config, layer)
    why = families.unsupported(config, index)
    if why:
        raise ValueError(f"{path}: {why}")
    arch = header.fields.get("general.architecture")
    families.use_attention_implementation(config)
    with torch.device("meta"):
        keys = list(families.decoder_layer_class(config)(config, layer_idx=index).state_dict())
    names = _gguf_names(config, index, keys)
    prefix = f"blk.{index}."
    tensors, quantized = {}, {}
    for t in header.tensors:
        if not t.name.startswith(prefix):
            continue
        local = names.get(t.name)
        if local is None:
            raise CheckpointError(
                f"{path}: GGUF tensor {t.name} has no place in {config.model_type}'s decoder "
                f"layer (architecture {arch}); pifi_fast reads the GGUF blocks whose tensors map "
                "one to one onto the layer's (not fused mixture-of-experts tensors): load the "
                "model's safetensors folder instead")
        data = tensor_bytes(header, t)
        w = torch.from_numpy(dequantize(data, t.ggml_type).copy())
        shape = tuple(reversed(t.dims))
        w = w.reshape(shape[0], -1) if len(shape) == 2 else w.reshape(shape)
        pair = (_q8_0_blocks(data, shape) if t.ggml_type == GGMLQuantizationType.Q8_0
                and local.endswith("proj.weight") else None)
        undo = gguf_rewrite(arch, local, config)  # llama.cpp's per-architecture rewrite
        if undo is not None:
            w = undo(w)
            if pair is not None:  # rows move with their scales
                pair = tuple(undo(p) for p in pair)
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
    rows, cols = shape
    blocks = np.ascontiguousarray(data).view(np.uint8).reshape(rows, cols // 32, 34)
    d = blocks[..., :2].copy().view(np.float16).reshape(rows, cols // 32)
    q = blocks[..., 2:].copy().view(np.int8).reshape(rows, cols)
    return torch.from_numpy(q), torch.from_numpy(d.astype(np.float32))


# -- the entry point ------------------------------------------------------------------------------
def load_llm_config(source):
    """The LLM's config alone (no tensor is read): a local folder, a .gguf file or a Hub id."""
    path = Path(os.fspath(source)).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        _gguf_header(path)
        return gguf_config(path)
    if path.is_dir():
        return load_config(str(path))
    if path.exists() or str(source).startswith((".", "/", "~")) or str(source).count("/") > 1:
        raise FileNotFoundError(f"{source}: not a checkpoint folder, GGUF file or Hub repo id")
    ensure_hub_reachable()
    config_file = huggingface_hub.hf_hub_download(str(source), "config.json")
    return load_config(str(Path(config_file).parent))


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
