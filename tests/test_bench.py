"""The benchmark machinery: the CLI writes its outputs, --compare flags slowdowns, the saved
bytes counter counts what autograd keeps."""
import json

import torch

from pifi_fast.bench import report
from pifi_fast.bench.timing import saved_activation_bytes
from pifi_fast.cli import main


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


def test_time_budget_skips_the_rest_and_still_writes(tmp_path):
    out = tmp_path / "res"
    assert main(["bench", "--sizes", "tiny", "--workloads", "W3", "--reps", "1",
                 "--time-budget", "0", "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert rows and all(r.get("skipped") == "time budget of this run reached" for r in rows)
    assert "## Targets of the fused layer" in (out / "results.md").read_text()


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
    with workloads._liger_rope(liger):
        assert module.apply_rotary_pos_emb is not before
    assert module.apply_rotary_pos_emb is before
