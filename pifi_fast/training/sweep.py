"""A sweep: a grid of tasks x SLMs x arms (an LLM and its layers, or a variant) x seeds, each cell
an ordinary training run, resumable cell by cell, and the report of the paper's tables.

A spec (TOML) names the grid:

    [sweep]
    name = "layers"
    tasks = ["sst2", "cola"]
    slms = ["minilm"]
    seeds = [1, 2, 3]

    [train]                  # TrainConfig fields every cell shares
    epochs = 2

    [[arm]]                  # the SLM alone
    name = "slm-alone"
    llm = "none"

    [[arm]]                  # one cell per layer; other keys are TrainConfig fields
    name = "smollm2"
    llm = "smollm2"
    layers = [0, 15, 29]

    [[arm]]                  # a variant on some of the tasks only
    name = "smollm2-2-layers"
    llm = "smollm2"
    layers = ["28,29"]       # a text: several layers plugged in one cell (--layers 28,29)
    tasks = ["sst2"]

Storage. Each finished cell is one small JSON record, ``<out>/cells/<cell id>.json`` (its
config, per-epoch dev scores, test scores, costs): that folder is what a sweep keeps and what
gets committed. A cell whose record exists is skipped (its config must equal the spec's: a
changed spec is an error, not a silent mix); a cell that was killed resumes from its run
folder's last checkpoint (``<work>/<cell id>/checkpoint-last``); its checkpoints are deleted once
the record is written. So a sweep can be stopped at any moment and continued, and split across
machines (``--shard i/n``): copying the cell records into one folder merges them.
The report (``results.json``, ``results.md``, plots) is rebuilt from the records each time.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import shutil
import statistics
from pathlib import Path

import torch
import transformers

from pifi_fast.data import TASK_METRIC
from pifi_fast.training.config import TrainConfig
from pifi_fast.training.loop import train

try:  # Python 3.11+; 3.10 has the same parser as the tomli package
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib

# TrainConfig fields a cell sets itself (from the grid), never the spec's [train] table
CELL_FIELDS = ("data", "slm", "llm", "layer", "layers", "seed", "output_dir", "resume")
# fields that do not change what a cell computes (where it runs, how it reports)
NOT_COMPARED = ("output_dir", "resume", "device")


class SweepError(ValueError):
    """A spec that cannot run, or cell records that do not match it."""


@dataclasses.dataclass(frozen=True)
class Arm:
    """One line of the grid: a name, the LLM (``none``: the SLM alone), its layers (one cell
    each; None: the config's own layer) and TrainConfig fields of its own (a variant)."""

    name: str
    llm: str | None
    layers: tuple | None = None  # an int: one layer (--layer); a text "i,j": a stack (--layers)
    fields: tuple = ()  # (field, value) pairs
    tasks: tuple | None = None  # the sweep's tasks this arm runs on (None: all)


@dataclasses.dataclass(frozen=True)
class Cell:
    id: str
    task: str
    slm: str
    arm: str
    llm: str | None
    layer: int | None
    seed: int
    config: dict  # TrainConfig fields, output_dir excluded

    def train_config(self, work: Path) -> TrainConfig:
        return TrainConfig(**self.config, output_dir=str(work / self.id), resume=True)


@dataclasses.dataclass
class SweepSpec:
    name: str
    tasks: list
    slms: list
    seeds: list
    arms: list
    train: dict = dataclasses.field(default_factory=dict)
    source: str | None = None  # the spec file, when read from one

    def cells(self) -> list[Cell]:
        out = []
        for task in self.tasks:
            for slm in self.slms:
                for arm in self.arms:
                    if arm.tasks is not None and task not in arm.tasks:
                        continue
                    for layer in (arm.layers or (None,)):
                        for seed in self.seeds:
                            out.append(self._cell(task, slm, arm, layer, seed))
        ids = [c.id for c in out]
        if len(set(ids)) != len(ids):
            raise SweepError(f"sweep {self.name}: two cells share an id (arm names must differ)")
        return out

    def _cell(self, task, slm, arm: Arm, layer, seed) -> Cell:
        config = dataclasses.asdict(TrainConfig())
        config.update(self.train)
        config.update(dict(arm.fields))
        config.update(data=task, slm=slm, llm=arm.llm, seed=seed)
        if isinstance(layer, str):
            config["layers"] = layer
        elif layer is not None:
            config["layer"] = layer
        for key in ("output_dir", "resume"):
            config.pop(key)
        where = f"L{layer}" if layer is not None else None
        cell_id = "__".join(_safe(p) for p in (_short(task), _short(slm), arm.name, where,
                                                f"seed{seed}") if p)
        return Cell(cell_id, task, slm, arm.name, arm.llm, layer, seed, config)


def _short(name: str) -> str:
    """A data or model path by its last part (hub:glue/cola stays whole): ids stay readable;
    two that end alike make the grid refuse to run (cells() checks the ids are distinct)."""
    return Path(name).name if "/" in name and not name.startswith("hub:") else name


def _safe(part) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in str(part))


def _train_fields() -> dict:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def _check_fields(table: dict, where: str) -> dict:
    fields = _train_fields()
    for key, value in table.items():
        if key not in fields:
            raise SweepError(f"{where}: {key!r} is not a training option (pifi-fast train "
                             f"--help lists them)")
        if key in CELL_FIELDS:
            raise SweepError(f"{where}: {key!r} is set by the grid ([sweep] tasks/slms/seeds, "
                             "an arm's llm/layers), not here")
    return table


def spec_from_dict(raw: dict, source: str | None = None) -> SweepSpec:
    where = source or "sweep spec"
    sweep = raw.get("sweep") or {}
    unknown = set(raw) - {"sweep", "train", "arm"}
    if unknown:
        raise SweepError(f"{where}: unknown tables {sorted(unknown)} (expected [sweep], [train], "
                         "[[arm]])")
    missing = [k for k in ("tasks", "seeds") if not sweep.get(k)]
    if missing or not raw.get("arm"):
        raise SweepError(f"{where}: needs [sweep] tasks and seeds and at least one [[arm]]"
                         f"{f' (missing: {missing})' if missing else ''}")
    arms = []
    for i, table in enumerate(raw["arm"]):
        table = dict(table)
        name = table.pop("name", None)
        if not name:
            raise SweepError(f"{where}: arm {i + 1} has no name")
        llm = table.pop("llm", "none")
        layers = table.pop("layers", None)
        if layers is not None and (not isinstance(layers, list) or not all(
                isinstance(v, int) or _is_layer_stack(v) for v in layers)):
            raise SweepError(f"{where}: arm {name}: layers must be a list whose entries are "
                             "layer indices (one cell each: 0, 15, -1) or texts of several "
                             "indices plugged together in one cell (\"28,29\")")
        if layers is not None and llm in (None, "none", ""):
            raise SweepError(f"{where}: arm {name}: layers without an llm")
        arm_tasks = table.pop("tasks", None)
        if arm_tasks is not None:
            if not isinstance(arm_tasks, list) or not arm_tasks:
                raise SweepError(f"{where}: arm {name}: tasks must be a non-empty list")
            unknown_tasks = [t for t in arm_tasks if t not in sweep["tasks"]]
            if unknown_tasks:
                raise SweepError(f"{where}: arm {name}: tasks {unknown_tasks} are not among "
                                 f"[sweep] tasks {list(sweep['tasks'])}")
        _check_fields(table, f"{where}: arm {name}")
        arms.append(Arm(name, None if llm in ("none", "") else llm,
                        tuple(layers) if layers else None, tuple(sorted(table.items())),
                        tuple(arm_tasks) if arm_tasks is not None else None))
    return SweepSpec(name=sweep.get("name") or (Path(source).stem if source else "sweep"),
                     tasks=list(sweep["tasks"]), slms=list(sweep.get("slms") or ["minilm"]),
                     seeds=[int(s) for s in sweep["seeds"]], arms=arms,
                     train=_check_fields(dict(raw.get("train") or {}), f"{where}: [train]"),
                     source=source)


def _is_layer_stack(value) -> bool:
    """A text of two or more comma-separated layer indices ("28,29")."""
    if not isinstance(value, str):
        return False
    parts = [p.strip() for p in value.split(",")]
    return len(parts) > 1 and all(p.lstrip("-").isdigit() for p in parts)


def load_spec(path) -> SweepSpec:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise SweepError(f"{path}: not valid TOML: {exc}") from exc
    return spec_from_dict(raw, str(path))


# -- running ---------------------------------------------------------------------------------
def comparable_config(config: dict) -> dict:
    """A cell's settings without those that do not change what it computes."""
    return {k: v for k, v in config.items() if k not in NOT_COMPARED}


def read_records(out: Path) -> dict:
    """cell id -> record, for every finished cell under out/cells."""
    folder = Path(out) / "cells"
    if not folder.is_dir():
        return {}
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def settings_differ(a: dict, b: dict) -> list[str]:
    """The settings two cell configs both have and set differently (a field one of them lacks,
    added to TrainConfig since, does not count)."""
    a, b = comparable_config(a), comparable_config(b)
    return sorted(k for k in set(a) & set(b) if a[k] != b[k])


def _check_record(cell: Cell, record: dict) -> None:
    got = record.get("config", {})
    diff = settings_differ(cell.config, got)
    if diff:
        raise SweepError(
            f"cell {cell.id} was run with other settings ("
            + ", ".join(f"{k}: {got[k]!r} there, {cell.config[k]!r} in the spec"
                        for k in diff[:5])
            + "): delete its record to rerun it, or give the sweep another --out")


def _record(cell: Cell, res: dict, seconds: float) -> dict:
    history = res.get("history") or []
    return {"id": cell.id, "task": cell.task, "slm": cell.slm, "arm": cell.arm,
            "llm": cell.llm, "layer": cell.layer, "seed": cell.seed,
            "config": cell.config, "metric": res["metric"], "dev": res["best_dev"],
            "best_epoch": res.get("best_epoch"),
            "dev_by_epoch": [h.get(cell.config["eval_split"], {}).get(res["metric"])
                             for h in history],
            "test": res.get("test"), "cross_domain": res.get("cross_domain"),
            "cost": {"seconds": seconds,
                     "epoch_seconds": [h["epoch_seconds"] for h in history],
                     "trainable_parameters": res.get("trainable_parameters"),
                     "peak_memory_bytes": res.get("peak_memory_bytes")},
            "source": "run", "date": datetime.date.today().isoformat(),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "python": platform.python_version(), "cpu_threads":
                         torch.get_num_threads(), "device": res.get("device")}}


def _write_json(path: Path, obj) -> None:
    """Written beside, then renamed: a kill never leaves half a record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def write_record(out, record: dict) -> Path:
    """A finished cell's record into out/cells/<id>.json (what marks the cell finished)."""
    path = Path(out) / "cells" / f"{record['id']}.json"
    _write_json(path, record)
    return path


def select_cells(cells: list[Cell], only: str | None = None,
                 shard: str | None = None) -> list[Cell]:
    """``only``: comma-separated substrings, a cell runs when its id holds one of them;
    ``shard``: "i/n", the i-th of n disjoint shares (by position in the grid)."""
    if only:
        parts = [p for p in only.split(",") if p]
        cells = [c for c in cells if any(p in c.id for p in parts)]
    if shard:
        try:
            i, n = (int(v) for v in shard.split("/"))
            assert 1 <= i <= n
        except (ValueError, AssertionError):
            raise SweepError(f"--shard takes i/n with 1 <= i <= n, got {shard!r}") from None
        cells = [c for k, c in enumerate(cells) if k % n == i - 1]
    return cells


def run_sweep(spec: SweepSpec, out, work=None, only: str | None = None,
              shard: str | None = None, report_only: bool = False,
              keep_checkpoints: bool = False, progress=print) -> dict:
    """Train every cell of the spec that has no record yet under ``out`` (resuming a killed
    one), then rebuild the report; returns the report's summary (also results.json)."""
    out = Path(out)
    work = Path(work) if work else Path("runs") / "sweeps" / spec.name
    cells = spec.cells()
    records = read_records(out)
    for cell in cells:
        if cell.id in records:
            _check_record(cell, records[cell.id])
    todo = [c for c in select_cells(cells, only, shard) if c.id not in records]
    if spec.source:  # the spec beside its results, as run
        out.mkdir(parents=True, exist_ok=True)
        if Path(spec.source).resolve() != (out / "spec.toml").resolve():
            shutil.copyfile(spec.source, out / "spec.toml")
    progress(f"sweep {spec.name}: {len(cells)} cells, {len(records)} finished, "
             f"{len(todo)} to run{' (report only)' if report_only else ''} -> {out}")
    if not report_only:
        for n, cell in enumerate(todo, 1):
            resumed = (work / cell.id / "checkpoint-last").is_dir()
            progress(f"[{n}/{len(todo)}] {cell.id}" + (" (resuming)" if resumed else ""))
            t0 = datetime.datetime.now()
            res = train(cell.train_config(work))
            res.pop("model", None)
            seconds = (datetime.datetime.now() - t0).total_seconds()
            write_record(out, _record(cell, res, seconds))
            if not keep_checkpoints:
                shutil.rmtree(work / cell.id, ignore_errors=True)
            records = read_records(out)
            write_report(spec, out, records)  # after every cell: a stop loses nothing
    return write_report(spec, out, read_records(out))


# -- the report --------------------------------------------------------------------------------
def seed_stats(values: list) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values)
            if len(values) > 1 else 0.0, "n": len(values), "values": values}


def _test_metric(record: dict):
    return (record.get("test") or {}).get(record["metric"])


def summarize(spec: SweepSpec, records: dict) -> dict:
    """Per task, SLM, arm and layer: the seeds' dev and test scores, mean and sample std, and the
    difference to the SLM alone (an arm without an LLM) against the larger seed spread."""
    rows = []
    for task in spec.tasks:
        for slm in spec.slms:
            base = None
            for arm in spec.arms:
                if arm.tasks is not None and task not in arm.tasks:
                    continue
                for layer in (arm.layers or (None,)):
                    recs = [r for r in records.values() if r["task"] == task and r["slm"] == slm
                            and r["arm"] == arm.name and r.get("layer") == layer
                            and r["seed"] in spec.seeds]
                    row = {"task": task, "slm": slm, "arm": arm.name, "llm": arm.llm,
                           "layer": layer, "metric": recs[0]["metric"] if recs else None,
                           "dev": seed_stats([r["dev"] for r in recs]),
                           "test": seed_stats([_test_metric(r) for r in recs]),
                           "seeds": sorted(r["seed"] for r in recs),
                           "epoch_seconds": seed_stats([min(r["cost"]["epoch_seconds"])
                                                    for r in recs
                                                    if r["cost"].get("epoch_seconds")])}
                    if arm.llm is None and base is None:
                        base = row
                    rows.append(row)
            for row in rows:
                if row["task"] == task and row["slm"] == slm and base is not None \
                        and row is not base:
                    row["vs_slm_alone"] = {split: _difference(row[split], base[split])
                                           for split in ("dev", "test")}
    return {"name": spec.name, "tasks": spec.tasks, "slms": spec.slms, "seeds": spec.seeds,
            "cells": len(spec.cells()), "finished": len(records), "rows": rows}


def _difference(a: dict | None, b: dict | None) -> dict | None:
    if not a or not b:
        return None
    diff = a["mean"] - b["mean"]
    spread = max(a["std"], b["std"])
    verdict = ("within the seed spread" if abs(diff) <= spread else
               "above the SLM alone by more than the seed spread" if diff > 0 else
               "below the SLM alone by more than the seed spread")
    if min(a["n"], b["n"]) < 2:
        verdict = "one seed: no spread to compare with"
    return {"difference": diff, "spread": spread, "verdict": verdict}


def _fmt(stat: dict | None, scale: float = 100.0) -> str:
    if not stat:
        return "not run"
    return f"{stat['mean'] * scale:.2f} ± {stat['std'] * scale:.2f} (n={stat['n']})"


def render_markdown(summary: dict, spec: SweepSpec) -> str:
    lines = [f"# Sweep `{summary['name']}`", "",
             f"{summary['finished']} of {summary['cells']} cells finished; seeds "
             f"{', '.join(map(str, spec.seeds))}; mean ± sample std over seeds, in points "
             "(accuracy or MCC x 100). Δ is against the SLM alone; it counts only when larger "
             "than the larger of the two seed spreads.", ""]
    settings = {k: v for k, v in spec.train.items()}
    if settings:
        lines += ["Settings shared by every cell: " + ", ".join(
            f"{k} {v}" for k, v in sorted(settings.items())) + ".", ""]
    for task in summary["tasks"]:
        for slm in summary["slms"]:
            rows = [r for r in summary["rows"] if r["task"] == task and r["slm"] == slm]
            metric = next((r["metric"] for r in rows if r["metric"]),
                          TASK_METRIC.get(task, "score"))
            lines += [f"## {task} ({metric}), SLM {slm}", "",
                      "| arm | LLM | layer | dev | test | Δ dev | Δ test | s/epoch |",
                      "|---|---|---|---|---|---|---|---|"]
            for r in rows:
                deltas = []
                for split in ("dev", "test"):
                    d = (r.get("vs_slm_alone") or {}).get(split)
                    deltas.append("" if not d else f"{d['difference'] * 100:+.2f}"
                                  + ("" if "within" in d["verdict"] or "one seed" in
                                     d["verdict"] else " (> spread)"))
                sec = "" if not r["epoch_seconds"] else f"{r['epoch_seconds']['mean']:.0f}"
                layer = "" if r["layer"] is None else r["layer"]
                lines.append(f"| {r['arm']} | {r['llm'] or '-'} | {layer} | {_fmt(r['dev'])} | "
                             f"{_fmt(r['test'])} | {deltas[0]} | {deltas[1]} | {sec} |")
            lines += ["", f"![{task}: score by layer](plot-{_safe(task)}-{_safe(slm)}.png)", ""]
    return "\n".join(lines) + "\n"


def plot(summary: dict, out: Path) -> list[Path]:
    """Per task and SLM: dev and test score against the layer index, one line per LLM arm with
    the seed spread as error bars and each seed as a dot, the SLM alone as a band."""
    # deferred: matplotlib (the test and bench extras) only for the report's figures
    import matplotlib
    import matplotlib.pyplot as plt

    matplotlib.use("Agg")

    files = []
    for task in summary["tasks"]:
        for slm in summary["slms"]:
            rows = [r for r in summary["rows"] if r["task"] == task and r["slm"] == slm]
            fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=False)
            for ax, split in zip(axes, ("dev", "test")):
                for r in rows:
                    if r["llm"] is None and r[split]:
                        m, s = r[split]["mean"] * 100, r[split]["std"] * 100
                        ax.axhspan(m - s, m + s, color="0.85", zorder=0)
                        ax.axhline(m, color="0.4", lw=1, label=f"{r['arm']} (no layer)")
                # a stack of layers ("28,29") has no place on a layer axis: the table has it
                arms = sorted({r["arm"] for r in rows if isinstance(r["layer"], int)})
                for arm in arms:
                    pts = sorted((r["layer"], r[split]) for r in rows
                                 if r["arm"] == arm and isinstance(r["layer"], int) and r[split])
                    if not pts:
                        continue
                    xs = [p[0] for p in pts]
                    ax.errorbar(xs, [p[1]["mean"] * 100 for p in pts],
                                yerr=[p[1]["std"] * 100 for p in pts], marker="o", capsize=3,
                                label=arm)
                    for x, st in pts:
                        ax.scatter([x] * len(st["values"]), [v * 100 for v in st["values"]],
                                   s=8, color="k", alpha=0.4, zorder=3)
                metric = next((r["metric"] for r in rows if r["metric"]),
                              TASK_METRIC.get(task, "score"))
                ax.set_title(f"{task} {split} ({metric} x 100), SLM {slm}")
                ax.set_xlabel("LLM layer index")
                ax.grid(alpha=0.3)
                if ax.get_legend_handles_labels()[0]:
                    ax.legend(fontsize=8)
            fig.tight_layout()
            path = out / f"plot-{_safe(task)}-{_safe(slm)}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            files.append(path)
    return files


def write_report(spec: SweepSpec, out, records: dict) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(spec, records)
    _write_json(out / "results.json", {**summary, "records": records})
    (out / "results.md").write_text(render_markdown(summary, spec))
    if records:
        plot(summary, out)
    return summary
