"""Compile-level proof for GPU targets, without a GPU (pifi_fast.kernels.compile_report).

Every configuration any kernel can pick is compiled for every target (sm_75, sm_80, sm_86, sm_89,
sm_90a) in every dtype it runs, and must compile, spill nothing and fit the target's shared
memory (GEMMs: use tensor cores): the whole committed report, about 3 minutes on 2 cores; run
alone with `pytest -m compile`. `make test-gpu-image` runs it again under the GPU image's Triton
(3.6, ptxas 12.8), whose register allocation differs: the tables must be clean under both. The
extension's machine code per arch is checked with cuobjdump.
"""
import itertools
import re
import subprocess
from pathlib import Path

import pytest
import torch

from pifi_fast.kernels import _tiles as T
from pifi_fast.kernels import common as kernels

pytestmark = [pytest.mark.compile,
              pytest.mark.skipif(not kernels.HAS_TRITON, reason="triton is not installed")]


def _fmt(bad):
    return "\n".join(f"{r['target']} {r['kernel']} {r['dtype']} {r['config']}: {r['problem']}"
                     for r in bad)


def test_every_kernel_configuration_compiles_clean():
    from pifi_fast.kernels import compile_report

    rows = compile_report.run(list(compile_report.TARGETS), list(compile_report.DTYPES), jobs=2)
    assert {r["target"] for r in rows} == set(compile_report.TARGETS)
    kinds = {r["kernel"].split("+")[0].split(".")[0] for r in rows}
    # every launch of the layer is covered, the 8-bit GEMM's too
    assert {"rms_norm_fwd", "rms_norm_bwd", "rope", "rope_transpose", "swiglu_fwd",
            "swiglu_bwd", "gemm_fwd", "gemm_igrad", "dq_gemm_fwd", "dq_gemm_igrad",
            "rms_1p_norm_fwd", "rms_1p_norm_bwd", "layer_norm_fwd", "layer_norm_bwd",
            "gelu_tanh_fwd", "gelu_tanh_bwd", "gelu_fwd", "gelu_bwd"} <= kinds
    epilogues = {r["kernel"].split("+")[1] for r in rows if r["kernel"].startswith("gemm_")
                 and "+" in r["kernel"]}
    assert {"swiglu", "swiglu_bwd", "geglu_tanh", "geglu_tanh_bwd", "gelu", "gelu_bwd"} <= epilogues
    for r in rows:
        if "gemm" not in r["kernel"] or not r["ok"]:
            continue
        if r["target"] == "sm_90a":
            # wgmma on Hopper for every tile of 64+ rows (a warpgroup's minimum); smaller tiles
            # (CLS mode's 32-row batches) take mma.sync
            rows_per_tile = int(r["config"].split("x")[0])
            assert r["tensor_cores"] == ("wgmma" if rows_per_tile >= 64 else "mma.sync"), r
        elif r["target"] == "sm_75":  # Triton compiles tl.dot to FMA on Turing
            assert r["tensor_cores"] == "fma", r
        else:
            assert r["tensor_cores"] == "mma.sync", r
    bad = [r for r in rows if not r["ok"]]
    assert not bad, "kernel configurations with a problem:\n" + _fmt(bad)


def test_the_check_fails_on_a_spilling_or_oversized_configuration():
    """A test must be able to fail: two tiles we know are bad are flagged."""
    from pifi_fast.kernels import compile_report

    # a 128x256 tile holds g, u and the accumulator of the SwiGLU-backward epilogue: it spills
    (row,) = compile_report.run(["sm_80"], ["bf16"], only="gemm_igrad+swiglu_bwd", jobs=1,
                                gemm_tiles=[(128, 256, 32, 3, 8)])
    assert not row["ok"] and "spills" in row["problem"], row
    # 128x256x64 at 3 stages with two B tiles (SwiGLU) needs 245,760 B > sm_90a's 232,448 B
    (row,) = compile_report.run(["sm_90a"], ["bf16"], only="gemm_fwd+swiglu+bias", jobs=1,
                                gemm_tiles=[(128, 256, 64, 3, 8)])
    assert not row["ok"] and "shared" in row["problem"], row


def test_specialization_matches_tritons_own_rules():
    """Our description of a launch specializes arguments as Triton does for real tensors."""
    try:
        from triton.backends.compiler import BaseBackend
        from triton.runtime.jit import native_specialize_impl
    except ImportError:
        pytest.skip("this Triton has no native_specialize_impl")
    from pifi_fast.kernels._spec import Int, Launch, Ptr, triton_signature

    class _Fn:
        arg_names = ["P", "ONE", "D16", "ODD", "BIG"]

    values = {"P": torch.empty(64, dtype=torch.bfloat16), "ONE": 1, "D16": 4096, "ODD": 4099,
              "BIG": 2**31 + 16}
    launch = Launch(_Fn, "probe", "", "bf16", {"P": Ptr(torch.bfloat16), "ONE": Int(1),
                                                 "D16": Int(4096), "ODD": Int(4099),
                                                 "BIG": Int(2**31 + 16)}, {})
    signature, constexprs, attrs = triton_signature(launch)
    for i, name in enumerate(_Fn.arg_names):
        ty, key = native_specialize_impl(BaseBackend, values[name], False, True, True)[:2]
        assert signature[name] == ty, (name, signature[name], ty)
        assert ((i,) in attrs) == (key == "D"), (name, attrs, key)
    assert constexprs == {(1,): 1}


def test_ptxas_report_parsing():
    from pifi_fast.kernels.compile_report import parse_ptxas, tensor_core_kind

    text = ("ptxas info    : Function properties for k\n"
            "    24 bytes stack frame, 16 bytes spill stores, 8 bytes spill loads\n"
            "ptxas info    : Used 255 registers, used 1 barriers, 128 bytes cmem[0]\n")
    assert parse_ptxas(text) == {"registers": 255, "stack_bytes": 24, "spill_stores": 16,
                                 "spill_loads": 8}
    with pytest.raises(ValueError):
        parse_ptxas("nothing here")
    assert tensor_core_kind("wgmma.mma_async.sync.aligned") == "wgmma"
    assert tensor_core_kind("mma.sync.aligned.m16n8k16") == "mma.sync"
    assert tensor_core_kind("fma.rn.f32") == "fma"


def test_gemm_tables_are_the_autotuners_only_source():
    """configs() is built from tiles(); the autotuner holds each target's tiles and prunes to
    the launching device's (checked here through the prune hook with a fake device)."""
    from pifi_fast.kernels import gemm

    assert gemm.tiles(75, "none", "fp16") == []  # Turing: FMA dots spill; cuBLAS there
    assert gemm.tiles(90, "swiglu", "fp32") == []  # fp32: cuBLAS
    for arch in (80, 86, 89, 90):
        for epilogue in gemm.EPILOGUES:
            table = gemm.tiles(arch, epilogue, "bf16")
            assert table and table == gemm.tiles(arch, epilogue, "fp16")
            assert [T.tile_of(c) for c in gemm.configs(arch, epilogue, "bf16")] == table
    with pytest.raises(ValueError, match="epilogue"):
        gemm.tiles(80, "relu", "bf16")


def test_prune_keeps_the_devices_tiles(monkeypatch):
    import triton

    from pifi_fast.kernels import gemm

    every = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                           num_stages=st, num_warps=w)
             for arch in gemm.GPU_ARCHS for e in gemm.EPILOGUES
             for bm, bn, bk, st, w in gemm.tiles(arch, e, "bf16")]
    monkeypatch.setattr(gemm, "device_arch", lambda device: 86)
    a = torch.empty(4, 4, dtype=torch.bfloat16)
    kept = gemm.prune_configs(every, {"A": a}, **gemm.SPECS["swiglu"].constexprs)
    assert [T.tile_of(c) for c in kept] == gemm.tiles(86, "swiglu", "bf16")
    kept = gemm.prune_configs(every, {"A": a}, **gemm.SPECS["none"].constexprs)
    assert [T.tile_of(c) for c in kept] == gemm.tiles(86, "none", "bf16")


def test_dequant_tiles_all_reach_the_autotuner(monkeypatch):
    """Every tile quant.tiles() can return, the fine-group forward's own included, is in the
    dequantizing GEMM's autotuner pool (one missing there would be pruned away silently), and
    the fine-group forward keeps a tile of 64 rows on every tensor-core target."""
    from pifi_fast.kernels import quant

    monkeypatch.setattr(quant, "interpreting", lambda: False)
    # a tile no table holds, as sm_86's fine-group forward's own: the pool must hold it too
    monkeypatch.setitem(T.DQ_FINE_ONLY, 86, [(16, 16, 32, 2, 1)])
    pool = {T.tile_of(c) for c in quant.all_configs()}
    assert (16, 16, 32, 2, 1) in pool
    for arch in quant.GPU_ARCHS:
        for storage, fine in itertools.product(quant.MODES, (False, True)):
            table = quant.tiles(arch, storage, "fp16", fine)
            assert set(table) <= pool and len(set(table)) == len(table), (arch, storage, fine)
    monkeypatch.undo()
    for arch in (80, 86, 89, 90):
        fine = quant.tiles(arch, "int8", "bf16", fine=True)
        assert any(t[0] >= 64 for t in fine), (arch, fine)
        assert not set(fine) & T.DQ_FINE_SPILLS.get(arch, set()), arch


def _cuobjdump():
    import triton

    for path in (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump",
                 Path("/usr/local/cuda/bin/cuobjdump")):
        if path.exists():
            return str(path)
    return None


def test_extension_holds_machine_code_for_every_arch_it_was_built_for():
    from pifi_fast import _ext

    if not _ext.EXTENSION_WITH_CUDA:
        pytest.skip("the extension was built without CUDA")
    from pifi_fast import _build_info

    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (Triton's NVIDIA backend or /usr/local/cuda)")
    import pifi_fast._C as ext

    archs = [a.strip() for a in re.split(r"[;\s]+", _build_info.CUDA_ARCHS or "") if a.strip()]
    expected = {"sm_" + a.split("+")[0].replace(".", "") for a in archs}
    assert expected, _build_info.CUDA_ARCHS
    out = subprocess.run([tool, "--list-elf", ext.__file__], capture_output=True, text=True)
    found = set(re.findall(r"\.(sm_\d+a?)\.cubin", out.stdout))
    assert expected <= found, f"built for {sorted(expected)}, machine code for {sorted(found)}"


def test_default_arch_list_covers_turing_to_hopper():
    text = (Path(__file__).resolve().parents[1] / "setup.py").read_text()
    default = re.search(r'DEFAULT_ARCHS = "([^"]+)"', text).group(1).split(";")
    assert {"7.5", "8.0", "8.6", "8.9", "9.0a"} <= set(default)
