"""pifi_fast.PiFiModel: the drop-in fast PiFi. Same constructor, state_dict keys and outputs as
pifi_fast.reference.PiFiModel; the frozen LLM layer is a FrozenLlamaLayer (one autograd node,
input gradient only) for the fused architectures, and the LLM's own layer otherwise; several
plugged layers are a FrozenLayerStack (one unpadding for them all) or an nn.ModuleList.
"""
from __future__ import annotations

import itertools

import torch
from torch import nn

from pifi_fast import families, packed_slm
from pifi_fast.families import FUSED_MODEL_TYPES, is_fusable
from pifi_fast.hf_layer import run_hf_layers
from pifi_fast.frozen.module import FrozenLlamaLayer
from pifi_fast.frozen.options import LayerOptions
from pifi_fast.frozen.stack import FrozenLayerStack
from pifi_fast.loading import warn_unfused
from pifi_fast.pifi_base import PiFiBase


class PiFiModel(PiFiBase):
    """PiFi with the fused frozen layer.

    Layer option `fused`: None (default) fuses when the architecture allows, True requires it
    (error otherwise), False always runs the Hugging Face layer. An unfrozen layer
    (freeze=False, the paper's ablation) needs weight gradients and so runs the Hugging Face layer.
    Options of the fused layer (see FrozenLlamaLayer): `kernels` ("auto", "triton", "torch"),
    `recompute` ("none", "mlp"), `attention` (None or a backend name), `gemm` ("cublas",
    "triton"), `chunk_tokens` (int, "auto" or None).

    `packed_slm` (how the SLM runs for classification, the only task it applies to; an
    execution choice, not saved with the weights): "auto" (default) computes the sentence
    vectors with pifi_fast.packed_slm on a CPU, where it was measured to pay, for the model
    types and inputs it supports (from the real tokens only; under a torch.compile that may
    not capture data-dependent sizes, on the padded layout with the last layer for [CLS] alone:
    see slm_mode), and runs the SLM's own forward otherwise; True does the same on every device
    (an error when the SLM or the batch is not supported); False always runs the SLM's own
    forward. Set it at construction or as an attribute. Packing computes the first token's
    state alone, so it applies to ``pooling="cls"`` only: with any other pooling ("mean",
    "mean-with-padding", "last") the pooled vector needs the SLM's whole last_hidden_state, and
    the SLM's own forward runs whatever packed_slm says.
    """

    def __init__(self, *args, packed_slm: bool | str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.packed_slm = packed_slm

    @property
    def packed_slm(self) -> bool | str:
        return self._packed_slm

    @packed_slm.setter
    def packed_slm(self, value: bool | str):
        if not (value is True or value is False or value == "auto"):
            raise ValueError(f"packed_slm must be 'auto', True or False, got {value!r}")
        if value is True and self.task == "classification" and self.pooling == "cls":
            reason = packed_slm.unsupported(self.slm)
            if reason:
                raise ValueError(f"packed_slm=True, but this SLM cannot be packed: {reason}")
        self._packed_slm = value

    def _make_layer(self, llms, freeze: bool, fused: bool | None = None, **fused_options):
        llm = llms[0]
        fusable = is_fusable(llm.config)
        if fused and not fusable:
            raise ValueError(f"fused=True, but model_type {llm.config.model_type!r} has no fused "
                             f"path (fused: {', '.join(FUSED_MODEL_TYPES)})")
        if fused and not freeze:
            raise ValueError("fused=True needs a frozen layer (freeze=True): the fused layer "
                             "computes no weight gradients")
        self.fused = bool(fusable and freeze and fused is not False)
        if self.fused:
            layers = []
            for one in llms:
                layers.append(FrozenLlamaLayer.from_hf(one.module, one.config, one.rotary,
                                                       getattr(one, "quantized", None),
                                                       **fused_options))
                layers[-1].layer_index = one.index
            # several layers: one unpadding for the whole stack (pifi_fast.frozen.stack)
            self.llm_layer = layers[0] if len(layers) == 1 else FrozenLayerStack(layers)
        else:
            defaults = LayerOptions().as_dict()
            unknown = sorted(set(fused_options) - set(defaults))
            if unknown:
                raise TypeError(f"unknown frozen-layer options {unknown} (the options are "
                                f"{sorted(defaults)})")
            # None is "not asked" (attention's default); any value other than a field's
            # default would be ignored by the Hugging Face layer, so it is refused
            if any(v is not None and v != defaults[k] for k, v in fused_options.items()):
                raise ValueError(f"options {sorted(fused_options)} apply to the fused layer only, "
                                 "which this model does not use (unfused architecture, "
                                 "freeze=False or fused=False)")
            if not fusable:
                warn_unfused(llm.config)
            modules = [one.module for one in llms]
            self.llm_layer = modules[0] if len(modules) == 1 else nn.ModuleList(modules)
            self.llm_rotary = llm.rotary
            for p in self.llm_layer.parameters():
                p.requires_grad_(not freeze)

    def extra_repr(self) -> str:
        if self.llm_config is None:
            return "the SLM alone (no frozen layer)"
        first = self.llm_index[0] if isinstance(self.llm_index, list) else self.llm_index
        layer = self.llm_layer[0] if isinstance(self.llm_layer, nn.ModuleList) else self.llm_layer
        held = next(itertools.chain(layer.parameters(), layer.buffers()), None)
        line = families.describe(self.llm_config, first,
                                 held.device.type if held is not None else None,
                                 layer.kernels if self.fused else "auto")
        if is_fusable(self.llm_config) and not self.fused:
            line += " -- run unfused here (fused=False or freeze=False)"
        return f"frozen layer: {line}"

    def _sentence_vectors(self, slm_inputs):
        mode = self.slm_mode(slm_inputs)
        if mode is None:
            return super()._sentence_vectors(slm_inputs)
        return packed_slm.first_token_states(self.slm, slm_inputs["input_ids"],
                                             slm_inputs["attention_mask"],
                                             slm_inputs.get("token_type_ids"),
                                             pack=mode == "packed")

    def slm_mode(self, slm_inputs: dict) -> str | None:
        """How a classification batch's sentence vectors are computed: "packed" (the real tokens
        only: eager, and compiled by inference.compile_model), "padded" (the padded layout, the
        last layer for the first tokens only: static shapes, what torch.compile traces when
        Dynamo may not capture a data-dependent size, as with CUDA graphs) or None (the SLM's
        own forward, always for a pooling other than "cls": packing computes the first
        token's state alone). ``slm_inputs``: input_ids, attention_mask, inputs_embeds."""
        if (self._packed_slm is False or self.task != "classification"
                or self.pooling != "cls"):
            return None
        ids = slm_inputs.get("input_ids")
        if self._packed_slm == "auto" and (ids is None
                                           or not packed_slm.packs_by_default(ids.device.type)):
            return None
        reason = (packed_slm.unsupported(self.slm)
                  or packed_slm.unsupported_inputs(ids, slm_inputs.get("attention_mask"),
                                                   slm_inputs.get("inputs_embeds")))
        if reason:
            if self._packed_slm is True:
                raise ValueError(f"packed_slm=True, but this batch cannot be packed: {reason}")
            return None
        if torch.compiler.is_compiling() and not packed_slm.packing_traceable():
            return "padded"  # packing's data-dependent token count would break the one graph
        return "packed"

    def _run_layer(self, h, mask):
        if self.fused:
            return self.llm_layer(h, mask)
        return run_hf_layers(self.llm_layer, self.llm_rotary, h, mask)
