"""Timing, ceilings and saved-activation accounting for the benchmarks.

On a GPU every repetition is timed with CUDA events around the work (never a wall clock around
asynchronous launches); on a CPU with perf_counter. Results are medians with their quartiles.
"""
from __future__ import annotations

import statistics
import time

import torch


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, device: torch.device, warmup: int = 2, reps: int = 7, setup=None) -> dict:
    """Median and quartiles (seconds) of fn() over `reps` runs after `warmup` runs."""
    for _ in range(warmup):
        args = setup() if setup else ()
        fn(*args)
    _sync(device)
    times = []
    for _ in range(reps):
        args = setup() if setup else ()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn(*args)
            times.append(time.perf_counter() - t0)
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {"median_s": statistics.median(times), "q1_s": q[0], "q3_s": q[2],
            "min_s": min(times), "reps": len(times)}


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(field)


def peak_memory(fn, device: torch.device) -> int | None:
    """Peak memory (bytes) that fn() adds: CUDA's allocator statistics on GPU; on Linux CPUs the
    process's peak resident set above its size before the call (the peak is reset through
    /proc/self/clear_refs), an approximation that the malloc caches can blur. None elsewhere."""
    if device.type != "cuda":
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current resident size
            base = _rss("VmRSS")
            fn()
            return max(_rss("VmHWM") - base, 0)
        except OSError:
            return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def saved_activation_bytes(forward, exclude: list[torch.Tensor]) -> int:
    """Bytes autograd keeps for backward while forward() runs, frozen weights excluded.

    Counted per storage (a tensor saved twice, or two views of one buffer, count once)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(storages.values())


def copy_bandwidth(device: torch.device, nbytes: int | None = None) -> float:
    """Measured device copy bandwidth in bytes/s (read + write), the memory-bound ceiling."""
    nbytes = nbytes or (1 << 30 if device.type == "cuda" else 1 << 28)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), device, warmup=2, reps=7)
    return 2 * nbytes / t["median_s"]


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """Measured dense matmul rate in FLOP/s for `dtype`, the compute-bound ceiling."""
    # Large enough to reach the sustained rate (a 1024^3 fp32 product does not on CPUs).
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = measure(lambda: a @ b, device, warmup=2, reps=5)
    return 2 * n**3 / t["median_s"]
