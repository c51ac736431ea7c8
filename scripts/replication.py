"""docs/replication.md from two sweeps' results: PiFi at small scale and the layer sweep.

The runs themselves are cells of `pifi-fast sweep` (benchmarks/sweeps/replication.toml and
layers.toml); this script only renders the page from their records:

    pifi-fast sweep benchmarks/sweeps/replication.toml --out benchmarks/results/replication
    pifi-fast sweep benchmarks/sweeps/layers.toml --out benchmarks/results/sweep-layers
    python scripts/replication.py

It reads each sweep's spec.toml and cells/*.json (never trains), writes docs/replication.md and
copies the layer sweep's plots to docs/assets/replication/.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pifi_fast.training import sweep  # noqa: E402

LAST = 29  # SmolLM2-135M's last layer (30 layers)
CROSS = "uci-imdb"


class Results:
    """One sweep's summary rows and records, looked up by task, arm and layer."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.spec = sweep.load_spec(folder / "spec.toml")
        self.records = sweep.read_records(folder)
        self.summary = sweep.summarize(self.spec, self.records)

    def row(self, task: str, arm: str, layer=None) -> dict:
        for r in self.summary["rows"]:
            if (r["task"], r["arm"], r["layer"]) == (task, arm, layer):
                return r
        return {}

    def cross(self, task: str, arm: str, layer=None) -> dict | None:
        values = [((r.get("cross_domain") or {}).get(CROSS) or {}).get("accuracy")
                  for r in self.records.values()
                  if (r["task"], r["arm"], r.get("layer")) == (task, arm, layer)]
        return sweep.seed_stats(values)

    def cost(self, task: str, arm: str, layer=None) -> str:
        recs = [r for r in self.records.values()
                if (r["task"], r["arm"], r.get("layer")) == (task, arm, layer)]
        parts = []
        params = [r["cost"].get("trainable_parameters") for r in recs]
        if any(params):
            parts.append(f"{statistics.fmean(p for p in params if p) / 1e6:.2f} M trained")
        epochs = [min(r["cost"]["epoch_seconds"]) for r in recs
                  if r["cost"].get("epoch_seconds")]
        if epochs:  # the median: one run that shared the machine is one outlier
            parts.append(f"{statistics.median(epochs):.0f} s/epoch")
        return ", ".join(parts) or "-"


def fmt(stat: dict | None) -> str:
    if not stat:
        return "not run"
    return (f"{stat['mean'] * 100:.2f} ± {stat['std'] * 100:.2f} (n={stat['n']}: "
            + ", ".join(f"{v * 100:.2f}" for v in stat["values"]) + ")")


def verdict(a: dict | None, b: dict | None, what: str) -> str | None:
    """b - a against the larger seed spread, in words (a hint, not a significance test)."""
    if not a or not b:
        return None
    gap, spread = (b["mean"] - a["mean"]) * 100, max(a["std"], b["std"]) * 100
    if min(a["n"], b["n"]) < 2:
        return f"{what}: {gap:+.2f} points; fewer than two seeds on one side: no verdict yet."
    if abs(gap) <= spread:
        return (f"{what}: {gap:+.2f} points, within the seed spread (largest std "
                f"{spread:.2f}): no measurable difference.")
    return (f"{what}: {gap:+.2f} points, larger than the seed spread ({spread:.2f}): "
            + ("better" if gap > 0 else "worse") + " here (a hint, not a significance test).")


def main_section(rep: Results) -> list[str]:
    lines = ["## SLM alone against SLM + PiFi", "",
             "| task | metric | split | SLM alone | SLM + PiFi (layer 29) |",
             "|---|---|---|---|---|"]
    notes = []
    for task in rep.spec.tasks:
        alone, pifi = rep.row(task, "slm-alone"), rep.row(task, "smollm2", LAST)
        metric = alone.get("metric") or pifi.get("metric") or "-"
        for split in ("dev", "test"):
            lines.append(f"| {task} | {metric} | {split} | {fmt(alone.get(split))} | "
                         f"{fmt(pifi.get(split))} |")
            v = verdict(alone.get(split), pifi.get(split), f"{task} {split}, PiFi - SLM alone")
            if v:
                notes.append(v)
        devs = [alone.get("dev"), pifi.get("dev")]
        if metric == "accuracy" and all(d and d["mean"] < 0.56 for d in devs):
            notes.append(f"{task}: both models stay near chance (50 % for two classes): the SLM "
                         "does not learn this task in this setting, so the comparison says "
                         "nothing about PiFi.")
    return lines + [""] + [f"- {n}" for n in notes]


def table(rep: Results, task: str, rows: list[tuple], with_cross: bool = False) -> list[str]:
    head = "| variant | dev | test |" + (" UCI IMDB |" if with_cross else "") + " cost |"
    lines = [head, "|---|---|---|" + ("---|" if with_cross else "") + "---|"]
    for label, arm, layer in rows:
        r = rep.row(task, arm, layer)
        cross = f" {fmt(rep.cross(task, arm, layer))} |" if with_cross else ""
        lines.append(f"| {label} | {fmt(r.get('dev'))} | {fmt(r.get('test'))} |{cross} "
                     f"{rep.cost(task, arm, layer)} |")
    return lines


def against(rep: Results, task: str, base: tuple, rows: list[tuple]) -> list[str]:
    """Each row against the base row (label, arm, layer), per split, in words."""
    out = []
    a = rep.row(task, *base[1:])
    for label, arm, layer in rows:
        b = rep.row(task, arm, layer)
        for split in ("dev", "test"):
            v = verdict(a.get(split), b.get(split), f"{task} {split}, {label} - {base[0]}")
            if v:
                out.append(f"- {v}")
    return out


def ablation_section(rep: Results) -> list[str]:
    rows = [("layer 0 (first)", "smollm2", 0), ("layer 15 (middle)", "smollm2", 15),
            ("layer 29 (last)", "smollm2", LAST),
            ("layer 29 fine-tuned (not frozen)", "smollm2-unfrozen", LAST)]
    return (["## Ablations on SST-2: where the layer comes from, frozen or not", "",
             "SmolLM2-135M has 30 decoder layers; the last row fine-tunes layer 29 with the "
             "rest (the Hugging Face layer, with weight gradients). The layer sweep below has "
             "more layers.", ""] + table(rep, "sst2", rows) + [""]
            + against(rep, "sst2", rows[2], [rows[0], rows[1], rows[3]]))


def quant_section(rep: Results) -> list[str]:
    lines = ["## 8-bit frozen weights: does the end task notice?", "",
             "PiFi with SmolLM2's last layer stored in 8 bits (`--layer-weights int8|fp8`: int8 "
             "weight-only with one scale per channel and 128 inputs; fp8 e4m3 W8A8 for o, "
             "gate/up and down with int8 q/k/v), against the same runs unquantized.", ""]
    for task in ("sst2", "cola"):
        rows = [("unquantized", "smollm2", LAST), ("int8", "smollm2-int8", LAST),
                ("fp8", "smollm2-fp8", LAST)]
        lines += [f"**{task}**", ""] + table(rep, task, rows) + [""]
        lines += against(rep, task, rows[0], rows[1:]) + [""]
    return lines


def research_section(rep: Results) -> list[str]:
    lines = ["## The paper's open questions", "",
             "**Low resource**: the first 500 SST-2 training sentences (file order, both labels "
             "well represented); dev and test as above.", ""]
    low = [("SLM alone", "slm-alone-500", None), ("SLM + PiFi", "smollm2-500", LAST)]
    lines += table(rep, "sst2", low) + [""] + against(rep, "sst2", low[0], low[1:])
    xd = [("SLM alone", "slm-alone-xd", None), ("SLM + PiFi", "smollm2-xd", LAST)]
    lines += ["", "**Cross-domain**: trained on SST-2, also scored on the UCI IMDB sentences "
              "(1,000 movie-review sentences whose 0/1 labels mean what SST-2's do; `train "
              "--test-data uci-imdb`), the paper's IMDB -> Tweet question at our scale.", ""]
    lines += table(rep, "sst2", xd, with_cross=True) + [""]
    v = verdict(rep.cross("sst2", "slm-alone-xd"), rep.cross("sst2", "smollm2-xd", LAST),
                "UCI IMDB, PiFi - SLM alone")
    if v:
        lines.append(f"- {v}")
    variants = [("PiFi, one layer, linear adapters", "smollm2", LAST),
                ("layers 28, 29", "smollm2-stack", "28,29"),
                ("layers 27, 28, 29", "smollm2-stack", "27,28,29"),
                ("MLP adapters", "smollm2-mlp-adapters", LAST),
                ("the whole SmolLM2 with LoRA (no SLM)", "smollm2-lora", None)]
    lines += ["", "**Variants** against PiFi with one layer and linear adapters.", ""]
    for task in ("sst2", "cola"):
        lines += [f"**{task}**", ""] + table(rep, task, variants) + [""]
        lines += against(rep, task, variants[0], variants[1:]) + [""]
    return lines


def layer_section(layers: Results, assets: Path) -> list[str]:
    lines = ["## Which layer: the layer sweep", "",
             f"`benchmarks/sweeps/layers.toml`: the SLM alone, SmolLM2-135M at layers "
             f"{', '.join(str(v) for a in layers.spec.arms if a.llm == 'smollm2' for v in a.layers)}"
             f" and Gemma-3-270M at layers "
             f"{', '.join(str(v) for a in layers.spec.arms if a.llm == 'gemma3-270m' for v in a.layers)}"
             f", same settings and seeds. {layers.summary['finished']} of "
             f"{layers.summary['cells']} cells finished; the full table is "
             "`benchmarks/results/sweep-layers/results.md`, and `pifi-fast select-layer` is "
             "checked against it in [Research](research.md).", ""]
    assets.mkdir(parents=True, exist_ok=True)
    for task in layers.spec.tasks:
        rows = [r for r in layers.summary["rows"] if r["task"] == task]
        lines += [f"**{task}**", "", "| arm | layer | dev | test |", "|---|---|---|---|"]
        for r in rows:
            layer = "-" if r["layer"] is None else r["layer"]
            lines.append(f"| {r['arm']} | {layer} | {fmt(r['dev'])} | {fmt(r['test'])} |")
        plot = layers.folder / f"plot-{task}-minilm.png"
        if plot.is_file() and any(r["dev"] for r in rows):
            shutil.copyfile(plot, assets / plot.name)
            lines += ["", f"![{task}: score by layer](assets/replication/{plot.name})"]
        lines.append("")
    return lines


def render(rep: Results, layers: Results | None, assets: Path) -> str:
    st = rep.spec.train
    lines = [
        "# PiFi at small scale: all-MiniLM-L6-v2 with and without SmolLM2-135M's layers", "",
        "Built by `scripts/replication.py` from two sweeps' cell records "
        "(`benchmarks/results/replication/` and `benchmarks/results/sweep-layers/`; every "
        "per-seed number is there). Settings: SLM all-MiniLM-L6-v2, LLM SmolLM2-135M-Instruct "
        f"(Q4_1 GGUF), Adam lr {st['lr']}, batch {st['batch_size']}, {st['epochs']} epochs, max "
        f"length {st['max_length']}, label smoothing {st['label_smoothing']}, clipping "
        f"{st['clip']}, best epoch on dev; CPU (2 cores), fp32; seeds "
        f"{', '.join(map(str, rep.spec.seeds))}. Mean ± sample std over seeds, in points; "
        "'not run' marks a cell the sweep has not finished. Costs: trained parameters and the "
        "median over seeds of each run's fastest epoch (other jobs shared the machine: rough).",
        ""]
    lines += main_section(rep) + [""] + ablation_section(rep) + [""]
    lines += quant_section(rep) + research_section(rep)
    if layers is not None:
        lines += layer_section(layers, assets)
    lines += ["## Epoch time: the authors' setup against pifi_fast's defaults", "",
              "Measured by the benchmark suite, not by these sweeps: "
              "[Benchmarks](benchmarks.md#headline-the-whole-pifi-step).", "",
              "## Reproduce", "",
              "Each sweep command trains the cells that have no record yet (a killed cell "
              "resumes) and rebuilds its results; the script rebuilds this page.", "",
              "```bash",
              "pifi-fast sweep benchmarks/sweeps/replication.toml --out "
              "benchmarks/results/replication",
              "pifi-fast sweep benchmarks/sweeps/layers.toml --out benchmarks/results/sweep-layers",
              "python scripts/replication.py", "```", "",
              "Cells the two sweeps share (same id and settings) are trained once: "
              "`python scripts/import_replication_cells.py --from-sweep "
              "benchmarks/results/sweep-layers` copies them.", "",
              "## Caveats", "",
              "- A 135M LLM whose weights were rounded to 4 bits (Q4_1 GGUF), against the "
              "paper's Llama-3.1-8B in bf16; a 22M-parameter SLM (MiniLM) instead of BERT-base "
              "and larger; 2 epochs instead of the paper's 3 (a 2-core CPU's budget).",
              "- SST-2 here is the 6,920-sentence split (not GLUE's 67k phrases); its test "
              "column is the 1,821-sentence test set. CoLA is scored as the authors do: test = "
              "GLUE's validation (1,043 rows), dev = a fixed-seed 20 % of the training "
              "sentences (`pifi-fast tasks`).",
              "- Few seeds: a difference smaller than the spread is not a result, and one "
              "larger than the spread of three seeds is a hint, not a significance test.",
              "- The SST-2 and RTE cells dated 2026-11-29 were imported from that day's "
              "replication (`benchmarks/results/replication/replication-2026-11-29.json`; each "
              "record's `source` says so): same settings, but the fused layer was being rebuilt "
              "then (the main rows used its plain PyTorch version, the ablations the packed "
              "version; on the exact one-token classification path they differ at rounding "
              "level). Their per-epoch scores were not kept. Its CoLA rows ran on CoLA's former "
              "splits and are not imported.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--replication", default=str(ROOT / "benchmarks/results/replication"))
    p.add_argument("--layers", default=str(ROOT / "benchmarks/results/sweep-layers"))
    p.add_argument("--out", default=str(ROOT / "docs/replication.md"))
    args = p.parse_args(argv)
    layers = Path(args.layers)
    out = Path(args.out)
    text = render(Results(Path(args.replication)),
                  Results(layers) if (layers / "spec.toml").is_file() else None,
                  out.parent / "assets" / "replication")
    out.write_text(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
