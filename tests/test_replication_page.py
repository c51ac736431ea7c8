"""docs/replication.md is built from sweep records: the 2026-11-29 runs import as the cells of the
same arm, layer and task (never CoLA's, whose splits changed), another sweep's cells import only
when their settings match, and the committed page is the one the committed records render."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from pifi_fast.training import sweep

ROOT = Path(__file__).resolve().parents[1]
REPLICATION = ROOT / "benchmarks" / "results" / "replication"
LAYERS = ROOT / "benchmarks" / "results" / "sweep-layers"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_old_runs_import_as_the_cells_of_the_same_arm_layer_and_task(tmp_path):
    importer = _script("import_replication_cells")
    assert importer.main(["--out", str(tmp_path), "--from-json",
                          str(REPLICATION / "replication-2026-11-29.json")]) == 0
    records = sweep.read_records(tmp_path)
    old = json.loads((REPLICATION / "replication-2026-11-29.json").read_text())
    assert records and not [r for r in records.values() if r["task"] == "cola"]
    assert {r["task"] for r in records.values()} == {"sst2", "rte"}
    # a row of each kind carries the old per-seed value of its seed
    last = records["sst2__minilm__smollm2__L29__seed2"]
    assert last["dev"] == old["main"]["sst2"]["pifi"]["dev"]["values"][1]
    assert last["config"]["layer"] == 29 and last["source"].endswith("2026-11-29.json")
    stack = records["sst2__minilm__smollm2-stack__L27-28-29__seed3"]
    assert stack["config"]["layers"] == "27,28,29"
    assert stack["test"]["accuracy"] == \
        old["research"]["variants"]["sst2"]["layers_3"]["test"]["values"][2]
    xd = records["sst2__minilm__smollm2-xd__L29__seed1"]
    assert xd["cross_domain"]["uci-imdb"]["accuracy"] == \
        old["research"]["cross_domain"]["sst2"]["pifi"]["cross_domain"]["values"][0]
    assert records["sst2__minilm__smollm2__L29__seed1"]["cross_domain"] is None
    # every imported cell is one of the spec's, with the spec's settings
    spec = sweep.load_spec(ROOT / "benchmarks" / "sweeps" / "replication.toml")
    cells = {c.id: c for c in spec.cells()}
    for rid, record in records.items():
        assert not sweep.settings_differ(cells[rid].config, record["config"])


def test_another_sweeps_cells_import_only_with_the_same_settings(tmp_path):
    importer = _script("import_replication_cells")
    spec = sweep.load_spec(ROOT / "benchmarks" / "sweeps" / "replication.toml")
    cell = next(c for c in spec.cells() if c.id == "cola__minilm__slm-alone__seed1")
    other = tmp_path / "other"
    sweep.write_record(other, {"id": cell.id, "task": "cola", "arm": "slm-alone", "layer": None,
                               "seed": 1, "config": {**cell.config, "epochs": 3}, "dev": 0.3})
    importer.main(["--out", str(tmp_path / "a"), "--from-json", "", "--from-sweep", str(other)])
    assert sweep.read_records(tmp_path / "a") == {}  # 3 epochs there, 2 in the spec
    sweep.write_record(other, {"id": cell.id, "task": "cola", "arm": "slm-alone", "layer": None,
                               "seed": 1, "config": dict(cell.config), "dev": 0.3})
    importer.main(["--out", str(tmp_path / "a"), "--from-json", "", "--from-sweep", str(other)])
    assert sweep.read_records(tmp_path / "a")[cell.id]["dev"] == 0.3


@pytest.mark.skipif(not (REPLICATION / "spec.toml").is_file(), reason="no committed sweep")
def test_the_committed_page_is_the_one_the_committed_records_render(tmp_path):
    page = _script("replication")
    layers = page.Results(LAYERS) if (LAYERS / "spec.toml").is_file() else None
    fresh = page.render(page.Results(REPLICATION), layers, tmp_path / "assets")
    assert (ROOT / "docs" / "replication.md").read_text() == fresh, (
        "docs/replication.md is stale: run `.venv/bin/python scripts/replication.py` and "
        "commit it")


def test_the_page_says_not_run_for_missing_cells_and_shows_each_seed(tmp_path):
    page = _script("replication")
    out = tmp_path / "rep"
    (out / "cells").mkdir(parents=True)
    shutil.copyfile(ROOT / "benchmarks" / "sweeps" / "replication.toml", out / "spec.toml")
    spec = sweep.load_spec(out / "spec.toml")
    for cell in spec.cells():
        if cell.id.startswith("rte__minilm__slm-alone"):
            sweep.write_record(out, {"id": cell.id, "task": "rte", "slm": "minilm",
                                     "arm": cell.arm, "layer": None, "seed": cell.seed,
                                     "config": cell.config, "metric": "accuracy",
                                     "dev": 0.5 + cell.seed / 100, "test": {"accuracy": 0.6},
                                     "cost": {"epoch_seconds": [10.0 * cell.seed]}})
    text = page.render(page.Results(out), None, tmp_path / "assets")
    assert ("| rte | accuracy | dev | 52.00 ± 1.00 (n=3: 51.00, 52.00, 53.00) | not run |"
            in text)
    assert "| sst2 | - | dev | not run | not run |" in text
