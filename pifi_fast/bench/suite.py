"""The benchmark suite and the step breakdown as library calls: run_benchmarks (what
`pifi-fast bench` runs) and run_breakdown (`pifi-fast breakdown`).

Both print their progress as they go (the case count, the bar, each pair timed); the caller
prints the results they return (the Markdown table, the paths written, the comparison).
"""
from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import torch
from tqdm import tqdm

from pifi_fast.bench import breakdown, report
from pifi_fast.bench.common import default_dtype, size_lists
from pifi_fast.bench.workloads import all_cases


def _device(device) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def run_benchmarks(level: str = "quick", workloads: str = "W1,W2,W3,W4,W5", *, device=None,
                   dtype=None, only: str | None = None, skip=(), reps: int | None = None,
                   time_budget: float | None = None, out=None, compare=None) -> dict:
    """Measure the cases of a size list (``level``: tiny, quick or full) and write the report.

    workloads: a comma list of W1..W5; only / skip: keep the cases whose key contains ``only``,
    drop those containing any text of ``skip``; reps: timed repetitions per case (default: the
    size list's); time_budget: seconds after which no case starts (the rows the targets read run
    first), the rest recorded as skipped; out: the folder (default
    bench-results/<device>-<date>); compare: an earlier results.json to flag slowdowns against.
    device / dtype: None (cuda when present; bf16 on GPU, fp32 on CPU), a name or a torch
    object. A SIGTERM (e.g. from `timeout`) ends the run early, writing what was measured.

    Returns {"rows", "paths" ({kind: Path} of what was written), "markdown" (the results.md
    text), "out_dir", "flagged" (the slowdowns against ``compare``; None without it)}.
    """
    device = _device(device)
    if dtype is None:
        dtype = default_dtype(device)
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    wanted = tuple(w.strip().upper() for w in workloads.split(","))
    cases = all_cases(level, device, dtype, wanted)
    if only:
        cases = [c for c in cases if only in c.key]
    if skip:
        cases = [c for c in cases if not any(text in c.key for text in skip)]
    env = report.environment(device)
    tag = "cpu" if device.type == "cpu" else env["device"].lower().replace(" ", "-")
    out_dir = Path(out or f"bench-results/{tag}-{env['date']}")
    print(f"pifi-fast bench: {len(cases)} cases ({level}) on {env['device']}, {dtype}"
          + ("  [CPU: ratios of the CPU paths, not GPU figures]" if device.type == "cpu" else ""))
    ceil = report.ceilings(device, dtype)
    reps = reps or size_lists(level, device)["reps"]
    deadline = None
    if time_budget is not None:
        cases = report.budget_order(cases)  # the rows the targets read first
        deadline = time.monotonic() + time_budget

    def stop(signum, frame):  # e.g. `timeout`: write what was measured, mark the rest
        raise report.Stopped(signal.Signals(signum).name)

    # only the main thread may set a signal handler: called from another one, a run simply
    # keeps Python's default SIGTERM behaviour
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, stop) if main_thread else None
    try:
        with tqdm(total=len(cases), unit="case", disable=None) as bar:  # no bar in log files
            rows = report.run(cases, device, reps, ceil, progress=bar, deadline=deadline)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    paths = report.write(rows, env, ceil, out_dir, level)
    flagged = report.compare(rows, Path(compare)) if compare else None
    return {"rows": rows, "paths": paths, "markdown": paths["md"].read_text(),
            "out_dir": out_dir, "flagged": flagged}


def run_breakdown(pairs, impls, sentences: int, reps: int, *, device=None, out=None) -> dict:
    """Time where each pair's training step goes for each implementation (pifi_fast, hf_sdpa,
    authors): ``reps`` steps of ``sentences`` SST-2 sentences after one warm-up. A pair whose
    files are missing (FileNotFoundError, e.g. the offline MiniLM / SmolLM2 packages) is skipped
    with a message and named in "missing". With ``out`` (a folder) and something timed, writes
    breakdown.md, breakdown.json and, with matplotlib, breakdown.png there.

    Returns {"results" (one dict per pair and impl), "missing" (the pairs skipped), "markdown"
    (the table; None when nothing was timed), "paths" ({kind: Path} of what was written)}.
    """
    device = _device(device)
    results, missing = [], []
    for pair in pairs:
        for impl in impls:
            print(f"timing {pair} {impl} ({reps} steps after one warm-up) ...", flush=True)
            try:
                results.append(breakdown.step_breakdown(pair, impl, sentences, reps, device))
            except FileNotFoundError as exc:  # e.g. the offline MiniLM / SmolLM2 packages
                print(f"skipped {pair}: {exc}", flush=True)
                missing.append(pair)
                break
    if not results:
        return {"results": results, "missing": missing, "markdown": None, "paths": {}}
    table = breakdown.markdown(results)
    paths = {}
    if out:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"md": out / "breakdown.md", "json": out / "breakdown.json"}
        paths["md"].write_text(table)
        paths["json"].write_text(json.dumps(results, indent=1))
        if breakdown.plot(results, out / "breakdown.png"):
            paths["png"] = out / "breakdown.png"
    return {"results": results, "missing": missing, "markdown": table, "paths": paths}
