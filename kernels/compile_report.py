"""Compile every Triton kernel of pifi_fast for GPU targets on any machine, GPU or not.

For each target (sm_75, sm_80, sm_86, sm_89, sm_90a), dtype, kernel and every configuration its
launch code can pick there (each kernel module's ``compile_launches``), this compiles the kernel
with ``triton.compile`` for that target, specialized as a real launch is (see
pifi_fast.kernels._spec), runs the ``ptxas`` shipped with Triton with ``-v`` on the PTX, and
records:

    registers      per thread (255 is the ceiling)
    spill bytes    spill stores / loads; any spill fails the row
    stack bytes    local-memory stack frame; non-zero fails the row (a local array or spills)
    shared bytes   what the kernel asks for (``metadata.shared``) against the target's per-block
                   limit; over the limit fails the row (the launch would be refused)
    tensor cores   for GEMMs: wgmma (sm_90a), mma.sync (sm_75..sm_89), or fma (no tensor cores)
    compile s      triton.compile wall time, fresh cache

Compiles run in worker processes (``jobs``), each with a fresh Triton cache and without
TRITON_INTERPRET (the interpreter's functions cannot be compiled), so the report can run inside
a test session that uses the interpreter. ``write`` saves Markdown and JSON; ``compile_all``
runs, times and writes them (what ``pifi-fast kernels`` prints).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

# (importing pifi_fast.kernels has imported pifi_fast, which loads these kernel modules anyway)
from . import _tiles, activations, gemm, norm, quant, rope
from ._spec import triton_signature


@dataclass(frozen=True)
class Target:
    name: str
    capability: int  # Triton's GPUTarget arch number
    ptxas_arch: str
    shared_limit: int  # bytes of shared memory one block may use (the opt-in maximum)
    dtypes: tuple  # the 16-bit compute dtypes this generation runs; fp32 runs everywhere
    gpus: str


TARGETS = {
    "sm_75": Target("sm_75", 75, "sm_75", 65536, ("fp16",), "T4, RTX 20xx (Turing)"),
    "sm_80": Target("sm_80", 80, "sm_80", 166912, ("bf16", "fp16"), "A100, A30 (Ampere)"),
    "sm_86": Target("sm_86", 86, "sm_86", 101376, ("bf16", "fp16"), "RTX 30xx, A10, A40"),
    "sm_89": Target("sm_89", 89, "sm_89", 101376, ("bf16", "fp16"), "RTX 40xx, L4, L40 (Ada)"),
    "sm_90a": Target("sm_90a", 90, "sm_90a", 232448, ("bf16", "fp16"), "H100, H200 (Hopper)"),
}
DTYPES = ("bf16", "fp16", "fp32")


def target_for_capability(major: int, minor: int) -> Target | None:
    """The report's target for a device capability, or None when we have no verified configs
    for it (then the GEMM falls back to cuBLAS)."""
    return {(7, 5): TARGETS["sm_75"], (8, 0): TARGETS["sm_80"], (8, 6): TARGETS["sm_86"],
            (8, 9): TARGETS["sm_89"], (9, 0): TARGETS["sm_90a"]}.get((major, minor))


def collect(targets, dtypes, only: str | None = None, gemm_tiles=None):
    """[(target, launch)] in a fixed order: every configuration of every kernel (the GEMMs'
    from their tables, or ``gemm_tiles`` on every target when given: to try candidates)."""
    out = []
    for tname in targets:
        target = TARGETS[tname]
        for dtype in dtypes:
            if dtype != "fp32" and dtype not in target.dtypes:
                continue  # bf16 needs sm_80+
            for module in (norm, activations, rope, gemm, quant):
                extra = ({"tile_list": gemm_tiles} if module in (gemm, quant) and gemm_tiles
                         else {})
                for launch in module.compile_launches(target.capability, dtype, **extra):
                    if only and only not in launch.name:
                        continue
                    out.append((target, launch))
    return out


# -- compiling one launch ------------------------------------------------------------------------
def _ptxas():
    import triton  # deferred: triton is optional (CPU-only torch builds); only compiling uses it

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not path.exists():
        raise FileNotFoundError(f"ptxas not found at {path}; the report needs Triton's NVIDIA "
                                "backend")
    return str(path)


_PTXAS_FIELDS = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack_bytes": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def parse_ptxas(text: str) -> dict:
    found = {}
    for key, rx in _PTXAS_FIELDS.items():
        m = rx.search(text)
        if m is None:
            raise ValueError(f"ptxas -v output has no {key!r}:\n{text}")
        found[key] = int(m.group(1))
    return found


def tensor_core_kind(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync", ptx):
        return "mma.sync"
    return "fma"


def compile_one(target: Target, launch) -> dict:
    """Compile one launch for one target; the report row."""
    # deferred: triton is optional (CPU-only torch builds); only compiling uses it
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = {"target": target.name, "kernel": launch.name, "dtype": launch.dtype,
           "config": launch.config, "warps": launch.num_warps, "stages": launch.num_stages,
           "shared_limit": target.shared_limit}
    t0 = time.perf_counter()
    log = io.StringIO()
    try:
        signature, constexprs, attrs = triton_signature(launch)
        # Triton runs ptxas -v itself (with the flags of the real cubin); its log, printed when
        # dump_ptxas_log is on, gives the numbers without a second ptxas run
        with _ptxas_log_on(), contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs),
                                      target=GPUTarget("cuda", target.capability, 32),
                                      options={"num_warps": launch.num_warps,
                                               "num_stages": launch.num_stages})
    except Exception as exc:  # a compile error is a finding, not a crash of the report
        row.update(ok=False, problem=f"compile error: {type(exc).__name__}: "
                   f"{str(exc).splitlines()[0][:300] if str(exc) else ''}",
                   compile_s=round(time.perf_counter() - t0, 2))
        return row
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    ptx = compiled.asm["ptx"]
    ptxas_log = log.getvalue()
    if "Used" not in ptxas_log:  # a cache hit (no ptxas run) or an older Triton: run it here
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "k.ptx"
            src.write_text(ptx)
            res = subprocess.run([_ptxas(), "-v", f"--gpu-name={target.ptxas_arch}", str(src),
                                  "-o", str(Path(tmp) / "k.cubin")], capture_output=True,
                                 text=True)
        if res.returncode != 0:
            row.update(ok=False, problem=f"ptxas failed: {res.stderr.strip()[:300]}")
            return row
        ptxas_log = res.stderr
    row.update(parse_ptxas(ptxas_log))
    row["shared_bytes"] = int(compiled.metadata.shared)
    row["tensor_cores"] = tensor_core_kind(ptx) if launch.uses_dot else "-"
    problems = []
    if row["spill_stores"] or row["spill_loads"]:
        problems.append(f"spills {row['spill_stores']} B stores / {row['spill_loads']} B loads")
    if row["stack_bytes"]:
        problems.append(f"{row['stack_bytes']} B local stack")
    if row["shared_bytes"] > target.shared_limit:
        problems.append(f"shared {row['shared_bytes']} B > limit {target.shared_limit} B")
    if launch.uses_dot and target.capability >= 80 and row["tensor_cores"] == "fma":
        problems.append("no tensor-core instructions")
    row["ok"] = not problems
    row["problem"] = "; ".join(problems)
    return row


@contextlib.contextmanager
def _ptxas_log_on():
    """Triton's knobs.nvidia.dump_ptxas_log switched on for one compile (when it exists)."""
    from triton import knobs  # deferred: triton is optional (CPU-only torch builds)

    nvidia = getattr(knobs, "nvidia", None)
    if nvidia is None or not hasattr(nvidia, "dump_ptxas_log"):
        yield
        return
    old = nvidia.dump_ptxas_log
    nvidia.dump_ptxas_log = True
    try:
        yield
    finally:
        nvidia.dump_ptxas_log = old


# -- running many, in worker processes ---------------------------------------------------------
def _worker_env(cache_dir: str) -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # interpreted kernels cannot be compiled
    env["TRITON_CACHE_DIR"] = cache_dir  # fresh: honest compile times
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run(targets=tuple(TARGETS), dtypes=DTYPES, only=None, jobs: int | None = None,
        progress=None, gemm_tiles=None) -> list[dict]:
    """Compile every launch for every target; rows in collect() order. ``progress``: a
    callable taking one finished row (e.g. a tqdm bar's update); ``gemm_tiles``: candidate
    GEMM tiles instead of the tables."""
    targets, dtypes = list(targets), list(dtypes)
    for t in targets:
        if t not in TARGETS:
            raise ValueError(f"unknown target {t!r}; choose from {sorted(TARGETS)}")
    for d in dtypes:
        if d not in DTYPES:
            raise ValueError(f"unknown dtype {d!r}; choose from {DTYPES}")
    jobs = max(1, jobs or os.cpu_count() or 1)
    total = len(collect(targets, dtypes, only, gemm_tiles))
    rows: list[dict | None] = [None] * total
    with tempfile.TemporaryDirectory(prefix="pifi-kernels-") as cache:
        cmd = [sys.executable, "-m", "pifi_fast.kernels.compile_report", "--worker",
               "--targets", *targets, "--dtypes", *dtypes, "--jobs", str(jobs)]
        if only:
            cmd += ["--only", only]
        if gemm_tiles:
            cmd += ["--gemm-tiles", json.dumps([list(t) for t in gemm_tiles])]
        procs = [subprocess.Popen(cmd + ["--shard", str(k)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True,
                                  env=_worker_env(os.path.join(cache, str(k))))
                 for k in range(jobs)]
        def drain(p):
            for line in p.stdout:
                if line.startswith("{"):
                    item = json.loads(line)
                    rows[item.pop("index")] = item
                    if progress is not None:
                        progress(item)

        threads = [threading.Thread(target=drain, args=(p,)) for p in procs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        errors = [p.stderr.read() for p in procs if p.wait() != 0]
    if errors or any(r is None for r in rows):
        raise RuntimeError("kernel compile workers failed:\n" + "\n".join(errors)[-3000:])
    return rows


def _worker(args) -> int:
    tiles = [tuple(t) for t in json.loads(args.gemm_tiles)] if args.gemm_tiles else None
    items = collect(args.targets, args.dtypes, args.only, tiles)
    for index, (target, launch) in enumerate(items):
        if index % args.jobs != args.shard:
            continue
        row = compile_one(target, launch)
        row["index"] = index
        print(json.dumps(row), flush=True)
    return 0


# -- report --------------------------------------------------------------------------------------
def summary(rows: list[dict]) -> list[dict]:
    """One line per (target, kernel, dtype): configurations, failures, worst registers."""
    groups: dict = {}
    for r in rows:
        g = groups.setdefault((r["target"], r["kernel"], r["dtype"]),
                              {"target": r["target"], "kernel": r["kernel"], "dtype": r["dtype"],
                               "configs": 0, "failed": 0, "spilling": 0, "over_shared": 0,
                               "max_registers": 0, "max_spill": 0, "max_shared": 0,
                               "shared_limit": r["shared_limit"], "compile_s": 0.0,
                               "tensor_cores": set()})
        g["configs"] += 1
        g["failed"] += not r["ok"]
        g["spilling"] += bool(r.get("spill_stores") or r.get("spill_loads"))
        g["over_shared"] += r.get("shared_bytes", 0) > r["shared_limit"]
        g["max_registers"] = max(g["max_registers"], r.get("registers", 0))
        g["max_spill"] = max(g["max_spill"], r.get("spill_stores", 0), r.get("spill_loads", 0))
        g["compile_s"] = round(g["compile_s"] + r.get("compile_s", 0.0), 2)
        g["max_shared"] = max(g["max_shared"], r.get("shared_bytes", 0))
        if r.get("tensor_cores", "-") != "-":
            g["tensor_cores"].add(r["tensor_cores"])
    out = []
    for g in groups.values():
        g["tensor_cores"] = "/".join(sorted(g["tensor_cores"])) or "-"
        out.append(g)
    return out


def text_table(rows: list[dict]) -> str:
    """The summary as a terminal table, then every row with a problem."""
    head = (f"{'target':7s} {'kernel':22s} {'dtype':5s} {'cfgs':>4s} {'failed':>6s} "
            f"{'max regs':>8s} {'max spill B':>11s} {'max shared B / limit':>22s} "
            f"{'tensor cores':>12s} {'compile s':>9s}")
    lines = [head, "-" * len(head)]
    for g in summary(rows):
        lines.append(f"{g['target']:7s} {g['kernel']:22s} {g['dtype']:5s} {g['configs']:4d} "
                     f"{g['failed']:6d} {g['max_registers']:8d} {g['max_spill']:11d} "
                     f"{g['max_shared']:>10,} / {g['shared_limit']:<9,} "
                     f"{g['tensor_cores']:>12s} {g['compile_s']:9.1f}")
    bad = [r for r in rows if not r["ok"]]
    lines.append(f"\n{len(rows)} configurations, {len(bad)} with a problem"
                 + (":" if bad else ""))
    lines += [f"  {r['target']} {r['kernel']} {r['dtype']} {r['config']}: {r['problem']}"
              for r in bad]
    return "\n".join(lines)


def markdown(rows: list[dict], env: dict, gemm_fallbacks: list[str]) -> str:
    n_bad = sum(not r["ok"] for r in rows)
    lines = [
        "# Kernel compile report", "",
        f"{env['date']}; Triton {env['triton']}, ptxas {env['ptxas']}, torch {env['torch']}; "
        f"compiled on {env['machine']} (no GPU needed). Reproduce: `pifi-fast kernels "
        f"--out DIR`.", "",
        f"**{len(rows)} kernel configurations compiled, {n_bad} with a problem** (compile error, "
        "spill, local stack, shared memory over the target's limit, or a GEMM without "
        "tensor-core instructions). Every configuration listed is one the launch code can pick "
        "on that target.", "",
        "| target | GPUs | shared limit |", "|---|---|---|",
    ]
    for t in TARGETS.values():
        if any(r["target"] == t.name for r in rows):
            lines.append(f"| {t.name} | {t.gpus} | {t.shared_limit:,} B |")
    if gemm_fallbacks:
        lines += ["", "Projection GEMM (`gemm='triton'`) with no configuration, so the layer "
                  "uses cuBLAS there and says so: " + ", ".join(gemm_fallbacks) + "."]
    lines += ["", "## Summary", "",
              "| target | kernel | dtype | configs | failed | max regs | max spill B | "
              "max shared B | tensor cores | compile s |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for g in summary(rows):
        lines.append(f"| {g['target']} | {g['kernel']} | {g['dtype']} | {g['configs']} | "
                     f"{g['failed']} | {g['max_registers']} | {g['max_spill']} | "
                     f"{g['max_shared']:,} | {g['tensor_cores']} | {g['compile_s']} |")
    lines += ["", "## Every configuration", "",
              "| target | kernel | dtype | config | regs | spill B (st/ld) | stack B | shared B | "
              "tensor cores | compile s | ok |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        spill = f"{r.get('spill_stores', '?')}/{r.get('spill_loads', '?')}"
        ok = "yes" if r["ok"] else f"**no**: {r['problem']}"
        lines.append(f"| {r['target']} | {r['kernel']} | {r['dtype']} | {r['config']} | "
                     f"{r.get('registers', '?')} | {spill} | {r.get('stack_bytes', '?')} | "
                     f"{r.get('shared_bytes', 0):,} | {r.get('tensor_cores', '?')} | "
                     f"{r['compile_s']} | {ok} |")
    return "\n".join(lines) + "\n"


def environment() -> dict:
    import triton  # deferred: triton is optional (CPU-only torch builds); the report needs it

    res = subprocess.run([_ptxas(), "--version"], capture_output=True, text=True)
    m = re.search(r"release ([\d.]+)", res.stdout)
    return {"date": datetime.date.today().isoformat(), "triton": triton.__version__,
            "torch": torch.__version__, "ptxas": m.group(1) if m else "unknown",
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def gemm_fallbacks(targets, dtypes) -> list[str]:
    return [f"{t} {d}" for t in targets for d in dtypes
            if (d == "fp32" or d in TARGETS[t].dtypes)
            and not any(gemm.configs(TARGETS[t].capability, e, d) for e in ("none", "swiglu",
                                                                       "swiglu_bwd"))]


def write(rows: list[dict], out_dir, targets, dtypes) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    fallbacks = gemm_fallbacks(targets, dtypes)
    (out / "kernels.md").write_text(markdown(rows, env, fallbacks))
    (out / "kernels.json").write_text(json.dumps(
        {"environment": env, "targets": {t: asdict(TARGETS[t]) for t in targets},
         "gemm_cublas_fallback": fallbacks, "summary": summary(rows), "rows": rows}, indent=1))
    return {"md": out / "kernels.md", "json": out / "kernels.json"}


def compile_all(targets=tuple(TARGETS), dtypes=DTYPES, only=None, jobs: int | None = None,
                out=None) -> dict:
    """run() with a progress bar (on a terminal), timed, and written to ``out`` when given
    (write()). Returns the rows, their text table, the seconds taken, the paths written
    ({kind: Path}, empty without ``out``) and whether every row passed ("ok")."""
    total = len(collect(targets, dtypes, only))
    t0 = time.monotonic()
    with tqdm(total=total, unit="kernel", desc="compiling", disable=None) as bar:
        rows = run(targets, dtypes, only, jobs, progress=lambda row: bar.update())
    seconds = time.monotonic() - t0
    paths = write(rows, out, targets, dtypes) if out else {}
    return {"rows": rows, "table": text_table(rows), "seconds": seconds, "paths": paths,
            "ok": all(r["ok"] for r in rows)}


# -- on a GPU: what the autotuner picks, against the table ----------------------------------------
def autotuner_picks(device="cuda", dtype=None, rows=(32, 4096)) -> list[dict]:
    """Run the GEMM once per layer launch at the Llama-3.1-8B shape for a few row counts on a
    real GPU, and report which tile the autotuner picked (and each tile's time) next to the
    table's first tile (the one taken without tuning). Needs CUDA."""
    if not torch.cuda.is_available():
        raise RuntimeError("autotuner_picks needs a CUDA device")
    dtype = dtype or (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    arch = gemm.device_arch(device)
    out = []
    for name, orientation, epilogue, bias, res in gemm.LAYER_LAUNCHES:
        table = gemm.tiles(arch, epilogue, _tiles.DTYPE_NAME[dtype]) if arch else []
        if not table:
            out.append({"launch": name, "pick": None, "note": "no tiles: cuBLAS"})
            continue
        for m in rows:
            n, k = (14336, 4096) if epilogue != "none" else (4096, 14336) if res else (6144, 4096)
            if orientation == "input_grad":
                n, k = (14336, 4096) if epilogue == "swiglu_bwd" else (4096, 6144)
            g = torch.Generator(device=device).manual_seed(0)
            a = torch.randn(m, k, device=device, dtype=dtype, generator=g)
            cols = 2 * n if epilogue == "swiglu" else n
            w = torch.randn(cols, k, device=device, dtype=dtype, generator=g) / k ** 0.5
            b = w.t() if orientation == "forward" else w.t().contiguous()
            kwargs = {}
            if bias:
                kwargs["bias"] = torch.randn(cols, device=device, dtype=dtype, generator=g)
            if res:
                kwargs["residual"] = torch.randn(m, n, device=device, dtype=dtype, generator=g)
            if epilogue == "swiglu_bwd":
                kwargs["aux"] = torch.randn(m, 2 * n, device=device, dtype=dtype, generator=g)
            tuner = gemm._gemm_kernel
            tuner.configs_timings = {}
            gemm.gemm(a, b, epilogue, **kwargs)
            torch.cuda.synchronize()
            best = tuner.best_config
            timings = {_tile_name(c): round(float(t[0] if isinstance(t, (list, tuple)) else t), 4)
                       for c, t in (getattr(tuner, "configs_timings", None) or {}).items()}
            out.append({"launch": name, "rows": m, "n": n, "k": k, "dtype": str(dtype),
                        "pick": _tile_name(best), "table_first": _tile_name(table[0]),
                        "same": _tile_name(best) == _tile_name(table[0]),
                        "timings_ms": timings})
    return out


def write_autotuner_picks(picks: list[dict], out_dir) -> Path:
    """Save autotuner_picks()'s result as out_dir/autotuner_picks.json; returns its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "autotuner_picks.json"
    path.write_text(json.dumps(picks, indent=1))
    return path


def _tile_name(t) -> str:
    if hasattr(t, "kwargs"):
        t = (t.kwargs["BLOCK_M"], t.kwargs["BLOCK_N"], t.kwargs["BLOCK_K"], t.num_stages,
             t.num_warps)
    bm, bn, bk, st, w = t
    return f"{bm}x{bn}x{bk} stages={st} warps={w}"


def _main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--shard", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--targets", nargs="+", default=list(TARGETS))
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES))
    p.add_argument("--only", default=None)
    p.add_argument("--gemm-tiles", default=None, help="JSON list of [BM, BN, BK, stages, warps]")
    args = p.parse_args(argv)
    if args.worker:
        return _worker(args)
    rows = run(args.targets, args.dtypes, args.only, args.jobs)
    print(json.dumps(summary(rows), indent=1, default=str))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(_main())
