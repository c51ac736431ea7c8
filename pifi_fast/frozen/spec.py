"""LayerSpec: one frozen decoder layer described by what differs between families, with enums
for its norm, block, activation and q/k/v layout, and one small builder per family.

    layer_spec(config)  the spec of a config, or None where pifi_fast does not fuse the family
                        (its Hugging Face layer then runs unfused)

Adding a family: a builder below (its norms, block, activation, key names) and its model_type
in BUILDERS; the kernels, blocks and checkpoint keys follow the spec.
"""
from __future__ import annotations

import dataclasses
from enum import StrEnum



class BlockKind(StrEnum):
    """How attention and the MLP are composed around the residual stream; what each kind
    computes, and the only code that tells them apart, is pifi_fast.frozen.blocks."""

    SEQUENTIAL = "sequential"
    SANDWICH = "sandwich"
    PARALLEL = "parallel"


class Norm(StrEnum):
    """RMS: Llama's RMSNorm (fp32 statistics, cast, then the weight); RMS_1P: Gemma's, the
    weight as (1 + w) in fp32 and the cast last; LAYER: LayerNorm with bias (Falcon)."""

    RMS = "rms"
    RMS_1P = "rms_1p"
    LAYER = "layer"


class Activation(StrEnum):
    """The MLP's activation: gated act(g) * u from a merged gate/up projection, or act(u)."""

    SILU = "silu"
    GELU_TANH = "gelu_tanh"
    GELU = "gelu"


class QkvLayout(StrEnum):
    """How the checkpoint stores q/k/v: SEPARATE q/k/v_proj (merged here), or Falcon's fused
    query_key_value: GROUPED (40B: per KV group its queries, then k, v), INTERLEAVED (per head
    q, k, v) or STACKED (7B, multi-query: all q, then k, then v, our own order)."""

    SEPARATE = "separate"
    GROUPED = "grouped"
    INTERLEAVED = "interleaved"
    STACKED = "stacked"


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerSpec:
    """One frozen decoder layer, described by what differs between families (Llama's is one
    instance); the layer and its kernels follow it.

    norm      Norm of every norm of the block
    block     BlockKind: sequential, sandwich (Gemma-2/3), parallel (pifi_fast.frozen.blocks)
    act       Activation of the MLP; gated: act(g) * u, else act(u) (Falcon)
    scaling   the attention's score scale (Gemma-2/3: query_pre_attn_scalar ** -0.5)
    softcap   tanh soft-capping of the scores (Gemma-2), or None
    qk_norm   per-head q/k norms (Qwen3: RMS, Gemma-3: RMS_1P), or None
    qkv       QkvLayout of the checkpoint's q/k/v
    keys      the layer's attributes -> the Hugging Face keys (without .weight / .bias)
    """

    model_type: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    eps: float
    norm: Norm
    block: BlockKind
    act: Activation
    gated: bool
    scaling: float
    softcap: float | None = None
    qk_norm: Norm | None = None
    qkv: QkvLayout = QkvLayout.SEPARATE
    attn_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    keys: tuple = ()  # ((attribute, Hugging Face key), ...)

    def __post_init__(self):
        # strings are taken (and an unknown one refused) here, once
        set_ = object.__setattr__
        set_(self, "norm", Norm(self.norm))
        set_(self, "block", BlockKind(self.block))
        set_(self, "act", Activation(self.act))
        set_(self, "qkv", QkvLayout(self.qkv))
        if self.qk_norm is not None:
            set_(self, "qk_norm", Norm(self.qk_norm))

    @property
    def key_map(self) -> dict[str, str]:
        return dict(self.keys)


# the config's activation names -> the MLP's Activation
ACTIVATIONS = {"silu": Activation.SILU, "swish": Activation.SILU,
               "gelu_pytorch_tanh": Activation.GELU_TANH, "gelu": Activation.GELU}
_LLAMA_KEYS = (("input_norm", "input_layernorm"), ("post_norm", "post_attention_layernorm"),
               ("q", "self_attn.q_proj"), ("k", "self_attn.k_proj"), ("v", "self_attn.v_proj"),
               ("o", "self_attn.o_proj"), ("gate", "mlp.gate_proj"), ("up", "mlp.up_proj"),
               ("down", "mlp.down_proj"), ("q_norm", "self_attn.q_norm"),
               ("k_norm", "self_attn.k_norm"))


def _llama_kind(config, kind: str) -> LayerSpec | None:
    """Llama, Mistral, Qwen2/3 and the Gemmas: separate q/k/v, a gated MLP, RMS norms."""
    gemma = kind in ("gemma", "gemma2", "gemma3_text")
    sandwich = kind in ("gemma2", "gemma3_text")
    act = ACTIVATIONS.get(getattr(config, "hidden_activation", None) if sandwich
                          else getattr(config, "hidden_act", "silu"))
    if act is None or act is Activation.GELU:
        return None
    hidden, heads = config.hidden_size, config.num_attention_heads
    d = getattr(config, "head_dim", None) or hidden // heads
    keys = list(_LLAMA_KEYS)
    if sandwich:
        keys = [(a, k) for a, k in keys if a != "post_norm"] + [
            ("attn_out_norm", "post_attention_layernorm"),
            ("post_norm", "pre_feedforward_layernorm"),
            ("mlp_out_norm", "post_feedforward_layernorm")]
    attention_bias = bool(getattr(config, "attention_bias", False))
    return LayerSpec(
        model_type=kind, hidden=hidden, heads=heads,
        kv_heads=config.num_key_value_heads or heads, head_dim=d,
        intermediate=config.intermediate_size, eps=config.rms_norm_eps,
        norm=Norm.RMS_1P if gemma else Norm.RMS,
        block=BlockKind.SANDWICH if sandwich else BlockKind.SEQUENTIAL, act=act, gated=True,
        scaling=config.query_pre_attn_scalar ** -0.5 if sandwich else d ** -0.5,
        softcap=getattr(config, "attn_logit_softcapping", None) or None,
        qk_norm=(Norm.RMS if kind == "qwen3" else Norm.RMS_1P if kind == "gemma3_text"
                 else None),
        attn_bias=attention_bias or kind == "qwen2", o_bias=attention_bias,
        mlp_bias=bool(getattr(config, "mlp_bias", False)), keys=tuple(keys))


def _falcon(config, kind: str) -> LayerSpec | None:
    """Falcon: LayerNorm, the parallel block (or sequential), fused q/k/v, a plain GELU MLP."""
    act = ACTIVATIONS.get(getattr(config, "activation", None))
    if act is None:
        return None
    hidden, heads = config.hidden_size, config.num_attention_heads
    new = bool(config.new_decoder_architecture)
    two_norms = new and (config.num_ln_in_parallel_attn or 2) == 2
    parallel = bool(config.parallel_attn) or new
    keys = [("input_norm", "ln_attn" if two_norms else "input_layernorm"),
            ("qkv", "self_attention.query_key_value"), ("o", "self_attention.dense"),
            ("up", "mlp.dense_h_to_4h"), ("down", "mlp.dense_4h_to_h")]
    if two_norms:
        keys.append(("post_norm", "ln_mlp"))
    elif not parallel:
        keys.append(("post_norm", "post_attention_layernorm"))
    d = hidden // heads
    bias = bool(config.bias)
    return LayerSpec(
        model_type=kind, hidden=hidden, heads=heads,
        kv_heads=config.num_kv_heads if (new or not config.multi_query) else 1, head_dim=d,
        intermediate=config.ffn_hidden_size, eps=config.layer_norm_epsilon, norm=Norm.LAYER,
        block=BlockKind.PARALLEL if parallel else BlockKind.SEQUENTIAL, act=act, gated=False,
        scaling=d ** -0.5,
        qkv=(QkvLayout.GROUPED if new else QkvLayout.STACKED if config.multi_query
             else QkvLayout.INTERLEAVED),
        attn_bias=bias, o_bias=bias, mlp_bias=bias, keys=tuple(keys))


# model_type -> its builder: the families whose frozen layer pifi_fast computes itself
BUILDERS = {"llama": _llama_kind, "mistral": _llama_kind, "qwen2": _llama_kind,
            "qwen3": _llama_kind, "gemma": _llama_kind, "gemma2": _llama_kind,
            "gemma3_text": _llama_kind, "falcon": _falcon}
FUSED_MODEL_TYPES = tuple(BUILDERS)


def layer_spec(config) -> LayerSpec | None:
    """The fused layer's description of this config, or None when pifi_fast does not compute
    the family itself (its Hugging Face layer then runs unfused)."""
    kind = getattr(config, "model_type", None)
    if kind not in BUILDERS or getattr(config, "alibi", False):
        return None
    return BUILDERS[kind](config, kind)
