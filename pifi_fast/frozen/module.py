"""FrozenLlamaLayer (also FrozenDecoderLayer): one frozen decoder layer with merged weights, of
any family that pifi_fast.frozen.spec describes with a LayerSpec.

Fused architectures: Llama (any rope scaling that Transformers' rotary init supports), Mistral,
Qwen2 (q/k/v bias), Qwen3 (per-head q/k RMSNorm), Gemma (RMSNorm with (1 + w), GeGLU), Gemma-2
(four norms per block, soft-capped scores, query_pre_attn_scalar), Gemma-3 (Gemma-2's block with
q/k norms and a rotary per layer type) and Falcon (LayerNorm, the parallel block, multi-query or
grouped KV, a plain GELU MLP). The layer keeps merged QKV and gate/up weights for speed but
reads and writes the Hugging Face key layout in its state_dict, so a checkpoint of the reference
model loads into it and back (pifi_fast.frozen.weights). (The class keeps its first family's
name: checkpoints and user code name it; FrozenDecoderLayer is the same class.)
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from pifi_fast.attention import Segments
from pifi_fast.families import (attention_window, layer_config_and_index, layer_type,
                                make_rotary, rotary_embeddings)
from pifi_fast.frozen.checkpoint import falcon_qkv_rows, key_layout
from pifi_fast.frozen.custom_op import frozen_layer_op, register_layer
from pifi_fast.frozen.function import FrozenLayerFunction, LayerRun
from pifi_fast.frozen.options import LayerOptions
from pifi_fast.frozen.spec import FUSED_MODEL_TYPES, Norm, layer_spec
from pifi_fast.frozen.weights import PER_CHANNEL, STORAGE, FrozenWeights
from pifi_fast.kernels import quant as _quant

# chunk_tokens="auto" on CPU: one fp32 (tokens x 2 * intermediate) temporary at most this large
CPU_CHUNK_BYTES = 128 * 2**20


class FrozenLlamaLayer(FrozenWeights, nn.Module):
    """A frozen decoder layer whose backward computes only the input gradient, of any family
    pifi_fast.frozen.spec.layer_spec describes (Llama's kind, Gemma, Gemma-2/3, Falcon; the layer's
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
                  residual / SwiGLU / SwiGLU-backward epilogues; see pifi_fast.frozen.linear)
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
                  activations (pifi_fast.frozen.linear.int8_cpu_linear; CPU inference), "fp8" e4m3 W8A8
                  with int8 q/k/v; norms, biases, RoPE, attention and the residual stream stay
                  in the compute dtype. The state_dict keeps the Hugging Face keys, the 8-bit
                  tensors under them plus a "<key>_scale" beside each.
    """

    def __init__(self, config, rotary: nn.Module, layer_index: int = -1, dtype=None, device=None,
                 *, kernels: str = "auto", recompute: str = "none", attention: str | None = None,
                 gemm: str = "cublas", chunk_tokens: int | str | None = "auto",
                 causal: bool = False, weights: str = "auto"):
        super().__init__()
        register_layer(self)  # its id for pifi_fast::frozen_layer (see pifi_fast.frozen.custom_op)
        options = LayerOptions(kernels=kernels, recompute=recompute, attention=attention,
                               gemm=gemm, chunk_tokens=chunk_tokens, causal=causal,
                               weights=weights)  # validated here, once
        self.options = options
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
        layer_norm = spec.norm == Norm.LAYER
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

    # The options as attributes (read, and set on a copy: each set is validated as at build).
    kernels = property(lambda self: self.options.kernels,
                       lambda self, v: self._set_option(kernels=v))
    recompute = property(lambda self: self.options.recompute,
                         lambda self, v: self._set_option(recompute=v))
    attention = property(lambda self: self.options.attention,
                         lambda self, v: self._set_option(attention=v))
    gemm = property(lambda self: self.options.gemm, lambda self, v: self._set_option(gemm=v))
    chunk_tokens = property(lambda self: self.options.chunk_tokens,
                            lambda self, v: self._set_option(chunk_tokens=v))
    causal = property(lambda self: self.options.causal,
                      lambda self, v: self._set_option(causal=v))
    weights = property(lambda self: self.options.weights)  # fixed: it sets the storage

    def _set_option(self, **change):
        self.options = LayerOptions.of(self.options, **change)

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

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.input_norm_weight.dtype

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
        run = LayerRun.start(x, layer=self, segments=seg, cos=cos, sin=sin,
                             kernels=self.kernels, recompute=self.recompute,
                             attention=self.attention, gemm=self.gemm,
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
            # CPU_CHUNK_BYTES, in steps of 256, so the memory stays bounded while the GEMMs stay
            # large enough to run at speed (a small fixed chunk makes them slow).
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


FrozenDecoderLayer = FrozenLlamaLayer  # the family-neutral name
