"""Saving and loading PiFi models: full and lean checkpoints, LoRA merging, the Hub.

PersistenceMixin gives PiFiBase (and so both PiFiModel classes) save_pretrained,
from_pretrained, merge_lora and push_to_hub. A checkpoint is one folder: pifi_config.json (the
options, the SLM's and LLM's configurations, the label vocabulary) and model.safetensors. A
lean checkpoint stores a reference to the frozen layer (source, index, dtype, sha256) instead of
its tensors and re-reads it on load. This module imports downward only (loading, hub, the 8-bit
kernels' dequantize); pifi_base imports it, never the reverse.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import safetensors.torch
from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM, AutoTokenizer

from pifi_fast import hub
from pifi_fast.kernels.quant import dequantize
from pifi_fast.loading import (CheckpointError, build_layer, check_safetensors_file,
                               load_llm_layer)
from pifi_fast.version import installed_version

CONFIG_NAME = "pifi_config.json"
WEIGHTS_NAME = "model.safetensors"


class PersistenceMixin:
    """Checkpoints of a PiFiBase: what a model writes, how it is read back, the Hub."""

    def frozen_layer_sha256(self) -> str:
        """sha256 over the frozen layer's tensors as this model holds them (names, dtypes,
        shapes and bytes, in key order): what a lean checkpoint verifies on load."""
        digest = hashlib.sha256()
        for key, t in sorted(self.llm_layer.state_dict().items()):
            t = t.detach().to("cpu").contiguous()
            digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return digest.hexdigest()

    def can_reference_frozen_layer(self) -> str | None:
        """None when a lean checkpoint can reference the frozen layer, else why not."""
        if self.llm_config is None:
            return "the model has no LLM layer"
        if not self.freeze:
            return "the layer is trained (freeze=False): its weights must be stored"
        source = self.llm_source
        if not source or source == "random":
            return "the layer has no source to re-read (random weights, or built from a module)"
        if (Path(source) / CONFIG_NAME).is_file():
            return "the layer came from a PiFi checkpoint, not from an LLM's own files"
        return None

    def save_pretrained(self, directory, extra_files: dict | None = None,
                        into_existing: bool = False, frozen_layer: str = "full",
                        state_dict: dict | None = None) -> Path:
        """One folder: pifi_config.json + model.safetensors (the single LLM layer stored once).

        frozen_layer="reference" writes a lean checkpoint: the trainable weights only, and a
        reference to the frozen layer (its source, layer index, dtype, 8-bit mode and a sha256
        over its tensors); from_pretrained re-reads just that layer from its source and checks
        the hash. A layer that cannot be referenced (random, trained, or itself from a PiFi
        checkpoint) makes this a ValueError naming why.

        Written into a temporary sibling folder and renamed into place, so an interrupted save
        never leaves a folder that loads as a checkpoint (an existing one is replaced only
        after the new one is complete). extra_files: {name: writer(path)} written inside it too
        (a tokenizer, a trainer state), so they are replaced atomically with the weights.
        into_existing=True keeps whatever else the folder holds (a Trainer's output folder with
        its checkpoints) and moves only our files in, the weights last: a folder with the new
        config but old weights can exist for an instant, never one without weights.
        state_dict: the weights to write instead of self.state_dict() (a sharded model's,
        gathered by pifi_fast.training.sharding.full_model_state).
        """
        target = Path(directory).resolve()
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            if frozen_layer not in ("full", "reference"):
                raise ValueError(f"frozen_layer must be 'full' or 'reference', got "
                                 f"{frozen_layer!r}")
            reference = None
            if frozen_layer == "reference":
                why = self.can_reference_frozen_layer()
                if why:
                    raise ValueError(f"cannot write a lean checkpoint: {why}")
                reference = {"source": str(self.llm_source), "layer": self.llm_index,
                             "dtype": str(self.layer_dtype).replace("torch.", ""),
                             "weights": self._options.get("weights", "auto"),
                             "sha256": self.frozen_layer_sha256()}
            state = {k: v.detach().to("cpu").contiguous().clone()
                     for k, v in (self.state_dict() if state_dict is None
                                  else state_dict).items()
                     if reference is None or not k.startswith("llm_layer.")}
            safetensors.torch.save_file(state, str(tmp / WEIGHTS_NAME),
                                        metadata={"format": "pt"})
            config = {
                "pifi_fast_version": installed_version(),
                "options": self._options,
                "labels": self.labels,
                "llm_source": self.llm_source,
                "frozen_layer": reference,
                "llm_index": self.llm_index,
                "layer_dtype": None if self.llm_config is None else
                str(self.layer_dtype).replace("torch.", ""),
                "slm_config": self.slm.config.to_dict(),
                "llm_config": None if self.llm_config is None else self.llm_config.to_dict(),
            }
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, default=str))
            extra_files = dict(extra_files or {})
            if getattr(self, "tokenizer", None) is not None:  # (a caller's own one wins)
                extra_files.setdefault("tokenizer", self.tokenizer.save_pretrained)
            for name, writer in extra_files.items():
                writer(tmp / name)
            if into_existing and target.is_dir():
                for item in sorted(tmp.iterdir(), key=lambda p: p.name == WEIGHTS_NAME):
                    dest = target / item.name
                    if dest.is_dir():
                        shutil.rmtree(dest)
                    os.replace(item, dest)
                shutil.rmtree(tmp, ignore_errors=True)
                return target
            old = None
            if target.exists():
                old = target.with_name(f".{target.name}.old-{os.getpid()}")
                os.replace(target, old)
            os.replace(tmp, target)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    @classmethod
    def from_pretrained(cls, directory, map_location="cpu", llm_source: str | None = None,
                        layer_dtype=None, **layer_options):
        """A saved model, full or lean. For a lean checkpoint the frozen layer is re-read from
        the recorded source (or ``llm_source``, when the files moved) and its sha256 checked.
        ``layer_options`` override the saved options of how the frozen layer runs, e.g.
        ``weights="int8-channel"``: the saved projection weights (dequantized first when they
        were saved in another 8-bit mode) quantized on load, for 8-bit inference on a CPU.
        ``layer_dtype`` (e.g. "bfloat16"): the frozen layer's dtype instead of the saved one
        (the SLM, adapters and head keep theirs)."""
        if not Path(directory).expanduser().exists() and looks_like_repo_id(str(directory)):
            directory = hub.download(str(directory))  # or the cache, with HF_HUB_OFFLINE=1
        directory = Path(directory).expanduser()
        cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        if not cfg_path.is_file() or not w_path.is_file():
            raise FileNotFoundError(f"{directory} is not a PiFi checkpoint (needs {CONFIG_NAME} "
                                    f"and {WEIGHTS_NAME})")
        check_safetensors_file(w_path)  # a cut file: an error naming it, not a header error
        cfg = json.loads(cfg_path.read_text())
        opts = dict(cfg["options"])
        saved_weights = opts.get("weights", "auto")
        requantize = layer_options.get("weights", saved_weights) != saved_weights
        dtype_name = cfg.get("layer_dtype")
        if layer_dtype is not None and cfg.get("llm_config") is not None:
            wanted = str(layer_dtype).replace("torch.", "")
            if wanted not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"layer_dtype must be float32, bfloat16 or float16, got "
                                 f"{layer_dtype!r}")
            redtype, dtype_name = wanted != dtype_name, wanted
        else:
            redtype = False
        if (requantize or redtype) and cfg.get("frozen_layer") is not None:
            # a lean checkpoint's hash is of the layer in its saved mode: re-read and verify it
            # so, then build the new mode from a full copy of the verified model
            verified = cls.from_pretrained(directory, map_location, llm_source)
            with tempfile.TemporaryDirectory(prefix="pifi-requantize-") as tmp:
                verified.save_pretrained(Path(tmp) / "full")
                model = cls.from_pretrained(Path(tmp) / "full", map_location,
                                            layer_dtype=layer_dtype, **layer_options)
            model.llm_source, model.loaded_from = verified.llm_source, directory
            return model
        opts.update(layer_options)
        slm_cfg = dict(cfg["slm_config"])
        slm_config = AutoConfig.for_model(slm_cfg.pop("model_type"), **slm_cfg)
        state = safetensors.torch.load_file(str(w_path), device=str(map_location))
        if requantize:  # the layer's float weights, which the new mode quantizes on load
            state = {k: dequantize(v, state[k + "_scale"]) if k + "_scale" in state else v
                     for k, v in state.items()
                     if not (k.startswith("llm_layer.") and k.endswith("_scale"))}
        slm_cls = AutoModelForSeq2SeqLM if opts["task"] == "seq2seq" else AutoModel
        slm = slm_cls.from_config(slm_config)
        llm = None
        reference = cfg.get("frozen_layer")
        if reference is not None:
            llm = reread_frozen_layer(reference, llm_source, directory)
        elif cfg["llm_config"] is not None:
            llm_cfg = dict(cfg["llm_config"])
            llm_config = AutoConfig.for_model(llm_cfg.pop("model_type"), **llm_cfg)
            llm = layers_from_state(llm_config, cfg["llm_index"], getattr(torch, dtype_name),
                                    state, source=str(directory))
        model = cls(slm, llm, labels=cfg.get("labels"), **opts)
        if reference is not None:
            missing, unexpected = model.load_state_dict(state, strict=False)
            missing = [k for k in missing if not k.startswith("llm_layer.")]
            if missing or unexpected:
                raise RuntimeError(f"{directory}: lean checkpoint does not fit the model: "
                                   f"missing {missing[:5]}, unexpected {unexpected[:5]}")
            got = model.frozen_layer_sha256()
            if got != reference["sha256"]:
                raise CheckpointError(
                    f"{directory}: the frozen layer re-read from {llm.source} (layer "
                    f"{reference['layer']}) differs from the one trained with: sha256 {got} "
                    f"!= {reference['sha256']} (the source changed?)")
        else:
            model.load_state_dict(state, strict=True)
        model.llm_source = cfg.get("llm_source", model.llm_source)
        model.loaded_from = directory
        if (directory / "tokenizer").is_dir():  # written beside the weights by save_pretrained
            model.tokenizer = AutoTokenizer.from_pretrained(directory / "tokenizer")
        return model

    def merge_lora(self) -> None:
        """Fold the SLM's LoRA updates into its weights (for export): the model then saves and
        loads as a plain one, without peft."""
        if "lora" not in self._options:
            return
        self.slm = self.slm.merge_and_unload()
        del self._options["lora"]

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token=None,
                    commit_message: str = "Upload PiFi model") -> str:
        """Upload this model with a model card to the Hugging Face Hub (pifi_fast.hub); a model
        loaded from a checkpoint folder uploads that folder (tokenizer and results too)."""
        return hub.push_to_hub(self, repo_id, private=private, token=token,
                               commit_message=commit_message,
                               source_folder=getattr(self, "loaded_from", None))



def layers_from_state(llm_config, llm_index, dtype, state: dict, source: str = ""):
    """The frozen layer(s) of a PiFi state dict (keys "llm_layer.<HF key>", or
    "llm_layer.<i>.<HF key>" for several layers) as the LLM's own Hugging Face decoder layers:
    one LLMLayer, or a list when ``llm_index`` is a list. 8-bit projections (a "<key>_scale"
    beside them) are dequantized: the Hugging Face module holds float weights, and an 8-bit
    layer built from it loads the stored 8-bit tensors as they are afterwards."""
    layer_sd = {k[len("llm_layer."):]: v for k, v in state.items() if k.startswith("llm_layer.")}
    layer_sd = {k: dequantize(v, layer_sd[k + "_scale"]) if k + "_scale" in layer_sd else v
                for k, v in layer_sd.items() if not k.endswith("_scale")}
    if isinstance(llm_index, list):
        return [build_layer(llm_config, index, {k[len(f"{i}."):]: v for k, v in layer_sd.items()
                                                if k.startswith(f"{i}.")},
                            dtype=dtype, source=source)
                for i, index in enumerate(llm_index)]
    return build_layer(llm_config, llm_index, layer_sd, dtype=dtype, source=source)


def looks_like_repo_id(name: str) -> bool:
    """org/name (one slash, no path syntax): a Hub repo id rather than a missing folder."""
    return (name.count("/") == 1 and not name.startswith((".", "/", "~"))
            and not name.endswith("/"))


def reread_frozen_layer(reference: dict, override: str | None, directory: Path):
    """The frozen layer of a lean checkpoint, read again from its source."""
    source = override or reference["source"]
    local = Path(source).expanduser()
    looks_local = source.startswith((".", "/", "~")) or local.suffix == ".gguf"
    if looks_local and not local.exists():
        raise FileNotFoundError(
            f"{directory} is a lean checkpoint: its frozen layer is layer {reference['layer']} of "
            f"{source}, which is missing here; pass from_pretrained(..., llm_source=PATH) to "
            "point at it, or use a full checkpoint")
    dtype = getattr(torch, reference["dtype"])
    if isinstance(reference["layer"], list):  # several plugged layers
        return [load_llm_layer(source, i, dtype=dtype) for i in reference["layer"]]
    return load_llm_layer(source, reference["layer"], dtype=dtype)
