"""Reliability: bad inputs caught before a GPU sees them, labels as users write them, non-finite
guards, killed runs that resume to the same bits, determinism. (Truncated files: test_loading;
mixed precision: test_mixed_precision; property tests: test_properties.)"""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from helpers import ragged_batch, save_tiny_run_models, tiny_llm, tiny_slm

from pifi_fast import PiFiModel
from pifi_fast import data as data_mod
from pifi_fast.train import (NonFiniteError, TaskData, TrainConfig, evaluate_checkpoint,
                             train)
from pifi_fast.training import loop

offline = pytest.importorskip("pifi_fast.offline")


# -- inputs checked before a GPU kernel sees them --------------------------------------------------
@pytest.fixture(scope="module")
def cls_model():
    return PiFiModel.from_parts(tiny_slm("bert"), tiny_llm("llama"), num_labels=3, seed=0)


def test_token_ids_outside_the_vocabulary_name_value_limit_and_row(cls_model):
    ids, mask = ragged_batch(120, [5, 3, 4])
    bad = ids.clone()
    bad[2, 1] = 120
    with pytest.raises(ValueError, match=r"row 2, position 1: token id 120 is outside the SLM's "
                                         r"vocabulary of 120 ids \(0\.\.119\)"):
        cls_model(input_ids=bad, attention_mask=mask)
    bad[2, 1] = -3
    with pytest.raises(ValueError, match="row 2, position 1: token id -3"):
        cls_model(input_ids=bad, attention_mask=mask)
    # the check is what a GPU user can switch on; switched off, torch's own error remains
    cls_model.validate_inputs = False
    try:
        with pytest.raises(IndexError):
            cls_model(input_ids=bad, attention_mask=mask)
    finally:
        cls_model.validate_inputs = None


def test_labels_outside_the_classes_name_value_limit_and_row(cls_model):
    ids, mask = ragged_batch(120, [5, 3, 4])
    with pytest.raises(ValueError, match=r"labels row 1: 5 is outside 0\.\.2 \(num_labels=3"):
        cls_model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 5, 1]))
    with pytest.raises(ValueError, match=r"labels row 0: -1 is outside"):
        cls_model(input_ids=ids, attention_mask=mask, labels=torch.tensor([-1, 0, 1]))
    out = cls_model(input_ids=ids, attention_mask=mask, labels=torch.tensor([2, -100, 0]))
    assert torch.isfinite(out.loss)  # -100 is "ignore", as in torch's cross entropy
    with pytest.raises(ValueError, match=r"batch row 1 \(example 17\)"):
        cls_model.check_values(ids, torch.tensor([0, 7, 1]), rows=[3, 17, 9])


# -- labels as users write them --------------------------------------------------------------
def test_numeric_labels_are_numbers_in_numeric_order():
    rows = [{"label": v} for v in ("10", "2", " 1 ", "2.0", 1.0, 10)]
    normalized = [data_mod.normalize_label(r["label"]) for r in rows]
    assert normalized == [10, 2, 1, 2, 1, 10] and all(type(v) is int for v in normalized)
    assert data_mod.label_vocabulary(rows) == {1: 0, 2: 1, 10: 2}  # class 2 is label 10
    assert data_mod.normalize_label("0.5") == 0.5 and data_mod.normalize_label("nan") == "nan"
    assert data_mod.label_vocabulary([{"label": "pos"}, {"label": "neg"}, {"label": 3}]) == {
        3: 0, "neg": 1, "pos": 2}
    with pytest.raises(ValueError, match=r"label '7' \(row 4 of dev\) is not one the model "
                                         r"knows; its labels are \[1, 2, 10\]"):
        data_mod.encode_label({1: 0, 2: 1, 10: 2}, "7", "row 4 of dev")
    assert data_mod.encode_label({1: 0, 2: 1, 10: 2}, "10.0") == 2


def _write_csv(folder, rows_by_split):
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in rows_by_split.items():
        lines = ["text,label"] + [f'"{t}",{y}' for t, y in rows]
        (folder / f"{split}.csv").write_text("\n".join(lines) + "\n")


TEXTS = ["a warm and funny film", "dull, long and cold", "one of the best of the year",
         "i want my money back", "a fine cast in a fine story", "the plot makes no sense",
         "moving and beautifully shot", "flat jokes and wooden acting"]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """A tiny BERT (with the real MiniLM tokenizer), a tiny Llama and a small csv dataset."""
    root = tmp_path_factory.mktemp("rel")
    save_tiny_run_models(root)
    train_rows = [(t, i % 2) for i, t in enumerate(TEXTS * 5)]
    _write_csv(root / "data", {"train": train_rows, "dev": train_rows[:16],
                               "test": train_rows[:8]})
    return {"bert": str(root / "bert"), "llama": str(root / "llama"), "data": str(root / "data"),
            "root": root}


def _cfg(dirs, out, **kw):
    base = dict(data=dirs["data"], slm=dirs["bert"], llm=dirs["llama"], epochs=2,
                batch_size=8, output_dir=str(out), test_split=None, seed=5, lr=1e-3)
    base.update(kw)
    return TrainConfig(**base)


def test_model_trained_on_int_labels_evaluates_on_csv_labels(tiny_dirs, tmp_path):
    """The finding: a model trained with integer labels, evaluated on a csv folder whose label
    column says 0/1 (strings in the file), failed with KeyError: '1'."""
    jsonl = tmp_path / "jsonl_data"
    jsonl.mkdir()
    rows = [{"text": t, "label": i % 2} for i, t in enumerate(TEXTS * 3)]
    for split in ("train", "dev"):
        (jsonl / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    res = train(_cfg(tiny_dirs, tmp_path / "run", data=str(jsonl), epochs=1))
    assert res["model"].labels == [0, 1]
    saved = PiFiModel.from_pretrained(tmp_path / "run" / "best")
    assert saved.labels == [0, 1]  # the label vocabulary travels with the weights
    other = tmp_path / "csv_eval"
    _write_csv(other, {"test": [(t, ("1.0", "0")[i % 2]) for i, t in enumerate(TEXTS)]})
    metrics = evaluate_checkpoint(str(tmp_path / "run" / "best"), str(other), "test")
    assert 0.0 <= metrics["accuracy"] <= 1.0
    _write_csv(other, {"test": [(TEXTS[0], 1), (TEXTS[1], 3)]})
    with pytest.raises(ValueError, match=r"label 3 \(row 1 of test\) is not one the model knows; "
                                         r"its labels are \[0, 1\]"):
        evaluate_checkpoint(str(tmp_path / "run" / "best"), str(other), "test")


def test_unknown_dev_label_stops_before_training(tiny_dirs, tmp_path):
    folder = tmp_path / "d"
    _write_csv(folder, {"train": [(t, i % 2) for i, t in enumerate(TEXTS)],
                        "dev": [(TEXTS[0], 0), (TEXTS[1], "maybe")]})
    with pytest.raises(ValueError, match=r"label 'maybe' \(row 1 of dev\)"):
        train(_cfg(tiny_dirs, tmp_path / "run", data=str(folder)))
    assert not (tmp_path / "run").exists()  # nothing was trained or written


# -- non-finite guard -------------------------------------------------------------------------
def test_diverging_learning_rate_stops_with_a_clear_message_and_keeps_the_checkpoint(
        tiny_dirs, tmp_path, monkeypatch):
    """Epoch 1 trains sanely; epoch 2 runs at a learning rate that diverges. The run stops
    before the bad optimizer step, naming epoch, step and examples; epoch 1's checkpoint is
    untouched."""
    real_step = loop.optimizer_step

    def diverging(model, optimizer, *args, **kwargs):
        if train_mod_state["epoch2"]:
            for group in optimizer.param_groups:
                group["lr"] = 1e30
        return real_step(model, optimizer, *args, **kwargs)

    train_mod_state = {"epoch2": False}
    real_eval = loop.evaluate

    def eval_then_diverge(*args, **kwargs):
        result = real_eval(*args, **kwargs)
        train_mod_state["epoch2"] = True
        return result

    monkeypatch.setattr(loop, "optimizer_step", diverging)
    monkeypatch.setattr(loop, "evaluate", eval_then_diverge)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"non-finite loss .* at epoch 2, step \d+, "
                                             r"examples \[[\d, ]+\]; stopped before the "
                                             r"optimizer step") as err:
        train(_cfg(tiny_dirs, out, epochs=3))
    assert "--on-nonfinite skip" in str(err.value)
    state = torch.load(out / "checkpoint-last" / "trainer_state.pt", weights_only=True)
    assert state["state"]["epoch"] == 1  # the last good state, untouched
    weights = PiFiModel.from_pretrained(out / "checkpoint-last").state_dict()
    assert all(torch.isfinite(v).all() for v in weights.values())


@pytest.mark.parametrize("precision", ["fp32", "fp16"])  # fp16: with the GradScaler
def test_skip_mode_skips_non_finite_steps_and_counts_them(tiny_dirs, tmp_path, monkeypatch,
                                                          precision):
    real_collate = TaskData.collate
    calls = {"n": 0}

    def poisoned(self, rows, **kw):  # every third training batch gets a NaN through its loss
        batch = real_collate(self, rows, **kw)
        calls["n"] += 1
        return batch

    real_forward = PiFiModel.forward

    def nan_forward(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        if self.training and calls["n"] % 3 == 0:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(TaskData, "collate", poisoned)
    monkeypatch.setattr(PiFiModel, "forward", nan_forward)
    res = train(_cfg(tiny_dirs, tmp_path / "run", on_nonfinite="skip", epochs=1,
                     precision=precision))
    assert res["nonfinite_steps_skipped"] == 5 // 3  # 40 rows / 8 = 5 steps: the 3rd is NaN
    weights = res["model"].state_dict()
    assert all(torch.isfinite(v).all() for v in weights.values())


# -- killed runs resume to the same bits -----------------------------------------------------------
def _train_cmd(dirs, out, *extra):
    return [sys.executable, "-m", "pifi_fast.cli", "train", "--data", dirs["data"], "--slm",
            dirs["bert"], "--llm", dirs["llama"], "--epochs", "2", "--batch-size", "8",
            "--output-dir", str(out), "--test-split", "none", "--seed", "5", "--lr", "1e-3",
            *extra]


def _run(cmd, fault=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("PIFI_FAST_FAULT", None)
    if fault:
        env["PIFI_FAST_FAULT"] = fault
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def _final(out):
    from safetensors.torch import load_file

    results = json.loads((out / "results.json").read_text())
    for h in results["history"]:
        h.pop("epoch_seconds")
    return (load_file(str(out / "checkpoint-last" / "model.safetensors")),
            load_file(str(out / "best" / "model.safetensors")), results["history"],
            results["best_dev"])


@pytest.fixture(scope="module")
def uninterrupted(tiny_dirs):
    out = tiny_dirs["root"] / "straight"
    proc = _run(_train_cmd(tiny_dirs, out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return _final(out)


@pytest.mark.slow  # over 2 s on 2 cores: not in make check
@pytest.mark.parametrize("fault", ["step:8", "checkpoint_write:1", "eval:2"],
                         ids=["mid-epoch-2", "during-checkpoint-write", "during-evaluation"])
def test_sigkilled_run_resumes_to_the_same_bits(tiny_dirs, uninterrupted, tmp_path, fault):
    """SIGKILL (5 steps per epoch, one evaluation batch): mid-epoch 2, while epoch 1's last
    checkpoint is being written (weights written, trainer state not), during epoch 2's
    evaluation. The resumed run's weights, best weights and metrics equal the uninterrupted
    run's exactly."""
    out = tmp_path / "run"
    killed = _run(_train_cmd(tiny_dirs, out), fault=fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    if fault.startswith("checkpoint_write"):
        # the half-written checkpoint sits in a temporary folder and is not a checkpoint
        partial = list(out.glob(".checkpoint-last.tmp-*"))
        assert partial and not (out / "checkpoint-last").exists()
        assert (partial[0] / "model.safetensors").exists()
        assert not (partial[0] / "trainer_state.pt").exists()
    resumed = _run(_train_cmd(tiny_dirs, out, "--resume", "true"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not list(out.glob(".*.tmp-*"))  # cleaned up on resume
    last, best, history, best_dev = _final(out)
    ref_last, ref_best, ref_history, ref_best_dev = uninterrupted
    assert history == ref_history and best_dev == ref_best_dev
    for got, ref in ((last, ref_last), (best, ref_best)):
        assert got.keys() == ref.keys()
        for k in ref:
            assert torch.equal(got[k], ref[k]), k


def test_a_partly_written_checkpoint_never_loads(tmp_path):
    from pifi_fast.persistence import CONFIG_NAME

    model = PiFiModel.from_parts(tiny_slm("bert"), tiny_llm("llama"), seed=0)
    model.save_pretrained(tmp_path / "ok")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / CONFIG_NAME).write_text((tmp_path / "ok" / CONFIG_NAME).read_text())
    with pytest.raises(FileNotFoundError, match="not a PiFi checkpoint"):
        PiFiModel.from_pretrained(partial)
    weights = (tmp_path / "ok" / "model.safetensors").read_bytes()
    (partial / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(Exception, match="model.safetensors"):
        PiFiModel.from_pretrained(partial)


# -- determinism --------------------------------------------------------------------------------
def test_two_runs_with_the_same_seed_are_identical_on_cpu(tiny_dirs, tmp_path):
    a = train(_cfg(tiny_dirs, tmp_path / "a", epochs=1))
    b = train(_cfg(tiny_dirs, tmp_path / "b", epochs=1))
    for h in a["history"] + b["history"]:
        h.pop("epoch_seconds")
    assert a["history"] == b["history"]
    sa, sb = a["model"].state_dict(), b["model"].state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    c = train(_cfg(tiny_dirs, tmp_path / "c", epochs=1, seed=6))
    assert not all(torch.equal(sa[k], c["model"].state_dict()[k]) for k in sa)
    # --deterministic (for GPUs) runs here too, equals the default on the CPU, and restores
    # the process-wide switches it sets
    d = train(_cfg(tiny_dirs, tmp_path / "d", epochs=1, deterministic=True))
    assert all(torch.equal(sa[k], d["model"].state_dict()[k]) for k in sa)
    assert not torch.are_deterministic_algorithms_enabled()
