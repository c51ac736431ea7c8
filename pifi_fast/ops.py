"""Autograd for the frozen decoder layer: forward and an explicit input-gradient-only backward.

Every op here is plain PyTorch (plus torch.ops.pifi_fast.frozen_linear for the projections) and
defines the meaning that the fused Triton kernels of pifi_fast.kernels must reproduce.

Chain rule of the layer (weights frozen, so only d/dx is needed; ``@W`` is x @ W^T forward and
dy @ W backward):

    h   = rms(x; w_in)                 dx   = dx2 + rms_bwd(x, w_in, dh)
    qkv = h @Wqkv (+b)                 dh   = dqkv @ Wqkv
    q,k = rope(norm?(q,k))             dq,dk through rope^T (rotation by -theta), then norm_bwd
    a   = softmax(q k^T s + m) v       dS = P * (dP - rowsum(P * dP)),  dP = da v^T
    x2  = x + a @Wo                    da   = dx2 @ Wo,  dx2 = dout + rms_bwd(x2, w_post, dh2)
    g,u = rms(x2; w_post) @Wgu         dh2  = [dg, du] @ Wgu
    out = x2 + (silu(g) * u) @Wd       dm = dout @ Wd, dg = dm u silu'(g), du = dm silu(g)

Saved for backward: x, x2, the raw qkv projection and the gate/up projection (q, k are
re-normalised and re-rotated in backward; the attention probabilities are recomputed).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pifi_fast._ext import frozen_linear


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face Llama RMSNorm: fp32 statistics, cast back, then scale by the weight."""
    x32 = x.float()
    r = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (x32 * r).to(x.dtype)


def rms_norm_input_grad(x: torch.Tensor, weight: torch.Tensor, eps: float, dy: torch.Tensor):
    """d/dx of rms_norm for a frozen weight: r * (g - x r^2 mean(g x)), g = dy * w, in fp32."""
    x32 = x.float()
    r = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    g = dy.float() * weight.float()
    dx = r * (g - x32 * (r * r) * (g * x32).mean(-1, keepdim=True))
    return dx.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False):
    """Rotate (B, heads, S, D) by cos/sin of shape (B, S, D); inverse=True rotates back.

    The inverse is also the backward: the rotation is orthogonal, so its transpose is the
    rotation by -theta.
    """
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * (-sin if inverse else sin)


def attention(q, k, v, key_mask: torch.Tensor | None, scale: float):
    """Bidirectional attention with grouped KV heads. q (B,H,S,D), k/v (B,Hkv,S,D).

    key_mask: (B, S) bool, True for real tokens, or None for all keys visible.
    """
    mask = None if key_mask is None else key_mask[:, None, None, :]
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


def attention_input_grads(q, k, v, key_mask, scale: float, do: torch.Tensor):
    """Backward of attention() for all three inputs, recomputing P in fp32."""
    n_rep = q.shape[1] // k.shape[1]
    kk = k.float().repeat_interleave(n_rep, dim=1)
    vv = v.float().repeat_interleave(n_rep, dim=1)
    q32, do32 = q.float(), do.float()
    s = (q32 @ kk.transpose(-1, -2)) * scale
    if key_mask is not None:
        s = s.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1)
    dv = p.transpose(-1, -2) @ do32
    dp = do32 @ vv.transpose(-1, -2)
    ds = p * (dp - (p * dp).sum(-1, keepdim=True))
    dq = (ds @ kk) * scale
    dk = (ds.transpose(-1, -2) @ q32) * scale
    b, h, s_len, d = dk.shape
    dk = dk.view(b, h // n_rep, n_rep, s_len, d).sum(2)
    dv = dv.view(b, h // n_rep, n_rep, s_len, d).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return F.silu(g) * u


def silu_mul_input_grads(g, u, dm):
    sg = torch.sigmoid(g.float())
    g32 = g.float()
    dm32 = dm.float()
    dg = dm32 * u.float() * sg * (1 + g32 * (1 - sg))
    du = dm32 * g32 * sg
    return dg.to(g.dtype), du.to(u.dtype)


class FrozenLayerFunction(torch.autograd.Function):
    """The whole frozen decoder layer as one autograd node; backward returns only dx."""

    @staticmethod
    def forward(ctx, x, layer, cos, sin, key_mask):
        out, saved = _layer_forward(layer, x, cos, sin, key_mask)
        ctx.layer = layer
        ctx.save_for_backward(*saved)
        return out

    @staticmethod
    def backward(ctx, dout):
        dx = _layer_input_grad(ctx.layer, dout, *ctx.saved_tensors)
        return dx, None, None, None, None


def _split_qkv(layer, qkv: torch.Tensor):
    b, s, _ = qkv.shape
    q, k, v = qkv.split([layer.q_size, layer.kv_size, layer.kv_size], dim=-1)
    q = q.view(b, s, layer.num_heads, layer.head_dim)
    k = k.view(b, s, layer.num_kv_heads, layer.head_dim)
    v = v.view(b, s, layer.num_kv_heads, layer.head_dim)
    return q, k, v


def _qk_rotated(layer, q, k, cos, sin):
    """Per-head q/k norm (Qwen3) then RoPE; input (B,S,heads,D), output (B,heads,S,D)."""
    if layer.q_norm_weight is not None:
        q = rms_norm(q, layer.q_norm_weight, layer.eps)
        k = rms_norm(k, layer.k_norm_weight, layer.eps)
    return rope(q.transpose(1, 2), cos, sin), rope(k.transpose(1, 2), cos, sin)


def _layer_forward(layer, x, cos, sin, key_mask):
    b, s, _ = x.shape
    h = rms_norm(x, layer.input_norm_weight, layer.eps)
    if s == 1:
        # One key: softmax weight is exactly 1 and RoPE never touches v, so the attention
        # block is o_proj(v_proj(h)) with each KV head repeated for its query group.
        w_v, b_v = layer.v_weight_and_bias()
        v = frozen_linear(h, w_v, b_v)
        a = v.view(b, 1, layer.num_kv_heads, 1, layer.head_dim)
        a = a.expand(b, 1, layer.num_kv_heads, layer.num_kv_groups, layer.head_dim)
        a = a.reshape(b, 1, layer.q_size)
        qkv = None
    else:
        qkv = frozen_linear(h, layer.qkv_weight, layer.qkv_bias)
        q, k, v = _split_qkv(layer, qkv)
        q, k = _qk_rotated(layer, q, k, cos, sin)
        a = attention(q, k, v.transpose(1, 2), key_mask, layer.scaling)
        a = a.transpose(1, 2).reshape(b, s, layer.q_size)
    x2 = frozen_linear(a, layer.o_weight, layer.o_bias, residual=x)
    h2 = rms_norm(x2, layer.post_norm_weight, layer.eps)
    gu = frozen_linear(h2, layer.gate_up_weight, layer.gate_up_bias)
    g, u = gu.chunk(2, dim=-1)
    out = frozen_linear(silu_mul(g, u), layer.down_weight, layer.down_bias, residual=x2)
    saved = [x, x2, gu] + ([] if qkv is None else [qkv, cos, sin])
    if key_mask is not None and qkv is not None:
        saved.append(key_mask)
    return out, saved


def _layer_input_grad(layer, dout, x, x2, gu, qkv=None, cos=None, sin=None, key_mask=None):
    b, s, _ = x.shape
    g, u = gu.chunk(2, dim=-1)
    dm = dout @ layer.down_weight
    dg, du = silu_mul_input_grads(g, u, dm)
    dh2 = torch.cat((dg, du), dim=-1) @ layer.gate_up_weight
    dx2 = dout + rms_norm_input_grad(x2, layer.post_norm_weight, layer.eps, dh2)
    da = dx2 @ layer.o_weight
    if qkv is None:
        w_v, _ = layer.v_weight_and_bias()
        dv = da.view(b, 1, layer.num_kv_heads, layer.num_kv_groups, layer.head_dim).sum(3)
        dh = dv.reshape(b, 1, layer.kv_size) @ w_v
    else:
        q_raw, k_raw, v = _split_qkv(layer, qkv)
        q, k = _qk_rotated(layer, q_raw, k_raw, cos, sin)
        da = da.view(b, s, layer.num_heads, layer.head_dim).transpose(1, 2)
        dq, dk, dv = attention_input_grads(q, k, v.transpose(1, 2), key_mask, layer.scaling, da)
        dq = rope(dq, cos, sin, inverse=True).transpose(1, 2)
        dk = rope(dk, cos, sin, inverse=True).transpose(1, 2)
        if layer.q_norm_weight is not None:
            dq = rms_norm_input_grad(q_raw, layer.q_norm_weight, layer.eps, dq)
            dk = rms_norm_input_grad(k_raw, layer.k_norm_weight, layer.eps, dk)
        dqkv = torch.cat(
            (dq.reshape(b, s, -1), dk.reshape(b, s, -1), dv.transpose(1, 2).reshape(b, s, -1)), -1
        )
        dh = dqkv @ layer.qkv_weight
    return dx2 + rms_norm_input_grad(x, layer.input_norm_weight, layer.eps, dh)
