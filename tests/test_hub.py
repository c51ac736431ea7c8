"""The Hub: PiFiModel.from_pretrained("org/name") through a Hub cache laid out as huggingface_hub
lays it out (HF_HUB_OFFLINE=1), push_to_hub with its model card (a stand-in HfApi records the
upload: no network here), and the one-line error when the Hub cannot be reached."""
import json
import shutil
import time

import pytest
import torch
from helpers import tiny_llm, tiny_slm

from pifi_fast import PiFiModel


@pytest.fixture
def saved(tmp_path):
    model = PiFiModel.from_parts(tiny_slm("bert"), tiny_llm("llama"), num_labels=2, seed=0,
                                 head_dropout=0.0, labels=["neg", "pos"])
    folder = model.save_pretrained(tmp_path / "model")
    (folder / "results.json").write_text(json.dumps(
        {"metric": "accuracy", "best_dev": 0.875, "best_epoch": 2,
         "test": {"accuracy": 0.861, "f1": 0.85}}))
    (folder / "train_config.json").write_text(json.dumps(
        {"data": "sst2", "slm": "minilm", "llm": "smollm2", "epochs": 3, "seed": 1,
         "label_map": [["neg", 0], ["pos", 1]]}))
    return model, folder


def _offline_cache(monkeypatch, tmp_path):
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_from_pretrained_reads_a_repo_from_the_hub_cache_offline(saved, tmp_path, monkeypatch):
    model, folder = saved
    cache = _offline_cache(monkeypatch, tmp_path)
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--someone--pifi-sst2"
    shutil.copytree(folder, repo / "snapshots" / revision)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    loaded = PiFiModel.from_pretrained("someone/pifi-sst2")
    ids = torch.randint(3, 120, (2, 5))
    assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert loaded.labels == ["neg", "pos"]
    with pytest.raises(FileNotFoundError, match="someone/other is not in the local Hub cache"):
        PiFiModel.from_pretrained("someone/other")


def test_push_to_hub_uploads_the_checkpoint_with_a_model_card(saved, tmp_path, monkeypatch):
    import huggingface_hub

    model, folder = saved
    uploads = {}

    class FakeApi:
        def __init__(self, token=None):
            self.token = token

        def create_repo(self, repo_id, private=None, exist_ok=False):
            uploads["repo"] = (repo_id, private, exist_ok)

        def upload_folder(self, repo_id, folder_path, commit_message):
            shutil.copytree(folder_path, tmp_path / "uploaded")
            return "https://huggingface.co/someone/pifi-sst2/commit/1"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr("pifi_fast.hub.ensure_hub_reachable", lambda: None)
    loaded = PiFiModel.from_pretrained(folder)
    url = loaded.push_to_hub("someone/pifi-sst2", private=True)
    assert url.endswith("/commit/1") and uploads["repo"] == ("someone/pifi-sst2", True, True)
    card = (tmp_path / "uploaded" / "README.md").read_text()
    for fragment in ("library_name: pifi-fast", "| task | classification |",
                     "| labels | neg, pos |", "| dev accuracy | 0.8750 (epoch 2) |",
                     "| test accuracy | 0.8610 |", "pifi-fast train --data sst2",
                     "PiFiModel.from_pretrained", "frozen"):
        assert fragment in card, fragment
    again = PiFiModel.from_pretrained(tmp_path / "uploaded")
    ids = torch.randint(3, 120, (2, 5))
    assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)


def test_an_unreachable_hub_is_one_line_within_seconds_for_models(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")
    t0 = time.monotonic()
    with pytest.raises(ConnectionError, match="cannot reach the Hugging Face Hub"):
        PiFiModel.from_pretrained("someone/pifi-sst2")
    assert time.monotonic() - t0 < 10
