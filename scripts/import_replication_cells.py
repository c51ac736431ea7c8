"""The SST-2 runs of docs/replication.json (2026-11-29) as finished cells of the layers sweep.

They are the same cells as benchmarks/sweeps/layers.toml's (MiniLM, SST-2, seeds 1-3, 2 epochs,
the same settings): the SLM alone and SmolLM2-135M's layers 0, 15 and 29. Their per-seed dev and
test accuracies are written as cell records (source: "docs/replication.json"), so the sweep
skips them. Their costs were not kept per run: left out. CoLA's runs are not imported: `cola`'s
splits changed since (docs/training.md).

    python scripts/import_replication_cells.py [--out benchmarks/results/sweep-layers]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from pifi_fast.training import sweep

ROOT = Path(__file__).resolve().parents[1]
# (arm, layer) -> where replication.json keeps that SST-2 row
SOURCES = {("slm-alone", None): ("main", "sst2", "slm_alone"),
           ("smollm2", 29): ("main", "sst2", "pifi"),
           ("smollm2", 0): ("ablations", "layer_first"),
           ("smollm2", 15): ("ablations", "layer_middle")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/sweep-layers"))
    parser.add_argument("--spec", default=str(ROOT / "benchmarks/sweeps/layers.toml"))
    args = parser.parse_args()
    replication = json.loads((ROOT / "docs/replication.json").read_text())
    seeds = replication["settings"]["seeds"]
    spec = sweep.load_spec(args.spec)
    written = 0
    for cell in spec.cells():
        where = SOURCES.get((cell.arm, cell.layer))
        if cell.task != "sst2" or where is None:
            continue
        row = replication
        for key in where:
            row = row[key]
        k = seeds.index(cell.seed)
        record = {"id": cell.id, "task": cell.task, "slm": cell.slm, "arm": cell.arm,
                  "llm": cell.llm, "layer": cell.layer, "seed": cell.seed,
                  "config": cell.config, "metric": "accuracy", "dev": row["dev"]["values"][k],
                  "best_epoch": None, "dev_by_epoch": None,
                  "test": {"accuracy": row["test"]["values"][k]}, "cross_domain": None,
                  "cost": {"seconds": None, "epoch_seconds": None,
                           "trainable_parameters": None, "peak_memory_bytes": None},
                  "source": "docs/replication.json", "date": "2026-11-29"}
        if not (Path(args.out) / "cells" / f"{cell.id}.json").exists():
            sweep.write_record(args.out, record)
            written += 1
    print(f"{written} cells written under {args.out}/cells")


if __name__ == "__main__":
    main()
