"""The frozen layer's tensors as checkpoints hold them: the Hugging Face key layout of its merged
q/k/v and gate/up weights (pifi_fast.frozen.checkpoint says which keys, per family), Falcon's
q/k/v rows, and the 8-bit storage of the projections with their scales.

FrozenWeights is a mixin of the layer (pifi_fast.frozen.module): its state_dict reads and writes
the Hugging Face keys, so a checkpoint of the reference model loads into it and back.
"""
from __future__ import annotations

import torch
from torch import nn

from pifi_fast.frozen.linear import QuantWeight
from pifi_fast.kernels import quant as _quant

# The projections that 8-bit modes quantize, and their storage per mode: int8 everywhere, or fp8
# with q/k/v in int8 (attention's projections dominate FP8's error, so they keep int8's finer
# steps; docs/quantization.md has the measured errors). "gate_up" is the MLP's
# input projection: [gate | up] for a gated MLP, up alone for Falcon's.
PROJECTIONS = ("qkv", "o", "gate_up", "down")
STORAGE = {"int8": dict.fromkeys(PROJECTIONS, "int8"),
           "int8-channel": dict.fromkeys(PROJECTIONS, "int8"),
           "fp8": {"qkv": "int8", "o": "fp8", "gate_up": "fp8", "down": "fp8"}}
# Modes whose int8 projections keep one scale per output channel (the scale group is the whole
# row) instead of pifi_fast.kernels.quant.group_size's 128 inputs: what CPU int8 GEMMs take
# (torch._weight_int8pack_mm, pifi_fast.frozen.linear.int8_cpu_linear).
PER_CHANNEL = frozenset({"int8-channel"})


class FrozenWeights:
    """The layer's projections by name, and its state dict in the Hugging Face key layout (the
    layer sets _merged, _single, _qkv_rows and _qkv_rows_back when it is built)."""

    def _prequantized(self, quantized: dict) -> dict[str, torch.Tensor]:
        """State-dict entries (key, key + "_scale") for the int8-stored projections whose every
        part the source holds in 8 bits (a merged projection needs all of its parts). Not for
        the per-channel modes: GGUF Q8_0's 32-input blocks would keep their groups, which the CPU
        int8 kernel does not take; those re-quantize the (dequantized) module weights instead."""
        out = {}
        if self.weights == "auto" or self.weights in PER_CHANNEL:
            return out
        for name in PROJECTIONS:
            if STORAGE[self.weights][name] != "int8":
                continue
            attr = name + "_weight"
            keys = self._merged.get(attr) or (self._single[attr],)
            if all(k in quantized for k in keys):
                for k in keys:
                    out[k], out[k + "_scale"] = quantized[k]
        return out

    def load_hf_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.load_state_dict(state_dict, strict=True)

    # -- the Hugging Face key layout in state_dict ------------------------------------------------
    def _hf_parts(self):
        parts = {}
        sizes = {"qkv": [self.q_size, self.kv_size, self.kv_size],
                 "gate_up": [self.intermediate] * 2}
        for merged, hf_keys in self._merged.items():
            p = getattr(self, merged)
            if p is not None:
                chunks = p.split(sizes[merged.rsplit("_", 1)[0]], dim=0)
                parts.update(zip(hf_keys, chunks))
                scale = getattr(self, merged + "_scale", None)
                if scale is not None:  # 8-bit rows and their scales split alike
                    split = scale.split(sizes[merged.rsplit("_", 1)[0]], dim=0)
                    parts.update(zip((k + "_scale" for k in hf_keys), split))
        for name, hf_key in self._single.items():
            p = getattr(self, name)
            if p is not None:
                scale = getattr(self, name + "_scale", None)
                if name.startswith("qkv_") and self._qkv_rows is not None:
                    back = self._qkv_rows_back  # [q | k | v] -> Falcon's layout
                    p, scale = p[back.to(p.device)], None if scale is None else scale[back]
                parts[hf_key] = p
                if scale is not None:
                    parts[hf_key + "_scale"] = scale
        return parts

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for key, t in self._hf_parts().items():
            destination[prefix + key] = t if keep_vars else t.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        expected = self._hf_parts()
        with torch.no_grad():
            for merged, hf_keys in self._merged.items():
                target = getattr(self, merged)
                if target is None:
                    continue
                got = [state_dict.get(prefix + k) for k in hf_keys]
                missing_keys.extend(prefix + k for k, t in zip(hf_keys, got) if t is None)
                if any(t is None for t in got):
                    continue
                scales = [state_dict.get(prefix + k + "_scale") for k in hf_keys]
                scale = torch.cat(scales, 0) if all(t is not None for t in scales) else None
                self._copy_weight(prefix, merged, merged, torch.cat(got, 0), scale, error_msgs)
            for name, hf_key in self._single.items():
                target = getattr(self, name)
                if target is None:
                    continue
                t = state_dict.get(prefix + hf_key)
                scale = state_dict.get(prefix + hf_key + "_scale")
                if t is None:
                    missing_keys.append(prefix + hf_key)
                    continue
                if name.startswith("qkv_") and self._qkv_rows is not None:
                    rows = self._qkv_rows  # Falcon's layout -> [q | k | v]
                    t, scale = t[rows.to(t.device)], None if scale is None else scale[rows]
                self._copy_weight(prefix, name, hf_key, t, scale, error_msgs)
        if strict:
            for key in state_dict:
                if key.startswith(prefix):
                    rest = key[len(prefix):]
                    if "." in rest and rest.split(".", 1)[0] == "rotary":
                        continue
                    if rest not in expected:
                        unexpected_keys.append(key)

    def _copy_weight(self, prefix, name, label, value, scale, error_msgs):
        """Copy one (merged) tensor into attribute `name` (`label`: its key, for messages). An
        8-bit projection takes either its stored 8-bit rows with their scales (a saved 8-bit
        layer reloads bit for bit) or a float weight, which is quantized here, once."""
        target = getattr(self, name)
        target_scale = getattr(self, name + "_scale", None)
        if target_scale is None:
            if scale is not None:
                error_msgs.append(f"{prefix}{label}: the checkpoint holds an 8-bit weight with "
                                  f"scales, but this layer has weights={self.weights!r}; build it "
                                  "with the checkpoint's weights= mode")
                return
            self._copy_checked(prefix, label, target, value, error_msgs)
            return
        if scale is None:
            if not value.is_floating_point() or value.dtype == _quant.FP8:
                error_msgs.append(f"{prefix}{label}: an 8-bit weight without its scales")
                return
            storage = "fp8" if target.dtype == _quant.FP8 else "int8"
            group = target.shape[1] // target_scale.shape[1]
            value, scale = _quant.quantize(value.to(target.device), storage,
                                           None if storage == "fp8" else group)
        elif value.dtype != target.dtype:
            error_msgs.append(f"{prefix}{label}: the checkpoint stores {value.dtype}, this layer "
                              f"(weights={self.weights!r}) stores {target.dtype}")
            return
        elif (target.dtype == torch.int8 and scale.dim() == 2 and scale.shape[1] > 0
              and scale.shape[0] == target_scale.shape[0] and scale.shape != target_scale.shape
              and target.shape[1] % scale.shape[1] == 0):
            # int8 with another scale group (GGUF Q8_0's 32 inputs, or a layer saved with them):
            # kept as stored, so the weights are the file's, bit for bit (an "int8-channel"
            # layer given grouped scales keeps them too; on the CPU its projections then take
            # the dequantizing twin, not the int8 kernel, which wants one scale per channel)
            target_scale = nn.Parameter(torch.empty(scale.shape, dtype=torch.float32,
                                                    device=target_scale.device),
                                        requires_grad=False)
            setattr(self, name + "_scale", target_scale)
        self._copy_checked(prefix, label, target, value, error_msgs)
        self._copy_checked(prefix, label + "_scale", target_scale, scale, error_msgs)

    def _copy_checked(self, prefix, name, target, value, error_msgs):
        if value.shape != target.shape:
            error_msgs.append(
                f"size mismatch for {prefix}{name}: checkpoint has {tuple(value.shape)}, the layer "
                f"(hidden {self.hidden_size}, heads {self.num_heads}/{self.num_kv_heads}, "
                f"head_dim {self.head_dim}, mlp {self.intermediate}) needs "
                f"{tuple(target.shape)}"
            )
            return
        if target.is_meta:
            # Built on the meta device: take the loaded tensor as the storage.
            setattr(self, _attr_of(self, target), nn.Parameter(
                value.to(target.dtype), requires_grad=False))
        else:
            target.copy_(value)

    def weight(self, name: str):
        """A projection's weight ("qkv", "o", "gate_up", "down"): the dense tensor, or the
        8-bit QuantWeight (q, scale)."""
        w = getattr(self, f"{name}_weight")
        scale = getattr(self, f"{name}_weight_scale", None)
        return w if scale is None else QuantWeight(w, scale)

    def v_weight_and_bias(self):
        start = self.q_size + self.kv_size
        w = self.weight("qkv")
        w = w[start:] if isinstance(w, torch.Tensor) else QuantWeight(w.q[start:],
                                                                      w.scale[start:])
        b = None if self.qkv_bias is None else self.qkv_bias[start:]
        return w, b

    def weight_bytes(self) -> int:
        """Bytes of the frozen tensors as stored (the 8-bit modes count their scales)."""
        return sum(p.numel() * p.element_size() for p in self.parameters())


def _attr_of(module: nn.Module, param: torch.Tensor) -> str:
    for name, p in module.named_parameters(recurse=False):
        if p is param:
            return name
    raise KeyError("parameter not found on module")
