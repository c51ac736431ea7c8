"""W1, the frozen layer in full-sequence mode: its cases and how each is built.

Forward, and forward + input-gradient backward; dense (rows of 512) and with real padding (SST-2
sentence lengths, padded to the batch max; the authors' setup pads to 100), per LLM shape.
"""
from __future__ import annotations

import functools

import torch

from pifi_fast import attention as attn
from pifi_fast.frozen.elementwise import elementwise_impl
from pifi_fast.bench.common import (AUTHORS_MAX_LENGTH, Case, layer_fn, layers_for,
                                    llm_config, sst2_lengths)
from pifi_fast.bench.timing import saved_activation_bytes


def cases(sizes, device, dtype) -> list[Case]:
    impls = sizes["impls"]
    out = []
    family = sizes.get("family_shapes", [])
    for shape in sizes["shapes"] + family:
        cfg = llm_config(shape)
        prefix = "family_" if shape in family else ""
        for backward in (False, True):
            for padded in (False, True):
                label = ("fwd+bwd" if backward else "fwd") + (" padded" if padded else " dense")
                for size in sizes[prefix + ("padded" if padded else "dense")]:
                    for impl in impls:
                        if impl == "authors" and not padded:
                            continue  # the authors' setup pads to 100: only for real sentences
                        if impl == "pifi_fast_mlp" and not backward:
                            continue  # the memory mode only changes what backward keeps
                        out.append(Case("W1", label, shape, size, impl, functools.partial(
                            _build_w1, shape, size, padded, backward, impl, device, dtype,
                            cfg.hidden_size)))
    return out


def _padded_batch(lengths, hidden, device, dtype, pad_to=None, gen_seed=0):
    s = pad_to or max(lengths)
    gen = torch.Generator().manual_seed(gen_seed)
    x = torch.randn(len(lengths), s, hidden, generator=gen).to(device=device, dtype=dtype)
    mask = torch.zeros(len(lengths), s, dtype=torch.bool, device=device)
    for i, n in enumerate(lengths):
        mask[i, :min(n, s)] = True
    return x, mask


def _fused_path(layer, x) -> str:
    """Which kernels and attention backend the fused layer runs on x, for the result row."""
    kernels = elementwise_impl(x, layer.kernels).name
    backend = attn.select_backend(x.new_empty(1), layer.attention)
    return (f"kernels={kernels}, attention={backend}, recompute={layer.recompute}, "
            f"weights={layer.weights}")


def _build_w1(shape, size, padded, backward, impl, device, dtype, hidden):
    layers, why = layers_for(shape, impl, device, dtype)
    if why:
        return {"skip": why}
    if padded:
        lengths = sst2_lengths(size, seed=size)
        pad_to = AUTHORS_MAX_LENGTH if impl == "authors" else None
        lengths = [min(n, AUTHORS_MAX_LENGTH) for n in lengths] if impl == "authors" else lengths
        layer_dtype = torch.float32 if impl == "authors" else dtype
        x, mask = _padded_batch(lengths, hidden, device, layer_dtype, pad_to)
        tokens = sum(lengths)
    else:
        layer_dtype = dtype
        x, mask = _padded_batch([512] * max(1, size // 512) if size >= 512 else [size], hidden,
                                device, dtype)
        mask = None
        tokens = x.shape[0] * x.shape[1]
    fn, forward = layer_fn(layers, impl, x, mask, backward)
    weights = list(layers[impl if impl.startswith("pifi_fast") or impl == "authors" else "hf"]
                   .parameters())
    out = {"fn": fn, "tokens": tokens, "padded_tokens": x.shape[0] * x.shape[1],
           "dtype": str(layer_dtype).replace("torch.", "")}
    if forward is not None:
        out["saved_bytes_per_token"] = saved_activation_bytes(forward, weights) / tokens
    if impl.startswith("pifi_fast"):
        out["path"] = _fused_path(layers[impl], x)
    return out
