"""pifi_fast.frozen.blocks and saved: the block kinds, what forward keeps for backward (against
saved_widths, the answer the custom op's fake is built from), the fake against the real op, and
the MLP's token chunks."""
import pytest
import torch
from helpers import tiny_llm

from pifi_fast.frozen import blocks, custom_op
from pifi_fast.frozen.blocks import BlockKind, block_kind, saved_widths
from pifi_fast.frozen.saved import OP_FIELDS, Saved, field_dtype
from pifi_fast.layer import FrozenLlamaLayer
from pifi_fast.loading import random_layer

# one family per block kind
KINDS = {"llama": BlockKind.SEQUENTIAL, "gemma2": BlockKind.SANDWICH,
         "falcon": BlockKind.PARALLEL}


def _layer(kind, **options):
    llm = random_layer(tiny_llm(kind), -1, dtype=torch.float32, seed=3)
    return FrozenLlamaLayer.from_hf(llm.module, llm.config, llm.rotary, kernels="torch",
                                    **options)


def test_block_kind_reads_the_spec_and_refuses_an_unknown_kind():
    for kind, want in KINDS.items():
        assert block_kind(_layer(kind).spec) is want
    with pytest.raises(ValueError):
        block_kind(type("Spec", (), {"block": "diagonal"})())


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("recompute", ["none", "mlp"])
@pytest.mark.parametrize("needs_grad", [True, False])
@pytest.mark.parametrize("seq", [1, 6])
def test_forward_keeps_what_saved_widths_says(kind, recompute, needs_grad, seq):
    layer = _layer(kind, recompute=recompute)
    x = torch.randn(3, seq, layer.hidden_size)
    flat, positions, _, run = layer.pack(x, None, None, needs_grad)
    _, saved, _ = blocks.forward(run, flat, positions)
    widths = saved_widths(layer, seq, needs_grad)
    assert set(widths) == set(Saved._fields)
    t = flat.shape[0]
    for name, tensor in saved._asdict().items():
        width = widths[name]
        want = (0,) if width is None else (t,) if width == 0 else (t, width)
        assert tuple(tensor.shape) == want, name
        if width is not None:
            assert tensor.dtype == field_dtype(name, flat.dtype), name


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("needs_grad", [True, False])
def test_the_custom_ops_fake_matches_its_outputs(kind, needs_grad):
    """The fake (shapes for torch.compile) and the real op agree on every output, padded batch
    included: the saved rows are sized for every position."""
    layer = _layer(kind)
    x = torch.randn(3, 5, layer.hidden_size)
    mask = torch.tensor([[1] * 5, [1] * 2 + [0] * 3, [1] * 4 + [0]])
    lid = custom_op.layer_id(layer)
    real = torch.ops.pifi_fast.frozen_layer(x, mask, None, lid, needs_grad)
    fake = custom_op.frozen_layer_fake(x, mask, None, lid, needs_grad)
    assert len(real) == len(fake) == 1 + len(OP_FIELDS)
    for name, r, f in zip(("out",) + OP_FIELDS, real, fake):
        assert (r.shape, r.dtype) == (f.shape, f.dtype), name


@pytest.mark.parametrize("t,most", [(1, 4), (10, 4), (12, 4), (7, 100), (1000, 256)])
def test_chunks_cover_the_tokens_in_near_equal_pieces(t, most):
    run = type("Run", (), {"chunk_tokens": most})()
    ranges = blocks.chunks(run, t)
    assert ranges[0][0] == 0 and ranges[-1][1] == t
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    sizes = [e - s for s, e in ranges]
    assert max(sizes) <= most and len(set(sizes[:-1])) <= 1 and sizes[-1] <= sizes[0]
    assert len(ranges) == -(-t // most)  # as few chunks as the bound allows
