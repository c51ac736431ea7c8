"""pytest-benchmark suite: every workload case of pifi_fast.bench, timed in one run.

pytest-benchmark times each case with its own clock around a synchronised call; the figure we
report is measured inside the case with CUDA events on GPU (perf_counter on CPU) and kept in
extra_info (median_s, q1_s, q3_s), next to saved bytes per token and % of ceiling.
"""
import math

import pytest
import torch

from pifi_fast.bench.timing import measure, peak_memory


def test_workload(case, benchmark, device, ceilings, reps, results):
    built = case.build()
    if "skip" in built:
        pytest.skip(built["skip"])
    fn = built.pop("fn")
    stats = measure(fn, device, warmup=1, reps=reps)
    assert math.isfinite(stats["median_s"]) and stats["median_s"] > 0
    row = {"workload": case.workload, "variant": case.variant, "shape": case.shape,
           "size": case.size, "impl": case.impl, "group": case.group, **built, **stats,
           "peak_memory_bytes": peak_memory(fn, device)}
    if "flops" in built:
        row["pct_of_ceiling"] = 100 * built["flops"] / stats["median_s"] / \
            ceilings["matmul_flop_per_s"]
    elif "bytes_moved" in built:
        row["pct_of_ceiling"] = 100 * built["bytes_moved"] / stats["median_s"] / \
            ceilings["copy_bytes_per_s"]
    results.append(row)
    benchmark.group = case.group
    benchmark.extra_info.update({k: v for k, v in row.items() if k != "group"})

    def synchronised():
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    benchmark.pedantic(synchronised, rounds=reps, warmup_rounds=1, iterations=1)
