"""Small-scale replication of PiFi (docs/replication.md and docs/replication.json).

all-MiniLM-L6-v2 alone against all-MiniLM-L6-v2 + PiFi (SmolLM2-135M's last layer) on SST-2,
CoLA and RTE from ../shared/data, several seeds each; the paper's ablations on SST-2 (layer
position first/middle/last, frozen/unfrozen); 8-bit layer weights; the paper's open questions
(several layers, MLP adapters, SmolLM2 + LoRA, low resource, cross-domain SST-2 -> UCI IMDB);
and the epoch time of the authors' setup (fp32, padding to 100, Hugging Face layer) against
pifi_fast's defaults.

    python scripts/replication.py                       # everything (hours on 2 CPU cores)
    python scripts/replication.py --only main --tasks sst2 --seeds 1
Finished runs are kept in runs/replication/<name>/results.json and reused, so an interrupted
sweep continues where it stopped; the report is rebuilt from all finished runs each time.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pifi_fast.train import TrainConfig, evaluate_checkpoint, train  # noqa: E402

METRIC = {"sst2": "accuracy", "cola": "mcc", "rte": "accuracy"}


REPORT_ONLY = False  # --report-only: build the report from finished runs, train nothing


def run(name: str, runs_dir: Path, cross: str | None = None, **cfg) -> dict | None:
    """A finished run's results (training it unless --report-only). ``cross``: a dataset the
    best model is also evaluated on (its test split) before the checkpoints are deleted, kept
    under "cross_domain"."""
    out = runs_dir / name
    if (out / "results.json").is_file():
        return json.loads((out / "results.json").read_text())
    if REPORT_ONLY:
        return None
    res = train(TrainConfig(output_dir=str(out), **cfg))
    res.pop("model", None)
    if cross:
        res["cross_domain"] = {"data": cross, **evaluate_checkpoint(str(out / "best"), cross,
                                                                    "test")}
        (out / "results.json").write_text(json.dumps(res, indent=2, default=str))
    for d in ("checkpoint-last", "best"):  # keep only the numbers: checkpoints are large
        import shutil

        shutil.rmtree(out / d, ignore_errors=True)
    return json.loads((out / "results.json").read_text())


# The paper's open questions (issue 14): variant -> TrainConfig fields, against the main rows
RESEARCH = {"layers_2": {"layers": "-2,-1"}, "mlp_adapters": {"adapter": "mlp"},
            "layers_3": {"layers": "-3,-2,-1"}, "llm_lora": {"baseline": "llm-lora"}}
LOW_RESOURCE = 500  # SST-2 training sentences in the low-resource rows
CROSS = "uci-imdb"  # every SST-2 model of these rows is also scored on the UCI IMDB sentences


def _summary(results: list[dict], task: str) -> dict:
    """Mean/std of dev, test, cross-domain accuracy and the cost of a list of runs."""
    def stat(f):
        return _mean_std([v for v in (f(r) for r in results) if v is not None])

    return {"metric": METRIC[task], "dev": stat(lambda r: r["best_dev"]),
            "test": stat(lambda r: (r.get("test") or {}).get(METRIC[task])),
            "cross_domain": stat(lambda r: (r.get("cross_domain") or {}).get("accuracy")),
            "cost": {"trainable_parameters": stat(lambda r: r.get("trainable_parameters")),
                     # each run's fastest epoch: other jobs on the machine (or a paused
                     # sweep) only ever add time to an epoch
                     "epoch_seconds": stat(lambda r: min(
                         h["epoch_seconds"] for h in r["history"])),
                     "peak_memory_bytes": stat(lambda r: r.get("peak_memory_bytes"))}}


def research_rows(args, runs_dir: Path, common: dict) -> dict:
    """Low-resource SST-2 and cross-domain SST-2 -> UCI IMDB (SLM alone vs PiFi), then per task
    several layers, MLP adapters and the SmolLM2 + LoRA baseline, in that order (cheapest and
    most asked-for first), 3 seeds each as everything else."""
    out = {"low_resource": {}, "cross_domain": {}, "variants": {}}
    plan = [("low_resource", "sst2", v, {"limit_train": LOW_RESOURCE}) for v in
            ("slm_alone", "pifi")]
    plan += [("cross_domain", "sst2", v, {}) for v in ("slm_alone", "pifi")]
    plan += [("variants", t, v, extra) for t in args.tasks if t in ("sst2", "cola")
             for v, extra in RESEARCH.items()]
    for group, task, variant, extra in plan:
        results = []
        for seed in args.seeds:
            cfg = {**common, "data": task, "seed": seed, "llm": "smollm2", **extra}
            if variant == "slm_alone":
                cfg["llm"] = None
            tag = {"low_resource": "lowres-", "cross_domain": "xd-"}.get(group, "")
            name = f"{task}-{tag}{variant}-s{seed}"
            if args.variants and variant not in args.variants and group == "variants":
                # not asked for in this call: reported if finished, never trained
                done = runs_dir / name / "results.json"
                r = json.loads(done.read_text()) if done.is_file() else None
            else:
                r = run(name, runs_dir, cross=CROSS if task == "sst2" else None, **cfg)
            if r is not None:
                results.append(r)
        if results:
            out[group].setdefault(task, {})[variant] = _summary(results, task)
    return out


def _mean_std(values):
    if not values:
        return None
    return {"mean": statistics.mean(values), "std": statistics.stdev(values)
            if len(values) > 1 else 0.0, "n": len(values), "values": values}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=["sst2", "cola", "rte"])
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--only", choices=["main", "ablations", "epoch_time", "quant", "research"],
                   default=None)
    p.add_argument("--variants", nargs="+", choices=list(RESEARCH), default=None,
                   help="--only research: train only these variants (the others are reported "
                        "from finished runs); default all")
    p.add_argument("--runs-dir", default=str(ROOT / "runs" / "replication"))
    p.add_argument("--report-only", action="store_true",
                   help="rebuild docs/replication.json from finished runs; train nothing")
    args = p.parse_args(argv)
    global REPORT_ONLY
    REPORT_ONLY = args.report_only
    runs_dir = Path(args.runs_dir)
    common = dict(slm="minilm", epochs=args.epochs, batch_size=32, lr=5e-5, max_length=100)
    report = {"settings": {**common, "seeds": args.seeds, "llm": "SmolLM2-135M-Instruct Q4_1 "
                           "GGUF, last layer (29)", "slm": "all-MiniLM-L6-v2"},
              "main": {}, "ablations": {}, "epoch_time": {}, "quant": {}, "research": {}}
    if args.only in (None, "main"):
        for task in args.tasks:
            # RTE and CoLA: their 'test' files are a re-split dev / out-of-domain dev; we report
            # dev (the model selection split) and test both.
            for variant, llm in (("slm_alone", None), ("pifi", "smollm2")):
                devs, tests = [], []
                for seed in args.seeds:
                    r = run(f"{task}-{variant}-s{seed}", runs_dir, data=task, llm=llm, seed=seed,
                            **common)
                    if r is None:
                        continue
                    devs.append(r["best_dev"])
                    if "test" in r:
                        tests.append(r["test"][METRIC[task]])
                report["main"].setdefault(task, {})[variant] = {
                    "metric": METRIC[task], "dev": _mean_std(devs), "test": _mean_std(tests)}
    if args.only in (None, "ablations"):
        for name, extra in (("layer_first", {"layer": 0}), ("layer_middle", {"layer": 15}),
                            ("layer_last", {"layer": -1}),
                            ("unfrozen_last", {"layer": -1, "freeze": False})):
            devs, tests = [], []
            for seed in args.seeds:
                # The last frozen layer is the main SST-2 PiFi run (same settings): reuse it.
                run_name = (f"sst2-pifi-s{seed}" if name == "layer_last"
                            else f"sst2-ablation-{name}-s{seed}")
                r = run(run_name, runs_dir, data="sst2", llm="smollm2",
                        seed=seed, **{**common, **extra})
                if r is None:
                    continue
                devs.append(r["best_dev"])
                tests.append(r["test"]["accuracy"])
            report["ablations"][name] = {"dev": _mean_std(devs), "test": _mean_std(tests)}
    if args.only in (None, "quant"):
        # 8-bit frozen weights (--layer-weights): the end task decides whether they cost accuracy
        for task in [t for t in args.tasks if t in ("sst2", "cola")]:
            for mode in ("int8", "fp8"):
                devs, tests = [], []
                for seed in args.seeds:
                    r = run(f"{task}-pifi-{mode}-s{seed}", runs_dir, data=task, llm="smollm2",
                            seed=seed, layer_weights=mode, **common)
                    if r is None:
                        continue
                    devs.append(r["best_dev"])
                    if "test" in r:
                        tests.append(r["test"][METRIC[task]])
                if devs:
                    report["quant"].setdefault(task, {})[mode] = {
                        "metric": METRIC[task], "dev": _mean_std(devs), "test": _mean_std(tests)}
    if args.only in (None, "research"):
        report["research"] = research_rows(args, runs_dir, common)
    if args.only in (None, "epoch_time"):
        times = {}
        for name, extra in (("authors_setup", {"authors_setup": True}), ("pifi_fast", {})):
            r = run(f"sst2-epochtime-{name}", runs_dir, data="sst2", llm="smollm2", seed=1,
                    **{**common, "epochs": 1, **extra})
            if r is not None:
                times[name] = r["history"][0]["epoch_seconds"]
        if len(times) == 2:
            report["epoch_time"] = {"seconds": times,
                                    "speedup": times["authors_setup"] / times["pifi_fast"]}
    out = ROOT / "docs" / "replication.json"
    old = json.loads(out.read_text()) if out.is_file() else {}
    # Only tasks/variants with finished runs are reported; empty entries are dropped.
    report["main"] = {t: {v: e for v, e in variants.items() if e["dev"]}
                      for t, variants in report["main"].items()}
    report["main"] = {t: variants for t, variants in report["main"].items() if variants}
    report["ablations"] = {k: v for k, v in report["ablations"].items() if v["dev"]}
    # A section with no finished run here (not run in this call, or its runs folder is gone)
    # keeps what the report already had.
    for key in ("main", "ablations", "epoch_time", "quant", "research"):
        empty = not report[key] or (key == "research" and not any(report[key].values()))
        if empty and key in old:
            report[key] = old[key]
    out.write_text(json.dumps(report, indent=2))
    (ROOT / "docs" / "replication.md").write_text(render_markdown(report))
    print(json.dumps(report, indent=2))


def _fmt(stats, scale=100.0):
    if not stats:
        return "not run"
    return (f"{stats['mean'] * scale:.2f} ± {stats['std'] * scale:.2f} (n={stats['n']}: "
            + ", ".join(f"{v * scale:.2f}" for v in stats["values"]) + ")")


def _quant_section(report: dict) -> list[str]:
    lines = ["", "## 8-bit frozen weights: does the end task notice?", ""]
    quant = report.get("quant") or {}
    if not quant:
        return lines + ["Not run yet: `python scripts/replication.py --only quant --tasks sst2 "
                        "cola`."]
    lines += ["PiFi with SmolLM2's last layer stored in 8 bits (`--layer-weights int8|fp8`: int8 "
              "weight-only, one scale per channel and 128 inputs (64 where 128 does not divide "
              "the row); fp8 e4m3 W8A8 for o, gate/up and down with int8 q/k/v), against the "
              "same runs with the layer unquantized (the main PiFi rows above). Same seeds, "
              "settings and epochs.", "",
              "| task | split | unquantized | int8 | fp8 |", "|---|---|---|---|---|"]
    verdicts = []
    for task, modes in quant.items():
        base = report.get("main", {}).get(task, {}).get("pifi", {})
        for split in ("dev", "test"):
            lines.append(f"| {task} | {split} | {_fmt(base.get(split))} | "
                         f"{_fmt(modes.get('int8', {}).get(split))} | "
                         f"{_fmt(modes.get('fp8', {}).get(split))} |")
            for mode, entry in modes.items():
                a, b = base.get(split), entry.get(split)
                if not a or not b:
                    continue
                gap = (b["mean"] - a["mean"]) * 100
                spread = max(a["std"], b["std"]) * 100
                verdicts.append(
                    f"- {task} {split}, {mode}: {gap:+.2f} points against the unquantized layer; "
                    + ("within the seed spread (largest std {:.2f}): no measurable cost."
                       .format(spread) if abs(gap) <= spread else
                       "larger than the seed spread ({:.2f}): {}.".format(
                           spread, "a cost" if gap < 0 else "a gain, not a result on its own")))
    return lines + [""] + verdicts


def _verdict(a, b, what: str) -> str:
    gap, spread = (b["mean"] - a["mean"]) * 100, max(a["std"], b["std"]) * 100
    if min(a["n"], b["n"]) < 2:
        return f"{what}: {gap:+.2f} points; fewer than two seeds on one side: no verdict yet."
    if abs(gap) <= spread:
        return (f"{what}: {gap:+.2f} points, within the seed spread (largest std "
                f"{spread:.2f}): no measurable difference.")
    return (f"{what}: {gap:+.2f} points, larger than the seed spread ({spread:.2f}): "
            + ("better" if gap > 0 else "worse") + " here (a hint, not a significance test).")


def _cost(entry) -> str:
    c = entry.get("cost") or {}
    parts = []
    if c.get("trainable_parameters"):
        parts.append(f"{c['trainable_parameters']['mean'] / 1e6:.2f} M trained")
    if c.get("epoch_seconds"):
        # the median over seeds: one run that shared the machine (or was paused) is one outlier
        parts.append(f"{statistics.median(c['epoch_seconds']['values']):.0f} s/epoch")
    if c.get("peak_memory_bytes"):
        parts.append(f"{c['peak_memory_bytes']['mean'] / 2**30:.2f} GiB peak RSS")
    return ", ".join(parts) or "-"


def _research_section(report: dict) -> list[str]:
    lines = ["", "## The paper's open questions: several layers, MLP adapters, SmolLM2 + LoRA, "
             "low resource, cross-domain", ""]
    res = report.get("research") or {}
    cmd = "`python scripts/replication.py --only research --tasks sst2 cola`"
    if not any(res.get(k) for k in ("low_resource", "cross_domain", "variants")):
        return lines + [f"Not run yet: {cmd}."]
    lines.append(f"Built by {cmd} (same settings and seeds as above; what is missing says "
                 "'not run'). Every SST-2 model here is also scored on the UCI IMDB sentences "
                 "(1,000 movie-review sentences; cross-domain column). Costs are means over "
                 "seeds on this CPU: trained parameters, seconds of each run's fastest "
                 "training epoch (the median over seeds; other jobs shared the machine: "
                 "rough), and the process's peak resident memory.")
    low = res.get("low_resource", {}).get("sst2", {})
    lines += ["", f"**Low resource** (the first {LOW_RESOURCE} SST-2 training sentences in file "
              "order, both labels well represented; dev and test as above):", "",
              "| | dev accuracy | test accuracy |", "|---|---|---|"]
    for v in ("slm_alone", "pifi"):
        e = low.get(v, {})
        lines.append(f"| {v} | {_fmt(e.get('dev'))} | {_fmt(e.get('test'))} |")
    for split in ("dev", "test"):
        a, b = low.get("slm_alone", {}).get(split), low.get("pifi", {}).get(split)
        if a and b:
            lines.append(f"\n{_verdict(a, b, f'PiFi - SLM alone, {split}')}")
    xd = res.get("cross_domain", {}).get("sst2", {})
    lines += ["", "**Cross-domain** (trained on SST-2, scored on UCI IMDB, whose 0/1 labels "
              "mean negative/positive as SST-2's do; the paper's IMDB -> Tweet claim at our "
              "scale):", "",
              "| | SST-2 test | UCI IMDB | cost |", "|---|---|---|---|"]
    for v in ("slm_alone", "pifi"):
        e = xd.get(v, {})
        lines.append(f"| {v} | {_fmt(e.get('test'))} | {_fmt(e.get('cross_domain'))} | "
                     f"{_cost(e)} |")
    a, b = xd.get("slm_alone", {}).get("cross_domain"), xd.get("pifi", {}).get("cross_domain")
    if a and b:
        lines.append(f"\n{_verdict(a, b, 'PiFi - SLM alone on UCI IMDB')}")
    variants = res.get("variants", {})
    lines += ["", "**Variants** against PiFi with one layer and linear adapters (the main rows):",
              "", "| task | variant | dev | test | UCI IMDB | cost |", "|---|---|---|---|---|---|"]
    verdicts = []
    for task in ("sst2", "cola"):
        base = report.get("main", {}).get(task, {})
        for v in ("slm_alone", "pifi"):
            e = base.get(v, {})
            lines.append(f"| {task} | {v} (main rows) | {_fmt(e.get('dev'))} | "
                         f"{_fmt(e.get('test'))} | - | - |")
        for v in RESEARCH:
            e = variants.get(task, {}).get(v, {})
            lines.append(f"| {task} | {v} | {_fmt(e.get('dev'))} | {_fmt(e.get('test'))} | "
                         f"{_fmt(e.get('cross_domain')) if task == 'sst2' else '-'} | "
                         f"{_cost(e) if e else '-'} |")
        for v in RESEARCH:
            e = variants.get(task, {}).get(v, {})
            for split in ("dev", "test"):
                a, b = base.get("pifi", {}).get(split), e.get(split)
                if a and b:
                    verdicts.append(f"- {_verdict(a, b, f'{task} {v} - PiFi (1 layer), {split}')}")
    return lines + [""] + verdicts


def render_markdown(report: dict) -> str:
    st = report["settings"]
    lines = [
        "# PiFi at small scale: all-MiniLM-L6-v2 with and without SmolLM2-135M's last layer",
        "",
        "Built by `scripts/replication.py` from [replication.json](replication.json); every "
        "number below is in that file with the per-seed values. Settings: "
        f"SLM {st['slm']}, LLM {st['llm']}, Adam lr {st['lr']}, batch {st['batch_size']}, "
        f"{st['epochs']} epochs, max length {st['max_length']}, label smoothing 0.05, clipping 5, "
        "best epoch on dev; CPU (2 cores), fp32. Mean ± sample std over seeds, in points.",
        "",
        "## SLM alone against SLM + PiFi",
        "",
        "| task | metric | split | SLM alone | SLM + PiFi |",
        "|---|---|---|---|---|",
    ]
    for task, variants in report["main"].items():
        metric = next(iter(variants.values()))["metric"]
        for split in ("dev", "test"):
            lines.append(f"| {task} | {metric} | {split} | "
                         f"{_fmt(variants.get('slm_alone', {}).get(split))} | "
                         f"{_fmt(variants.get('pifi', {}).get(split))} |")
    for task, variants in report["main"].items():
        for split in ("dev", "test"):
            a = variants.get("slm_alone", {}).get(split)
            b = variants.get("pifi", {}).get(split)
            if a and b:
                diff, spread = (b["mean"] - a["mean"]) * 100, max(a["std"], b["std"]) * 100
                if min(a["n"], b["n"]) < 2:
                    verdict = "fewer than two seeds on one side: no verdict yet"
                elif abs(diff) <= spread:
                    verdict = "within the seed spread: no measurable gain"
                else:
                    verdict = ("larger than the seed spread: PiFi " +
                               ("helps" if diff > 0 else "hurts") + " here")
                lines.append(f"\n{task} {split}: PiFi - SLM alone = {diff:+.2f} points "
                             f"(largest std {spread:.2f}): {verdict}.")
    for task, variants in report["main"].items():
        devs = [variants.get(v, {}).get("dev") for v in ("slm_alone", "pifi")]
        if METRIC[task] == "accuracy" and all(d and d["mean"] < 0.56 for d in devs):
            lines.append(f"\n{task}: both models stay near chance (50 % for two classes): the "
                         "SLM does not learn this task in this setting, so the comparison says "
                         "nothing about PiFi.")
    missing = [t for t in METRIC if t not in report["main"]]
    if missing:
        lines += ["", f"Not run yet: {', '.join(missing)} "
                  f"(`python scripts/replication.py --only main --tasks {' '.join(missing)}`)."]
    lines += ["", "## Ablations on SST-2 (PiFi; layer position, frozen or not)", ""]
    if report["ablations"]:
        lines += ["SmolLM2-135M has 30 decoder layers: layer_first is layer 0, layer_middle "
                  "layer 15, layer_last layer 29 (the same runs as the main SST-2 PiFi rows), "
                  "unfrozen_last layer 29 fine-tuned with the rest (the Hugging Face layer, "
                  "with weight gradients).", "",
                  "| variant | dev accuracy | test accuracy |", "|---|---|---|"]
        lines += [f"| {k} | {_fmt(v['dev'])} | {_fmt(v['test'])} |"
                  for k, v in report["ablations"].items()]
        for split in ("dev", "test"):
            stats = [v[split] for v in report["ablations"].values() if v[split]]
            if len(stats) > 1:
                means = [st["mean"] * 100 for st in stats]
                spread = max(st["std"] for st in stats) * 100
                gap = max(means) - min(means)
                lines.append(f"\n{split}: the variants' means lie within {gap:.2f} points of each "
                             f"other (largest seed std {spread:.2f}): " +
                             ("no variant is distinguishable from another at this scale."
                              if gap <= 2 * spread else "the gap exceeds twice the seed spread."))
    else:
        lines.append("Not run yet: `python scripts/replication.py --only ablations`.")
    lines += _quant_section(report)
    lines += _research_section(report)
    lines += ["", "## Epoch time: the authors' setup against pifi_fast's defaults", "",
              "How long one SST-2 epoch takes with pifi_fast's defaults against the authors' "
              "setup is measured by the benchmark suite, not by this sweep: the current figure "
              "is in [Benchmarks](benchmarks.md#headline-the-whole-pifi-step) (one SST-2 epoch "
              "with its dev evaluation, MiniLM + SmolLM2's last layer)."]
    # (--only epoch_time still times it here; its seconds stay in replication.json)
    seeds = " ".join(str(x) for x in st["seeds"])
    tasks = " ".join(report["main"]) or "sst2 cola rte"
    lines += ["", "## Reproduce", "",
              "Each command trains what is missing under runs/replication/ and rebuilds this "
              "page from every finished run; `--report-only` only rebuilds it.", "", "```bash",
              f"python scripts/replication.py --only main --tasks {tasks} --seeds {seeds} "
              f"--epochs {st['epochs']}",
              f"python scripts/replication.py --only ablations --seeds {seeds} "
              f"--epochs {st['epochs']}",
              f"python scripts/replication.py --only quant --tasks sst2 cola --seeds {seeds} "
              f"--epochs {st['epochs']}",
              f"python scripts/replication.py --only research --tasks sst2 cola --seeds {seeds} "
              f"--epochs {st['epochs']}",
              f"python scripts/replication.py --report-only --seeds {seeds} --epochs {st['epochs']}",
              "```"]
    lines += ["", "## Caveats", "",
              "- A 135M LLM whose weights were rounded to 4 bits (Q4_1 GGUF), against the "
              "paper's Llama-3.1-8B in bf16; a 22M-parameter SLM (MiniLM) instead of BERT-base "
              "and larger.",
              "- SST-2 here is the 6,920-sentence split (not GLUE's 67k phrases); the test "
              "column is its 1,821-sentence test set.",
              "- Few seeds: a difference smaller than the spread is not a result, and one "
              "larger than the spread of three seeds is a hint, not a significance test.",
              "- 2 epochs instead of the paper's 3 (the compute budget of a 2-core CPU).",
              "- The sweep ran while the fused layer was being rebuilt (2026-11-29): the SST-2, "
              "CoLA and RTE main runs and the epoch time used its plain PyTorch version, the "
              "ablations the packed Triton/twin version. In classification the layer takes the "
              "exact one-token path in both, so they differ at rounding level only.",
              "- **CoLA's splits changed on 2026-12-07** (docs/training.md): `cola` now means "
              "the authors' (and GLUE's) splits, test = GLUE's validation (in-domain + "
              "out-of-domain dev, 1,043 rows), dev = a fixed-seed 20 % of the training "
              "sentences. The CoLA rows on this page were run before, with dev = the in-domain "
              "dev set and test = the out-of-domain one, on all 8,551 training sentences: they "
              "are not comparable with runs made since. The layer sweep "
              "(`benchmarks/sweeps/layers.toml`, in progress: "
              "`benchmarks/results/sweep-layers/results.md`) reruns CoLA under the new splits.",
              ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
