"""Finished runs as cell records of a sweep, so the sweep does not train them again.

Two sources:

- ``--from-json``: the 2026-11-29 replication (its per-seed dev and test scores, kept in
  benchmarks/results/replication/replication-2026-11-29.json). Each of its rows is the cell of the
  same arm, layer and task in benchmarks/sweeps/replication.toml and layers.toml (MiniLM, seeds
  1-3, 2 epochs, the same settings). Its CoLA rows are never imported: `cola`'s splits changed
  since (docs/training.md). Costs are imported where it kept them per run (its research rows).
- ``--from-sweep DIR``: another sweep's finished cells whose id and settings equal a cell of this
  spec (the layer sweep shares the SLM alone and SmolLM2's layers 0, 15 and 29 with the
  replication).

A cell that already has a record is left as it is.

    python scripts/import_replication_cells.py                         # replication.toml
    python scripts/import_replication_cells.py --from-sweep benchmarks/results/sweep-layers
    python scripts/import_replication_cells.py --spec benchmarks/sweeps/layers.toml \\
        --out benchmarks/results/sweep-layers
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from pifi_fast.training import sweep

ROOT = Path(__file__).resolve().parents[1]
OLD = "benchmarks/results/replication/replication-2026-11-29.json"


def old_row(task: str, arm: str, layer) -> tuple | None:
    """Where the 2026-11-29 report keeps the runs of one cell (keys into its JSON), or None."""
    if task == "cola":  # run on cola's former splits: not the same cell
        return None
    main = {("slm-alone", None): ("main", task, "slm_alone"),
            ("smollm2", 29): ("main", task, "pifi")}
    if (arm, layer) in main:
        return main[(arm, layer)]
    if task != "sst2":
        return None
    return {("smollm2", 0): ("ablations", "layer_first"),
            ("smollm2", 15): ("ablations", "layer_middle"),
            ("smollm2-unfrozen", 29): ("ablations", "unfrozen_last"),
            ("smollm2-int8", 29): ("quant", "sst2", "int8"),
            ("smollm2-fp8", 29): ("quant", "sst2", "fp8"),
            ("slm-alone-500", None): ("research", "low_resource", "sst2", "slm_alone"),
            ("smollm2-500", 29): ("research", "low_resource", "sst2", "pifi"),
            ("slm-alone-xd", None): ("research", "cross_domain", "sst2", "slm_alone"),
            ("smollm2-xd", 29): ("research", "cross_domain", "sst2", "pifi"),
            ("smollm2-stack", "28,29"): ("research", "variants", "sst2", "layers_2"),
            ("smollm2-stack", "27,28,29"): ("research", "variants", "sst2", "layers_3"),
            ("smollm2-mlp-adapters", 29): ("research", "variants", "sst2", "mlp_adapters"),
            ("smollm2-lora", None): ("research", "variants", "sst2", "llm_lora"),
            }.get((arm, layer))


def _value(stat: dict | None, k: int):
    return stat["values"][k] if stat and k < len(stat["values"]) else None


def record_from_json(cell: sweep.Cell, old: dict) -> dict | None:
    where = old_row(cell.task, cell.arm, cell.layer)
    if where is None:
        return None
    row = old
    for key in where:
        row = (row or {}).get(key)
    seeds = old["settings"]["seeds"]
    if not row or cell.seed not in seeds or not row.get("dev"):
        return None
    k = seeds.index(cell.seed)
    metric = row.get("metric", "accuracy")
    cross = None
    if cell.config.get("test_data"):  # scored on the other dataset in the same run
        cross = {cell.config["test_data"]: {"accuracy": _value(row.get("cross_domain"), k)}}
    cost = row.get("cost") or {}
    epoch = _value(cost.get("epoch_seconds"), k)
    return {"id": cell.id, "task": cell.task, "slm": cell.slm, "arm": cell.arm,
            "llm": cell.llm, "layer": cell.layer, "seed": cell.seed, "config": cell.config,
            "metric": metric, "dev": _value(row["dev"], k), "best_epoch": None,
            "dev_by_epoch": None, "test": {metric: _value(row.get("test"), k)},
            "cross_domain": cross,
            # the old report kept each run's fastest epoch only
            "cost": {"seconds": None, "epoch_seconds": [epoch] if epoch else None,
                     "trainable_parameters": _value(cost.get("trainable_parameters"), k),
                     "peak_memory_bytes": _value(cost.get("peak_memory_bytes"), k)},
            "source": OLD, "date": "2026-11-29"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(ROOT / "benchmarks/sweeps/replication.toml"))
    parser.add_argument("--out", default=None,
                        help="the sweep's --out (default: benchmarks/results/<spec name>)")
    parser.add_argument("--from-json", default=str(ROOT / OLD),
                        help="the 2026-11-29 replication report ('' to skip it)")
    parser.add_argument("--from-sweep", action="append", default=[],
                        help="another sweep's --out folder (repeatable)")
    args = parser.parse_args(argv)
    spec = sweep.load_spec(args.spec)
    out = Path(args.out or ROOT / "benchmarks" / "results" / spec.name)
    have = sweep.read_records(out)
    old = json.loads(Path(args.from_json).read_text()) if args.from_json else None
    others = [sweep.read_records(Path(d)) for d in args.from_sweep]
    written = {"json": 0, "sweep": 0}
    for cell in spec.cells():
        if cell.id in have:
            continue
        record = None
        for records in others:
            found = records.get(cell.id)
            if found and not sweep.settings_differ(found["config"], cell.config):
                record, source = found, "sweep"
                break
        if record is None and old is not None:
            record, source = record_from_json(cell, old), "json"
        if record is not None:
            sweep.write_record(out, {**record, "arm": cell.arm, "config": cell.config})
            written[source] += 1
    print(f"{written['json']} cells from {args.from_json or '-'}, {written['sweep']} from "
          f"{', '.join(args.from_sweep) or '-'}, written under {out}/cells")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
