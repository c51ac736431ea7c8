"""Running cases into result rows, speed-ups against baselines, and the written report."""
from __future__ import annotations

import datetime
import json
import platform
import subprocess
import time
from pathlib import Path

import torch
import transformers

from pifi_fast.bench import w5_deploy
from pifi_fast.bench.common import BASELINES
from pifi_fast.bench.timing import copy_bandwidth, matmul_rate, measure, peak_memory


def environment(device: torch.device) -> dict:
    env = {"date": datetime.date.today().isoformat(), "python": platform.python_version(),
           "torch": torch.__version__, "transformers": transformers.__version__,
           "cuda": torch.version.cuda, "device_type": device.type}
    try:  # deferred: triton is optional (CPU-only torch builds come without it)
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True).stdout.strip().splitlines()[0]
        except (OSError, IndexError):
            env["driver"] = None
    else:
        env["device"] = f"CPU: {platform.processor() or platform.machine()}, " \
                        f"{torch.get_num_threads()} threads"
        env["driver"] = None
    return env


def ceilings(device: torch.device, dtype: torch.dtype) -> dict:
    return {"copy_bytes_per_s": copy_bandwidth(device), "matmul_flop_per_s": matmul_rate(device,
                                                                                        dtype)}


def measure_case(case, built: dict, device: torch.device, reps: int, ceil: dict) -> dict:
    """Time a built case and turn it into a result row (shared by the CLI and pytest suite)."""
    fn = built.pop("fn")
    # a case may ask for fewer repetitions (W4 on CPU, the one-epoch rows: seconds to minutes
    # per call) and no extra call for the peak-memory figure
    reps, warmup = min(reps, built.pop("reps", reps)), built.pop("warmup", 2)
    with_peak = built.pop("peak_memory", True)
    row = {"workload": case.workload, "variant": case.variant, "shape": case.shape,
           "size": case.size, "impl": case.impl, "group": case.group, **built}
    row.update(measure(fn, device, warmup=warmup, reps=reps))
    row["peak_memory_bytes"] = peak_memory(fn, device) if with_peak else None
    row["tokens_per_s"] = row["tokens"] / row["median_s"]
    if "flops" in row:
        row["pct_of_ceiling"] = 100 * row["flops"] / row["median_s"] / ceil["matmul_flop_per_s"]
        row["ceiling"] = "matmul"
    elif "bytes_moved" in row:
        row["pct_of_ceiling"] = 100 * row["bytes_moved"] / row["median_s"] / \
            ceil["copy_bytes_per_s"]
        row["ceiling"] = "copy"
    row["fn"] = fn  # callers that time it again (pytest-benchmark) take it out
    return row


class Stopped(Exception):
    """Raised (from a SIGTERM handler, see pifi-fast bench) to end a run early: the case in
    progress and the rest are recorded as skipped and everything measured is still written."""


def run(cases, device: torch.device, reps: int, ceil: dict, progress=None,
        deadline: float | None = None) -> list[dict]:
    """Measure every case. With a deadline (time.monotonic() value), cases not started by then
    are recorded as skipped, so a time-boxed run still writes everything it measured; so does
    a run stopped by Stopped."""
    rows = []
    stopped = None
    for case in cases:
        if progress is not None:
            progress.set_description(f"{case.workload} {case.shape} {case.size} {case.impl}")
        row = None
        if stopped:
            built = {"skip": stopped}
        elif deadline is not None and time.monotonic() > deadline:
            built = {"skip": "time budget of this run reached"}
        else:
            try:
                built = case.build()
                if "skip" not in built:
                    row = measure_case(case, built, device, reps, ceil)
                    row.pop("fn")
            except torch.OutOfMemoryError as exc:
                built = {"skip": f"out of memory: {exc}".splitlines()[0]}
            except Stopped as exc:
                stopped = f"run stopped ({exc}) before this case finished"
                built = {"skip": stopped}
        rows.append(row if row is not None and "skip" not in built else
                    {"workload": case.workload, "variant": case.variant, "shape": case.shape,
                     "size": case.size, "impl": case.impl, "group": case.group,
                     "skipped": built["skip"]})
        if progress is not None:
            progress.update(1)
    add_speedups(rows)
    return rows


def add_speedups(rows: list[dict]) -> None:
    """speedup_vs[b] = median(b) / median(ours) within each group, same run, for pifi_fast and
    its variants (pifi_fast_mlp, pifi_fast_tgemm, pifi_fast_compiled, ...)."""
    by_group: dict[str, dict[str, dict]] = {}
    for r in rows:
        if "median_s" in r:
            by_group.setdefault(r["group"], {})[r["impl"]] = r
    for impls in by_group.values():
        for name, ours in impls.items():
            if name.startswith("pifi_fast"):
                # a variant (recompute="mlp", compiled, 8-bit, ...) is also set against plain
                # eager pifi_fast: its cost or gain over the default
                bases = BASELINES + (("pifi_fast",) if name != "pifi_fast" else ())
                ours["speedup_vs"] = {b: impls[b]["median_s"] / ours["median_s"]
                                      for b in bases if b in impls}


# The fused-layer issue's speed and memory targets, read off one run's rows: (what, workload,
# variant, size, how the value is computed, goal, "min" = at least / "max" = at most).
TARGET_SHAPE, DENSE_TOKENS, PADDED_SENTENCES, CLS_ROWS = "llama-3.1-8b", 16384, 32, 32
GEMMS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def targets(rows: list[dict], asked: set | None = None) -> list[dict]:
    """Each target with the measured value (None when the run lacks the rows it needs).
    ``asked`` collects the key of every row looked up (see needed_rows)."""
    def find(workload, variant, size, impl="pifi_fast"):
        if asked is not None:
            asked.add((workload, variant, TARGET_SHAPE, size, impl))
        for r in rows:
            if (r["workload"], r["variant"], r["shape"], r["size"], r["impl"]) == (
                    workload, variant, TARGET_SHAPE, size, impl) and "median_s" in r:
                return r
        return None

    def speedup(workload, variant, size, base):  # pifi_fast's row against the base's
        r, b = find(workload, variant, size), find(workload, variant, size, base)
        return None if r is None or b is None else r.get("speedup_vs", {}).get(base)

    dense = find("W1", "fwd+bwd dense", DENSE_TOKENS)
    hf_dense = find("W1", "fwd+bwd dense", DENSE_TOKENS, "hf_sdpa")
    gemm_rows = [find("W3", op + suffix, DENSE_TOKENS) for op in GEMMS
                 for suffix in ("", "_grad")]
    gemm_ratio = (dense["median_s"] / sum(g["median_s"] for g in gemm_rows)
                  if dense and all(gemm_rows) else None)
    cls = find("W2", "cls fwd+bwd", CLS_ROWS)
    peak = (dense["peak_memory_bytes"] / hf_dense["peak_memory_bytes"]
            if dense and hf_dense and dense.get("peak_memory_bytes")
            and hf_dense.get("peak_memory_bytes") else None)
    table = [
        ("fwd+bwd 32x512 dense: speed-up over the HF layer (SDPA)",
         speedup("W1", "fwd+bwd dense", DENSE_TOKENS, "hf_sdpa"), 1.3, "min"),
        ("fwd+bwd 32x512 dense: speed-up over the HF layer under torch.compile",
         speedup("W1", "fwd+bwd dense", DENSE_TOKENS, "hf_compile"), 1.05, "min"),
        ("fwd+bwd 32x512 dense: time / sum of its 8 GEMMs alone (cuBLAS)", gemm_ratio, 1.25,
         "max"),
        ("fwd+bwd, 32 SST-2 sentences padded: speed-up over the HF layer with a mask",
         speedup("W1", "fwd+bwd padded", PADDED_SENTENCES, "hf_sdpa"), 2.0, "min"),
        ("CLS fwd+bwd, 32 rows: % of the weight-streaming roofline",
         None if cls is None else cls.get("pct_of_ceiling"), 70.0, "min"),
        ("forward only 32x512: speed-up over the HF layer (SDPA)",
         speedup("W1", "fwd dense", DENSE_TOKENS, "hf_sdpa"), 1.3, "min"),
        ("fwd+bwd 32x512: peak memory / the HF layer's", peak, 0.6, "max"),
    ]
    out = []
    for what, value, goal, kind in table:
        met = None if value is None else (value >= goal if kind == "min" else value <= goal)
        out.append({"target": what, "value": value, "goal": goal, "kind": kind, "met": met})
    return out


# Issue 10's whole-step targets (GPU, bf16), read per W4 pair off one run's rows: (what, W4
# variant, sentences (QA: windows), the pifi_fast rows that may meet it (the fastest counts, and
# is named), baseline, goal). The 8-bit rows are left out: different weights, a different model.
STEP_PAIRS = ("bert-base+llama-3.1-8b", "minilm+smollm2")
STEP_TRAIN_IMPLS = ("pifi_fast", "pifi_fast_compiled", "pifi_fast_packed")
STEP_TARGETS = (
    ("classification train step, 32 sentences: over the eager reference PiFi", "train step", 32,
     STEP_TRAIN_IMPLS, "hf_sdpa", 3.0),
    ("classification train step, 32 sentences: over the authors' setup", "train step", 32,
     STEP_TRAIN_IMPLS, "authors", 8.0),
    ("inference, batch 32, CUDA graphs: over the eager reference PiFi", "inference", 32,
     ("pifi_fast_cudagraphs",), "hf_sdpa", 5.0),
    ("QA train step, 8 x 384 tokens: over the compiled reference PiFi", "qa train step", 8,
     ("pifi_fast", "pifi_fast_compiled"), "hf_compile", 1.3),
)


def step_targets(rows: list[dict], asked: set | None = None) -> list[dict]:
    """Each whole-step target per pair: the fastest of its pifi_fast rows over the baseline
    (value None when the run lacks the baseline or every pifi_fast row)."""
    by_key = {(r["workload"], r["variant"], r["shape"], r["size"], r["impl"]): r for r in rows
              if "median_s" in r}
    out = []
    for pair in STEP_PAIRS:
        for what, variant, size, impls, base, goal in STEP_TARGETS:
            keys = [("W4", variant, pair, size, impl) for impl in (*impls, base)]
            if asked is not None:
                asked.update(keys)
            base_row = by_key.get(keys[-1])
            ours = [by_key[k] for k in keys[:-1] if k in by_key]
            best = min(ours, key=lambda r: r["median_s"]) if ours and base_row else None
            value = None if best is None else base_row["median_s"] / best["median_s"]
            out.append({"target": what, "pair": pair, "value": value, "goal": goal,
                        "kind": "min", "met": None if value is None else value >= goal,
                        "impl": None if best is None else best["impl"]})
    return out


def needed_rows() -> set[tuple]:
    """(workload, variant, shape, size, impl) of every row some target reads: a time-boxed run
    measures these first (pifi-fast bench --time-budget)."""
    asked: set[tuple] = set()
    targets([], asked)
    step_targets([], asked)
    return asked


def budget_order(cases: list) -> list:
    """The order of a time-boxed run: the rows some target reads first (fused layer, then the
    whole step), the compiled and CUDA-graph ones among them last (each compiles for tens of
    seconds: a run cut short still has the eager pairs), and of those the ones a target cannot
    do without (a compiled baseline, CUDA graphs) before compiled pifi_fast (an alternative to
    its eager row); then the rest, the eager rows first, the target shape first among each;
    otherwise the suite's order."""
    needed = needed_rows()

    def rank(c):
        compiles = "compile" in c.impl or "cudagraphs" in c.impl
        if (c.workload, c.variant, c.shape, c.size, c.impl) in needed:
            if not compiles:
                return 0, 0, 0
            return 0, 2 if c.impl.startswith("pifi_fast") and "compiled" in c.impl else 1, 0
        return 1, int(compiles), int(c.shape != TARGET_SHAPE)

    return sorted(cases, key=rank)


def write(rows, env, ceil, out_dir: Path, level: str) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "md": out_dir / "results.md"}
    payload = {"environment": env, "ceilings": ceil, "level": level, "rows": rows,
               "targets": targets(rows), "step_targets": step_targets(rows),
               "deploy_overhead": w5_deploy.overhead(rows),
               "deploy_targets": w5_deploy.deploy_targets(rows)}
    paths["json"].write_text(json.dumps(payload, indent=1, default=str))
    paths["md"].write_text(markdown(rows, env, ceil, level))
    paths.update(plots(rows, env, out_dir))
    if w5_deploy.plot(rows, out_dir / "w5_overhead.png"):
        paths["w5_png"] = out_dir / "w5_overhead.png"
    return paths


def _fmt_speedups(r) -> str:
    return ", ".join(f"{b} x{v:.2f}" for b, v in r.get("speedup_vs", {}).items()) or "-"


def markdown(rows, env, ceil, level) -> str:
    lines = [f"# pifi_fast benchmark ({level}) on {env['device']}", "",
             f"{env['date']}; torch {env['torch']}, transformers {env['transformers']}, triton "
             f"{env['triton']}, CUDA {env['cuda']}, driver {env['driver']}.", "",
             f"Ceilings measured in this run: copy {ceil['copy_bytes_per_s'] / 1e9:.1f} GB/s, "
             f"matmul {ceil['matmul_flop_per_s'] / 1e12:.2f} TFLOP/s.", "",
             "Speed-up = baseline median / pifi_fast median, same run (> 1: pifi_fast faster). "
             "Spread = interquartile range.", ""]
    if env["device_type"] == "cpu":
        lines += ["**CPU run**: these are ratios of the CPU code paths, not GPU figures.", ""]
    lines += ["| workload | shape | size | impl | dtype | median ms | spread ms | tokens/s | "
              "saved B/token | peak MB | % ceiling | speed-up of pifi_fast |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['workload']} {r['variant']} | {r['shape']} | {r['size']} | "
                         f"{r['impl']} | | skipped: {r['skipped']} | | | | | | |")
            continue
        saved = r.get("saved_bytes_per_token")
        peak = r.get("peak_memory_bytes")
        pct = r.get("pct_of_ceiling")
        saved_s = "" if saved is None else f"{saved / 1e3:.1f} K"
        peak_s = "" if peak is None else f"{peak / 2**20:.0f}"
        pct_s = "" if pct is None else f"{pct:.1f} ({r['ceiling']})"
        lines.append(
            f"| {r['workload']} {r['variant']} | {r['shape']} | {r['size']} | {r['impl']} | "
            f"{r.get('dtype', '')} | {r['median_s'] * 1e3:.3f} | "
            f"{(r['q3_s'] - r['q1_s']) * 1e3:.3f} | {r['tokens_per_s']:.0f} | "
            f"{saved_s} | {peak_s} | {pct_s} | "
            f"{_fmt_speedups(r) if r['impl'].startswith('pifi_fast') else ''} |")
    notes = sorted({r["path"] for r in rows if r.get("path")})
    if notes:
        lines += ["", "pifi_fast paths in this run: " + "; ".join(notes) + "."]
    first = [f"{r['workload']} {r['variant']} {r['shape']} {r['impl']} "
             f"{r['first_call']['seconds']:.1f} s" for r in rows
             if (r.get("first_call") or {}).get("seconds") is not None]
    if first:  # compiled rows: the warm-up's first call, compiling (and capturing) included
        lines += ["", "First call, compiling included (Inductor's on-disk cache may shorten it): "
                  + "; ".join(first) + "."]
    lines += ["", f"## Targets of the fused layer ({TARGET_SHAPE} shape, this run)", ""]
    if env["device_type"] != "cuda":
        lines += ["The targets are GPU (bf16) targets; on this device they are shown for "
                  "completeness only.", ""]
    lines += ["| target | measured | goal | met |", "|---|---|---|---|"]
    for t in targets(rows):
        value = "not in this run" if t["value"] is None else f"{t['value']:.2f}"
        met = "-" if t["met"] is None else ("yes" if t["met"] else "**no**")
        goal = (">= " if t["kind"] == "min" else "<= ") + f"{t['goal']:g}"
        lines.append(f"| {t['target']} | {value} | {goal} | {met} |")
    lines += ["", "## Targets of the whole step (issue 10: W4, this run)", ""]
    if env["device_type"] != "cuda":
        lines += ["GPU (bf16) targets too: on this device for completeness only.", ""]
    lines += ["The fastest of the pifi_fast rows named in each target counts, and is named.", "",
              "| pair | target | measured | pifi_fast row | goal | met |",
              "|---|---|---|---|---|---|"]
    for t in step_targets(rows):
        value = "not in this run" if t["value"] is None else f"{t['value']:.2f}"
        met = "-" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['pair']} | {t['target']} | {value} | {t['impl'] or '-'} | "
                     f">= {t['goal']:g} | {met} |")
    w5 = w5_deploy.markdown(rows)
    if w5:
        lines += ["", w5.rstrip("\n")]
    return "\n".join(lines) + "\n"


def plots(rows, env, out_dir: Path) -> dict[str, Path]:
    try:  # deferred: matplotlib is optional (plots only)
        import matplotlib
    except ImportError:  # e.g. a bare GPU machine: the JSON and Markdown still get written
        print("matplotlib is not installed: plots skipped (pip install matplotlib)")
        return {}

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: matplotlib is optional; after use("Agg")

    out = {}
    tag = "CPU paths" if env["device_type"] == "cpu" else env["device"]
    w1 = [r for r in rows if r["workload"] in ("W1", "W2") and r["impl"] == "pifi_fast"
          and "speedup_vs" in r]
    if w1:
        variants = sorted({(r["workload"], r["variant"]) for r in w1})
        cols = min(3, len(variants))
        nrows = -(-len(variants) // cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.4 * nrows), squeeze=False)
        colors = {b: f"C{i}" for i, b in enumerate(BASELINES)}
        markers = dict(zip(sorted({r["shape"] for r in w1}), "os^Dv"))
        handles = {}
        for ax, (wl, variant) in zip(axes.flat, variants):
            sel = [r for r in w1 if (r["workload"], r["variant"]) == (wl, variant)]
            for shape in sorted({r["shape"] for r in sel}):
                for base in BASELINES:
                    pts = sorted((r["tokens"], r["speedup_vs"][base]) for r in sel
                                 if r["shape"] == shape and base in r["speedup_vs"])
                    if pts:
                        (line,) = ax.plot(*zip(*pts), marker=markers[shape], color=colors[base])
                        handles[f"{shape} vs {base}"] = line
            ax.axhline(1.0, color="gray", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{wl} {variant}", fontsize=9)
            ax.set_xlabel("real tokens (W2: rows)")
            ax.set_ylabel("speed-up of pifi_fast")
        for ax in list(axes.flat)[len(variants):]:
            ax.axis("off")
        fig.legend(handles.values(), handles.keys(), fontsize=7, loc="lower right",
                   ncol=max(1, len(handles) // 6))
        fig.suptitle(f"pifi_fast speed-up over each baseline ({tag}, {env['date']})", fontsize=10)
        fig.tight_layout(rect=(0, 0.12 if nrows == 1 else 0.05, 1, 1))
        out["speedup_png"] = out_dir / "speedup_vs_tokens.png"
        fig.savefig(out["speedup_png"], dpi=110)
        plt.close(fig)
    mem = [r for r in rows if r["workload"] == "W1" and r["variant"].startswith("fwd+bwd")
           and r.get("saved_bytes_per_token") is not None]
    if mem:
        fig, ax = plt.subplots(figsize=(6, 3.8))
        for shape in sorted({r["shape"] for r in mem}):
            for impl in sorted({r["impl"] for r in mem}):
                pts = sorted((r["tokens"], r["saved_bytes_per_token"] / 1e3) for r in mem
                             if r["shape"] == shape and r["impl"] == impl)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=f"{shape} {impl}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("real tokens")
        ax.set_ylabel("saved activations, KB per token")
        ax.set_title(f"W1 fwd+bwd memory kept for backward ({tag})", fontsize=9)
        ax.legend(fontsize=6)
        fig.tight_layout()
        out["memory_png"] = out_dir / "memory_vs_tokens.png"
        fig.savefig(out["memory_png"], dpi=110)
        plt.close(fig)
    w3 = [r for r in rows if r["workload"] == "W3" and "pct_of_ceiling" in r]
    if w3:
        fig, ax = plt.subplots(figsize=(7, 3.8))
        labels = [f"{r['variant']}\n{r['shape']}\n{r['size']}" for r in w3]
        ax.bar(range(len(w3)), [r["pct_of_ceiling"] for r in w3],
               color=["tab:blue" if r["ceiling"] == "copy" else "tab:orange" for r in w3])
        ax.set_xticks(range(len(w3)), labels, fontsize=5, rotation=90)
        ax.set_ylabel("% of measured ceiling")
        ax.set_title(f"W3 ops alone: blue = copy bandwidth, orange = matmul rate ({tag})",
                     fontsize=9)
        fig.tight_layout()
        out["roofline_png"] = out_dir / "roofline_per_kernel.png"
        fig.savefig(out["roofline_png"], dpi=110)
        plt.close(fig)
    return out


def compare(new_rows, old_path: Path) -> list[str]:
    """Every case that got slower than in `old_path` by more than its measured spread."""
    old = {f"{r['group']} | {r['impl']}": r for r in json.loads(old_path.read_text())["rows"]
           if "median_s" in r}
    flagged = []
    for r in new_rows:
        o = old.get(f"{r['group']} | {r['impl']}")
        if o is None or "median_s" not in r:
            continue
        spread = max(r["q3_s"] - r["q1_s"], o["q3_s"] - o["q1_s"])
        if r["median_s"] - o["median_s"] > spread:
            flagged.append(f"SLOWER: {r['group']} | {r['impl']}: {o['median_s'] * 1e3:.3f} -> "
                           f"{r['median_s'] * 1e3:.3f} ms (spread {spread * 1e3:.3f} ms)")
    return flagged
