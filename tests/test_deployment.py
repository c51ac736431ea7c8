"""Deployment pieces that need no exporter: loading a checkpoint in another weights mode (8-bit
CPU inference), and the W5 overhead workload's cases, ratios and targets."""
import pytest
import torch
from helpers import rel_err, tiny_slm
from transformers import AutoModelForCausalLM, LlamaConfig

from pifi_fast import PiFiModel
from pifi_fast.bench import w5_deploy
from pifi_fast.bench.common import size_lists
from pifi_fast.cli import build_parser


def _llm_config():
    # inputs of every projection a multiple of 16 (hidden 64, MLP 96): the CPU int8 kernel's
    # condition, so the int8-channel model below really runs it
    return LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                       num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=64,
                       rms_norm_eps=1e-5)


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 120, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    mask[2, 7:] = 0
    return ids, mask


@pytest.mark.parametrize("saved", ["auto", "int8"])
def test_a_checkpoint_loads_in_int8_channel_and_runs_the_int8_kernel(tmp_path, monkeypatch,
                                                                       saved):
    model = PiFiModel.from_parts(tiny_slm("bert"), _llm_config(), seed=0, head_dropout=0.0,
                                 weights=saved).eval()
    model.save_pretrained(tmp_path / "ckpt")
    int8 = PiFiModel.from_pretrained(tmp_path / "ckpt", weights="int8-channel").eval()
    layer = int8.llm_layer
    assert int8._options["weights"] == "int8-channel"
    for name in ("qkv", "o", "gate_up", "down"):
        q, scale = getattr(layer, f"{name}_weight"), getattr(layer, f"{name}_weight_scale")
        assert q.dtype == torch.int8 and scale.shape == (q.shape[0], 1)
    calls = []
    real = torch._weight_int8pack_mm

    def counting(*args):
        calls.append(args[1].shape)
        return real(*args)
    monkeypatch.setattr(torch, "_weight_int8pack_mm", counting)
    ids, mask = _batch()
    with torch.no_grad():
        got = int8(input_ids=ids, attention_mask=mask).logits
        want = model(input_ids=ids, attention_mask=mask).logits
    assert len(calls) >= 4  # the four projections went through the int8 kernel
    assert rel_err(got, want) < 5e-2  # int8 weights + bf16 activations against the float model


def test_a_lean_checkpoint_loads_in_another_weights_mode_after_its_hash_check(tmp_path):
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(_llm_config()).save_pretrained(tmp_path / "llm")
    model = PiFiModel.from_parts(tiny_slm("bert"), str(tmp_path / "llm"), seed=0,
                                 head_dropout=0.0).eval()
    model.save_pretrained(tmp_path / "lean", frozen_layer="reference")
    int8 = PiFiModel.from_pretrained(tmp_path / "lean", weights="int8-channel").eval()
    assert int8.llm_layer.down_weight_scale.shape[1] == 1
    assert int8.loaded_from == tmp_path / "lean" and int8.llm_source == str(tmp_path / "llm")
    ids, mask = _batch()
    with torch.no_grad():
        assert rel_err(int8(input_ids=ids, attention_mask=mask).logits,
                       model(input_ids=ids, attention_mask=mask).logits) < 5e-2
    # the saved layer is still verified first: a changed source fails as it does without
    AutoModelForCausalLM.from_config(_llm_config()).save_pretrained(tmp_path / "llm")
    with pytest.raises(Exception, match="differs"):
        PiFiModel.from_pretrained(tmp_path / "lean", weights="int8-channel")


def test_a_checkpoint_loads_with_its_layer_in_bf16(tmp_path):
    model = PiFiModel.from_parts(tiny_slm("bert"), _llm_config(), seed=0,
                                 head_dropout=0.0).eval()
    model.save_pretrained(tmp_path / "ckpt")
    bf16 = PiFiModel.from_pretrained(tmp_path / "ckpt", layer_dtype="bfloat16").eval()
    assert bf16.layer_dtype == torch.bfloat16
    assert next(bf16.slm.parameters()).dtype == torch.float32  # only the layer changes
    ids, mask = _batch()
    with torch.no_grad():
        assert rel_err(bf16(input_ids=ids, attention_mask=mask).logits,
                       model(input_ids=ids, attention_mask=mask).logits) < 3e-2
    same = PiFiModel.from_pretrained(tmp_path / "ckpt", layer_dtype="float32")
    assert torch.equal(same.llm_layer.down_weight, model.llm_layer.down_weight)
    with pytest.raises(ValueError, match="layer_dtype"):
        PiFiModel.from_pretrained(tmp_path / "ckpt", layer_dtype="int8")


def test_eval_and_predict_take_layer_weights_and_export_its_formats():
    parser = build_parser()
    for command in (["eval", "ckpt"], ["predict", "ckpt", "--data", "x.csv"]):
        assert parser.parse_args(command + ["--layer-weights", "int8-channel"]).layer_weights \
            == "int8-channel"
        assert parser.parse_args(command).layer_weights is None
        assert parser.parse_args(command + ["--layer-dtype", "bfloat16"]).layer_dtype \
            == "bfloat16"
    args = parser.parse_args(["export", "ckpt", "--format", "pt2", "--out", "d", "--check",
                              "false"])
    assert (args.format, args.out, args.check, args.int8) == ("pt2", "d", False, False)
    with pytest.raises(SystemExit):
        parser.parse_args(["export", "ckpt", "--format", "tflite", "--out", "d"])


# -- W5 -------------------------------------------------------------------------------------------
def test_w5_lists_its_cpu_cases_and_none_on_a_gpu():
    sizes = size_lists("quick", torch.device("cpu"))
    cases = w5_deploy.cases(sizes, torch.device("cpu"), torch.float32)
    keys = {(c.variant, c.shape, c.size, c.impl) for c in cases}
    for pair in ("minilm+smollm2", "bert-base+llama-3.1-8b"):
        for batch in (1, 32):
            for impl in w5_deploy.MODEL_IMPLS:
                assert ("cls infer", pair, batch, impl) in keys
            assert ("cls layer fwd", pair, batch, "pifi_fast_int8") in keys
    gpu_sizes = size_lists("quick", torch.device("cuda"))
    assert w5_deploy.cases(gpu_sizes, torch.device("cuda"), torch.bfloat16) == []


def _row(variant, pair, size, impl, ms, **extra):
    return {"workload": "W5", "variant": variant, "shape": pair, "size": size, "impl": impl,
            "median_s": ms / 1e3, **extra}


def test_w5_overhead_ratios_and_targets():
    big = "bert-base+llama-3.1-8b"
    rows = [_row("cls infer", big, 32, "slm_alone", 100), _row("cls infer", big, 32, "hf_sdpa",
                                                                 300),
            _row("cls infer", big, 32, "pifi_fast", 120),
            _row("cls infer", big, 32, "pifi_fast_int8", 105),
            _row("cls infer", big, 1, "slm_alone", 10), _row("cls infer", big, 1, "hf_sdpa", 40),
            _row("cls infer", big, 1, "pifi_fast", 25),
            _row("cls infer", big, 1, "pifi_fast_int8", 14),
            _row("cls layer fwd", big, 1, "pifi_fast_int8", 4, pct_of_ceiling=70.0),
            _row("cls layer fwd", big, 1, "pifi_fast", 16, pct_of_ceiling=60.0),
            {"workload": "W5", "variant": "cls infer", "shape": big, "size": 1,
             "impl": "ort_int8", "skipped": "not installed"}]
    table = {(t["batch"], t["impl"]): t for t in w5_deploy.overhead(rows)}
    assert table[(32, "pifi_fast")]["vs_slm_alone"] == pytest.approx(1.2)
    assert table[(32, "pifi_fast")]["speedup_vs_reference"] == pytest.approx(2.5)
    assert table[(1, "pifi_fast_int8")]["layer_pct_of_streaming_bound"] == 70.0
    assert table[(1, "pifi_fast")]["layer_ms"] == pytest.approx(16)
    assert (1, "ort_int8") not in table  # a skipped row is no figure
    targets = {t["target"]: t for t in w5_deploy.deploy_targets(rows)}
    b32 = targets["PiFi over the SLM alone, batch 32"]
    assert b32["impl"] == "pifi_fast_int8" and b32["value"] == pytest.approx(1.05) and b32["met"]
    b1 = targets["PiFi over the SLM alone, batch 1 (int8 layer)"]
    assert b1["value"] == pytest.approx(1.4) and b1["met"]
    ref1 = targets["best pifi_fast PyTorch path over the reference, batch 1"]
    assert ref1["impl"] == "pifi_fast_int8" and ref1["value"] == pytest.approx(40 / 14)
    assert targets["best pifi_fast PyTorch path over the reference, batch 32"]["met"]
    # an exported row counts in the second kind only
    rows.append(_row("cls infer", big, 1, "ort_fp32", 8))
    targets = {t["target"]: t for t in w5_deploy.deploy_targets(rows)}
    assert targets["best pifi_fast PyTorch path over the reference, batch 1"]["impl"] \
        == "pifi_fast_int8"
    exported = targets["best pifi_fast path, exports included over the reference, batch 1"]
    assert exported["impl"] == "ort_fp32" and exported["value"] == pytest.approx(5.0)
    bound = targets["int8 layer CLS latency, % of its weight-streaming bound (batch 1)"]
    assert bound["value"] == 70.0 and bound["met"]
    rows[-4]["pct_of_ceiling"] = 50.0  # now 2x its bound: not met
    bound = {t["target"]: t for t in w5_deploy.deploy_targets(rows)}[
        "int8 layer CLS latency, % of its weight-streaming bound (batch 1)"]
    assert bound["met"] is False
    md = w5_deploy.markdown(rows)
    assert "| bert-base+llama-3.1-8b | 32 | pifi_fast | 120.00 |" in md
