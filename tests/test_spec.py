"""pifi_fast.frozen.spec and checkpoint: the family builders' enums, LayerSpec's keyword-only
construction and its refusals, and the checkpoint layouts against each other (Falcon's q/k/v
rows, llama.cpp's regrouping)."""
import dataclasses

import pytest
import torch
from helpers import NEW_FUSED, tiny_llm

from pifi_fast.frozen import checkpoint
from pifi_fast.frozen.spec import (FUSED_MODEL_TYPES, Activation, BlockKind, LayerSpec, Norm,
                                   QkvLayout, layer_spec)

# what each tiny family is, by the rules its Hugging Face layer follows
WANT = {"llama": (Norm.RMS, BlockKind.SEQUENTIAL, Activation.SILU, None),
        "qwen3": (Norm.RMS, BlockKind.SEQUENTIAL, Activation.SILU, Norm.RMS),
        "gemma": (Norm.RMS_1P, BlockKind.SEQUENTIAL, Activation.GELU_TANH, None),
        "gemma2": (Norm.RMS_1P, BlockKind.SANDWICH, Activation.GELU_TANH, None),
        "gemma3": (Norm.RMS_1P, BlockKind.SANDWICH, Activation.GELU_TANH, Norm.RMS_1P),
        "falcon": (Norm.LAYER, BlockKind.PARALLEL, Activation.GELU, None),
        "falcon-sequential": (Norm.LAYER, BlockKind.SEQUENTIAL, Activation.GELU, None)}


@pytest.mark.parametrize("kind", list(WANT))
def test_each_builder_gives_its_familys_enums(kind):
    spec = layer_spec(tiny_llm(kind))
    assert spec.model_type in FUSED_MODEL_TYPES
    assert (spec.norm, spec.block, spec.act, spec.qk_norm) == WANT[kind]
    for field in ("norm", "block", "act", "qkv"):
        assert type(getattr(spec, field)) in (Norm, BlockKind, Activation, QkvLayout)


def test_the_spec_is_keyword_only_and_refuses_unknown_values():
    spec = layer_spec(tiny_llm("llama"))
    with pytest.raises(TypeError):
        LayerSpec(*dataclasses.astuple(spec))
    for field, value in (("norm", "batch"), ("block", "diagonal"), ("act", "relu"),
                         ("qkv", "shuffled"), ("qk_norm", "layer2")):
        with pytest.raises(ValueError):
            dataclasses.replace(spec, **{field: value})
    assert dataclasses.replace(spec, norm="rms_1p").norm is Norm.RMS_1P


def test_an_unfused_config_has_no_spec():
    config = tiny_llm("llama")
    config.model_type = "gpt2"
    assert layer_spec(config) is None


@pytest.mark.parametrize("kind", ["falcon", "falcon-40b"])
def test_falcon_rows_and_the_gguf_regrouping_undo_each_other(kind):
    config = tiny_llm(kind)
    spec = layer_spec(config)
    width = (spec.heads + 2 * spec.kv_heads) * spec.head_dim
    theirs = torch.randn(width, 5)  # the Hugging Face layout
    rows = checkpoint.falcon_qkv_rows(spec)
    ours = theirs if rows is None else theirs[rows]  # [q | k | v], llama.cpp's order
    assert torch.equal(checkpoint.regroup_falcon_qkv(ours, config), theirs)
    undo = checkpoint.gguf_rewrite("falcon", "self_attention.query_key_value.weight", config)
    assert torch.equal(undo(ours), theirs)


def test_the_key_layout_names_every_parameter_of_the_layer():
    for kind in ["llama"] + NEW_FUSED:
        spec = layer_spec(tiny_llm(kind))
        merged, single = checkpoint.key_layout(spec)
        keys = [k for ks in merged.values() for k in ks] + list(single.values())
        assert len(keys) == len(set(keys)), kind  # no key read twice
        assert ("qkv_weight" in merged) == (spec.qkv == QkvLayout.SEPARATE)
        assert ("gate_up_weight" in merged) == spec.gated
        assert ("input_norm_bias" in single) == (spec.norm == Norm.LAYER)
    assert checkpoint.gguf_rewrite("llama", "mlp.down_proj.weight", tiny_llm("llama")) is None
