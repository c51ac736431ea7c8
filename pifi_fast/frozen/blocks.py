"""The decoder block's composition on packed tokens: forward -> (out, Saved, attention graph)
and input_grad(dout, Saved) -> dx, for the three block kinds (the only place that tells them
apart):

    SEQUENTIAL  x2 = x + attn(n1(x));        out = x2 + mlp(n2(x2))        (Llama, Qwen, Gemma)
    SANDWICH    x2 = x + na(attn(n1(x)));    out = x2 + nm(mlp(n2(x2)))    (Gemma-2/3)
    PARALLEL    x2 = x + attn(n1(x));        out = x2 + mlp(n2(x))         (Falcon; n2 = n1
                unless the family has a second norm): the MLP reads x, so x2 is not kept and dx
                gets the MLP branch's input gradient added

Chain rule (weights frozen, so only d/dx; ``@W`` is x @ W^T forward and dy @ W backward), for
the sequential block:

    h   = norm(x; w_in)                     dx  = norm_bwd(x; dh) + dx2     (dres folded in)
    qkv = rope(h @Wqkv (+b))                dh  = rope^T(dqkv) @Wqkv        (rope^T in place)
    a   = attn(q, k, v)                     dq, dk, dv = attn_bwd(da)      (recomputed fwd)
    x2  = x + a @Wo                         da  = dx2 @Wo
    gu  = norm(x2; w_post) @Wgu             dx2 = norm_bwd(x2; dgu @Wgu) + dout
    out = x2 + act(gu) @Wd                  dgu = act_bwd(gu, dout @Wd)

[CLS] mode (every sequence is one token) takes the exact shortcut: softmax over one key is 1 and
RoPE never touches v, so attention is v repeated over each KV head's query group. The MLP block
runs over chunks of run.chunk_tokens tokens, forward and backward, so its (tokens x MLP)-sized
temporaries exist for one chunk at a time.
"""
from __future__ import annotations

import torch

from pifi_fast.frozen import steps
from pifi_fast.frozen.elementwise import ACT_EPILOGUE
from pifi_fast.frozen.linear import project, project_input_grad, triton_gemm_applies
from pifi_fast.frozen.options import Recompute
from pifi_fast.frozen.saved import Saved
from pifi_fast.frozen.spec import BlockKind


def block_kind(spec) -> BlockKind:
    """The block kind of a LayerSpec (a string or the enum; an unknown one is a ValueError)."""
    return BlockKind(spec.block)


def saved_widths(layer, seq: int, needs_grad: bool) -> dict:
    """Per Saved field, what forward keeps for a call of the layer: None (an empty
    placeholder), 0 (a (T,) vector) or the row width. The custom op's fake reads it, and
    tests/test_blocks.py holds forward to it."""
    kind, h = block_kind(layer.spec), layer.hidden_size
    sandwich = kind is BlockKind.SANDWICH and needs_grad
    keep_gu = needs_grad and layer.recompute == Recompute.NONE
    return {"x": h, "rstd1": 0, "x2": None if kind is BlockKind.PARALLEL else h, "rstd2": 0,
            "positions": 0, "qkv": layer.q_size + 2 * layer.kv_size if seq > 1 else None,
            "gu": layer.gate_up_weight.shape[0] if keep_gu else None,
            "extra": 2 * h if sandwich else None, "extra_stats": 2 if sandwich else None}


def _proj(run, x, w, b=None, residual=None, epilogue="none"):
    return project(run.linear, x, w, b, residual, epilogue, act=lambda y: steps.act_fwd(run, y))


def _proj_grad(run, dy, w, epilogue="none", aux=None):
    return project_input_grad(run.linear, dy, w, epilogue, aux,
                              act_bwd=lambda gu, dm: steps.act_bwd(run, gu, dm))


def mlp_norm(layer) -> str:
    """The norm the MLP reads through: its own, or (Falcon-7B's parallel block) the input's."""
    return "post_norm" if layer.post_norm_weight is not None else "input_norm"


def gate_up(run, src):
    """gu = norm(src) @Wgu, re-made in backward under recompute="mlp"."""
    layer = run.layer
    h2, _ = steps.norm_fwd(run, src, mlp_norm(layer))
    return _proj(run, h2, layer.weight("gate_up"), layer.gate_up_bias)


def forward(run, x, positions, keep_attention: bool = False):
    """(out, Saved, attention graph or None). keep_attention: attention runs under autograd and
    its graph (output, (q, k, v)) is returned for backward to differentiate instead of
    re-running the attention forward (pifi_fast.frozen.function says where that pays)."""
    layer = run.layer
    kind = block_kind(layer.spec)
    t = x.shape[0]
    graph = None
    h, rstd1 = steps.norm_fwd(run, x, "input_norm")
    if run.segments.seq == 1:
        w_v, b_v = layer.v_weight_and_bias()
        v = _proj(run, h, w_v, b_v).view(t, layer.num_kv_heads, 1, layer.head_dim)
        a = v.expand(t, layer.num_kv_heads, layer.num_kv_groups, layer.head_dim)
        a = a.reshape(t, layer.q_size)
        qkv = None
    else:
        qkv = _proj(run, h, layer.weight("qkv"), layer.qkv_bias)
        rotated = steps.qkv_rotated(run, qkv, positions)
        if keep_attention:
            with torch.enable_grad():
                q, k, v = (p.detach().requires_grad_() for p in steps.heads(layer, rotated))
                o = steps.attend(run, q, k, v)
            graph = (o, (q, k, v))
            a = o.detach().reshape(t, layer.q_size)
        else:
            a = steps.attend(run, *steps.heads(layer, rotated)).reshape(t, layer.q_size)
        if layer.q_norm_weight is None:
            qkv = rotated  # save the rotated buffer: backward needs no re-rotation
    empty = x.new_empty(0)
    extra, extra_stats = empty, empty
    if kind is BlockKind.SANDWICH:  # x2 = x + norm(attention's output)
        o = _proj(run, a, layer.weight("o"), layer.o_bias)
        no, rstd_o = steps.norm_fwd(run, o, "attn_out_norm")
        x2 = x + no
    else:  # x2 = x + attention's output (for the parallel block, out = x2 + mlp(norm(x)))
        x2 = _proj(run, a, layer.weight("o"), layer.o_bias, residual=x)
    keep_gu = run.needs_grad and run.recompute == Recompute.NONE
    src = x if kind is BlockKind.PARALLEL else x2
    out, rstd2, gu, m, rstd_m = _mlp_forward(run, x2, src, keep_gu)
    if kind is BlockKind.SANDWICH and run.needs_grad:  # the two norms' inputs and statistics
        extra = torch.cat((o, m), -1)
        extra_stats = torch.stack((rstd_o, rstd_m), -1)
    saved = Saved(x=x, rstd1=rstd1, x2=empty if kind is BlockKind.PARALLEL else x2, rstd2=rstd2,
                  positions=positions, qkv=qkv if qkv is not None else empty,
                  gu=gu if keep_gu else empty, extra=extra, extra_stats=extra_stats)
    return out, saved, graph


def chunks(run, t: int):
    """Token ranges for the MLP block: its (T, I)-sized temporaries (the activation's output,
    dm, [dg | du], a recomputed gu) then exist for one chunk at a time, which bounds the layer's
    peak memory; chunks of a few thousand tokens keep the GEMMs large."""
    most = run.chunk_tokens or t
    step = -(-t // -(-t // most))  # equal chunks of at most `most` (no short tail chunk)
    return [(s, min(s + step, t)) for s in range(0, t, step)]


def _mlp_forward(run, x2, src, keep_gu):
    """out = x2 + mlp(norm(src)) (sandwich: x2 + norm(mlp(...))), chunked over tokens; src is x2,
    or x for the parallel block. Returns out, the MLP norm's fp32 1/std, gu when it is to be kept
    for backward, and for the sandwich block the MLP's output before its norm and that norm's
    1/std (else None, None)."""
    layer = run.layer
    t, width = x2.shape[0], layer.gate_up_weight.shape[0]
    sandwich = block_kind(layer.spec) is BlockKind.SANDWICH
    ranges = chunks(run, t)
    if len(ranges) == 1:  # one chunk: its results are the outputs (no copies into buffers)
        out, rstd2, gu, m, rstd_m = _mlp_chunk(run, x2, src, keep_gu)
        if gu is not None and gu.untyped_storage().nbytes() > gu.numel() * gu.element_size():
            gu = gu.clone()  # a row-padded GEMM output (fp8_linear): keep only the real rows
        return out, rstd2, gu, m, rstd_m
    stat = torch.promote_types(x2.dtype, torch.float32)
    out = torch.empty_like(x2)
    rstd2 = torch.empty(t, dtype=stat, device=x2.device)
    gu = torch.empty(t, width, dtype=x2.dtype, device=x2.device) if keep_gu else None
    m = torch.empty_like(x2) if sandwich else None
    rstd_m = torch.empty(t, dtype=stat, device=x2.device) if sandwich else None
    for s, e in ranges:
        out[s:e], rstd2[s:e], g, mc, rc = _mlp_chunk(run, x2[s:e], src[s:e], keep_gu)
        if keep_gu:
            gu[s:e] = g
        if sandwich:
            m[s:e], rstd_m[s:e] = mc, rc
    return out, rstd2, gu, m, rstd_m


def _mlp_chunk(run, x2, src, keep_gu):
    """(out, rstd2, gu or None, m or None, rstd_m or None) of the MLP block on these tokens."""
    layer = run.layer
    h2, rstd2 = steps.norm_fwd(run, src, mlp_norm(layer))
    g, epilogue = None, ACT_EPILOGUE[layer.spec.act]
    if not keep_gu and triton_gemm_applies(run.linear, h2, epilogue):
        # gu is not needed later: gate/up GEMM and activation in one pass, gu never written
        mm = _proj(run, h2, layer.weight("gate_up"), layer.gate_up_bias, epilogue=epilogue)
    else:
        g = _proj(run, h2, layer.weight("gate_up"), layer.gate_up_bias)
        mm = steps.act_fwd(run, g)
    if block_kind(layer.spec) is BlockKind.SANDWICH:
        m = _proj(run, mm, layer.weight("down"), layer.down_bias)
        nm, rstd_m = steps.norm_fwd(run, m, "mlp_out_norm")
        return x2 + nm, rstd2, g if keep_gu else None, m, rstd_m
    out = _proj(run, mm, layer.weight("down"), layer.down_bias, residual=x2)
    return out, rstd2, g if keep_gu else None, None, None


def _mlp_input_grad(run, dout, src, rstd2, gu, m=None, rstd_m=None):
    """The MLP block's input gradient, chunked over tokens (see chunks): with respect to src
    through the MLP's norm, plus dout along the residual where src is x2 (the parallel block's
    residual gradient is added by the caller)."""
    layer = run.layer
    name = mlp_norm(layer)
    parallel = block_kind(layer.spec) is BlockKind.PARALLEL
    epilogue = ACT_EPILOGUE[layer.spec.act] + "_bwd"
    dsrc = torch.empty_like(src)
    for s, e in chunks(run, src.shape[0]):
        # recompute="mlp": one extra gate/up GEMM per chunk instead of keeping gu
        g = gu[s:e] if gu.numel() else gate_up(run, src[s:e])
        dy = dout[s:e]
        if m is not None:  # sandwich: through the norm of the MLP's output first
            dy = steps.norm_bwd(run, dy, m[s:e], "mlp_out_norm", rstd_m[s:e])
        dgu = _proj_grad(run, dy, layer.weight("down"), epilogue, aux=g)
        dh2 = _proj_grad(run, dgu, layer.weight("gate_up"))
        dsrc[s:e] = steps.norm_bwd(run, dh2, src[s:e], name, rstd2[s:e],
                                   None if parallel else dout[s:e])
    return dsrc


def input_grad(run, dout, saved: Saved, attention_graph=None):
    """dx of the block at saved.x for the output gradient dout (T, H). attention_graph: what
    forward kept with keep_attention (used once), else the attention forward is re-run."""
    layer, impl = run.layer, run.impl
    kind = block_kind(layer.spec)
    x, qkv, positions = saved.x, saved.qkv, saved.positions
    t = x.shape[0]
    if kind is BlockKind.PARALLEL:  # out = x2 + mlp(norm(x)), x2 = x + attn: d/dx2 is dout
        dx_mlp = _mlp_input_grad(run, dout, x, saved.rstd2, saved.gu)
        dx2 = dout
        da = _proj_grad(run, dx2, layer.weight("o"))
    elif kind is BlockKind.SANDWICH:
        o, m = saved.extra.split(layer.hidden_size, -1)
        dx2 = _mlp_input_grad(run, dout, saved.x2, saved.rstd2, saved.gu, m,
                              saved.extra_stats[:, 1])
        do = steps.norm_bwd(run, dx2, o, "attn_out_norm", saved.extra_stats[:, 0])
        da = _proj_grad(run, do, layer.weight("o"))
    else:
        dx2 = _mlp_input_grad(run, dout, saved.x2, saved.rstd2, saved.gu)
        da = _proj_grad(run, dx2, layer.weight("o"))
    if run.segments.seq == 1:
        w_v, _ = layer.v_weight_and_bias()
        dv = da.view(t, layer.num_kv_heads, layer.num_kv_groups, layer.head_dim).sum(2)
        dh = _proj_grad(run, dv.reshape(t, layer.kv_size), w_v)
    else:
        qk_norm = layer.q_norm_weight is not None
        if attention_graph is not None:
            o, leaves = attention_graph
            dq, dk, dv = torch.autograd.grad(o, leaves, da.view_as(o))
        else:
            rotated = steps.qkv_rotated(run, qkv, positions) if qk_norm else qkv
            with steps.autograd_admitted(), torch.enable_grad():
                q, k, v = (p.detach().requires_grad_() for p in steps.heads(layer, rotated))
                o = steps.attend(run, q, k, v)
                dq, dk, dv = torch.autograd.grad(o, (q, k, v), da.view_as(o))
        dqkv = torch.cat((dq.reshape(t, -1), dk.reshape(t, -1), dv.reshape(t, -1)), -1)
        impl.rope_(dqkv, positions, run.cos, run.sin, layer.num_heads, layer.num_kv_heads,
                   layer.head_dim, transpose=True)
        if qk_norm:
            dqkv = steps.qk_norm_input_grad(layer, qkv, dqkv)
        dh = _proj_grad(run, dqkv, layer.weight("qkv"))
    dres = dx2 if kind is not BlockKind.PARALLEL else dx2 + dx_mlp
    return steps.norm_bwd(run, dh, x, "input_norm", saved.rstd1, dres)
