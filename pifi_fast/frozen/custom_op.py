"""The frozen layer as torch.library custom ops, for torch.compile, and the registry of live
layers they find their weights through.

Under torch.compile the whole layer (unpadding with its host sync, every data-dependent size,
the kernels and GEMMs) is the opaque op pifi_fast::frozen_layer, so the model around it traces
into one graph. The backward is a second op fed by what the forward returns besides the output:
the Saved fields of OP_FIELDS (x is the op's own input, re-packed in backward from the mask).
Those hold the T real tokens in their first T rows of B*S: static shapes, so a plain
torch.compile needs no data-dependent sizes (the price, in compiled mode with padding only: the
saved tensors are sized for every position and copied there once). Frozen weights are read
from the layer object, found through a registry of live layers by an integer id, which each
layer object gets when it is built, copied or unpickled (register_layer): an int attribute
Dynamo reads as a constant of the graph (a layer object itself is no constant to torch 2.11's
Dynamo).
"""
from __future__ import annotations

import itertools
import weakref
from typing import Optional

import torch

from pifi_fast.frozen import blocks, saved as saved_
from pifi_fast.frozen.saved import fake_op_outputs, from_op, op_outputs

_LAYER_IDS = itertools.count()
_LAYERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def register_layer(layer) -> int:
    """Give a layer object its own registry id (the layer calls it when it is built, and when
    it is copied or unpickled: a copy, perhaps with other options, never runs as its
    original)."""
    lid = next(_LAYER_IDS)
    _LAYERS[lid] = layer
    layer._op_id = lid
    return lid


def layer_id(layer) -> int:
    """The layer's registry id; in eager mode also checked (a layer object made some way that
    bypassed __init__ and __setstate__ gets its own id here; torch.compile reads the attribute)."""
    lid = layer._op_id
    if not torch.compiler.is_compiling() and _LAYERS.get(lid) is not layer:
        lid = register_layer(layer)
    return lid


def lookup(lid: int):
    """The live layer with registry id `lid`."""
    layer = _LAYERS.get(lid)
    if layer is None:
        raise RuntimeError(f"pifi_fast::frozen_layer: layer {lid} no longer exists")
    return layer


def frozen_layer_op(layer, x, attention_mask, position_ids):
    """The layer through pifi_fast::frozen_layer (the path torch.compile traces), or through
    pifi_fast::frozen_layer_dense when nothing in the call needs the host: no padding mask to
    unpad (none given, or one token per row as in [CLS] mode) and no position ids to bound."""
    mask = None if attention_mask is None or x.shape[1] == 1 else attention_mask
    needs_grad = torch.is_grad_enabled() and x.requires_grad
    op = (torch.ops.pifi_fast.frozen_layer if mask is not None or position_ids is not None
          else torch.ops.pifi_fast.frozen_layer_dense)
    return op(x, mask, position_ids, layer_id(layer), needs_grad)[0]


def _frozen_layer(x: torch.Tensor, mask: Optional[torch.Tensor],
                  position_ids: Optional[torch.Tensor], layer_id: int,
                  needs_grad: bool) -> list[torch.Tensor]:
    layer = lookup(layer_id)
    flat, positions, seg, run = layer.pack(x, mask, position_ids, needs_grad)
    out, saved, _ = blocks.forward(run, flat, positions)
    return [layer.unpack(x, out, seg)] + op_outputs(saved, x.shape[0] * x.shape[1])


def frozen_layer_fake(x, mask, position_ids, layer_id, needs_grad):
    """The op's outputs as torch.compile sees them: their shapes and dtypes, from saved_widths,
    the same answer forward follows."""
    layer = lookup(layer_id)
    b, s, _ = x.shape
    widths = blocks.saved_widths(layer, s, needs_grad)
    return [torch.empty_like(x)] + fake_op_outputs(x, b * s, widths)  # rows: every position


def _frozen_layer_backward(dout: torch.Tensor, x: torch.Tensor, mask: Optional[torch.Tensor],
                           position_ids: Optional[torch.Tensor], rstd1: torch.Tensor,
                           x2: torch.Tensor, rstd2: torch.Tensor, qkv: torch.Tensor,
                           gu: torch.Tensor, extra: torch.Tensor, extra_stats: torch.Tensor,
                           layer_id: int) -> torch.Tensor:
    # (the parameters after position_ids are saved_.OP_FIELDS, in order: torch.library reads
    # the schema from this signature, so they are spelled out)
    layer = lookup(layer_id)
    flat, positions, seg, run = layer.pack(x, mask, position_ids, True)
    saved = from_op(flat, positions, (rstd1, x2, rstd2, qkv, gu, extra, extra_stats))
    b, s, h = x.shape
    d = dout.reshape(b * s, h)
    if seg.indices is not None:
        d = d.index_select(0, seg.indices)
    with torch.autocast(dout.device.type, enabled=False):
        dx = blocks.input_grad(run, d.to(flat.dtype).contiguous(), saved)
    if seg.indices is not None:  # padding passes its gradient straight through
        return dout.reshape(b * s, h).index_copy(0, seg.indices, dx.to(dout.dtype)).view(b, s, h)
    return dx.view(b, s, h).to(dout.dtype)


def _frozen_layer_backward_fake(dout, x, mask, position_ids, rstd1, x2, rstd2, qkv, gu, extra,
                                extra_stats, layer_id):
    return torch.empty_like(x)


def _frozen_layer_setup(ctx, inputs, output):
    x, mask, position_ids, layer_id, _ = inputs
    ctx.layer_id = layer_id
    ctx.save_for_backward(x, mask, position_ids, *output[1:])


def _register_layer_op(name: str, tags: tuple):
    """pifi_fast::<name> and pifi_fast::<name>_backward: the same Python bodies, own tags."""
    forward = torch.library.custom_op(f"pifi_fast::{name}", _frozen_layer, mutates_args=(),
                                      tags=tags)
    forward.register_fake(frozen_layer_fake)
    backward = torch.library.custom_op(f"pifi_fast::{name}_backward", _frozen_layer_backward,
                                       mutates_args=(), tags=tags)
    backward.register_fake(_frozen_layer_backward_fake)

    def grad(ctx, grads):
        x, mask, position_ids, *saved = ctx.saved_tensors
        dx = backward(grads[0], x, mask, position_ids, *saved, ctx.layer_id)
        return dx, None, None, None, None

    forward.register_autograd(grad, setup_context=_frozen_layer_setup)


assert saved_.OP_FIELDS == ("rstd1", "x2", "rstd2", "qkv", "gu", "extra", "extra_stats"), \
    "the backward op's parameters above follow OP_FIELDS"
# Two registrations of one layer op, told apart for CUDA graphs (mode="reduce-overhead"):
# frozen_layer unpads a padding mask or bounds position ids, each a host sync, which a CUDA graph
# capture cannot hold; it is tagged cudagraph_unsafe, so Inductor's graph partition runs it
# eagerly between captured graphs of the model around it. frozen_layer_dense has no host sync
# (no mask to unpad: [CLS] mode, dense batches) and is captured with the rest of the model.
_register_layer_op("frozen_layer", (torch.Tag.cudagraph_unsafe,))
_register_layer_op("frozen_layer_dense", ())
