"""A run's checkpoints: writing them (lean by default, atomically, with the trainer state for
resuming), loading their weights back into the model being trained, and recovering the output
folder after a kill.

Nothing read back from a run folder runs code: weights are safetensors, configs JSON, and the
trainer state (trainer_state.pt: optimizer, GradScaler, RNG and run state) holds only tensors
and plain values, read with torch.load(weights_only=True). Folders written before the RNG state
became tensors load the same way without any allowlist (their Python RNG state is a tuple of
ints, which weights_only accepts; they had no NumPy state), so they stay resumable; a file
holding anything else is refused (TrainerStateError), never unpickled."""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from pifi_fast.persistence import CONFIG_NAME
from pifi_fast.training.faults import fault_point
from pifi_fast.training.runtime import rng_state


TRAINER_STATE = "trainer_state.pt"
_PLAIN = (str, int, float, bool, type(None))


class TrainerStateError(ValueError):
    """A checkpoint's trainer_state.pt is not one training can resume from: unreadable, not
    laid out as pifi_fast writes it, or holding objects other than tensors and plain values
    (refused unloaded: unpickling them could run code)."""


def recover_checkpoints(out_dir: Path) -> None:
    """After a kill: temporary folders of an unfinished save are removed (they never load), and
    a checkpoint caught between its two renames (the old one moved aside, the new one not yet
    in place) is moved back."""
    if not out_dir.is_dir():
        return
    for tmp in out_dir.glob(".*.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    for old in out_dir.glob(".*.old-*"):
        target = out_dir / old.name[1:].split(".old-")[0]
        if not target.exists():
            os.replace(old, target)
        else:
            shutil.rmtree(old, ignore_errors=True)


def load_best(model, best_dir: Path, device, load_state=None) -> bool:
    """The best checkpoint's weights into the model; True when it was already exported merged
    (LoRA folded in, by an earlier invocation of a resumed run): the model is merged first."""
    options = json.loads((best_dir / CONFIG_NAME).read_text())["options"]
    merged = "lora" in model._options and "lora" not in options
    if merged:
        model.merge_lora()
    load_weights(model, best_dir, device, load_state)
    return merged


def load_weights(model, directory: Path, device, load_state=None) -> None:
    """A checkpoint's weights into the model being trained: full, or lean (no frozen layer:
    the model's own, read from the same source, must be the one the checkpoint names).
    load_state(state, strict) -> (missing, unexpected) puts them in (default:
    model.load_state_dict; a sharded model's: pifi_fast.training.sharding)."""
    config = json.loads((directory / CONFIG_NAME).read_text())
    reference = config.get("frozen_layer")
    if reference is not None and model.frozen_layer_sha256() != reference["sha256"]:
        raise RuntimeError(f"{directory}: the frozen layer of this run differs from the one the "
                           f"checkpoint was trained with ({reference['source']}, layer "
                           f"{reference['layer']}): not resuming from it")
    missing, unexpected = (load_state or model.load_state_dict)(
        load_file(str(directory / "model.safetensors"), device=str(device)),
        strict=reference is None)
    if reference is not None and (unexpected or any(not k.startswith("llm_layer.")
                                                    for k in missing)):
        raise RuntimeError(f"{directory}: checkpoint does not fit the model ({missing[:5]}, "
                           f"{unexpected[:5]})")


def save_checkpoint(model, task_data, optimizer, state, cfg, directory: Path, scaler=None,
                    model_state: dict | None = None, optimizer_state: dict | None = None):
    """A checkpoint folder; with an optimizer (or its gathered ``optimizer_state``) also the
    trainer state that --resume reads. A sharded run passes the full weights and optimizer
    state its ranks gathered (model_state, optimizer_state: see training.sharding); its
    trainer state says so ("layout": "fsdp"), since its optimizer state is keyed by parameter
    name where a one-process or DDP run's is keyed by position."""
    labels = None if task_data.label_map is None else [[k, v] for k, v in
                                                        task_data.label_map.items()]
    extra = {"tokenizer": lambda p: task_data.tok.save_pretrained(p),
             "train_config.json": lambda p: p.write_text(json.dumps(
                 {**dataclasses.asdict(cfg), "label_map": labels}, indent=2))}
    if optimizer is not None or optimizer_state is not None:
        def write_state(p):
            fault_point("checkpoint_write")  # weights and config are written, this is not
            torch.save(plain_state({"format": 2, "layout": "ddp" if optimizer_state is None else "fsdp",
                               "optimizer": (optimizer.state_dict() if optimizer_state is None
                                             else optimizer_state),
                               "rng": rng_state(), "state": state,
                               "scaler": scaler.state_dict() if scaler is not None else None}),
                       p)

        extra[TRAINER_STATE] = write_state
    # lean by default: the frozen layer never changes, so it is referenced, not copied
    lean = not cfg.full_checkpoints and model.can_reference_frozen_layer() is None
    model.save_pretrained(directory, extra_files=extra,
                          frozen_layer="reference" if lean else "full", state_dict=model_state)


def load_trainer_state(directory: Path) -> dict:
    """The trainer state of a checkpoint folder, read with torch.load(weights_only=True): a
    file holding anything but tensors and plain values raises TrainerStateError naming it, and
    nothing in it runs."""
    path = Path(directory) / TRAINER_STATE
    advice = ("if you did not write this run folder yourself, do not use it; to train anyway, "
              "run without --resume (a fresh start, which replaces its checkpoints)")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's own message advises weights_only=False: not for this file; only its finding
        found = re.search(r"unsupported global:? GLOBAL [\w.]+|unsupported operand \d+", str(exc),
                          re.IGNORECASE)
        raise TrainerStateError(
            f"{path}: refused to load it: pifi_fast writes only tensors and plain values there, "
            f"and this file holds something else "
            f"({found.group(0) if found else 'unreadable by the safe loader'}), which "
            f"unpickling could run as code; {advice}") from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise TrainerStateError(f"{path}: not a readable trainer state ({exc}); {advice}") from exc
    if not (isinstance(saved, dict) and {"optimizer", "rng", "state"} <= saved.keys()
            and isinstance(saved["state"], dict) and isinstance(saved["rng"], dict)):
        raise TrainerStateError(f"{path}: not a pifi_fast trainer state (expected a dict with "
                                f"optimizer, rng and state); {advice}")
    return saved


def plain_state(obj, where="trainer state"):
    """obj with NumPy scalars made Python numbers; TypeError for anything else that
    torch.load(weights_only=True) would refuse, so that a run never writes a state it cannot
    resume from."""
    if torch.is_tensor(obj) or type(obj) in _PLAIN:
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {plain_state(k, where): plain_state(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [plain_state(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    raise TypeError(f"{where}: a {type(obj).__name__} is not a tensor or plain value; "
                    "trainer_state.pt holds only those (it is read with weights_only=True)")
