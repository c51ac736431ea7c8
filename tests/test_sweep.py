"""pifi-fast sweep: the grid from a spec, a killed sweep resumed without redoing finished cells,
records checked against the spec, the report (results.json, results.md, plots)."""
import json

import pytest
from helpers import save_tiny_run_models, write_cue_word_data

from pifi_fast import cli
from pifi_fast.training import loop, sweep

offline = pytest.importorskip("pifi_fast.offline")


@pytest.fixture(scope="module")
def grid_parts(tmp_path_factory):
    """A tiny BERT with MiniLM's tokenizer, a tiny Llama, and a small labelled data folder."""
    root = tmp_path_factory.mktemp("sweep-parts")
    return {**save_tiny_run_models(root),
            "data": write_cue_word_data(root / "data", {"train": 16, "dev": 8, "test": 8})}


def _spec(parts, **train):
    return sweep.spec_from_dict({
        "sweep": {"name": "tiny", "tasks": [parts["data"]], "slms": [parts["bert"]],
                  "seeds": [1, 2]},
        "train": {"epochs": 2, "batch_size": 8, "lr": 1e-3, **train},
        "arm": [{"name": "alone", "llm": "none"},
                {"name": "tiny-llama", "llm": parts["llama"], "layers": [0, -1]}]})


def test_the_grid_has_one_cell_per_task_slm_arm_layer_and_seed(grid_parts):
    cells = _spec(grid_parts).cells()
    assert len(cells) == 1 * 1 * (1 + 2) * 2
    assert len({c.id for c in cells}) == len(cells)
    by_arm = {(c.arm, c.layer, c.seed): c for c in cells}
    assert by_arm[("alone", None, 1)].config["llm"] is None
    assert by_arm[("tiny-llama", -1, 2)].config["layer"] == -1
    assert by_arm[("tiny-llama", 0, 1)].config["epochs"] == 2
    with pytest.raises(sweep.SweepError, match="not a training option"):
        sweep.spec_from_dict({"sweep": {"tasks": ["x"], "seeds": [1]}, "train": {"epoch": 2},
                              "arm": [{"name": "a"}]})
    with pytest.raises(sweep.SweepError, match="set by the grid"):
        sweep.spec_from_dict({"sweep": {"tasks": ["x"], "seeds": [1]}, "train": {"seed": 2},
                              "arm": [{"name": "a"}]})


def test_an_arm_can_stack_layers_and_run_on_some_tasks_only():
    spec = sweep.spec_from_dict({
        "sweep": {"tasks": ["sst2", "cola"], "seeds": [1]},
        "arm": [{"name": "alone", "llm": "none"},
                {"name": "stack", "llm": "smollm2", "layers": ["28,29", 5], "tasks": ["cola"],
                 "adapter": "mlp"}]})
    cells = {c.id: c for c in spec.cells()}
    assert sorted(cells) == ["cola__minilm__alone__seed1", "cola__minilm__stack__L28-29__seed1",
                             "cola__minilm__stack__L5__seed1", "sst2__minilm__alone__seed1"]
    stacked = cells["cola__minilm__stack__L28-29__seed1"].config
    assert stacked["layers"] == "28,29" and stacked["adapter"] == "mlp"
    assert cells["cola__minilm__stack__L5__seed1"].config["layers"] is None
    rows = sweep.summarize(spec, {})["rows"]
    assert [(r["task"], r["arm"], r["layer"]) for r in rows] == [
        ("sst2", "alone", None), ("cola", "alone", None), ("cola", "stack", "28,29"),
        ("cola", "stack", 5)]
    with pytest.raises(sweep.SweepError, match="not among"):
        sweep.spec_from_dict({"sweep": {"tasks": ["sst2"], "seeds": [1]},
                              "arm": [{"name": "a", "llm": "x", "tasks": ["rte"]}]})
    with pytest.raises(sweep.SweepError, match="several indices"):
        sweep.spec_from_dict({"sweep": {"tasks": ["sst2"], "seeds": [1]},
                              "arm": [{"name": "a", "llm": "x", "layers": ["last"]}]})


def test_a_killed_sweep_resumes_without_redoing_finished_cells(grid_parts, tmp_path,
                                                               monkeypatch):
    spec, out, work = _spec(grid_parts), tmp_path / "out", tmp_path / "work"
    real_step, real_train = loop.optimizer_step, sweep.train
    steps = {"n": 0}

    def killed(*a, **k):  # 2 steps an epoch, 4 a cell: the third cell dies in its 2nd epoch
        steps["n"] += 1
        if steps["n"] == 11:
            raise KeyboardInterrupt("killed")
        return real_step(*a, **k)

    monkeypatch.setattr(loop, "optimizer_step", killed)
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(spec, out, work, progress=lambda *_: None)
    finished = sweep.read_records(out)
    assert len(finished) == 2
    before = {p.name: p.read_bytes() for p in (out / "cells").glob("*.json")}
    killed_cell = spec.cells()[2]
    assert (work / killed_cell.id / "checkpoint-last").is_dir()

    monkeypatch.setattr(loop, "optimizer_step", real_step)
    trained = []

    def counting(cfg):
        trained.append(cfg)
        return real_train(cfg)

    monkeypatch.setattr(sweep, "train", counting)
    lines = []
    summary = sweep.run_sweep(spec, out, work, progress=lines.append)
    assert len(trained) == len(spec.cells()) - 2  # the finished cells were not trained again
    assert trained[0].output_dir.endswith(killed_cell.id) and trained[0].resume
    assert any("(resuming)" in line for line in lines)
    assert {p.name: p.read_bytes() for p in (out / "cells").glob("*.json")
            if p.name in before} == before
    assert summary["finished"] == summary["cells"] == 6
    records = sweep.read_records(out)
    resumed = records[killed_cell.id]
    assert len(resumed["dev_by_epoch"]) == 2 and resumed["dev"] is not None
    assert not (work / killed_cell.id).exists()  # checkpoints go once the record is written
    report = json.loads((out / "results.json").read_text())
    assert len(report["records"]) == 6
    row = next(r for r in report["rows"] if r["arm"] == "tiny-llama" and r["layer"] == -1)
    assert row["dev"]["n"] == 2 and row["vs_slm_alone"]["dev"] is not None
    md = (out / "results.md").read_text()
    assert "| tiny-llama |" in md and "not run" not in md
    assert list(out.glob("plot-*.png"))

    # a finished sweep trains nothing; a changed spec does not silently mix with the records
    trained.clear()
    sweep.run_sweep(spec, out, work, progress=lambda *_: None)
    assert trained == []
    with pytest.raises(sweep.SweepError, match="other settings"):
        sweep.run_sweep(_spec(grid_parts, lr=5e-4), out, work, progress=lambda *_: None)


def test_sweep_command_from_flags_and_a_spec_file(grid_parts, tmp_path):
    spec_file = tmp_path / "grid.toml"
    spec_file.write_text(
        "[sweep]\nname = \"cli\"\n"
        f"tasks = [\"{grid_parts['data']}\"]\nslms = [\"{grid_parts['bert']}\"]\n"
        "seeds = [1]\n[train]\nepochs = 1\nbatch_size = 8\n"
        "[[arm]]\nname = \"alone\"\nllm = \"none\"\n")
    assert cli.main(["sweep", str(spec_file), "--out", str(tmp_path / "a"),
                     "--work", str(tmp_path / "wa")]) == 0
    assert (tmp_path / "a" / "spec.toml").read_text() == spec_file.read_text()
    assert len(sweep.read_records(tmp_path / "a")) == 1
    assert cli.main(["sweep", "--tasks", grid_parts["data"], "--slms", grid_parts["bert"],
                     "--llm", grid_parts["llama"], "--layers=-1", "--seeds", "1",
                     "--set", "epochs=1", "--set", "batch_size=8", "--out",
                     str(tmp_path / "b"), "--work", str(tmp_path / "wb")]) == 0
    records = sweep.read_records(tmp_path / "b")
    assert sorted(r["arm"] for r in records.values()) == ["llama", "slm-alone"]
    assert {r["id"].split("__")[0] for r in records.values()} == {"data"}
    assert all(r["config"]["epochs"] == 1 for r in records.values())
    with pytest.raises(ValueError, match="OPTION=VALUE"):
        cli.main(["sweep", "--set", "nonsense=1", "--out", str(tmp_path / "c")])
