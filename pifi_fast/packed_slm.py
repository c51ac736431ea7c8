"""The SLM's sentence vectors from its real tokens only (BERT-family encoders).

PiFi's classification reads one vector per sentence from the SLM: the first token's ([CLS])
last hidden state. The plain forward runs every layer over every padded position and the last
layer over every token. This module computes the same vectors (same parameters, same values
to float rounding, same gradients) with two savings:

* packing: the token-wise parts of each layer (the q/k/v and output projections, the
  feed-forward block, the LayerNorms and dropouts) run on the real tokens only, gathered once
  from the padded batch; attention alone goes back to the padded (B, heads, S, d) layout, with
  padding keys masked. A random batch of 32 SST-2 sentences is about half padding (49 % real
  tokens, measured with MiniLM's tokenizer), so a user's own random-batch loop gains most;
  `pifi-fast train` already batches by length (97 % real tokens).
* the last layer computes only what the sentence vector needs: keys and values for every
  token, the query, the attention output and the feed-forward block for the first token alone.

The embeddings run as the model's own module on the padded batch (so positions, token types and
RoBERTa's padding-aware position ids stay the model's), then the real tokens are gathered. The
layers' sub-modules (Linear, LayerNorm, dropout, activation, peft's LoRA-wrapped Linear) are
called as they are, so weights, sub-module hooks and LoRA behave as in the plain forward
(hooks on the SLM module itself do not fire: its forward is not called); only the attention core
is ours (torch's SDPA with a boolean key mask, the computation of the models'
"sdpa" and "eager" attention). In training, dropout draws other masks than the plain forward
would (same rates), so a training run is not bit-identical to one on the plain forward.

Packing takes any padding layout (a left-padded row's first position is kept, as a query
only), but its token count depends on the mask: a host sync on a GPU, and under torch.compile
a data-dependent size that Dynamo traces only with capture_dynamic_output_shape_ops on
(inference.compile_model turns it on for its compiled model; otherwise the nonzero would break
the graph). With ``pack=False`` the padded layout is kept (padding positions computed and
ignored, as the plain forward does; static shapes, no host sync) and only the last layer's
saving applies: what torch.compile traces without that option, and what CUDA graphs capture.

Supported: the model types in PACKED_MODEL_TYPES as encoders (no decoder, no cross-attention,
no gradient checkpointing), LoRA through peft, input ids (not inputs_embeds) of shape
(batch, length) with an optional mask of the same shape. Otherwise `unsupported` /
`unsupported_inputs` say why, and pifi_fast.PiFiModel runs the plain forward.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

PACKED_MODEL_TYPES = ("bert", "electra", "roberta", "xlm-roberta")


def base_encoder(slm: nn.Module) -> nn.Module:
    """The Transformers model inside a peft wrapper (LoRA layers injected), else `slm`."""
    get_base = getattr(slm, "get_base_model", None)
    return get_base() if callable(get_base) else slm


def unsupported(slm: nn.Module) -> str | None:
    """None when first_token_states can run this SLM, else why not (one line)."""
    peft_config = getattr(slm, "peft_config", None)
    if isinstance(peft_config, dict):
        kinds = {str(getattr(c, "peft_type", "")).rsplit(".", 1)[-1] for c in
                 peft_config.values()}
        if kinds != {"LORA"}:
            return f"peft adapters other than LoRA ({sorted(kinds)})"
    model = base_encoder(slm)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in PACKED_MODEL_TYPES:
        return f"model type {model_type!r} (packed: {', '.join(PACKED_MODEL_TYPES)})"
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        return "a decoder or cross-attention configuration"
    if getattr(model, "gradient_checkpointing", False):
        return "gradient checkpointing is on (the packed path does not checkpoint)"
    if not hasattr(model, "embeddings") or not len(getattr(getattr(model, "encoder", None),
                                                            "layer", ())):
        return f"{type(model).__name__} has no embeddings / encoder layers"
    return None


def unsupported_inputs(input_ids, attention_mask, inputs_embeds=None) -> str | None:
    """None when first_token_states can take the batch, else why not (shapes only: no host
    sync, so it can run under torch.compile)."""
    if inputs_embeds is not None or input_ids is None:
        return "inputs_embeds instead of input_ids"
    if input_ids.dim() != 2:
        return f"input_ids of shape {tuple(input_ids.shape)} (needs (batch, length))"
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        return f"an attention mask of shape {tuple(attention_mask.shape)} (needs (batch, length))"
    return None


def packs_by_default(device_type: str) -> bool:
    """What PiFiModel's packed_slm="auto" does on a device: pack on a CPU, where packing was
    measured to pay; on a GPU it adds a host sync and a few gathers per layer that a
    launch-bound step may not repay, so it stays opt-in (packed_slm=True) until a GPU run."""
    return device_type == "cpu"


def packing_traceable() -> bool:
    """Whether torch.compile may trace packing into its graph: Dynamo captures an op whose
    output size depends on the data (nonzero) only with capture_dynamic_output_shape_ops on."""
    return bool(torch._dynamo.config.capture_dynamic_output_shape_ops)


class _Packing:
    """Where the tokens a layer computes sit: packed (T, ...) <-> padded (B, S, ...). Packed,
    the real tokens and each row's first position (the sentence vector is read there even
    where it is padding, as the plain forward's ``[:, 0]`` reads a left-padded row); unpacked
    (pack=False or no padding), every position (a reshape)."""

    def __init__(self, real: torch.Tensor | None, pack: bool, shape: tuple[int, int], device):
        self.batch, self.length = shape
        # no padding: packing is a reshape (the check is a host sync: eager only; pack=False
        # never reads the mask on the host)
        no_padding = real is None or (pack and not torch.compiler.is_compiling()
                                      and bool(real.all()))
        self.every_position = not pack or no_padding
        if self.every_position:
            self.flat = None
            # row b's first position (padding or not: the plain forward's [:, 0])
            self.first = torch.arange(self.batch, device=device) * self.length
        else:
            kept = real.clone()
            kept[:, 0] = True  # a padding first position is computed as a query, never a key
            counts = kept.sum(1)
            # the token count depends on the data: under torch.compile this nonzero stays in
            # the graph only with capture_dynamic_output_shape_ops (inference.compile_model)
            self.flat = kept.reshape(-1).nonzero().squeeze(1)
            self.first = torch.cumsum(counts, 0) - counts  # packed index of each first position
        self.key_mask = None if no_padding else real[:, None, None, :]  # True: attend

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        """(B, S, ...) -> (T, ...)."""
        rows = padded.reshape(self.batch * self.length, *padded.shape[2:])
        return rows if self.every_position else rows.index_select(0, self.flat)

    def heads(self, packed: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
        """(T, n_heads * head_dim) -> (B, n_heads, S, head_dim), zeros at padding."""
        if not self.every_position:
            packed = packed.new_zeros(self.batch * self.length, packed.shape[-1]) \
                .index_copy(0, self.flat, packed)
        return packed.view(self.batch, self.length, n_heads, head_dim).transpose(1, 2)


def _attention_core(self_attention, q, k, v, key_mask):
    """Scaled dot-product attention as the models' own attention computes it (bidirectional,
    padding keys masked, dropout on the probabilities while training)."""
    p = self_attention.dropout.p if self_attention.training else 0.0
    return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=p,
                                          scale=self_attention.scaling)


def _layer(layer: nn.Module, x: torch.Tensor, packing: _Packing, first_only: bool):
    """One encoder layer on packed tokens x (T, H); with first_only, (B, H) for the rows'
    first tokens (the only outputs the sentence vector needs)."""
    attention = layer.attention.self
    n_heads, head_dim = attention.num_attention_heads, attention.attention_head_size
    k = packing.heads(attention.key(x), n_heads, head_dim)
    v = packing.heads(attention.value(x), n_heads, head_dim)
    if first_only:
        rows = x.index_select(0, packing.first)  # (B, H): queries of the first tokens only
        q = attention.query(rows).view(packing.batch, 1, n_heads, head_dim).transpose(1, 2)
    else:
        rows = x
        q = packing.heads(attention.query(x), n_heads, head_dim)
    context = _attention_core(attention, q, k, v, packing.key_mask)  # (B, heads, S or 1, d)
    context = context.transpose(1, 2).reshape(packing.batch, -1, n_heads * head_dim)
    context = context[:, 0] if first_only else packing.pack(context)
    hidden = layer.attention.output(context, rows)  # dense, dropout, LayerNorm(+ rows)
    return layer.output(layer.intermediate(hidden), hidden)


def first_token_states(slm: nn.Module, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor | None = None,
                       token_type_ids: torch.Tensor | None = None,
                       pack: bool = True) -> torch.Tensor:
    """(B, 1, H): the SLM's last hidden state at each row's first token, as
    ``slm(input_ids, attention_mask, token_type_ids).last_hidden_state[:, :1]`` gives it; from
    the real tokens only with ``pack``, else on the padded layout. The caller
    checks `unsupported` and `unsupported_inputs` first."""
    model = base_encoder(slm)
    real = None if attention_mask is None else attention_mask != 0
    packing = _Packing(real, pack, tuple(input_ids.shape), input_ids.device)
    kwargs = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
    x = packing.pack(model.embeddings(input_ids=input_ids, **kwargs))  # the model's own
    project = getattr(model, "embeddings_project", None)  # ELECTRA: embedding -> hidden size
    if project is not None:
        x = project(x)
    layers = model.encoder.layer
    for i, layer in enumerate(layers):
        x = _layer(layer, x, packing, first_only=i == len(layers) - 1)
    return x.unsqueeze(1)
