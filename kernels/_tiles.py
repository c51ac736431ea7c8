"""Tile tables of the two GEMMs (kernels/gemm.py, kernels/quant.py) and what both do with them:
a tile as a triton.Config and back, the autotuner's pool of every target's tiles, pruning it to
the launching device's list, the launch that skips tuning, and the grouped program order.

A tile is (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps) for 16-bit activations. Every
entry is compiled by pifi_fast.kernels.compile_report for its target, under both supported
Tritons (3.6 and 3.8), and must use tensor-core instructions (sm_80 on), spill nothing and fit
the target's shared memory; tests/test_compile_report.py fails otherwise. A target or dtype
without an entry runs the plain path (cuBLAS, or dequantize then cuBLAS), and says so.
"""
from __future__ import annotations

import os

import torch

from .common import HAS_TRITON

Tile = tuple[int, int, int, int, int]
GPU_ARCHS = (75, 80, 86, 89, 90)
DTYPE_NAME = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}

# -- the projection GEMM (gemm.py): per target, per accumulator shape ----------------------------
# "none": one accumulator; "swiglu": two (gate and up) and two B tiles loaded, so its tiles are
# half as wide for the same registers and shared memory; "swiglu_bwd": one accumulator and a
# [g | u] tile read in the epilogue. Before sm_90a the 128x256 tile is 32 deep: 64 deep needs
# more than the 255 registers a thread has. No entry on sm_75 (Triton compiles tl.dot to FMA on
# Turing, where even a 64x64x32 tile spills) nor for fp32 (the IEEE-exact dot runs on FMA units;
# cuBLAS is faster on every target). The small-M tiles serve CLS mode (32 rows per batch).
_SMALL_M = [(32, 64, 128, 3, 4), (16, 128, 64, 4, 4)]
GEMM_TILES: dict[int, dict[str, list[Tile]]] = {
    90: {  # sm_90a: wgmma; 227 KB shared memory
        "none": [(128, 256, 64, 3, 8), (128, 128, 64, 4, 8), (64, 256, 64, 3, 8),
                 (128, 64, 64, 3, 8), (64, 128, 64, 3, 8), (32, 64, 128, 3, 4),
                 (16, 128, 128, 4, 4)],
        # (no 32x64x128 tile: it spills with two accumulators here)
        "swiglu": [(128, 128, 64, 3, 8), (128, 64, 64, 3, 8), (64, 128, 64, 3, 8),
                   (64, 64, 64, 4, 4), (16, 128, 64, 4, 4)],
        "swiglu_bwd": [(128, 64, 64, 3, 8), (64, 128, 64, 3, 8), (64, 64, 64, 4, 4)] + _SMALL_M,
    },
    80: {  # sm_80: mma.sync; 163 KB shared memory
        "none": [(128, 256, 32, 3, 8), (128, 128, 64, 4, 8), (64, 256, 64, 3, 8),
                 (128, 64, 64, 3, 8), (64, 128, 64, 3, 8), (32, 64, 128, 3, 4),
                 (16, 128, 128, 4, 4)],
        "swiglu": [(128, 64, 64, 3, 8), (64, 128, 64, 3, 8), (64, 64, 64, 4, 4)] + _SMALL_M,
        "swiglu_bwd": [(128, 64, 64, 3, 8), (64, 128, 64, 3, 8), (64, 64, 64, 4, 4)] + _SMALL_M,
    },
}
# sm_86 and sm_89: as sm_80 but 99 KB of shared memory: fewer stages, no 16x128x128 tile, and
# no 16x128x64 tile with two accumulators
GEMM_TILES[86] = GEMM_TILES[89] = {
    "none": [(128, 256, 32, 3, 8), (128, 128, 64, 3, 8), (64, 256, 64, 3, 8),
             (128, 64, 64, 3, 8), (64, 128, 64, 3, 8), (32, 64, 128, 3, 4),
             (16, 64, 128, 4, 4)],
    "swiglu": [(128, 64, 64, 3, 8), (64, 128, 64, 3, 8), (64, 64, 64, 3, 4),
               (32, 64, 128, 3, 4), (32, 64, 64, 5, 2)],
    "swiglu_bwd": [(128, 64, 64, 3, 8), (64, 128, 64, 3, 8), (64, 64, 64, 3, 4)] + _SMALL_M,
}
# An activation on a single accumulator (gelu) keeps the plain tiles up to 128x128: wider ones
# run out of registers for the activation's temporaries.
ACT_MAX_TILE_AREA = 128 * 128

# -- the dequantizing GEMM (quant.py): per target, per storage ------------------------------------
# BLOCK_K divides 64 (the smallest scale group). The converted B tile lives in shared memory, so
# the 99-KB targets have no 3-4-stage 128-wide tiles, and no target fits a 128x256 tile. On
# sm_75 (FMA dots) only tiles up to 32x64x32 stay out of local memory, which suits CLS mode's
# weight streaming. The small tiles serve CLS mode (32 rows).
_SMALL = [(32, 128, 64, 4, 4), (16, 128, 64, 4, 4), (16, 64, 64, 4, 4)]
DQ_TILES: dict[int, dict[str, list[Tile]]] = {
    90: {"int8": [(128, 128, 64, 3, 8), (64, 256, 64, 3, 8), (128, 64, 64, 3, 8),
                  (64, 128, 64, 3, 8), (64, 64, 64, 4, 4)] + _SMALL,
         "fp8": [(128, 128, 64, 3, 8), (128, 64, 64, 3, 8), (64, 128, 64, 3, 8),
                 (64, 64, 64, 4, 4)] + _SMALL},
    80: {"int8": [(128, 128, 64, 3, 8), (64, 128, 64, 3, 8), (64, 64, 64, 4, 4),
                  (64, 64, 32, 4, 4), (32, 128, 64, 4, 4), (16, 64, 64, 4, 4)]},
    75: {"int8": [(32, 64, 32, 2, 4), (32, 32, 32, 2, 4), (16, 64, 32, 2, 2),
                  (16, 32, 32, 2, 2)]},
}
_SMALL_99KB = [(32, 64, 32, 2, 4), (16, 64, 64, 4, 4)]
DQ_TILES[86] = {"int8": [(128, 64, 64, 3, 8), (64, 128, 64, 3, 8), (64, 64, 32, 4, 4)]
                + _SMALL_99KB}
DQ_TILES[89] = {"int8": DQ_TILES[86]["int8"],
                "fp8": [(128, 64, 64, 3, 8), (64, 128, 64, 3, 8), (64, 64, 32, 4, 4)]
                + _SMALL_99KB}
# The forward with finer scale groups (one scale per input: its offsets and scales take
# registers; pifi-fast kernels' "int8-g32" launches) leaves out the tiles that spill with it,
# and on sm_86/sm_89, where that leaves no tile of 64 rows, 64x64x64 takes their place.
DQ_FINE_SPILLS = {80: {(32, 128, 64, 4, 4), (64, 128, 64, 3, 8), (64, 64, 64, 4, 4)},
                  86: {(128, 64, 64, 3, 8), (64, 128, 64, 3, 8), (64, 64, 32, 4, 4)},
                  89: {(128, 64, 64, 3, 8), (64, 128, 64, 3, 8), (64, 64, 32, 4, 4)}}
DQ_FINE_ONLY = {86: [(64, 64, 64, 4, 4)], 89: [(64, 64, 64, 4, 4)]}


# -- what both GEMMs do with their tables -----------------------------------------------------------
def device_arch(device) -> int | None:
    """The Triton arch number of a CUDA device whose tile lists we verified, else None."""
    major, minor = torch.cuda.get_device_capability(device)
    arch = 10 * major + minor
    return arch if arch in GPU_ARCHS else None


def tile_of(config) -> Tile:
    kw = config.kwargs
    return (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], config.num_stages, config.num_warps)


def config_of(tile: Tile):
    """A tile as the triton.Config the GEMMs' autotuners take (grouped by 8 rows of tiles)."""
    import triton  # deferred: a Triton-only path (configs need triton installed)

    bm, bn, bk, stages, warps = tile
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                         num_stages=stages, num_warps=warps)


def pool(tile_lists, interpreting: bool) -> list:
    """The autotuner's configs: every tile of every list once (it prunes to the launching
    device's list at launch). Under the interpreter, one small tile: it would otherwise run
    every config."""
    import triton  # deferred: a Triton-only path (configs need triton installed)

    if interpreting:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 4})]
    seen, out = set(), []
    for table in tile_lists:
        for t in table:
            if t not in seen:
                seen.add(t)
                out.append(config_of(t))
    return out or [config_of((64, 64, 32, 3, 4))]


def prune(all_configs, wanted: list[Tile]) -> list:
    """The configs of ``wanted`` in its order (the table's: the first is the default)."""
    by_tile = {tile_of(c): c for c in all_configs}
    return [by_tile[t] for t in wanted if t in by_tile]


def launch(kernel, grid, prune_hook, named_args: dict, args: tuple, constexprs: dict) -> None:
    """Launch an autotuned GEMM. Under torch.use_deterministic_algorithms(True) the autotuner
    is bypassed and the first tile of the device's list runs: the tuner's pick depends on timing
    and can differ between runs, and another tile is another rounding. The bypass also skips the
    tuner's cache, which may hold a pick from before determinism was asked for.
    PIFI_FAST_GEMM_TUNE=0 does the same without torch's switch (GPU test runs: tuning every
    shape would take most of their time)."""
    if not (torch.are_deterministic_algorithms_enabled()
            or os.environ.get("PIFI_FAST_GEMM_TUNE") == "0"):
        kernel[grid](*args, **constexprs)
        return
    # Triton's autotuner prunes only when it holds several configs (the interpreter's one)
    configs = kernel.configs
    first = configs[0] if len(configs) == 1 else prune_hook(configs, named_args,
                                                            **constexprs)[0]
    kernel.fn[grid](*args, **constexprs, **first.all_kwargs())


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """(pid_m, pid_n) of this program in grouped order: consecutive programs share rows of
        A in L2."""
        pid = tl.program_id(0)
        n_m, n_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        group = GROUP_M * n_n
        first_m = (pid // group) * GROUP_M
        size_m = min(n_m - first_m, GROUP_M)
        return first_m + (pid % group) % size_m, (pid % group) // size_m
