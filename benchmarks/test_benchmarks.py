"""pytest-benchmark suite: every workload case of pifi_fast.bench, timed in one run.

pytest-benchmark times each case with its own clock around a synchronised call; the figure we
report is measured inside the case with CUDA events on GPU (perf_counter on CPU) and kept in
extra_info (median_s, q1_s, q3_s), next to saved bytes per token and % of ceiling.
"""
import math

import pytest
import torch

from pifi_fast.bench.report import measure_case


def test_workload(case, benchmark, device, ceilings, reps, results):
    built = case.build()
    if "skip" in built:
        pytest.skip(built["skip"])
    row = measure_case(case, built, device, reps, ceilings)
    fn = row.pop("fn")
    assert math.isfinite(row["median_s"]) and row["median_s"] > 0
    results.append(row)
    benchmark.group = case.group
    benchmark.extra_info.update({k: v for k, v in row.items() if k != "group"})

    def synchronised():
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    benchmark.pedantic(synchronised, rounds=reps, warmup_rounds=1, iterations=1)
