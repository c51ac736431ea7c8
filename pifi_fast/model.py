"""pifi_fast.PiFiModel: the drop-in fast PiFi. Same constructor, state_dict keys and outputs as
pifi_fast.reference.PiFiModel; the frozen LLM layer is a FrozenLlamaLayer (one autograd node,
input gradient only) for the fused architectures, and the LLM's own layer otherwise; several
plugged layers are a FrozenLayerStack (one unpadding for them all) or an nn.ModuleList.
"""
from __future__ import annotations

from torch import nn

from pifi_fast.hf_layer import run_hf_layers
from pifi_fast.layer import FrozenLayerStack, FrozenLlamaLayer, is_fusable
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
    """

    def _make_layer(self, llms, freeze: bool, fused: bool | None = None, **fused_options):
        llm = llms[0]
        fusable = is_fusable(llm.config)
        if fused and not fusable:
            raise ValueError(f"fused=True, but model_type {llm.config.model_type!r} has no fused "
                             "path (fused: llama, mistral, qwen2, qwen3)")
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
            # several layers: one unpadding for the whole stack (pifi_fast.layer)
            self.llm_layer = layers[0] if len(layers) == 1 else FrozenLayerStack(layers)
        else:
            defaults = (None, "auto", "none", "cublas")
            if any(v not in defaults for v in fused_options.values()):
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

    def _run_layer(self, h, mask):
        if self.fused:
            return self.llm_layer(h, mask)
        return run_hf_layers(self.llm_layer, self.llm_rotary, h, mask)
