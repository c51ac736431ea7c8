"""Compile candidate tiles of the projection GEMMs for GPU targets (no GPU needed) and print which
use tensor cores, spill nothing and fit shared memory: the method behind the per-target tables
in kernels/gemm.py and kernels/quant.py (TILES). A tile can join a target's table for an
epilogue (gemm) or a weight storage (dq_gemm) only if it is clean for every launch of it
(LAYER_LAUNCHES in each module), and only if clean under every Triton we support: run it with
.venv's Triton 3.8 and again with the GPU image's 3.6 (build/gpu-image-venv, from `make
test-gpu-image`; run from build/gpu-image-src), whose ptxas allocates registers differently.
Usage:

    python scripts/explore_gemm_tiles.py --targets sm_80 sm_90a --dtypes bf16 [--out tiles.json]
    python scripts/explore_gemm_tiles.py --kernel dq_gemm --targets sm_75 --dtypes fp16

About 6 minutes for the four tensor-core targets on 2 cores in bf16; sm_80, sm_86 and sm_89 in
bf16 and fp16, 12-14 minutes (gemm) and 5 (dq_gemm).
"""
import argparse
import json

from tqdm import tqdm

from pifi_fast.kernels import compile_report

DQ_CANDIDATES = [  # BLOCK_K divides 64 (the smallest scale group)
    (128, 256, 64, 3, 8), (64, 256, 64, 3, 8), (128, 128, 64, 3, 8), (128, 128, 64, 4, 8),
    (128, 128, 32, 4, 4), (128, 64, 64, 3, 8), (128, 64, 64, 4, 4), (64, 128, 64, 3, 8),
    (64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (64, 64, 32, 4, 4), (64, 64, 32, 3, 4),
    (32, 128, 64, 4, 4), (32, 64, 64, 4, 4), (16, 128, 64, 4, 4), (16, 64, 64, 4, 4),
    (32, 32, 32, 2, 4), (32, 32, 32, 2, 2), (16, 32, 32, 2, 2), (16, 16, 32, 2, 1),
    (32, 64, 32, 2, 4), (16, 64, 32, 2, 2),
]
CANDIDATES = [
    # (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps): the usual Triton matmul tiles
    (128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 128, 64, 4, 8), (128, 128, 64, 3, 8),
    (128, 128, 64, 4, 4), (128, 128, 32, 4, 4), (128, 128, 32, 3, 8), (128, 64, 64, 4, 4),
    (128, 64, 64, 3, 8), (64, 128, 64, 4, 4), (64, 128, 64, 3, 8), (128, 64, 32, 4, 4),
    (64, 128, 32, 4, 4), (64, 64, 64, 4, 4), (64, 64, 32, 4, 4), (64, 64, 64, 3, 4),
    (128, 32, 64, 4, 4), (64, 32, 64, 5, 2), (32, 64, 64, 5, 2), (32, 128, 64, 4, 4),
    (16, 128, 128, 4, 4), (16, 128, 64, 4, 4), (16, 64, 128, 4, 4), (32, 64, 128, 3, 4),
    (64, 256, 64, 3, 8), (64, 256, 32, 3, 8), (128, 256, 32, 3, 8), (64, 128, 128, 3, 4),
    (128, 128, 128, 2, 8),
]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--targets", nargs="+", default=["sm_80", "sm_86", "sm_89", "sm_90a"])
    p.add_argument("--dtypes", nargs="+", default=["bf16"])
    p.add_argument("--jobs", type=int, default=None)
    p.add_argument("--kernel", choices=("gemm", "dq_gemm"), default="gemm")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    candidates = DQ_CANDIDATES if args.kernel == "dq_gemm" else CANDIDATES
    # "gemm_" also matches "dq_gemm_"; the dequantizing GEMM's rows are filtered out below
    total = len(compile_report.collect(args.targets, args.dtypes, args.kernel, candidates))
    with tqdm(total=total, unit="kernel") as bar:
        rows = compile_report.run(args.targets, args.dtypes, args.kernel, args.jobs,
                                  progress=lambda r: bar.update(), gemm_tiles=candidates)
    rows = [r for r in rows if r["kernel"].startswith("dq_") == (args.kernel == "dq_gemm")]
    verdicts: dict = {}
    for r in rows:
        if args.kernel == "dq_gemm":  # one table per weight storage
            epilogue = r["kernel"].rsplit(".", 1)[1]
        else:
            epilogue = ("swiglu_bwd" if "swiglu_bwd" in r["kernel"] else
                        "swiglu" if "swiglu" in r["kernel"] else "none")
        v = verdicts.setdefault((r["target"], r["dtype"], epilogue, r["config"]),
                                {"ok": True, "registers": 0, "shared": 0, "problems": set()})
        v["ok"] &= r["ok"]
        v["registers"] = max(v["registers"], r.get("registers", 0))
        v["shared"] = max(v["shared"], r.get("shared_bytes", 0))
        if r["problem"]:
            v["problems"].add(r["problem"])
    for (target, dtype, epilogue, config), v in sorted(verdicts.items()):
        print(f"{target:6s} {dtype} {epilogue:10s} {config:32s} {'ok ' if v['ok'] else 'BAD'} "
              f"regs {v['registers']:3d} shared {v['shared']:7d} "
              f"{'; '.join(sorted(v['problems']))[:90]}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump([{"target": k[0], "dtype": k[1], "epilogue": k[2], "tile": k[3],
                        **{**v, "problems": sorted(v["problems"])}}
                       for k, v in verdicts.items()], f, indent=1)


if __name__ == "__main__":
    main()
