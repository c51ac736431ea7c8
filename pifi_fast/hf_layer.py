"""Running a Hugging Face decoder layer the way PiFi needs it: bidirectional, padding masked.

Transformers 5.x gives *causal* attention when a Llama layer gets attention_mask=None, and it
needs position_embeddings from the model's rotary module. So we always pass an explicit additive
4-D mask (0 for visible keys, the dtype's minimum for padding keys and, on a layer with a
sliding window, for keys outside it) and cos/sin from the LLM's own rotary class, called for the
layer's type where the family has several (pifi_fast.families says what each family needs).
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from pifi_fast import families
from pifi_fast.families import layer_config_and_index


def bidirectional_mask(mask: torch.Tensor | None, batch: int, seq: int, dtype, device,
                       window: int | None = None):
    """(B, 1, S, S) additive mask; `mask` (B, S) True for real tokens, None for all visible;
    `window`: keys `window` or more positions away from the query are hidden too."""
    add = torch.zeros(batch, 1, seq, seq, dtype=dtype, device=device)
    if mask is not None:
        add = add.masked_fill(~mask[:, None, None, :], torch.finfo(dtype).min)
    if window is not None and seq > window:
        pos = torch.arange(seq, device=device)
        add = add.masked_fill((pos[:, None] - pos[None, :]).abs() >= window,
                              torch.finfo(dtype).min)
    return add


def run_hf_layer(layer: nn.Module, rotary: nn.Module | None, h: torch.Tensor,
                 mask: torch.Tensor | None) -> torch.Tensor:
    """h (B, S, H) at positions 0..S-1 through `layer` with bidirectional attention."""
    b, s, _ = h.shape
    config, index = layer_config_and_index(layer)
    window = None if config is None else families.attention_window(config, index)
    kind = None if config is None else families.layer_type(config, index)
    position_ids = torch.arange(s, device=h.device).unsqueeze(0).expand(b, s)
    kwargs = {
        "attention_mask": bidirectional_mask(mask, b, s, h.dtype, h.device, window),
        "position_ids": position_ids,
    }
    if rotary is not None:
        kwargs["position_embeddings"] = families.rotary_embeddings(rotary, h, position_ids, kind)
    if "alibi" in inspect.signature(layer.forward).parameters:
        kwargs["alibi"] = None
    out = layer(h, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def run_hf_layers(layers: nn.Module, rotary: nn.Module | None, h: torch.Tensor,
                  mask: torch.Tensor | None) -> torch.Tensor:
    """run_hf_layer through one layer, or through each layer of an nn.ModuleList in order
    (PiFi with several plugged layers)."""
    for layer in (layers if isinstance(layers, nn.ModuleList) else [layers]):
        h = run_hf_layer(layer, rotary, h, mask)
    return h
