"""W3, each op of the frozen layer alone: its cases and how each is built, timed against the
ceilings (copy bandwidth, matmul rate) measured in the same run.

Llama-kind shapes get every op (norms, RoPE, SwiGLU, attention, the projections and their input
gradients, the GEMM-epilogue choice, the 8-bit GEMMs); the other families' shapes get their own
norm, activation and epilogue rows (FAMILY_OP_SHAPES).
"""
from __future__ import annotations

import functools

import torch

from pifi_fast import attention as attn
from pifi_fast.frozen.linear import LinearPath, project_input_grad, quant_linear
from pifi_fast.kernels import common as kernels
from pifi_fast._ext import frozen_linear
from pifi_fast.bench.common import FAMILY_OP_SHAPES, LLAMA_KIND_SHAPES, Case, bench_layers
# (gemm imports without triton, as pifi_fast.frozen.linear imports it: only the GPU rows call it)
from pifi_fast.kernels.gemm import gemm
from pifi_fast.frozen.elementwise import ACT_EPILOGUE, elementwise_impl


# the ops of a Llama-kind layer (LLAMA_KIND_SHAPES), each a row per shape and size
LLAMA_OPS = ("rms_norm", "rms_norm_bwd", "rope", "swiglu", "swiglu_bwd", "attention", "qkv_proj",
             "o_proj", "gate_up_proj", "down_proj",
             # the input-gradient GEMMs of backward (dy @ W): with the four above, the "sum of
             # its GEMMs" that the whole layer's time is held against
             "qkv_proj_grad", "o_proj_grad", "gate_up_proj_grad", "down_proj_grad",
             # the GEMM choice of the issue, per shape: cuBLAS + a separate kernel against the
             # Triton GEMM with the epilogue fused (pifi_fast.kernels.gemm)
             "gate_up+swiglu cublas", "gate_up+swiglu triton", "down_grad+swiglu_bwd cublas",
             "down_grad+swiglu_bwd triton", "o_proj+residual cublas", "o_proj+residual triton",
             # 8-bit weights (pifi_fast.kernels.quant): the forward GEMM and the input gradient
             "gate_up_proj int8", "gate_up_proj fp8", "gate_up_proj_grad int8",
             "gate_up_proj_grad fp8")


def cases(sizes, device, dtype) -> list[Case]:
    shape_ops = [(shape, LLAMA_OPS) for shape in sizes["shapes"] if shape in LLAMA_KIND_SHAPES]
    for shape in sizes["shapes"]:
        if shape in FAMILY_OP_SHAPES:
            norm, act, epilogue = FAMILY_OP_SHAPES[shape]
            shape_ops.append((shape, (
                f"{norm}_norm", f"{norm}_norm_bwd", act, f"{act}_bwd", "attention",
                f"gate_up+{epilogue} cublas", f"gate_up+{epilogue} triton",
                f"down_grad+{epilogue}_bwd cublas", f"down_grad+{epilogue}_bwd triton")))
    return [Case("W3", op, shape, tokens, "pifi_fast",
                 functools.partial(_build_w3, shape, tokens, op, device, dtype))
            for shape, shape_ops_ in shape_ops for tokens in sizes["kernel_tokens"]
            for op in shape_ops_]


def _build_w3(shape, tokens, op, device, dtype):
    """One op of the layer as the layer runs it: Triton kernels on CUDA, their PyTorch twins
    elsewhere (pifi_fast.frozen.elementwise.elementwise_impl decides, as in the layer)."""
    layer = bench_layers(shape, str(device), str(dtype).replace("torch.", ""))["pifi_fast"]
    es = torch.empty((), dtype=dtype).element_size()
    h, inter = layer.hidden_size, layer.down_weight.shape[1]
    seq = min(tokens, 512)
    b = max(1, tokens // seq)
    t = b * seq

    def rand(*shape_):
        return torch.randn(*shape_, device=device, dtype=dtype)

    impl = elementwise_impl(rand(1), layer.kernels)
    if op.endswith(("_norm", "_norm_bwd")) and not op.startswith("rms_norm"):
        # the other families' norms: Gemma's (1 + w) RMSNorm, LayerNorm with bias
        kind = op.removesuffix("_bwd").removesuffix("_norm")
        x, w, bias = rand(t, h), layer.input_norm_weight, layer.input_norm_bias
        if not op.endswith("_bwd"):
            return {"fn": lambda: impl.norm_fwd(x, w, layer.eps, kind, bias), "tokens": t,
                    "bytes_moved": 2 * t * h * es}
        _, rstd = impl.norm_fwd(x, w, layer.eps, kind, bias)
        dy, dres = rand(t, h), rand(t, h)
        return {"fn": lambda: impl.norm_bwd(dy, x, w, rstd, kind, dres), "tokens": t,
                "bytes_moved": 4 * t * h * es}
    if op.removesuffix("_bwd") in ("gelu_tanh", "gelu"):
        act = op.removesuffix("_bwd")
        gated = act == "gelu_tanh"  # reads [g | u], writes m; backward writes [dg | du]
        gu, dm = rand(t, (2 if gated else 1) * inter), rand(t, inter)
        if not op.endswith("_bwd"):
            return {"fn": lambda: impl.act_fwd(gu, act), "tokens": t,
                    "bytes_moved": (3 if gated else 2) * t * inter * es}
        return {"fn": lambda: impl.act_bwd(gu, dm, act), "tokens": t,
                "bytes_moved": (5 if gated else 3) * t * inter * es}
    if op in ("rms_norm", "rms_norm_bwd"):
        x, w = rand(t, h), layer.input_norm_weight
        if op == "rms_norm":
            return {"fn": lambda: impl.rms_fwd(x, w, layer.eps), "tokens": t,
                    "bytes_moved": 2 * t * h * es}
        _, _, rstd = impl.rms_fwd(x, w, layer.eps)
        dy, dres = rand(t, h), rand(t, h)
        return {"fn": lambda: impl.rms_bwd(dy, x, w, rstd, dres), "tokens": t,
                "bytes_moved": 4 * t * h * es}
    if op == "rope":
        qkv = rand(t, layer.q_size + 2 * layer.kv_size)
        pos = torch.arange(seq, device=device).repeat(b)
        cos, sin = layer.rope_tables(seq, device, dtype)
        rotated = (layer.num_heads + layer.num_kv_heads) * layer.head_dim
        return {"fn": lambda: impl.rope_(qkv, pos, cos, sin, layer.num_heads,
                                         layer.num_kv_heads, layer.head_dim),
                "tokens": t, "bytes_moved": 2 * t * rotated * es}
    if op in ("swiglu", "swiglu_bwd"):
        gu = rand(t, 2 * inter)
        if op == "swiglu":
            return {"fn": lambda: impl.swiglu_fwd(gu), "tokens": t,
                    "bytes_moved": 3 * t * inter * es}
        dm = rand(t, inter)
        return {"fn": lambda: impl.swiglu_bwd(gu, dm), "tokens": t,
                "bytes_moved": 5 * t * inter * es}
    if op == "attention":
        q = rand(t, layer.num_heads, layer.head_dim)
        k, v = rand(t, layer.num_kv_heads, layer.head_dim), rand(t, layer.num_kv_heads,
                                                                 layer.head_dim)
        seg = attn.Segments.dense(b, seq, device)
        return {"fn": lambda: attn.attention(q, k, v, seg, layer.scaling), "tokens": t,
                "flops": 4 * b * layer.num_heads * seq * seq * layer.head_dim}
    if "cublas" in op or "triton" in op:
        return _gemm_choice_case(layer, op, impl, rand, t, h)
    if op.endswith(("int8", "fp8")):
        q_layer = bench_layers(shape, str(device), str(dtype).replace("torch.", ""))[
            "pifi_fast_" + op.rsplit(" ", 1)[1]]
        w = q_layer.weight("gate_up")
        flops = 2 * t * w.q.shape[0] * w.q.shape[1]
        stored = w.q.numel() * w.q.element_size() + w.scale.numel() * 4
        if "_grad" in op:
            dy = rand(t, w.q.shape[0])
            path = LinearPath(triton=impl.name == "triton")
            return {"fn": lambda: project_input_grad(path, dy, w), "tokens": t,
                    "flops": flops, "weight_bytes": stored}
        x = rand(t, w.q.shape[1])
        return {"fn": lambda: quant_linear(x, w, triton=impl.name == "triton"),
                "tokens": t, "flops": flops, "weight_bytes": stored}
    weight = {"qkv_proj": layer.qkv_weight, "o_proj": layer.o_weight,
              "gate_up_proj": layer.gate_up_weight,
              "down_proj": layer.down_weight}[op.removesuffix("_grad")]
    if op.endswith("_grad"):
        dy = rand(t, weight.shape[0])
        return {"fn": lambda: dy @ weight, "tokens": t,
                "flops": 2 * t * weight.shape[0] * weight.shape[1]}
    x = rand(t, weight.shape[1])
    return {"fn": lambda: frozen_linear(x, weight), "tokens": t,
            "flops": 2 * t * weight.shape[0] * weight.shape[1]}


def _gemm_choice_case(layer, op, impl, rand, t, h):
    triton = op.endswith("triton")
    if triton and not kernels.HAS_TRITON:
        return {"skip": "triton is not installed"}
    if triton and rand(1).device.type != "cuda":
        return {"skip": "the Triton GEMM is timed on GPU only (CPU runs it through the "
                        "interpreter)"}
    if op.startswith("o_proj"):
        a, w, res = rand(t, layer.q_size), layer.o_weight, rand(t, h)
        fn = ((lambda: gemm(a, w.t(), residual=res)) if triton
              else (lambda: frozen_linear(a, w, None, res)))
        return {"fn": fn, "tokens": t, "flops": 2 * t * w.shape[0] * w.shape[1]}
    epilogue = op.split(" ")[0].partition("+")[2]  # "gate_up+geglu_tanh cublas" -> geglu_tanh
    act = {e: a for a, e in ACT_EPILOGUE.items()}[epilogue.removesuffix("_bwd")]
    act_fwd, act_bwd = ((impl.swiglu_fwd, impl.swiglu_bwd) if act == "silu" else
                        (functools.partial(impl.act_fwd, act=act),
                         functools.partial(impl.act_bwd, act=act)))
    if op.startswith("gate_up"):
        x, w = rand(t, h), layer.gate_up_weight
        fn = ((lambda: gemm(x, w.t(), epilogue)) if triton
              else (lambda: act_fwd(frozen_linear(x, w))))
    else:  # down_grad: the down projection's input gradient and the activation's backward
        w = layer.down_weight
        dy, gu = rand(t, h), rand(t, (1 if act == "gelu" else 2) * w.shape[1])
        fn = ((lambda: gemm(dy, w, epilogue, aux=gu)) if triton
              else (lambda: act_bwd(gu, dy @ w)))
    return {"fn": fn, "tokens": t, "flops": 2 * t * w.shape[0] * w.shape[1]}

