"""W2, the frozen layer in CLS mode (one token per row), forward + backward: its cases and how
each is built."""
from __future__ import annotations

import functools

import torch

from pifi_fast.bench.common import Case, layer_fn, layers_for
from pifi_fast.bench.timing import saved_activation_bytes


def cases(sizes, device, dtype) -> list[Case]:
    impls = sizes["impls"]
    out = []
    for shape in sizes.get("cls_shapes", sizes["shapes"]):
        for size in sizes["cls"]:
            if device.type == "cpu" and shape == "llama-3.1-8b" and size > 32:
                continue
            for impl in impls:
                if impl in ("hf_eager", "hf_compile", "pifi_fast_mlp", "pifi_fast_tgemm"):
                    continue  # one key: the attention kernel choice is irrelevant in CLS mode
                out.append(Case("W2", "cls fwd+bwd", shape, size, impl, functools.partial(
                    _build_w2, shape, size, impl, device, dtype)))
    return out


def _build_w2(shape, size, impl, device, dtype):
    layers, why = layers_for(shape, impl, device, dtype)
    if why:
        return {"skip": why}
    layer_dtype = torch.float32 if impl == "authors" else dtype
    x = torch.randn(size, 1, layers["config"].hidden_size, device=device, dtype=layer_dtype)
    fn, forward = layer_fn(layers, impl, x, None, backward=True)
    key = impl if impl.startswith("pifi_fast") else "authors" if impl == "authors" else "hf"
    weights = list(layers[key].parameters())  # as stored: 8-bit layers stream half the bytes
    weight_bytes = sum(p.numel() * p.element_size() for p in weights)
    return {"fn": fn, "tokens": size, "dtype": str(layer_dtype).replace("torch.", ""),
            "saved_bytes_per_token": saved_activation_bytes(forward, weights) / size,
            # CLS mode streams every frozen weight once forward and once backward.
            "bytes_moved": 2 * weight_bytes}
