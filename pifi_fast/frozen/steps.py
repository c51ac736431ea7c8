"""The frozen layer's family steps on packed tokens, each with its input gradient: the norms,
the MLP activation, per-head q/k norms with RoPE, and attention.

Each step takes the call's LayerRun (pifi_fast.frozen.function): its layer (weights, spec) and
its elementwise table (run.impl, pifi_fast.frozen.elementwise). The blocks compose them.
"""
from __future__ import annotations

import contextlib

import torch

from pifi_fast import attention as attn
from pifi_fast.frozen import elementwise
from pifi_fast.frozen.elementwise import act_op, norm_op
from pifi_fast.frozen.options import effective_attention


def norm_fwd(run, x, name):
    """(y, fp32 1/std) of the layer's norm `name` ("input_norm", "post_norm", "attn_out_norm",
    "mlp_out_norm") on x: Llama's RMSNorm, Gemma's (1 + w) RMSNorm or LayerNorm with bias,
    through the kernels or their twins (run.impl)."""
    layer = run.layer
    w = getattr(layer, name + "_weight")
    if norm_op(layer.spec) == "rms":
        y, _, rstd = run.impl.rms_fwd(x, w, layer.eps)
        return y, rstd
    # the kernels floor takes its modes as plain names
    return run.impl.norm_fwd(x, w, layer.eps, str(layer.spec.norm),
                             getattr(layer, name + "_bias"))


def norm_bwd(run, dy, x, name, rstd, dres=None):
    """dx of the norm `name` at input x (+ dres, the gradient along the residual stream)."""
    layer = run.layer
    w = getattr(layer, name + "_weight")
    if norm_op(layer.spec) == "rms":
        return run.impl.rms_bwd(dy, x, w, rstd, dres)
    return run.impl.norm_bwd(dy, x, w, rstd, str(layer.spec.norm), dres)


def act_fwd(run, gu):
    """The MLP's activation on the gate/up GEMM's output: silu(g) * u, gelu_tanh(g) * u or
    gelu(u), through the kernels or their twins."""
    spec = run.layer.spec
    return (run.impl.swiglu_fwd(gu) if act_op(spec) == "swiglu"
            else run.impl.act_fwd(gu, str(spec.act)))


def act_bwd(run, gu, dm):
    """The activation's input gradient ([dg | du] for the gated ones) from dm and gu."""
    spec = run.layer.spec
    return (run.impl.swiglu_bwd(gu, dm) if act_op(spec) == "swiglu"
            else run.impl.act_bwd(gu, dm, str(spec.act)))


def qkv_rotated(run, qkv, positions):
    """Per-head q/k norms (Qwen3, Gemma-3; plain PyTorch), then RoPE in place. qkv (T, W) is the
    raw projection; returns the rotated buffer (a new one when q/k norms apply)."""
    layer = run.layer
    if layer.q_norm_weight is not None:
        qkv = qk_normed(layer, qkv)
    return run.impl.rope_(qkv, positions, run.cos, run.sin, layer.num_heads, layer.num_kv_heads,
                          layer.head_dim)


def qk_norm_fwd(layer, x, w):
    """(y, 1/std) of the layer's per-head q/k norm on x (T, heads, D)."""
    out = elementwise.QK_NORMS[layer.spec.qk_norm][0](x, w, layer.eps)  # (y, rstd) or (y, _, rstd)
    return out[0], out[-1]


def qk_normed(layer, qkv):
    """qkv with q and k normed per head (v unchanged), a new buffer."""
    t, d = qkv.shape[0], layer.head_dim
    q, k, v = qkv.split([layer.q_size, layer.kv_size, layer.kv_size], -1)
    qn = qk_norm_fwd(layer, q.reshape(t, -1, d), layer.q_norm_weight)[0]
    kn = qk_norm_fwd(layer, k.reshape(t, -1, d), layer.k_norm_weight)[0]
    return torch.cat((qn.reshape(t, -1), kn.reshape(t, -1), v), -1)


def qk_norm_input_grad(layer, qkv_raw, dqkv):
    """The gradient with respect to the raw projection, through the per-head q/k norms."""
    t, d = qkv_raw.shape[0], layer.head_dim
    raw = qkv_raw.split([layer.q_size, layer.kv_size, layer.kv_size], -1)
    grads = dqkv.split([layer.q_size, layer.kv_size, layer.kv_size], -1)
    out = []
    for r, g, w in ((raw[0], grads[0], layer.q_norm_weight),
                    (raw[1], grads[1], layer.k_norm_weight)):
        r = r.reshape(t, -1, d)
        _, rstd = qk_norm_fwd(layer, r, w)
        bwd = elementwise.QK_NORMS[layer.spec.qk_norm][1]
        out.append(bwd(g.reshape(t, -1, d), r, w, rstd).reshape(t, -1))
    return torch.cat((out[0], out[1], grads[2]), -1)


def heads(layer, qkv):
    """q (T, heads, D), k and v (T, kv heads, D): views of the [q | k | v] buffer."""
    t, d = qkv.shape[0], layer.head_dim
    q, k, v = qkv.split([layer.q_size, layer.kv_size, layer.kv_size], -1)
    return q.view(t, -1, d), k.view(t, -1, d), v.view(t, -1, d)


def attend(run, q, k, v):
    """Attention over the call's segments with the layer's scale, window and soft-cap."""
    layer = run.layer
    return attn.attention(q, k, v, run.segments, layer.scaling, run.causal,
                          effective_attention(run.attention), window=layer.window,
                          softcap=layer.spec.softcap)


@contextlib.contextmanager
def autograd_admitted():
    """Autograd recording even inside a custom op's implementation (pifi_fast::frozen_layer_
    backward under torch.compile), where PyTorch excludes autograd's dispatch keys: the attention
    backward differentiates its recomputed forward with autograd, whatever the backend."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    if not (exclude.has(torch._C.DispatchKey.AutogradOther)
            or exclude.has(torch._C.DispatchKey.AutogradCPU)):
        yield  # the usual case: nothing excluded
        return
    autograd = (torch._C.DispatchKeySet(torch._C.DispatchKey.AutogradCPU)
                | torch._C.DispatchKeySet(torch._C.DispatchKey.ADInplaceOrView))
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(),
                                         exclude - autograd):
        yield
