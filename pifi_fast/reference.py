"""The reference PiFi: exactly the authors' computation, built only from Hugging Face modules
(the LLM's own decoder-layer and rotary classes). It is the yardstick for every speed-up:
pifi_fast.PiFiModel must match it, and the benchmarks time against it.

Differences from the authors' code, both switchable: padding is masked inside the layer
(attend_to_padding=True reproduces their all-ones mask), and attention is explicitly
bidirectional (their code relied on Transformers 4.x treating a missing mask as non-causal).
"""
from __future__ import annotations

from torch import nn

from pifi_fast.hf_layer import run_hf_layers
from pifi_fast.pifi_base import PiFiBase


class PiFiModel(PiFiBase):
    """PiFi with the LLM's own Hugging Face decoder layer(s) (plain autograd)."""

    def _make_layer(self, llms, freeze: bool, fused: bool | None = None):
        # `fused` is accepted (and ignored) so that a pifi_fast checkpoint saved with it loads
        # here too: the reference always runs the Hugging Face layer.
        modules = [llm.module for llm in llms]
        self.llm_layer = modules[0] if len(modules) == 1 else nn.ModuleList(modules)
        self.llm_rotary = llms[0].rotary
        for p in self.llm_layer.parameters():
            p.requires_grad_(not freeze)

    def _run_layer(self, h, mask):
        return run_hf_layers(self.llm_layer, self.llm_rotary, h, mask)
