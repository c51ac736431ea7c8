"""Sharing PiFi models the way Hugging Face users expect: the Hub and a model card.

    PiFiModel.from_pretrained("org/name")     a local folder, else a Hub repo (cache offline)
    model.push_to_hub("org/name")              save_pretrained + model card, one upload
    pifi-fast push runs/sst2/best org/name     the same from the command line

The model card (README.md in the folder) says what the model is: the SLM, the LLM source and
layer, the task and labels, the metrics of the run (results.json), the command that trained it
and the pifi_fast version. pifi-fast train writes it into the best checkpoint.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import huggingface_hub
from huggingface_hub.errors import LocalEntryNotFoundError

from pifi_fast.loading import HUB_UNREACHABLE, ensure_hub_reachable, hub_offline
from pifi_fast.version import installed_version

CARD_NAME = "README.md"
# what a PiFi checkpoint folder holds: nothing else is downloaded
_FILES = ["pifi_config.json", "model.safetensors", "README.md", "results.json",
          "train_config.json", "tokenizer/*"]


def download(repo_id: str, revision: str | None = None) -> Path:
    """A local folder holding the PiFi checkpoint of a Hub repo: downloaded (only a
    checkpoint's files), or, with HF_HUB_OFFLINE=1, found in the local cache."""
    ensure_hub_reachable()
    offline = hub_offline()
    try:
        path = huggingface_hub.snapshot_download(repo_id, revision=revision,
                                                 allow_patterns=_FILES, local_files_only=offline)
    except LocalEntryNotFoundError:
        if offline:
            raise FileNotFoundError(f"{repo_id} is not in the local Hub cache "
                                    "(HF_HUB_OFFLINE=1)") from None
        raise ConnectionError(HUB_UNREACHABLE) from None
    return Path(path)


def _fmt_metric(value):
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def model_card(model, results: dict | None = None, train_config: dict | None = None) -> str:
    """README.md text for a saved PiFi model."""
    slm = getattr(model.slm.config, "_name_or_path", "") or model.slm.config.model_type
    index = model.llm_index
    where = (f"layers {', '.join(map(str, index))}" if isinstance(index, list)
             else f"layer {index}")
    llm = (f"{where} of `{model.llm_source or model.llm_config.model_type}` "
           f"({model.llm_config.model_type}, hidden {model.llm_config.hidden_size}), frozen"
           if model.llm_config is not None else "none (the SLM alone)")
    weights = model._options.get("weights", "auto")
    lines = ["---", "library_name: pifi-fast", "tags:", "- pifi", "- frozen-llm-layer",
             f"- {model.task}", "---", "", "# PiFi model", "",
             "A small LM with one frozen decoder layer of a large LM plugged in between two "
             f"{model._options.get('adapter', 'linear')} adapters (PiFi, ACL 2025), trained "
             f"with pifi_fast {installed_version()}.", "",
             "| | |", "|---|---|", f"| small LM | `{slm}` |", f"| LLM layer | {llm} |",
             f"| frozen layer weights | {weights} |", f"| task | {model.task} |"]
    if model.labels is not None:
        lines.append(f"| labels | {', '.join(str(x) for x in model.labels)} |")
    if results:
        metric = results.get("metric")
        if results.get("best_dev") is not None:
            lines.append(f"| dev {metric} | {_fmt_metric(results['best_dev'])} (epoch "
                         f"{results.get('best_epoch')}) |")
        for name, value in (results.get("test") or {}).items():
            lines.append(f"| test {name} | {_fmt_metric(value)} |")
    if train_config:
        args = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in train_config.items()
                        if k in ("data", "task", "slm", "llm", "layer", "epochs", "batch_size",
                                 "lr", "seed", "precision", "layer_weights") and v is not None)
        lines += ["", "Trained with:", "", "```bash", f"pifi-fast train {args}", "```"]
    lines += ["", "Load it:", "", "```python", "from pifi_fast import PiFiModel",
              "model = PiFiModel.from_pretrained(\"<this folder or repo id>\")"]
    if model.task == "classification":
        lines.append("model.predict([\"a sentence to classify\"])")
    lines += ["```", ""]
    return "\n".join(lines)


def write_model_card(model, directory, results: dict | None = None) -> Path:
    """The model card into a checkpoint folder (its train_config.json, when present, gives the
    command)."""
    directory = Path(directory)
    train_config = None
    if (directory / "train_config.json").is_file():
        train_config = json.loads((directory / "train_config.json").read_text())
    path = directory / CARD_NAME
    path.write_text(model_card(model, results, train_config))
    return path


def push_to_hub(model, repo_id: str, *, private: bool | None = None, token=None,
                commit_message: str = "Upload PiFi model", source_folder=None,
                results: dict | None = None) -> str:
    """Upload a PiFi checkpoint with its model card: the folder it was loaded from
    (``source_folder``, keeping its tokenizer and results) or a fresh save_pretrained."""
    ensure_hub_reachable()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        if source_folder is not None:
            shutil.copytree(source_folder, folder)
        else:
            model.save_pretrained(folder)
        if results is None and (folder / "results.json").is_file():
            results = json.loads((folder / "results.json").read_text())
        if not (folder / CARD_NAME).is_file() or results is not None:
            write_model_card(model, folder, results)
        api = huggingface_hub.HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder),
                                 commit_message=commit_message)
    return str(getattr(info, "commit_url", info))
