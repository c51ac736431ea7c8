"""The frozen layer as one autograd node on packed tokens: FrozenLayerFunction, and LayerRun,
what one call needs besides x. Per-call state lives on the call's LayerRun (immutable) and on
autograd's ctx, never on the layer module.

Saved between forward and backward (memory modes; pifi_fast.frozen.saved lists the tensors):
    recompute="none"  x, x2, the rotated qkv, gu (all in the compute dtype), the two fp32 1/rms
                      vectors and the int64 positions: at the Llama-3.1-8B shape in bf16
                      8192 + 8192 + 12288 + 57344 + 8 + 8 = 86,032 B per token.
    recompute="mlp"   the same without gu (re-made in backward from x2 with one extra gate/up
                      GEMM): 28,688 B per token.
On a GPU attention keeps nothing of its own: backward re-runs the attention forward under
autograd and differentiates it, which costs one attention forward and lets every backend
(flash-attn, PyTorch varlen, SDPA) be used unchanged. On a CPU (eager, recompute="none") the
attention's autograd graph is kept from forward instead (KEEP_ATTENTION_GRAPH), because there
the re-run forward is a visible share of the layer's time and memory rarely binds.
"""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any

import torch

from pifi_fast.frozen import blocks
from pifi_fast.frozen.elementwise import elementwise_impl
from pifi_fast.frozen.linear import LinearPath
from pifi_fast.frozen.options import Kernels, effective_kernels
from pifi_fast.frozen.saved import Saved
from pifi_fast.kernels import common as kernels

# Device types on which the eager layer keeps attention's autograd graph for backward instead of
# re-running the attention forward there (recompute="none" only). The custom op that
# torch.compile traces cannot carry a graph from forward to backward: it always recomputes.
KEEP_ATTENTION_GRAPH = {"cpu"}


@dataclasses.dataclass(frozen=True)
class LayerRun:
    """What one call of the layer needs besides x: the layer, the segments, the RoPE tables,
    the options (kernels, recompute, attention backend, gemm, chunk_tokens, causal), whether a
    backward will follow (needs_grad), and what the options resolve to on x's device: the
    elementwise table (impl) and the projections' path (linear). Build it with start()."""

    layer: Any = None
    segments: Any = None
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    kernels: str = "auto"
    recompute: str = "none"
    attention: str | None = None
    gemm: str = "cublas"
    chunk_tokens: int | None = None
    causal: bool = False
    needs_grad: bool = False
    impl: SimpleNamespace | None = None
    linear: LinearPath = LinearPath()

    @classmethod
    def start(cls, x: torch.Tensor, **fields) -> LayerRun:
        """A run for tensor x: the kernels option resolved on x's device (impl_on's error for
        kernels="triton" where Triton cannot run) and the projections' path from it."""
        run = cls(**fields)
        impl = elementwise_impl(x, run.kernels)
        forced = effective_kernels(run.kernels) == Kernels.TORCH
        return dataclasses.replace(run, impl=impl, linear=LinearPath(
            gemm=run.gemm, triton=impl.name == "triton", twins_forced=forced))

    def for_layer(self, layer) -> LayerRun:
        """The same call for another layer of a stack (one LLM, the same options)."""
        return dataclasses.replace(self, layer=layer)


class FrozenLayerFunction(torch.autograd.Function):
    """The whole frozen decoder layer on packed tokens as one autograd node; backward returns
    only dx. apply(x (T, H), positions (T,), run: LayerRun)."""

    @staticmethod
    def forward(ctx, x, positions, run):
        if run.gemm == "triton" and not kernels.can_run(x):
            raise RuntimeError("gemm='triton' needs triton and a CUDA tensor (or Triton's "
                               f"interpreter); got a {x.device.type} tensor. Use gemm='cublas'.")
        keep = (run.needs_grad and run.recompute == "none"
                and x.device.type in KEEP_ATTENTION_GRAPH)
        out, saved, graph = blocks.forward(run, x, positions, keep_attention=keep)
        ctx.run = run
        ctx.attention_graph = graph  # usable for one backward
        ctx.save_for_backward(*saved)
        return out

    @staticmethod
    def backward(ctx, dout):
        # the layer computes in its own dtype (the mixed-precision rule of
        # pifi_fast.frozen.module), also when backward is called inside an autocast region
        with torch.autocast(dout.device.type, enabled=False):
            saved = Saved(*ctx.saved_tensors)
            graph, ctx.attention_graph = ctx.attention_graph, None
            dx = blocks.input_grad(ctx.run, dout.to(saved.x.dtype).contiguous(), saved, graph)
        return dx, None, None
