"""FrozenLayerStack: several frozen layers of one LLM run in order, unpadded once for all."""
from __future__ import annotations

import torch
from torch import nn

from pifi_fast.frozen.function import FrozenLayerFunction
from pifi_fast.frozen.module import FrozenLlamaLayer


def _run_options(layer: FrozenLlamaLayer) -> tuple:
    """What a packed run takes from its layer besides the weights (the stack shares one)."""
    return layer.compute_dtype, layer.options


class FrozenLayerStack(nn.ModuleList):
    """Several frozen layers of one LLM, run in order (PiFi with more than one plugged layer).

    A full-sequence input is unpadded once for the whole stack: the first layer packs the real
    tokens (one host sync), every layer runs on the packed tokens as its own autograd node
    (input gradient only), and the padding is put back once at the end, keeping the stack's
    input there as a single layer keeps its own. CLS mode (one token per row) has nothing to
    unpad. Under torch.compile each layer is its own custom op (each unpads; the graph stays
    whole). State-dict keys: "<i>.<Hugging Face key>" for the i-th layer."""

    def __init__(self, layers):
        layers = list(layers)
        if len(layers) < 2:
            raise ValueError(f"FrozenLayerStack needs at least two layers, got {len(layers)}")
        first = layers[0]
        for layer in layers[1:]:
            if (layer.config.to_dict() != first.config.to_dict()
                    or _run_options(layer) != _run_options(first)):
                raise ValueError("the layers of a FrozenLayerStack must come from one LLM and be "
                                 "built with the same options and dtype")
        super().__init__(layers)

    def forward(self, hidden_states, attention_mask=None, position_ids=None):
        first, x = self[0], hidden_states
        first._check_input(x)
        with torch.autocast(x.device.type, enabled=False):  # the mixed-precision rule above
            h = x.to(first.input_norm_weight.dtype)
            if torch.compiler.is_compiling():
                for layer in self:
                    h = layer._forward(h, attention_mask, position_ids)
            else:
                flat, positions, seg, run = first.pack(h, attention_mask, position_ids,
                                                       torch.is_grad_enabled() and h.requires_grad)
                for layer in self:
                    flat = FrozenLayerFunction.apply(flat, positions, run.for_layer(layer))
                h = first.unpack(h, flat, seg)
        return h.to(x.dtype)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self[0].compute_dtype

    def weight_bytes(self) -> int:
        return sum(layer.weight_bytes() for layer in self)
