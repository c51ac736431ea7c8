"""FrozenLlamaLayer: one frozen decoder layer with merged weights, of any family that
pifi_fast.families describes with a LayerSpec.

Fused architectures: Llama (any rope scaling that Transformers' rotary init supports), Mistral,
Qwen2 (q/k/v bias), Qwen3 (per-head q/k RMSNorm), Gemma (RMSNorm with (1 + w), GeGLU), Gemma-2
(four norms per block, soft-capped scores, query_pre_attn_scalar), Gemma-3 (Gemma-2's block with
q/k norms and a rotary per layer type) and Falcon (LayerNorm, the parallel block, multi-query or
grouped KV, a plain GELU MLP). The layer keeps merged QKV and gate/up weights for speed but
reads and writes the Hugging Face key layout in its state_dict, so a checkpoint of the reference
model loads into it and back. (The class keeps its first family's name: checkpoints and user
code name it.)
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from pifi_fast.attention import BACKENDS, Segments
from pifi_fast.hf_layer import layer_config_and_index
from pifi_fast.families import (FUSED_MODEL_TYPES, attention_window, layer_spec,
                                layer_type, make_rotary, rotary_embeddings)
from pifi_fast.kernels import quant as _quant
from pifi_fast.ops import (GEMM_CHOICES, KERNEL_CHOICES, RECOMPUTE_CHOICES, WEIGHT_CHOICES,
                           FrozenLayerFunction, LayerRun, QuantWeight, frozen_layer_op,
                           register_layer)

# The projections that 8-bit modes quantize, and their storage per mode: int8 everywhere, or fp8
# with q/k/v in int8 (attention's projections dominate FP8's error: measured on SmolLM2's last
# layer, fp8 everywhere gives 9.5 % relative error on the layer's update, int8 q/k/v + fp8 for o,
# gate/up and down 5.9 %; with per-token fp8 activations 13 % and 8.0 %). "gate_up" is the MLP's
# input projection: [gate | up] for a gated MLP, up alone for Falcon's.
PROJECTIONS = ("qkv", "o", "gate_up", "down")
STORAGE = {"int8": dict.fromkeys(PROJECTIONS, "int8"),
           "int8-channel": dict.fromkeys(PROJECTIONS, "int8"),
           "fp8": {"qkv": "int8", "o": "fp8", "gate_up": "fp8", "down": "fp8"}}
# Modes whose int8 projections keep one scale per output channel (the scale group is the whole
# row) instead of pifi_fast.kernels.quant.group_size's 128 inputs: what CPU int8 GEMMs take
# (torch._weight_int8pack_mm, pifi_fast.ops.int8_cpu_linear).
PER_CHANNEL = frozenset({"int8-channel"})


def key_layout(spec) -> tuple[dict[str, tuple[str, ...]], dict[str, str]]:
    """(merged, single) for a LayerSpec: merged parameter -> the Hugging Face keys it is the
    row-wise concatenation of (in this order); single parameter -> its one key."""
    keys = spec.key_map
    merged, single = {}, {}
    suffixes = ("weight", "bias")
    for suffix in suffixes:
        if spec.qkv == "separate":
            merged[f"qkv_{suffix}"] = tuple(f"{keys[p]}.{suffix}" for p in "qkv")
        else:
            single[f"qkv_{suffix}"] = f"{keys['qkv']}.{suffix}"
        if spec.gated:
            merged[f"gate_up_{suffix}"] = (f"{keys['gate']}.{suffix}", f"{keys['up']}.{suffix}")
        else:
            single[f"gate_up_{suffix}"] = f"{keys['up']}.{suffix}"
        for name in ("o", "down"):
            single[f"{name}_{suffix}"] = f"{keys[name]}.{suffix}"
    norms = ["input_norm", "post_norm", "attn_out_norm", "mlp_out_norm"]
    for name in norms + ["q_norm", "k_norm"]:
        if name in keys:
            single[f"{name}_weight"] = f"{keys[name]}.weight"
            if spec.norm == "layer" and name in norms:
                single[f"{name}_bias"] = f"{keys[name]}.bias"
    return merged, single


def falcon_qkv_rows(spec) -> torch.Tensor | None:
    """Row order taking Falcon's fused query_key_value (its spec.qkv layout) to [q | k | v]
    (ours = theirs[rows]); None when they already agree."""
    heads, kv, d = spec.heads, spec.kv_heads, spec.head_dim
    rows = torch.arange((heads + 2 * kv) * d)
    if spec.qkv == "grouped":  # (kv, heads / kv + 2, d): per group its queries, then k, v
        grouped = rows.view(kv, heads // kv + 2, d)
        return torch.cat((grouped[:, :-2].reshape(-1), grouped[:, -2].reshape(-1),
                          grouped[:, -1].reshape(-1)))
    if spec.qkv == "interleaved":  # (heads, 3, d): per head q, k, v
        per_head = rows.view(heads, 3, d)
        return torch.cat([per_head[:, i].reshape(-1) for i in range(3)])
    return None


# chunk_tokens="auto" on CPU: one fp32 (tokens x 2 * intermediate) temporary at most this large
CPU_CHUNK_BYTES = 128 * 2**20


class FrozenLlamaLayer(nn.Module):
    """A frozen decoder layer whose backward computes only the input gradient, of any family
    pifi_fast.families.layer_spec describes (Llama's kind, Gemma, Gemma-2/3, Falcon; the layer's
    ``spec``). The layer's sliding window (``window``) and soft-capping come from its config.

    forward(hidden_states (B, S, H), attention_mask (B, S) of 1 = token / 0 = padding or None,
    position_ids (B, S) or None for 0..S-1) -> (B, S, H). Attention is bidirectional (or causal
    with ``causal=True``); padding keys are masked. S == 1 takes the exact single-token shortcut
    (no q/k, softmax or RoPE).

    Unpadded execution: with a padding mask, only the real tokens are gathered (packed), every
    kernel, GEMM and the attention run on them, and the result is scattered back. The output at
    a padding position is defined as its input (the layer leaves padding untouched), never
    NaN; its gradient passes straight through.

    Options (attributes, also constructor keywords):
      kernels     "auto" (Triton on CUDA, PyTorch twins elsewhere), "triton", "torch"
      recompute   "none" (save gate/up outputs) or "mlp" (recompute them in backward)
      attention   None (best available) or one of pifi_fast.attention.BACKENDS
      gemm        "cublas" (the compiled frozen_linear op) or "triton" (GEMMs with fused
                  residual / SwiGLU / SwiGLU-backward epilogues; see pifi_fast.ops)
      chunk_tokens  the MLP block runs over this many tokens at a time, so its (tokens x MLP)-
                  sized temporaries stay bounded; "auto" (default): 4096 on CUDA; on CPU
                  (the PyTorch twins there make several fp32 temporaries) as many as keep one
                  (tokens x 2I) fp32 temporary within 128 MiB, at least 256; None: all at once
      causal      False (PiFi's bidirectional attention) or True
      weights     "auto" (the compute dtype), "int8", "int8-channel" or "fp8": the four
                  projection weights are stored in 8 bits once, when the layer is built (see
                  STORAGE and pifi_fast.kernels.quant): "int8" with a scale per output channel
                  and 128 inputs (the GPU default), "int8-channel" with one scale per output
                  channel, which on the CPU runs torch's weight-only int8 GEMM with bf16
                  activations (pifi_fast.ops.int8_cpu_linear; CPU inference), "fp8" e4m3 W8A8
                  with int8 q/k/v; norms, biases, RoPE, attention and the residual stream stay
                  in the compute dtype. The state_dict keeps the Hugging Face keys, the 8-bit
                  tensors under them plus a "<key>_scale" beside each.
    """

    def __init__(self, config, rotary: nn.Module, layer_index: int = -1, dtype=None, device=None,
                 *, kernels: str = "auto", recompute: str = "none", attention: str | None = None,
                 gemm: str = "cublas", chunk_tokens: int | str | None = "auto",
                 causal: bool = False, weights: str = "auto"):
        super().__init__()
        register_layer(self)  # its id for pifi_fast::frozen_layer (see pifi_fast.ops)
        if weights not in WEIGHT_CHOICES:
            raise ValueError(f"weights must be one of {WEIGHT_CHOICES}, got {weights!r}")
        self.weights = weights
        if kernels not in KERNEL_CHOICES:
            raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {kernels!r}")
        if recompute not in RECOMPUTE_CHOICES:
            raise ValueError(f"recompute must be one of {RECOMPUTE_CHOICES}, got {recompute!r}")
        if gemm not in GEMM_CHOICES:
            raise ValueError(f"gemm must be one of {GEMM_CHOICES}, got {gemm!r}")
        if chunk_tokens not in (None, "auto") and (not isinstance(chunk_tokens, int)
                                                   or chunk_tokens < 1):
            raise ValueError(f"chunk_tokens must be a positive int, 'auto' or None, got "
                             f"{chunk_tokens!r}")
        if attention is not None and attention not in BACKENDS:
            raise ValueError(f"attention must be None or one of {BACKENDS}, got {attention!r}")
        self.kernels, self.recompute, self.attention, self.gemm, self.causal = (
            kernels, recompute, attention, gemm, causal)
        self.chunk_tokens = chunk_tokens
        self._rope_cache: dict = {}
        spec = layer_spec(config)
        if spec is None:
            raise ValueError(
                f"FrozenLlamaLayer fuses {FUSED_MODEL_TYPES} (not with ALiBi, and with their own "
                f"activations); got model_type={getattr(config, 'model_type', None)!r}. Use the "
                "Hugging Face layer (fused=False).")
        self.spec = spec
        self.config = config
        self.layer_index = layer_index
        self.hidden_size = spec.hidden
        self.num_heads = spec.heads
        self.num_kv_heads = spec.kv_heads
        self.head_dim = spec.head_dim
        self.num_kv_groups = self.num_heads // self.num_kv_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scaling = spec.scaling
        self.eps = spec.eps
        self.intermediate = spec.intermediate
        self.max_positions = getattr(config, "max_position_embeddings", None)
        if getattr(config, "attention_dropout", 0.0):
            warnings.warn("FrozenLlamaLayer does not apply attention dropout "
                          f"({config.attention_dropout}); the frozen layer runs it as in eval mode")
        inter = spec.intermediate
        kw = {"dtype": dtype, "device": device}

        def frozen(*shape, present=True):
            if not present:
                return None
            return nn.Parameter(torch.empty(*shape, **kw), requires_grad=False)

        h = self.hidden_size
        mlp_in = (2 if spec.gated else 1) * inter
        shapes = {"qkv": (self.q_size + 2 * self.kv_size, h), "o": (h, self.q_size),
                  "gate_up": (mlp_in, h), "down": (h, inter)}

        def projection(name):
            if weights == "auto":
                return frozen(*shapes[name])
            rows, cols = shapes[name]
            storage = STORAGE[weights][name]
            per_channel = storage == "fp8" or weights in PER_CHANNEL
            group = cols if per_channel else _quant.group_size(cols)
            q = torch.empty(rows, cols, device=device,
                            dtype=torch.int8 if storage == "int8" else _quant.FP8)
            scale = torch.empty(rows, cols // group, device=device, dtype=torch.float32)
            setattr(self, f"{name}_weight_scale", nn.Parameter(scale, requires_grad=False))
            return nn.Parameter(q, requires_grad=False)

        keys = spec.key_map
        layer_norm = spec.norm == "layer"
        for norm in ("input_norm", "post_norm", "attn_out_norm", "mlp_out_norm"):
            setattr(self, f"{norm}_weight", frozen(h, present=norm in keys))
            setattr(self, f"{norm}_bias", frozen(h, present=norm in keys and layer_norm))
        self.qkv_weight = projection("qkv")
        self.qkv_bias = frozen(self.q_size + 2 * self.kv_size, present=spec.attn_bias)
        self.o_weight = projection("o")
        self.o_bias = frozen(h, present=spec.o_bias)
        self.gate_up_weight = projection("gate_up")
        self.gate_up_bias = frozen(mlp_in, present=spec.mlp_bias)
        self.down_weight = projection("down")
        self.down_bias = frozen(h, present=spec.mlp_bias)
        self.q_norm_weight = frozen(self.head_dim, present=spec.qk_norm is not None)
        self.k_norm_weight = frozen(self.head_dim, present=spec.qk_norm is not None)
        self._merged, self._single = key_layout(spec)
        self._qkv_rows = falcon_qkv_rows(spec)  # Falcon's layout -> [q | k | v], and back:
        self._qkv_rows_back = None if self._qkv_rows is None else torch.argsort(self._qkv_rows)
        self.rotary = rotary

    @property
    def window(self) -> int | None:
        """The layer's sliding attention window (None: every key), from its config and index."""
        return attention_window(self.config, self.layer_index)

    # -- construction ------------------------------------------------------------------------
    def __setstate__(self, state):
        """copy.copy, copy.deepcopy and unpickling come through here: the new object gets its
        own registry id (a shallow copy with other options must not run as the original)."""
        super().__setstate__(state)
        register_layer(self)

    @classmethod
    def from_hf(cls, hf_layer: nn.Module, config=None, rotary: nn.Module | None = None,
                quantized: dict | None = None, **options):
        """Build from a Hugging Face decoder layer (its weights are copied and merged); options
        as in the constructor. ``quantized``: projection weights the source already holds in
        8 bits (LLMLayer.quantized: Hugging Face key -> (q int8, scale)), which projections
        stored in int8 take as they are instead of quantizing the module's float weights."""
        own_config, index = layer_config_and_index(hf_layer)
        config = config or own_config
        if rotary is None:
            rotary = make_rotary(config)
        ref = next(hf_layer.parameters())
        layer = cls(config, rotary, -1 if index is None else index,
                    dtype=ref.dtype, device=ref.device, **options)
        state = hf_layer.state_dict()
        state.update(layer._prequantized(quantized or {}))
        layer.load_hf_state_dict(state)
        return layer

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

    # -- helpers used by pifi_fast.ops -----------------------------------------------------------
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

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.input_norm_weight.dtype

    def weight_bytes(self) -> int:
        """Bytes of the frozen tensors as stored (the 8-bit modes count their scales)."""
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def rope_tables(self, n_positions: int, device, dtype):
        """cos/sin tables (n, head_dim) for positions 0..n-1, from the model's own rotary module
        (so rope scaling such as llama3 is honoured), in the layer dtype as Hugging Face casts
        them. Cached; grown in powers of two."""
        key = (str(device), dtype)
        have = self._rope_cache.get(key)
        if have is None or have[0].shape[0] < n_positions:
            n = 1 << max(n_positions - 1, 1).bit_length()
            if self.max_positions is not None:
                n = max(min(n, self.max_positions), n_positions)
            pos = torch.arange(n, device=device).unsqueeze(0)
            probe = torch.empty(1, 1, self.head_dim, device=device, dtype=dtype)
            with torch.no_grad():
                cos, sin = rotary_embeddings(self.rotary, probe, pos,
                                             layer_type(self.config, self.layer_index))
            have = (cos[0].contiguous(), sin[0].contiguous())
            self._rope_cache[key] = have
        return have

    # -- forward --------------------------------------------------------------------------------
    def forward(self, hidden_states, attention_mask=None, position_ids=None):
        x = hidden_states
        self._check_input(x)
        # Mixed precision, the rule: the frozen layer always computes in its own dtype, with
        # autocast off inside (autocast would otherwise turn some of its products into the
        # autocast dtype and hand them to ops holding weights of another dtype), and returns
        # the dtype its input had, as the Hugging Face layer under autocast does (its residual
        # stream keeps the input's dtype). Load the layer in the autocast dtype to compute in it.
        with torch.autocast(x.device.type, enabled=False):
            out = self._forward(x.to(self.input_norm_weight.dtype), attention_mask, position_ids)
        return out.to(x.dtype)

    def _check_input(self, x):
        if x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"FrozenLlamaLayer expects (batch, seq, {self.hidden_size}), got "
                             f"{tuple(x.shape)}")
        w = self.input_norm_weight  # the compute dtype (8-bit projections keep norms in it)
        if x.device != w.device:
            raise ValueError(f"FrozenLlamaLayer: input is on {x.device} but the layer's weights "
                             f"are on {w.device}; move the input or the layer")
        autocast = torch.is_autocast_enabled(x.device.type)
        if x.dtype != w.dtype and not autocast:
            raise ValueError(f"FrozenLlamaLayer: input is {x.dtype} but the layer's weights are "
                             f"{w.dtype}; cast the input or the layer (under torch.autocast the "
                             "layer casts for you)")

    def _forward(self, x, attention_mask, position_ids):
        if torch.compiler.is_compiling():
            # under torch.compile the layer is one custom op (pifi_fast::frozen_layer): the
            # unpadding, its host sync and every data-dependent size stay inside it, so the
            # model around it traces into one graph
            return frozen_layer_op(self, x, attention_mask, position_ids)
        flat, positions, seg, run = self.pack(x, attention_mask, position_ids,
                                              torch.is_grad_enabled() and x.requires_grad)
        out = FrozenLayerFunction.apply(flat, positions, run)
        return self.unpack(x, out, seg)

    def pack(self, x, attention_mask, position_ids, needs_grad: bool):
        """(flat (T, H) real tokens, their positions (T,), Segments, LayerRun) for x (B, S, H):
        the checks, the unpadding (one host sync for the row lengths) and the RoPE tables."""
        b, s, _ = x.shape
        if b == 0 or s == 0:
            raise ValueError(f"FrozenLlamaLayer: empty input of shape {tuple(x.shape)}")
        seg = Segments.dense(b, s, x.device)
        if attention_mask is not None:
            if attention_mask.shape != (b, s):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, "
                                 f"expected {(b, s)}")
            if s > 1:  # (S == 1: every row is its one token; the mask has nothing to remove)
                seg = Segments.from_mask(attention_mask.to(device=x.device, dtype=torch.bool))
        if position_ids is None:
            positions = torch.arange(s, device=x.device).expand(b, s)
            n_positions = s
        else:
            if position_ids.shape[-1] != s:
                raise ValueError(f"position_ids has shape {tuple(position_ids.shape)}, "
                                 f"expected {(b, s)}")
            positions = position_ids.to(x.device).expand(b, s)
            n_positions = int(positions.max()) + 1
            if int(positions.min()) < 0:
                raise ValueError("position_ids must be non-negative")
        if self.max_positions is not None and n_positions > self.max_positions:
            raise ValueError(f"sequence position {n_positions - 1} exceeds the LLM's "
                             f"max_position_embeddings ({self.max_positions})")
        flat = x.reshape(b * s, self.hidden_size)
        positions = positions.reshape(-1)
        if seg.indices is not None:
            flat = flat.index_select(0, seg.indices)
            positions = positions.index_select(0, seg.indices)
        cos, sin = (None, None) if s == 1 else self.rope_tables(n_positions, x.device, x.dtype)
        run = LayerRun(layer=self, segments=seg, cos=cos, sin=sin, kernels=self.kernels,
                       recompute=self.recompute, attention=self.attention, gemm=self.gemm,
                       chunk_tokens=self._chunk_tokens(x), causal=self.causal,
                       needs_grad=needs_grad)
        return flat.contiguous(), positions.contiguous(), seg, run

    def unpack(self, x, out, seg):
        """(B, S, H) from the packed output: padding positions keep their input."""
        b, s, h = x.shape
        if seg.indices is not None:
            out = x.reshape(b * s, h).index_copy(0, seg.indices, out)
        return out.view(b, s, h)

    def _chunk_tokens(self, x):
        if self.chunk_tokens == "auto":
            if x.is_cuda:
                return 4096
            # CPU: as many tokens as keep one fp32 (tokens x 2I) temporary of the twins within
            # CPU_CHUNK_BYTES, in steps of 256: SmolLM2 10752, Qwen2-0.5B 3328, Llama-3.1-8B 1024.
            # (A flat 256 cost 8 % of SmolLM2's forward + backward at 2048 tokens: small GEMMs.)
            per_token = 2 * self.intermediate * 4
            return max(256, CPU_CHUNK_BYTES // per_token // 256 * 256)
        return self.chunk_tokens

    def extra_repr(self):
        return (f"{self.config.model_type}, hidden={self.hidden_size}, heads={self.num_heads}/"
                f"{self.num_kv_heads}, head_dim={self.head_dim}, "
                f"mlp={self.intermediate}, layer={self.layer_index}, "
                f"window={self.window}, "
                f"kernels={self.kernels}, recompute={self.recompute}, "
                f"attention={self.attention or 'auto'}, gemm={self.gemm}, causal={self.causal}, "
                f"weights={self.weights}")


def _run_options(layer: FrozenLlamaLayer) -> tuple:
    """What a packed run takes from its layer besides the weights (the stack shares one)."""
    return (layer.compute_dtype, layer.kernels, layer.recompute, layer.attention, layer.gemm,
            layer.chunk_tokens, layer.causal, layer.weights)


def _attr_of(module: nn.Module, param: torch.Tensor) -> str:
    for name, p in module.named_parameters(recurse=False):
        if p is param:
            return name
    raise KeyError("parameter not found on module")


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
                    fields = {k: v for k, v in vars(run).items() if k != "impl"}
                    flat = FrozenLayerFunction.apply(flat, positions,
                                                     LayerRun(**{**fields, "layer": layer}))
                h = first.unpack(h, flat, seg)
        return h.to(x.dtype)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self[0].compute_dtype

    def weight_bytes(self) -> int:
        return sum(layer.weight_bytes() for layer in self)
