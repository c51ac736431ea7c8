"""Nothing read back from a run folder runs code: the trainer state (optimizer, GradScaler, RNG
and run state) loads with torch.load(weights_only=True), a planted pickle payload is refused
before it runs, and folders written before the change still resume to the same bits."""
import contextlib
import io
import os
import pickle
import random
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import save_tiny_run_models

from pifi_fast.train import TrainConfig, train
from pifi_fast.training.checkpoints import (TRAINER_STATE, TrainerStateError, plain_state,
                                            load_trainer_state)
from pifi_fast.training.runtime import rng_state, seed_everything, set_rng_state

offline = pytest.importorskip("pifi_fast.offline")

TEXTS = ["a warm and funny film", "dull, long and cold", "one of the best of the year",
         "i want my money back", "a fine cast in a fine story", "the plot makes no sense"]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """A tiny BERT (with the real MiniLM tokenizer; dropout on, so the RNG matters), a tiny
    Llama and a small csv dataset."""
    root = tmp_path_factory.mktemp("safe")
    save_tiny_run_models(root)
    data = root / "data"
    data.mkdir()
    rows = [(t, i % 2) for i, t in enumerate(TEXTS * 4)]
    for split, part in (("train", rows), ("dev", rows[:8])):
        (data / f"{split}.csv").write_text(
            "text,label\n" + "".join(f'"{t}",{y}\n' for t, y in part))
    return {"bert": str(root / "bert"), "llama": str(root / "llama"), "data": str(data),
            "root": root}


def _cfg(dirs, out, **kw):
    base = dict(data=dirs["data"], slm=dirs["bert"], llm=dirs["llama"], epochs=2,
                batch_size=8, output_dir=str(out), test_split=None, seed=7, lr=1e-3,
                precision="fp16")  # fp16: the GradScaler's state is saved too
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def one_epoch(tiny_dirs):
    """A run stopped after its first epoch (the folder a resume starts from)."""
    out = tiny_dirs["root"] / "one_epoch"
    train(_cfg(tiny_dirs, out, epochs=1))
    return out


class Payload:
    """Unpickled, it runs its call: what a planted trainer_state.pt would do."""

    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def _payloads(marker):
    return {"os.system in a torch.save zip": lambda path: torch.save(
                {"optimizer": {}, "rng": Payload(os.system, f"touch '{marker}'"), "state": {}},
                path),
            "open in a bare pickle": lambda path: path.write_bytes(
                pickle.dumps(Payload(open, str(marker), "w")))}


# -- the RNG state ---------------------------------------------------------------------------------
def test_rng_state_is_tensors_and_plain_values_and_restores_exactly(tmp_path):
    seed_everything(11)
    random.gauss(0, 1)  # leaves Python's second Gaussian cached
    np.random.standard_normal()  # ... and NumPy's
    state = rng_state()
    assert state["python"]["gauss_next"] is not None and state["numpy"]["has_gauss"] == 1
    torch.save(state, tmp_path / "rng.pt")
    draws = (random.random(), random.gauss(0, 1), np.random.standard_normal(3).tolist(),
             np.random.randint(0, 1000, 4).tolist(), torch.rand(3).tolist())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert draws == (random.random(), random.gauss(0, 1), np.random.standard_normal(3).tolist(),
                     np.random.randint(0, 1000, 4).tolist(), torch.rand(3).tolist())


def test_the_saved_trainer_state_loads_weights_only(one_epoch):
    saved = torch.load(one_epoch / "checkpoint-last" / TRAINER_STATE, weights_only=True)
    assert saved["format"] == 2 and saved["state"]["epoch"] == 1
    assert saved["scaler"]["scale"] > 0  # the GradScaler's state (fp16)
    assert saved["optimizer"]["state"] and {"numpy", "python", "torch"} <= saved["rng"].keys()


def test_save_keeps_only_what_a_weights_only_load_accepts():
    plain = plain_state({"best": np.float64(0.5), "history": [{"n": np.int64(3)}], "t": (1, None)})
    assert plain == {"best": 0.5, "history": [{"n": 3}], "t": (1, None)}
    assert type(plain["best"]) is float and type(plain["history"][0]["n"]) is int
    with pytest.raises(TypeError, match=r"trainer state\['bad'\]: a ndarray is not a tensor"):
        plain_state({"bad": np.zeros(2)})


# -- planted and broken files ----------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["os.system in a torch.save zip", "open in a bare pickle"])
def test_a_planted_payload_is_refused_not_run(tiny_dirs, one_epoch, tmp_path, kind):
    marker = tmp_path / "payload-ran"
    plant = _payloads(marker)[kind]
    plant(tmp_path / "live.pt")  # the payload is live: an unsafe load runs it (then fails)
    with contextlib.suppress(RuntimeError):
        torch.load(tmp_path / "live.pt", weights_only=False)
    assert marker.exists()
    marker.unlink()

    out = tmp_path / "run"
    shutil.copytree(one_epoch, out)
    target = out / "checkpoint-last" / TRAINER_STATE
    plant(target)
    with pytest.raises(TrainerStateError) as err:
        train(_cfg(tiny_dirs, out, resume=True))
    assert not marker.exists()
    message = str(err.value)
    assert str(target) in message and "refused to load it" in message
    assert "without --resume" in message and "weights_only=False" not in message


@pytest.mark.slow  # over 2 s on 2 cores: not in make check
def test_the_cli_refuses_a_planted_payload_in_one_line(tiny_dirs, one_epoch, tmp_path):
    """The issue's case: `pifi-fast train --resume` on a folder with a planted payload."""
    marker = tmp_path / "payload-ran"
    out = tmp_path / "run"
    shutil.copytree(one_epoch, out)
    target = out / "checkpoint-last" / TRAINER_STATE
    _payloads(marker)["os.system in a torch.save zip"](target)
    cmd = [sys.executable, "-m", "pifi_fast.cli", "train", "--data", tiny_dirs["data"], "--slm",
           tiny_dirs["bert"], "--llm", tiny_dirs["llama"], "--epochs", "2", "--batch-size", "8",
           "--output-dir", str(out), "--test-split", "none", "--seed", "7", "--resume", "true"]
    env = {k: v for k, v in os.environ.items() if k != "PIFI_FAST_DEBUG"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert not marker.exists()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"pifi-fast train: error: {target}: refused to load it" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("content", ["list", "truncated", "empty"])
def test_a_broken_trainer_state_is_refused_with_its_name(tmp_path, content):
    path = tmp_path / TRAINER_STATE
    if content == "list":
        torch.save([1, 2], path)
    else:
        buffer = io.BytesIO()
        torch.save({"optimizer": {}, "rng": {}, "state": {}}, buffer)
        path.write_bytes(buffer.getvalue()[:40] if content == "truncated" else b"")
    with pytest.raises(TrainerStateError,
                       match=rf"{re.escape(str(path))}: not a .*without --resume"):
        load_trainer_state(tmp_path)


# -- folders written before the change -------------------------------------------------------------
def _to_old_layout(path):
    """trainer_state.pt as runs wrote it before: Python's RNG state as its tuple, no NumPy
    state, no format field."""
    saved = torch.load(path, weights_only=True)
    rng, python = saved["rng"], saved["rng"]["python"]
    old_rng = {"python": (python["version"], tuple(python["internal"].tolist()),
                          python["gauss_next"]), "torch": rng["torch"]}
    if "cuda" in rng:
        old_rng["cuda"] = rng["cuda"]
    torch.save({"optimizer": saved["optimizer"], "rng": old_rng, "state": saved["state"],
                "scaler": saved["scaler"]}, path)


def test_a_folder_written_before_the_change_resumes_to_the_same_bits(tiny_dirs, one_epoch,
                                                                       tmp_path):
    straight = train(_cfg(tiny_dirs, tmp_path / "straight"))
    for layout in ("new", "old"):
        out = tmp_path / layout
        shutil.copytree(one_epoch, out)
        if layout == "old":
            _to_old_layout(out / "checkpoint-last" / TRAINER_STATE)
        resumed = train(_cfg(tiny_dirs, out, resume=True))
        for h in resumed["history"] + straight["history"]:
            h.pop("epoch_seconds", None)
        assert resumed["history"] == straight["history"], layout
        got, ref = resumed["model"].state_dict(), straight["model"].state_dict()
        assert all(torch.equal(got[k], ref[k]) for k in ref), layout
