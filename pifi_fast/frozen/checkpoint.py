"""The frozen layer's checkpoint layout, per family: which Hugging Face keys each merged or
single parameter reads and writes (key_layout), Falcon's q/k/v row order (falcon_qkv_rows), and
what llama.cpp's GGUF conversion rewrites per architecture and how to undo it (gguf_rewrite,
fix_gguf_config), with llama.cpp's names for the architectures and blocks (gguf_arch,
HF_BLOCK_PREFIXES). The layer's state dict and pifi_fast.loading both read it from here.
"""
from __future__ import annotations

from typing import Callable

import torch

from pifi_fast.frozen.spec import Norm, QkvLayout

# the block's norms (LayerNorm gives each a bias), and the per-head q/k norms (weights only)
BLOCK_NORMS = ("input_norm", "post_norm", "attn_out_norm", "mlp_out_norm")


def key_layout(spec) -> tuple[dict[str, tuple[str, ...]], dict[str, str]]:
    """(merged, single) for a LayerSpec: merged parameter -> the Hugging Face keys it is the
    row-wise concatenation of (in this order); single parameter -> its one key."""
    keys = spec.key_map
    merged, single = {}, {}
    for suffix in ("weight", "bias"):
        if spec.qkv == QkvLayout.SEPARATE:
            merged[f"qkv_{suffix}"] = tuple(f"{keys[p]}.{suffix}" for p in "qkv")
        else:
            single[f"qkv_{suffix}"] = f"{keys['qkv']}.{suffix}"
        if spec.gated:
            merged[f"gate_up_{suffix}"] = (f"{keys['gate']}.{suffix}", f"{keys['up']}.{suffix}")
        else:
            single[f"gate_up_{suffix}"] = f"{keys['up']}.{suffix}"
        for name in ("o", "down"):
            single[f"{name}_{suffix}"] = f"{keys[name]}.{suffix}"
    for name in BLOCK_NORMS + ("q_norm", "k_norm"):
        if name in keys:
            single[f"{name}_weight"] = f"{keys[name]}.weight"
            if spec.norm == Norm.LAYER and name in BLOCK_NORMS:
                single[f"{name}_bias"] = f"{keys[name]}.bias"
    return merged, single


def falcon_qkv_rows(spec) -> torch.Tensor | None:
    """Row order taking Falcon's fused query_key_value (its spec.qkv layout) to [q | k | v]
    (ours = theirs[rows]); None when they already agree."""
    heads, kv, d = spec.heads, spec.kv_heads, spec.head_dim
    rows = torch.arange((heads + 2 * kv) * d)
    if spec.qkv == QkvLayout.GROUPED:  # (kv, heads / kv + 2, d): per group its queries, k, v
        grouped = rows.view(kv, heads // kv + 2, d)
        return torch.cat((grouped[:, :-2].reshape(-1), grouped[:, -2].reshape(-1),
                          grouped[:, -1].reshape(-1)))
    if spec.qkv == QkvLayout.INTERLEAVED:  # (heads, 3, d): per head q, k, v
        per_head = rows.view(heads, 3, d)
        return torch.cat([per_head[:, i].reshape(-1) for i in range(3)])
    return None


# -- GGUF: llama.cpp's names, and what it rewrites on conversion --------------------------------
# Module names a family's blocks have in its Hugging Face checkpoint, tried in turn when asking
# gguf-py's tensor-name table (llama.cpp's own) for a tensor's GGUF name.
HF_BLOCK_PREFIXES = ("model.layers.{i}.", "transformer.h.{i}.", "gpt_neox.layers.{i}.",
                     "model.decoder.layers.{i}.", "transformer.blocks.{i}.")
# Transformers model_type -> llama.cpp's architecture name, where the two differ
GGUF_ARCH = {"mistral": "llama", "cohere": "command-r", "qwen2_moe": "qwen2moe",
             "qwen3_moe": "qwen3moe", "gemma3_text": "gemma3", "mixtral": "llama"}


def gguf_arch(model_type: str) -> str:
    """llama.cpp's architecture name of a Transformers model_type."""
    return GGUF_ARCH.get(model_type, model_type)


# What llama.cpp rewrites on conversion (Transformers' GGUF loader undoes the same; Falcon's
# q/k/v regrouping it does not):
#   llama (Llama and Mistral)  q and k rows permuted per head (rotary halves interleaved)
#   gemma2, gemma3             every norm weight stored with the +1 of Gemma's (1 + w) added
#   falcon                     query_key_value's kv groups rearranged into [q | k | v]
def gguf_rewrite(arch: str, local: str, config) -> Callable | None:
    """The function that undoes llama.cpp's rewrite of the layer tensor `local` (its key in the
    Hugging Face layer) for GGUF architecture `arch`, applied to the tensor and to the rows of
    its 8-bit parts alike; None when the tensor is stored as Hugging Face has it."""
    if arch == "llama" and local in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
        heads = config.num_attention_heads if "q_proj" in local else config.num_key_value_heads
        return lambda w: unpermute_gguf_rows(w, heads)
    if arch in ("gemma2", "gemma3") and local.endswith("norm.weight"):
        return lambda w: w - 1
    if arch == "falcon" and local == "self_attention.query_key_value.weight":
        return lambda w: regroup_falcon_qkv(w, config)
    return None


def regroup_falcon_qkv(w: torch.Tensor, config) -> torch.Tensor:
    """Undo llama.cpp's Falcon q/k/v rearrangement: it stores [all q heads | all k | all v]; the
    Hugging Face layer (40B style) wants each KV group's query heads followed by its k and v.
    For multi-query Falcon-7B the two layouts are the same."""
    if not config.new_decoder_architecture:
        return w
    heads, kv = config.num_attention_heads, config.num_kv_heads
    d = config.hidden_size // heads
    q, k, v = w.split([heads * d, kv * d, kv * d], 0)
    q = q.reshape(kv, heads // kv, d, *w.shape[1:])
    k, v = (t.reshape(kv, 1, d, *w.shape[1:]) for t in (k, v))
    return torch.cat((q, k, v), 1).reshape(w.shape)


def unpermute_gguf_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation. Per head, llama.cpp interleaves the two rotary
    halves (rows r and r + D/2 become rows 2r and 2r+1); this puts them back in halves."""
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def fix_gguf_config(config, header):
    """Fill in what Transformers' GGUF parser leaves at its defaults for the families whose
    layer we read (checked on Transformers 5.24): Gemma-2/3's attention soft-capping (llama.cpp
    writes it) and query scale (llama.cpp derives it: hidden / heads for Gemma-2-27B, the 46-layer
    model, the key length otherwise); Falcon's MLP width, KV heads, q/k/v bias and the 40B-style
    block (llama.cpp tells it apart by a second attention norm)."""
    fields, arch = header.fields, header.fields.get("general.architecture")
    if config.model_type in ("gemma2", "gemma3_text"):
        cap = fields.get(f"{arch}.attn_logit_softcapping")
        if cap is not None:
            config.attn_logit_softcapping = float(cap)
        if config.model_type == "gemma2":
            config.query_pre_attn_scalar = (
                config.hidden_size // config.num_attention_heads
                if config.num_hidden_layers == 46 else config.head_dim)
    if config.model_type == "falcon":
        names = {t.name for t in header.tensors}
        config.ffn_hidden_size = int(fields.get("falcon.feed_forward_length",
                                                4 * config.hidden_size))
        kv = int(fields.get("falcon.attention.head_count_kv", 1))
        config.new_decoder_architecture = any(n.endswith(".attn_norm_2.weight") for n in names)
        config.num_kv_heads = kv
        config.multi_query = kv == 1 and not config.new_decoder_architecture
        config.num_ln_in_parallel_attn = 2 if config.new_decoder_architecture else None
        config.bias = any(n.endswith(".attn_qkv.bias") for n in names)
        config.parallel_attn = True  # llama.cpp's Falcon graph has only the parallel block
    return config
