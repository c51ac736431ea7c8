"""What each Transformers decoder family needs to run one of its layers as PiFi's frozen layer.

A decoder layer is not written to run alone: the model around it picks the attention
implementation, builds the masks (per layer type, sliding windows included) and calls the
rotary module (per layer type where a family has several). This module answers those questions
from the config, for any family Transformers ships, so that loading (pifi_fast.loading) and
running (pifi_fast.hf_layer, pifi_fast.frozen) need no per-family branches:

  modeling_classes      the family's causal-LM class and modeling module
  decoder_layer_class   the class of one decoder block (named *DecoderLayer, *Layer or *Block)
  unsupported           why a layer cannot be PiFi's frozen layer (None when it can)
  use_attention_implementation  SDPA where the layer supports it, eager where it does not
                        (Gemma-2's soft-capped logits, or a model class without SDPA)
  layer_type / attention_window  the layer's type and its sliding window (None: full)
  make_rotary / rotary_embeddings  the family's own rotary module, called as its model calls it
  layer_spec (LayerSpec)  the fused layer's description of a family (pifi_fast.frozen.spec, here
                        for old imports), None where it runs unfused
  layer_config_and_index  the config and index a Hugging Face layer module holds
  FUSED_MODEL_TYPES / is_fusable / describe  which families pifi_fast fuses, and in words which
                        path a layer takes (pifi-fast info --llm, the model's repr); a fused
                        layer's kernels are read from pifi_fast.frozen.elementwise's table, not listed

Nothing here runs code from a checkpoint: a family that exists only as remote code is refused
with what to do instead.
"""
from __future__ import annotations

import inspect
import sys

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from pifi_fast.frozen.elementwise import describe_kernels
from pifi_fast.frozen.spec import FUSED_MODEL_TYPES, LayerSpec, layer_spec  # noqa: F401

# The families whose frozen layer pifi_fast computes itself (FUSED_MODEL_TYPES, each described
# by a LayerSpec of pifi_fast.frozen.spec); every other family Transformers ships runs its own
# Hugging Face layer, unfused.

# the layer types of Transformers' configs that are attention (a hybrid model's other types,
# "mamba", "linear_attention", "conv", ..., are blocks PiFi cannot plug in)
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")


def modeling_classes(config):
    """(the family's causal-LM class, the modeling module defining it)."""
    try:
        model_cls = AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        raise ValueError(
            f"model_type {config.model_type!r} has no causal-LM class in Transformers, so it has "
            "no decoder layer PiFi can plug in; use a decoder-only LLM (Llama, Mistral, Qwen2, "
            "Gemma-2, Falcon, ...)") from None
    return model_cls, sys.modules[model_cls.__module__]


def decoder_layer_class(config):
    """The class of one decoder block, read from the model class's _no_split_modules (the
    blocks Transformers keeps whole on one device): *DecoderLayer first, then *Layer / *Block
    (GPT-NeoX's GPTNeoXLayer, GPT-2's GPT2Block)."""
    model_cls, module = modeling_classes(config)
    names = [n for n in getattr(model_cls, "_no_split_modules", None) or []
             if isinstance(getattr(module, n, None), type)]
    for suffixes in (("DecoderLayer",), ("Layer", "Block")):
        for name in names:
            if name.endswith(suffixes) and "Vision" not in name and "Encoder" not in name:
                return getattr(module, name)
    raise ValueError(f"cannot find the decoder-layer class of {config.model_type!r} "
                     f"(Transformers names {names or 'no blocks'} for it)")


def layer_type(config, index: int) -> str | None:
    """The config's type for layer `index` ("full_attention", "sliding_attention", ...), or
    None for a family with one kind of layer."""
    types = getattr(config, "layer_types", None)
    return types[index] if types else None


def attention_window(config, index: int) -> int | None:
    """The sliding window of layer `index` (None: it sees every token). Families with layer
    types (Gemma-2/3, Qwen2, ...) window their "sliding_attention" layers only; families
    without them (Mistral v0.1, Phi-3, Starcoder2) window every layer when the config sets
    sliding_window, as their models' mask builders do. PiFi's attention is bidirectional, so
    the window is symmetric: a query sees the keys less than `window` positions away on either
    side (the causal window's keys, mirrored)."""
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    if getattr(config, "layer_types", None):
        return window if layer_type(config, index) == "sliding_attention" else None
    return window


def unsupported(config, index: int) -> str | None:
    """Why layer `index` of this LLM cannot be PiFi's frozen layer, or None when it can."""
    kind = layer_type(config, index)
    if kind is not None and kind not in ATTENTION_LAYER_TYPES:
        usable = [i for i, t in enumerate(config.layer_types) if t in ATTENTION_LAYER_TYPES]
        hint = (f"choose an attention layer (layer {usable[-1]} is the last)" if usable
                else "this LLM has no attention layer")
        return (f"layer {index} of this {config.model_type!r} model is a {kind!r} block, not "
                f"an attention decoder layer; {hint}")
    if getattr(config, "alibi", False):
        return (f"this {config.model_type!r} model uses ALiBi position biases, which pifi_fast "
                "does not build for a single layer; use a rotary-position LLM")
    try:
        layer_cls = decoder_layer_class(config)
    except ValueError as exc:
        return str(exc)
    if "alibi" in _required_parameters(layer_cls.forward) and not hasattr(config, "alibi"):
        # (Falcon's block takes an alibi argument too, None unless its config sets alibi)
        return (f"the {layer_cls.__name__} block needs ALiBi position biases, which pifi_fast "
                "does not build for a single layer; use a rotary-position LLM")
    return None


def _required_parameters(fn) -> set[str]:
    return {n for n, p in inspect.signature(fn).parameters.items()
            if p.default is inspect.Parameter.empty and n != "self"
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def needs_eager_attention(config) -> bool:
    """Scores SDPA cannot compute: soft-capped logits (Gemma-2), or a model class that declares
    no SDPA support."""
    if getattr(config, "attn_logit_softcapping", None):
        return True
    model_cls, _ = modeling_classes(config)
    return not getattr(model_cls, "_supports_sdpa", True)


def use_attention_implementation(config) -> None:
    """Set the config's attention implementation for a layer run alone, when none was chosen:
    SDPA where the family supports it (PiFi passes an explicit additive mask, which SDPA
    takes), eager where SDPA cannot compute its scores. A choice already made is kept (the
    benchmarks' eager baseline), except SDPA for a layer that cannot use it: a clear error."""
    chosen = getattr(config, "_attn_implementation", None)
    if chosen is None:
        config._attn_implementation = "eager" if needs_eager_attention(config) else "sdpa"
    elif chosen == "sdpa" and needs_eager_attention(config):
        raise ValueError(f"{config.model_type!r} layers cannot use SDPA attention (soft-capped "
                         "logits or no SDPA support): use eager or flex_attention")


def make_rotary(config, device=None) -> nn.Module | None:
    """The LLM's own rotary module (so every rope_scaling type, llama3 included, and every
    per-layer-type rotary, Gemma-3's local and global, is honoured); None without one."""
    _, module = modeling_classes(config)
    names = [n for n in dir(module) if n.endswith("RotaryEmbedding")]
    prefix = type(config).__name__.replace("Config", "")
    names.sort(key=lambda n: (not n.startswith(prefix), len(n)))
    if not names:
        return None
    rotary_cls = getattr(module, names[0])
    if "device" in inspect.signature(rotary_cls.__init__).parameters:
        return rotary_cls(config, device=device)
    return rotary_cls(config)


def layer_config_and_index(layer: nn.Module):
    """(the LLM's config, the layer's index) as the Hugging Face layer knows them (its
    attention module holds both), or (None, None)."""
    for module in layer.modules():
        index = getattr(module, "layer_idx", None)
        config = getattr(module, "config", None)
        if isinstance(index, int) and config is not None:
            return config, index
    return None, None


def rotary_embeddings(rotary: nn.Module, x: torch.Tensor, position_ids: torch.Tensor,
                      kind: str | None):
    """(cos, sin) for `position_ids`, called as the family's model calls it: with the layer's
    type for a rotary that has one table per layer type (Gemma-3)."""
    if "layer_type" in inspect.signature(rotary.forward).parameters:
        if kind is None:
            raise ValueError(f"{type(rotary).__name__} needs the layer's type, and the config "
                             "has no layer_types")
        return rotary(x, position_ids, layer_type=kind)
    return rotary(x, position_ids)


def is_fusable(config) -> bool:
    """Whether pifi_fast's fused layer computes this family's layer (layer_spec has one)."""
    return layer_spec(config) is not None


def describe(config, index: int, device_type: str | None = None, kernels: str = "auto") -> str:
    """One line: which path layer `index` of this LLM takes in pifi_fast.PiFiModel; for a fused
    layer, what runs its norms, activation and RoPE on CUDA and on `device_type` (default: CUDA
    when there is one, else the CPU) under the kernels option `kernels`, read from the table
    the layer dispatches through (pifi_fast.frozen.elementwise.describe_kernels)."""
    why = unsupported(config, index)
    if why:
        return f"{config.model_type}: cannot be plugged in: {why}"
    window = attention_window(config, index)
    extras = [f"sliding window {window}" if window else "full attention"]
    spec = layer_spec(config)
    if getattr(config, "attn_logit_softcapping", None):
        extras.append(f"logits soft-capped at {config.attn_logit_softcapping}"
                      + (" (flash-attn where it soft-caps, else the math path)" if spec else ""))
    if spec is not None:
        return (f"{config.model_type} layer {index}: fused (pifi_fast's FrozenLlamaLayer, "
                f"{spec.block} block; {describe_kernels(spec, device_type, kernels)}; "
                f"input-gradient-only backward; {', '.join(extras)})")
    attn = "eager" if needs_eager_attention(config) else "sdpa"
    return (f"{config.model_type} layer {index}: unfused (its own Hugging Face "
            f"{decoder_layer_class(config).__name__}, {attn} attention, "
            f"{', '.join(extras)}; correct, not accelerated)")
