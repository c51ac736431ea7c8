"""The benchmark workloads (W1-W4) and their baselines, as self-building cases.

  W1 frozen layer, full-sequence mode: forward, and forward + input-gradient backward;
     dense (rows of 512) and with real padding (SST-2 sentence lengths, padded to the batch max)
  W2 CLS mode (one token per row) forward + backward
  W3 each op of the layer alone, against the ceilings measured in the same run
  W4 a whole PiFi step: classification training step (forward + backward; the optimizer, the
     same for all, is in the epoch rows and pifi-fast breakdown) and inference batch on SST-2
     sentence lengths, the QA
     training step on 384-token windows, and one whole SST-2 training epoch with evaluation
     (through pifi_fast.train: optimizer, data loading and all), eager and under torch.compile

Implementations compared in one run:
  pifi_fast   FrozenLlamaLayer / pifi_fast.PiFiModel (Triton kernels on CUDA, their PyTorch
              twins elsewhere; rows say which in `path`); variants pifi_fast_mlp, _tgemm,
              _int8, _fp8, and in W4 _compiled (torch.compile) and _cudagraphs (GPU)
  hf_sdpa     the Hugging Face layer with SDPA attention (the reference PiFi for W4)
  hf_eager    the Hugging Face layer with eager attention
  hf_compile  the Hugging Face layer under torch.compile (W4: the reference model under it)
  authors     the authors' setup: fp32 layer, every row padded to 100 tokens, padding attended
  liger       the Hugging Face layer with Liger-Kernel's RMSNorm, SwiGLU MLP and RoPE (only when
              it is installed, on GPU; see liger_layer)
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import os
import time
from pathlib import Path
from typing import Callable

import torch

from pifi_fast.bench.timing import saved_activation_bytes

# Token lengths of SST-2 dev sentences under the all-MiniLM-L6-v2 tokenizer ([CLS]/[SEP]
# included), measured once; used when ../shared/data/sst2 is not present.
SST2_TOKEN_HISTOGRAM = {
    4: 2, 5: 1, 6: 2, 7: 7, 8: 12, 9: 12, 10: 22, 11: 17, 12: 28, 13: 20, 14: 27, 15: 23,
    16: 23, 17: 22, 18: 33, 19: 28, 20: 38, 21: 29, 22: 31, 23: 25, 24: 26, 25: 38, 26: 29,
    27: 31, 28: 26, 29: 26, 30: 29, 31: 24, 32: 26, 33: 17, 34: 22, 35: 21, 36: 16, 37: 11,
    38: 11, 39: 16, 40: 17, 41: 15, 42: 7, 43: 6, 44: 15, 45: 4, 46: 4, 47: 7, 48: 2, 49: 6,
    50: 3, 51: 1, 52: 2, 53: 4, 54: 4, 55: 1, 57: 1, 58: 1, 60: 1,
}
AUTHORS_MAX_LENGTH = 100

LLM_SHAPES = {
    "llama-3.1-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336,
                                   num_attention_heads=32, num_key_value_heads=8,
                                   max_position_embeddings=131072, rms_norm_eps=1e-5,
                                   rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                                                    "factor": 8.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 8192})),
    "qwen2-0.5b": ("qwen2", dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14,
                                 num_key_value_heads=2, max_position_embeddings=32768,
                                 rms_norm_eps=1e-6, rope_parameters={"rope_type": "default",
                                                                     "rope_theta": 1000000.0})),
    "smollm2-135m": ("llama", dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                                   num_key_value_heads=3, max_position_embeddings=8192,
                                   rms_norm_eps=1e-5, rope_parameters={"rope_type": "default",
                                                                       "rope_theta": 100000.0})),
    # the authors' other two families, their released configs' layer shapes (the last layer:
    # Gemma-2-9B's layer 41 is a full-attention one)
    "gemma-2-9b": ("gemma2", dict(hidden_size=3584, intermediate_size=14336,
                                  num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                                  query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
                                  sliding_window=4096, layer_types=["full_attention"],
                                  max_position_embeddings=8192, rms_norm_eps=1e-6)),
    "falcon-7b": ("falcon", dict(hidden_size=4544, ffn_hidden_size=18176, num_attention_heads=71,
                                 num_kv_heads=71, multi_query=True, parallel_attn=True,
                                 bias=False, alibi=False, new_decoder_architecture=False,
                                 max_position_embeddings=2048, layer_norm_epsilon=1e-5)),
}
# shapes whose layer is Llama's kind (RMSNorm, SwiGLU): the per-op rows (W3) and Liger apply
LLAMA_KIND_SHAPES = ("llama-3.1-8b", "qwen2-0.5b", "smollm2-135m")
# the other families' shapes: their norm, activation (LayerSpec.norm, .act) and the activation's
# GEMM epilogue (pifi_fast.ops.ACT_EPILOGUE), whose kernels (pifi_fast.kernels.family_ops) get
# per-op rows (W3) of their own
FAMILY_OP_SHAPES = {"gemma-2-9b": ("rms_1p", "gelu_tanh", "geglu_tanh"),
                    "falcon-7b": ("layer", "gelu", "gelu")}
BASELINES = ("hf_sdpa", "hf_eager", "hf_compile", "authors", "liger")
# the fused layer with 8-bit weights (weights="int8" / "fp8"), the same layer otherwise
QUANT_IMPLS = ("pifi_fast_int8", "pifi_fast_fp8")


@dataclasses.dataclass
class Case:
    workload: str  # W1 .. W4
    variant: str  # e.g. "fwd+bwd padded"
    shape: str  # LLM shape (or model pair for W4)
    size: int  # the x-axis: tokens (W1, W3), rows (W2), sentences (W4)
    impl: str
    build: Callable[[], dict]  # -> {"fn": zero-arg callable, "tokens": int, ...}
    note: str = ""

    @property
    def group(self) -> str:
        return f"{self.workload} {self.variant} | {self.shape} | {self.size}"

    @property
    def key(self) -> str:
        return f"{self.group} | {self.impl}"


# -- size lists -----------------------------------------------------------------------------------
def size_lists(level: str, device: torch.device) -> dict:
    gpu = device.type == "cuda"
    if level == "tiny":  # CI smoke run on CPU: seconds
        return {"shapes": ["smollm2-135m"], "dense": [128], "padded": [8], "cls": [4],
                "kernel_tokens": [128], "w4_sentences": [4], "w4_shapes": ["tiny"], "w4_qa": 2,
                "impls": ("pifi_fast", "hf_sdpa", "hf_eager", "authors"), "reps": 3}
    if level == "quick":
        return {"shapes": list(LLM_SHAPES) if gpu else ["smollm2-135m", "qwen2-0.5b"],
                "dense": [512, 4096, 16384] if gpu else [512, 2048],
                "padded": [32, 128, 512] if gpu else [32, 128],
                "cls": [1, 32, 256] if gpu else [1, 32],
                "cls_shapes": list(LLM_SHAPES),
                # the Gemma-2 and Falcon layer shapes on a CPU: one size each (a 9B-class layer
                # costs seconds a pass there); on a GPU they are in "shapes"
                "family_shapes": [] if gpu else ["gemma-2-9b", "falcon-7b"],
                "family_dense": [512], "family_padded": [32],
                # Inputs larger than the caches, so memory-bound ops meet the copy ceiling.
                "kernel_tokens": [16384] if gpu else [8192],
                "w4_sentences": [32], "w4_shapes": ["bert-base+llama-3.1-8b", "minilm+smollm2"],
                # QA train step: 8 windows of 384; the one-epoch rows take ~20 minutes on 2 CPU
                # cores (5 implementations): in the quick list on GPU, the full one on CPU
                "w4_qa": 8, "w4_epoch": gpu,
                "impls": ("pifi_fast", "pifi_fast_mlp", "pifi_fast_tgemm") + QUANT_IMPLS
                + BASELINES,
                "reps": 10 if gpu else 5}
    if level == "full":
        return {"shapes": list(LLM_SHAPES),
                "dense": [512, 1024, 2048, 4096, 8192, 16384, 32768] if gpu else
                [512, 1024, 2048, 4096],
                "padded": [32, 64, 128, 256, 512, 1024] if gpu else [32, 64, 128, 256],
                "cls": [1, 2, 4, 8, 16, 32, 64, 128, 256],
                "kernel_tokens": [4096, 32768] if gpu else [8192, 32768],
                "w4_sentences": [32, 128], "w4_shapes": ["bert-base+llama-3.1-8b", "minilm+smollm2"],
                "w4_qa": 8, "w4_epoch": True,
                "impls": ("pifi_fast", "pifi_fast_mlp", "pifi_fast_tgemm") + QUANT_IMPLS
                + BASELINES,
                "reps": 20 if gpu else 7}
    raise ValueError(f"unknown size list {level!r}: tiny, quick or full")


# -- shared state (built lazily, cached) -----------------------------------------------------------
def llm_config(shape: str):
    from transformers import AutoConfig

    kind, kw = LLM_SHAPES[shape]
    return AutoConfig.for_model(kind, num_hidden_layers=1, **copy.deepcopy(kw))


@functools.lru_cache(maxsize=4)
def _layers(shape: str, device_str: str, dtype_str: str):
    """HF layers (sdpa / eager, sharing weights), the fused layer, and an fp32 authors' layer."""
    from pifi_fast.families import needs_eager_attention
    from pifi_fast.layer import FrozenLlamaLayer
    from pifi_fast.loading import build_layer, random_layer

    device, dtype = torch.device(device_str), getattr(torch, dtype_str)
    base = random_layer(llm_config(shape), 0, dtype=torch.float32, seed=0)
    sd32 = base.module.state_dict()
    out = {"rotary": base.rotary.to(device), "config": base.config}
    # the Hugging Face layer with SDPA and with eager attention; a family whose scores SDPA
    # cannot compute (Gemma-2's soft-capping) has the eager one only, which "hf" then names
    kinds = ("eager",) if needs_eager_attention(base.config) else ("sdpa", "eager")
    sd = {k: v.to(device=device, dtype=dtype) for k, v in sd32.items()}
    for attn in kinds:
        cfg = copy.deepcopy(base.config)
        cfg._attn_implementation = attn
        out[attn] = build_layer(cfg, 0, sd, dtype=dtype).module.to(device)
        sd = out[attn].state_dict()  # the next one shares these weights
    out["hf"] = out[kinds[0]]
    out["pifi_fast"] = FrozenLlamaLayer.from_hf(out["hf"], base.config, out["rotary"])
    # The recompute="mlp" memory mode, sharing the same weights (a shallow module copy).
    out["pifi_fast_mlp"] = copy.copy(out["pifi_fast"])
    out["pifi_fast_mlp"].recompute = "mlp"
    # gemm="triton": the Triton GEMMs with fused epilogues (GPU only), same weights.
    out["pifi_fast_tgemm"] = copy.copy(out["pifi_fast"])
    out["pifi_fast_tgemm"].gemm = "triton"
    for mode in ("int8", "fp8"):  # quantized once here, from the same weights
        out[f"pifi_fast_{mode}"] = FrozenLlamaLayer.from_hf(out["hf"], base.config,
                                                            out["rotary"], weights=mode)
    if device.type == "cuda" and _liger_missing() is None and shape in LLAMA_KIND_SHAPES:
        out["liger"] = liger_layer(out["hf"], base.config)
    if dtype == torch.float32:
        out["authors"] = out["hf"]
    else:
        out["authors"] = build_layer(copy.deepcopy(base.config), 0, sd32,
                                     dtype=torch.float32).module.to(device)
    return out


def _liger_missing() -> str | None:
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return "Liger-Kernel is not installed"
    return None


def liger_layer(hf_layer, config):
    """The Hugging Face layer with Liger-Kernel's modules swapped in, same (shared) weights: its
    RMSNorm for both norms and its SwiGLU MLP. Liger's RoPE replaces a module-level function of
    Transformers (apply_rotary_pos_emb), which would also change the other baselines of the same
    run; run_liger applies it only for the duration of this layer's own call."""
    from liger_kernel.transformers.rms_norm import LigerRMSNorm
    from liger_kernel.transformers.swiglu import LigerSwiGLUMLP

    layer = copy.copy(hf_layer)  # a shallow copy: submodules below are replaced, not mutated
    layer._modules = dict(hf_layer._modules)
    ref = next(hf_layer.parameters())
    for name in ("input_layernorm", "post_attention_layernorm"):
        old = getattr(hf_layer, name)
        norm = LigerRMSNorm(config.hidden_size, eps=config.rms_norm_eps, in_place=False)
        norm.weight = old.weight
        layer._modules[name] = norm.to(ref.device)
    mlp = LigerSwiGLUMLP(config).to(device=ref.device, dtype=ref.dtype)
    for proj in ("gate_proj", "up_proj", "down_proj"):
        getattr(mlp, proj).weight = getattr(hf_layer.mlp, proj).weight
    layer._modules["mlp"] = mlp
    return layer


@contextlib.contextmanager
def _liger_rope(layer):
    """Liger's RoPE in the layer's attention module for one call (see liger_layer)."""
    import importlib

    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    module = importlib.import_module(type(layer.self_attn).__module__)
    saved = module.apply_rotary_pos_emb
    module.apply_rotary_pos_emb = liger_rotary_pos_emb
    try:
        yield
    finally:
        module.apply_rotary_pos_emb = saved


def sst2_lengths(n: int, seed: int = 0) -> list[int]:
    """n sentence lengths (tokens) drawn from SST-2 dev (the file if present, else the table)."""
    hist = _live_sst2_histogram() or SST2_TOKEN_HISTOGRAM
    lengths = torch.tensor(list(hist.keys()), dtype=torch.float)
    weights = torch.tensor(list(hist.values()), dtype=torch.float)
    gen = torch.Generator().manual_seed(seed)
    return lengths[torch.multinomial(weights, n, replacement=True, generator=gen)].long().tolist()


@functools.lru_cache(maxsize=1)
def _live_sst2_histogram():
    root = Path(os.environ.get("PIFI_FAST_DATA", Path(__file__).resolve().parents[2] / ".." /
                               "shared" / "data"))
    path = root / "sst2" / "stsa.binary.dev"
    try:
        from transformers import AutoTokenizer

        from pifi_fast.offline import minilm_dir

        tok = AutoTokenizer.from_pretrained(minilm_dir())
        texts = [line.split(" ", 1)[1].strip() for line in path.read_text().splitlines()]
    except (OSError, ImportError, IndexError):
        return None
    hist: dict[int, int] = {}
    for ids in tok(texts)["input_ids"]:
        hist[len(ids)] = hist.get(len(ids), 0) + 1
    return hist


def _padded_batch(lengths, hidden, device, dtype, pad_to=None, gen_seed=0):
    s = pad_to or max(lengths)
    gen = torch.Generator().manual_seed(gen_seed)
    x = torch.randn(len(lengths), s, hidden, generator=gen).to(device=device, dtype=dtype)
    mask = torch.zeros(len(lengths), s, dtype=torch.bool, device=device)
    for i, n in enumerate(lengths):
        mask[i, :min(n, s)] = True
    return x, mask


def _layer_fn(layers, impl, x, mask, backward: bool):
    """A zero-arg callable running one implementation of the layer on (x, mask)."""
    from pifi_fast.hf_layer import run_hf_layer

    if impl.startswith("pifi_fast"):
        layer = layers[impl]

        def run(inp):
            return layer(inp, mask)
    elif impl in ("hf_sdpa", "hf_eager", "authors"):
        layer = layers["sdpa" if impl == "hf_sdpa" else "eager" if impl == "hf_eager"
                       else "authors"]  # (hf_sdpa without an SDPA layer: skipped, _unbuildable)
        layer_mask = None if impl == "authors" else mask  # the authors attend to padding

        def run(inp):
            return run_hf_layer(layer, layers["rotary"], inp, layer_mask)
    elif impl == "liger":
        layer = layers["liger"]

        def run(inp):
            with _liger_rope(layer):
                return run_hf_layer(layer, layers["rotary"], inp, mask)
    elif impl == "hf_compile":
        layer = layers["hf"]
        compiled = torch.compile(functools.partial(run_hf_layer, layer, layers["rotary"]))

        def run(inp):
            return compiled(inp, mask)
    else:
        raise ValueError(impl)
    if not backward:
        def fwd():
            with torch.inference_mode():
                return run(x)
        return fwd, None
    leaf = x.detach().clone().requires_grad_()
    grad = torch.randn_like(leaf)

    def fwd_bwd():
        leaf.grad = None
        run(leaf).backward(grad)

    return fwd_bwd, lambda: run(leaf)


def _fused_path(layer, x) -> str:
    """Which kernels and attention backend the fused layer runs on x, for the result row."""
    from pifi_fast import attention as attn
    from pifi_fast import ops

    kernels = ops.elementwise_impl(x, layer.kernels).name
    backend = attn.select_backend(x.new_empty(1), layer.attention)
    return (f"kernels={kernels}, attention={backend}, recompute={layer.recompute}, "
            f"weights={layer.weights}")


def _available(impl: str, device: torch.device) -> str | None:
    """None if the implementation can run here, else why not."""
    if impl == "pifi_fast_tgemm" and device.type != "cuda":
        return "the Triton GEMMs run on GPU only here (CPU: Triton's interpreter)"
    if impl == "liger":
        if device.type != "cuda":
            return "Liger-Kernel needs a GPU"
        return _liger_missing()
    return None


def _w1_w2_cases(sizes, device, dtype, impls):
    cases = []
    family = sizes.get("family_shapes", [])
    for shape in sizes["shapes"] + family:
        cfg = llm_config(shape)
        prefix = "family_" if shape in family else ""
        for backward in (False, True):
            for padded in (False, True):
                label = ("fwd+bwd" if backward else "fwd") + (" padded" if padded else " dense")
                for size in sizes[prefix + ("padded" if padded else "dense")]:
                    for impl in impls:
                        if impl == "authors" and not padded:
                            continue  # the authors' setup pads to 100: only for real sentences
                        if impl == "pifi_fast_mlp" and not backward:
                            continue  # the memory mode only changes what backward keeps
                        cases.append(Case("W1", label, shape, size, impl, functools.partial(
                            _build_w1, shape, size, padded, backward, impl, device, dtype,
                            cfg.hidden_size)))
    for shape in sizes.get("cls_shapes", sizes["shapes"]):
        for size in sizes["cls"]:
            if device.type == "cpu" and shape == "llama-3.1-8b" and size > 32:
                continue
            for impl in impls:
                if impl in ("hf_eager", "hf_compile", "pifi_fast_mlp", "pifi_fast_tgemm"):
                    continue  # one key: the attention kernel choice is irrelevant in CLS mode
                cases.append(Case("W2", "cls fwd+bwd", shape, size, impl, functools.partial(
                    _build_w2, shape, size, impl, device, dtype)))
    return cases


def _unbuildable(layers, impl) -> str | None:
    """Why this shape's layers have no `impl` (None when they have it)."""
    if impl == "hf_sdpa" and "sdpa" not in layers:
        return "the Hugging Face layer cannot use SDPA (soft-capped scores): see hf_eager"
    if impl == "liger" and "liger" not in layers:
        return "Liger-Kernel's modules are Llama's kind (RMSNorm, SwiGLU)"
    return None


def _build_w1(shape, size, padded, backward, impl, device, dtype, hidden):
    why = _available(impl, device)
    if why:
        return {"skip": why}
    layers = _layers(shape, str(device), str(dtype).replace("torch.", ""))
    why = _unbuildable(layers, impl)
    if why:
        return {"skip": why}
    if padded:
        lengths = sst2_lengths(size, seed=size)
        pad_to = AUTHORS_MAX_LENGTH if impl == "authors" else None
        lengths = [min(n, AUTHORS_MAX_LENGTH) for n in lengths] if impl == "authors" else lengths
        layer_dtype = torch.float32 if impl == "authors" else dtype
        x, mask = _padded_batch(lengths, hidden, device, layer_dtype, pad_to)
        tokens = sum(lengths)
    else:
        layer_dtype = dtype
        x, mask = _padded_batch([512] * max(1, size // 512) if size >= 512 else [size], hidden,
                                device, dtype)
        mask = None
        tokens = x.shape[0] * x.shape[1]
    fn, forward = _layer_fn(layers, impl, x, mask, backward)
    weights = list(layers[impl if impl.startswith("pifi_fast") or impl == "authors" else "hf"]
                   .parameters())
    out = {"fn": fn, "tokens": tokens, "padded_tokens": x.shape[0] * x.shape[1],
           "dtype": str(layer_dtype).replace("torch.", "")}
    if forward is not None:
        out["saved_bytes_per_token"] = saved_activation_bytes(forward, weights) / tokens
    if impl.startswith("pifi_fast"):
        out["path"] = _fused_path(layers[impl], x)
    return out


def _build_w2(shape, size, impl, device, dtype):
    why = _available(impl, device)
    if why:
        return {"skip": why}
    layers = _layers(shape, str(device), str(dtype).replace("torch.", ""))
    why = _unbuildable(layers, impl)
    if why:
        return {"skip": why}
    layer_dtype = torch.float32 if impl == "authors" else dtype
    x = torch.randn(size, 1, layers["config"].hidden_size, device=device, dtype=layer_dtype)
    fn, forward = _layer_fn(layers, impl, x, None, backward=True)
    key = impl if impl.startswith("pifi_fast") else "authors" if impl == "authors" else "hf"
    weights = list(layers[key].parameters())  # as stored: 8-bit layers stream half the bytes
    weight_bytes = sum(p.numel() * p.element_size() for p in weights)
    return {"fn": fn, "tokens": size, "dtype": str(layer_dtype).replace("torch.", ""),
            "saved_bytes_per_token": saved_activation_bytes(forward, weights) / size,
            # CLS mode streams every frozen weight once forward and once backward.
            "bytes_moved": 2 * weight_bytes}


# -- W3: each op alone ----------------------------------------------------------------------------
def _w3_cases(sizes, device, dtype):
    ops = ("rms_norm", "rms_norm_bwd", "rope", "swiglu", "swiglu_bwd", "attention", "qkv_proj",
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
    shape_ops = [(shape, ops) for shape in sizes["shapes"] if shape in LLAMA_KIND_SHAPES]
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
    elsewhere (pifi_fast.ops.elementwise_impl decides, as in the layer)."""
    from pifi_fast import attention as attn
    from pifi_fast import ops
    from pifi_fast._ext import frozen_linear

    layer = _layers(shape, str(device), str(dtype).replace("torch.", ""))["pifi_fast"]
    es = torch.empty((), dtype=dtype).element_size()
    h, inter = layer.hidden_size, layer.down_weight.shape[1]
    seq = min(tokens, 512)
    b = max(1, tokens // seq)
    t = b * seq

    def rand(*shape_):
        return torch.randn(*shape_, device=device, dtype=dtype)

    impl = ops.elementwise_impl(rand(1), layer.kernels)
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
        q_layer = _layers(shape, str(device), str(dtype).replace("torch.", ""))[
            "pifi_fast_" + op.rsplit(" ", 1)[1]]
        w = q_layer.weight("gate_up")
        flops = 2 * t * w.q.shape[0] * w.q.shape[1]
        stored = w.q.numel() * w.q.element_size() + w.scale.numel() * 4
        if "_grad" in op:
            dy = rand(t, w.q.shape[0])
            run_ = ops.LayerRun(impl=impl)
            return {"fn": lambda: ops._proj_input_grad(run_, dy, w), "tokens": t,
                    "flops": flops, "weight_bytes": stored}
        x = rand(t, w.q.shape[1])
        return {"fn": lambda: ops._quant_linear(x, w, triton=impl.name == "triton"),
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
    from pifi_fast._ext import frozen_linear
    from pifi_fast.kernels import HAS_TRITON

    triton = op.endswith("triton")
    if triton and not HAS_TRITON:
        return {"skip": "triton is not installed"}
    if triton and rand(1).device.type != "cuda":
        return {"skip": "the Triton GEMM is timed on GPU only (CPU runs it through the "
                        "interpreter)"}
    from pifi_fast.kernels.gemm import gemm

    from pifi_fast.ops import ACT_EPILOGUE

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


# -- W4: a whole PiFi step ------------------------------------------------------------------------
def _pair_parts(pair: str):
    """(SLM config or folder, the LLM layer in fp32) of a W4 pair."""
    from transformers import BertConfig

    from pifi_fast.loading import random_layer

    if pair == "tiny":
        slm = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128, vocab_size=1000)
        return slm, random_layer(llm_config("smollm2-135m"), 0, dtype=torch.float32, seed=0)
    if pair == "bert-base+llama-3.1-8b":  # BERT-base shape, random weights
        return BertConfig(), random_layer(llm_config("llama-3.1-8b"), 0, dtype=torch.float32,
                                          seed=0)
    if pair == "minilm+smollm2":
        from pifi_fast.loading import load_llm_layer
        from pifi_fast.offline import minilm_dir, smollm2_gguf

        return str(minilm_dir()), load_llm_layer(smollm2_gguf(), dtype=torch.float32)
    raise ValueError(pair)


# (4: a time-boxed run visits the pairs' classification and QA models in turn, eager rows first,
# then the compiled ones; a GPU holds all four, ~15 GB in bf16, a CPU run has three)
@functools.lru_cache(maxsize=4)
def _pifi_models(pair: str, device_str: str, dtype_str: str, task: str = "classification"):
    """({impl: model}, vocabulary size) of a W4 pair and task, every model with the authors'
    trainable weights; the 8-bit models are built apart, when a row asks (_quant_model)."""
    from pifi_fast import PiFiModel, reference

    device, dtype = torch.device(device_str), getattr(torch, dtype_str)
    slm, llm = _pair_parts(pair)
    torch.manual_seed(0)
    authors = reference.PiFiModel.from_parts(slm, copy.deepcopy(llm), task=task,
                                             attend_to_padding=True)  # fp32, its own copy
    llm.module.to(dtype)
    fast = PiFiModel.from_parts(slm, llm, task=task, llm_dtype=dtype)
    ref = reference.PiFiModel.from_parts(slm, copy.deepcopy(llm), task=task, llm_dtype=dtype)
    fast.load_state_dict(authors.state_dict())
    ref.load_state_dict(authors.state_dict())
    models = {"pifi_fast": fast, "hf_sdpa": ref, "authors": authors}
    if device.type == "cuda" and task == "classification":
        packed = PiFiModel.from_parts(slm, copy.deepcopy(llm), task=task, llm_dtype=dtype,
                                      packed_slm=True)
        packed.load_state_dict(authors.state_dict())
        models["pifi_fast_packed"] = packed
    vocab = authors.slm.config.vocab_size
    return {k: m.to(device) for k, m in models.items()}, vocab


@functools.lru_cache(maxsize=2)
def _quant_model(pair: str, device_str: str, dtype_str: str, mode: str):
    """The classification model of a pair with its frozen layer in 8 bits (``mode`` int8 or fp8,
    quantized on load; ~7 s each for the 8B-shaped layer on 2 cores, so only when asked), with
    the same trainable weights as _pifi_models' models."""
    from pifi_fast import PiFiModel

    dtype = getattr(torch, dtype_str)
    slm, llm = _pair_parts(pair)
    llm.module.to(dtype)
    torch.manual_seed(0)
    model = PiFiModel.from_parts(slm, llm, task="classification", llm_dtype=dtype, weights=mode)
    authors = _pifi_models(pair, device_str, dtype_str, "classification")[0]["authors"]
    model.load_state_dict(authors.state_dict())
    return model.to(device_str)


# W4 implementations besides the fused model's 8-bit variants: eager and compiled pifi_fast and
# reference (the Hugging Face layer; "hf_compile" = the reference model under torch.compile),
# pifi_fast inference through CUDA graphs (GPU), and the authors' setup.
W4_IMPLS = ("pifi_fast", "pifi_fast_compiled", "pifi_fast_cudagraphs", "pifi_fast_packed",
            "hf_sdpa", "hf_compile", "authors")
# GPU-only W4 rows: CUDA graphs (inference), and pifi_fast with packed_slm=True (classification):
# on a CPU pifi_fast packs by default (packed_slm="auto"); on a GPU packing stays opt-in until
# these rows have measured it there.
GPU_ONLY_W4 = ("pifi_fast_cudagraphs", "pifi_fast_packed")
QA_TOKENS = 384  # the QA train step: windows of 384 tokens (SQuAD's setting), all full
SST2_TRAIN_SENTENCES = 6920


def _w4_cases(sizes, device, dtype):
    gpu = device.type == "cuda"
    cases = []

    def add(variant, pair, n, impls, build):
        for impl in impls:
            cases.append(Case("W4", variant, pair, n, impl,
                              functools.partial(build, pair, n, variant, impl, device, dtype)))

    for pair in sizes["w4_shapes"]:
        tiny = pair == "tiny"
        # CPU: compiling BERT-base + an 8B-shaped layer costs minutes per variant; the compiled
        # rows run on the real MiniLM + SmolLM2 pair there (every pair on GPU)
        compiled = gpu or pair == "minilm+smollm2"
        for n in sizes["w4_sentences"]:
            for variant in ("train step", "inference"):
                impls = [i for i in W4_IMPLS if (compiled or "compile" not in i)
                         and (i != "pifi_fast_cudagraphs" or variant == "inference")
                         and (i != "pifi_fast_packed" or gpu)]
                if not tiny:
                    impls[1:1] = QUANT_IMPLS
                add(variant, pair, n, impls, _build_w4)
        if sizes.get("w4_qa") and (gpu or pair != "bert-base+llama-3.1-8b"):
            # (CPU: 8 x 384 tokens through BERT-base and an 8B-shaped layer is ~15 s a step)
            impls = [i for i in W4_IMPLS if i not in GPU_ONLY_W4
                     and (compiled or "compile" not in i)]
            add("qa train step", pair, sizes["w4_qa"], impls, _build_w4)
    if sizes.get("w4_epoch"):
        add("sst2 epoch", "minilm+smollm2", SST2_TRAIN_SENTENCES,
            [i for i in W4_IMPLS if i not in GPU_ONLY_W4], _build_epoch)
    return cases


def _w4_batch(pair, n, variant, impl, device, vocab):
    """(ids, mask, label keywords, real tokens) of one W4 batch: SST-2 sentence lengths (the
    authors pad to 100), or n full QA windows of QA_TOKENS tokens with start/end labels."""
    gen = torch.Generator().manual_seed(1)
    if variant == "qa train step":
        lengths, seq = [QA_TOKENS] * n, QA_TOKENS
    else:
        lengths = sst2_lengths(n, seed=n)
        if impl == "authors":  # padding='max_length', max_length=100
            lengths = [min(x, AUTHORS_MAX_LENGTH) for x in lengths]
        seq = AUTHORS_MAX_LENGTH if impl == "authors" else max(lengths)
    ids = torch.randint(1000 if vocab > 2000 else 5, vocab, (n, seq), generator=gen).to(device)
    mask = torch.zeros(n, seq, dtype=torch.long, device=device)
    for i, length in enumerate(lengths):
        mask[i, :length] = 1
    if variant == "qa train step":
        start = torch.randint(0, QA_TOKENS - 16, (n,), generator=gen)
        labels = {"start_positions": start.to(device),
                  "end_positions": (start + torch.randint(0, 16, (n,), generator=gen)).to(device)}
    else:
        labels = {"labels": torch.randint(0, 2, (n,), generator=gen).to(device)}
    return ids, mask, labels, sum(lengths)


def _w4_runner(models, impl, device):
    """(model, what to call, why not) for an implementation: the model eager, under
    torch.compile, or compiled with CUDA graphs as evaluation and predict() run it
    (pifi_base.inference_runner, mode="reduce-overhead"; GPU only, not yet run on one)."""
    base = impl.replace("_compiled", "").replace("_cudagraphs", "").replace("hf_compile",
                                                                            "hf_sdpa")
    model = models[base]
    from pifi_fast.pifi_base import compile_model, inference_runner

    if impl.endswith("_cudagraphs"):
        if device.type != "cuda":
            return model, None, "CUDA graphs need a GPU"
        return model, inference_runner(model, "cuda-graphs"), None
    if impl.endswith("_compiled") or impl == "hf_compile":
        # both compiled the same way (on a CPU: ATen's random numbers, see compile_model)
        return model, compile_model(model), None
    return model, model, None


def w4_precision(impl: str, dtype: torch.dtype) -> str:
    """The trainer's --precision for a W4 row: the run's dtype as autocast over the whole model
    (bf16 / fp16, as pifi-fast train runs it on a GPU; fp32 on the CPU by default), and fp32 for
    the authors' setup, fp32 by definition."""
    if impl == "authors":
        return "fp32"
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def _build_w4(pair, n, variant, impl, device, dtype):
    task = "question_answering" if variant == "qa train step" else "classification"
    dtype_str = str(dtype).replace("torch.", "")
    try:
        models, vocab = _pifi_models(pair, str(device), dtype_str, task)
        if impl in QUANT_IMPLS:  # built apart, when a row asks
            models = {impl: _quant_model(pair, str(device), dtype_str,
                                         impl.removeprefix("pifi_fast_"))}
    except FileNotFoundError as exc:
        return {"skip": str(exc)}
    model, runner, why = _w4_runner(models, impl, device)
    if why:
        return {"skip": why}
    train = variant != "inference"
    ids, mask, labels, tokens = _w4_batch(pair, n, variant, impl, device, vocab)
    model.train(train)
    from pifi_fast.train import precision_autocast

    # the whole model under the trainer's autocast (the SLM is most of a step: without it a GPU
    # row would time the SLM in fp32, which pifi-fast train never runs there); backward outside
    # it, as in the training loop (fp16's loss scaling is left out: one multiply)
    autocast, precision = precision_autocast(device, w4_precision(impl, dtype))

    def step():
        model.zero_grad(set_to_none=True)
        with autocast:
            loss = runner(input_ids=ids, attention_mask=mask, **labels).loss
        loss.backward()

    def infer():  # as predict() runs it: inference mode eager, no_grad compiled
        with torch.inference_mode(runner is model), torch.no_grad(), autocast:
            runner(input_ids=ids, attention_mask=mask)

    fn = step if train else infer
    out = {"dtype": "float32" if impl == "authors" else str(dtype).replace("torch.", ""),
           "precision": precision, "tokens": tokens}
    if impl.startswith("pifi_fast") and task == "classification":
        out["path"] = f"W4 {impl} classification: " + _slm_path(model, impl, ids, mask)
    if device.type == "cpu":  # a step is seconds here: fewer repetitions keep W4 in budget
        out.update(reps=3, warmup=1)
    if "compile" in impl or "cudagraphs" in impl:
        out["warmup"] = 2  # the first calls compile (and capture); never timed as a rep
        # ...but the first call's wall time (compiling included) is the row's "first call"
        # (filled in when the warm-up runs; Inductor's on-disk cache can make it shorter)
        first, timed = {}, fn

        def fn():
            if "seconds" in first:
                return timed()
            t0 = time.perf_counter()
            timed()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            first["seconds"] = time.perf_counter() - t0

        out["first_call"] = first
    out["fn"] = fn
    return out


def _slm_path(model, impl, ids, mask) -> str:
    """How a W4 pifi_fast row runs its SLM (PiFiModel.slm_mode for this batch: eager and
    compiled (pifi_base.compile_model) pack alike; under CUDA graphs the padded layout)."""
    mode = model.slm_mode({"input_ids": ids, "attention_mask": mask})
    if mode is not None and impl.endswith("_cudagraphs"):
        mode = "padded"
    return {"packed": "packed_slm, the real tokens only",
            "padded": "packed_slm on the padded layout (CUDA graphs; last layer for [CLS] only)",
            None: "the SLM's own forward"}[mode]


def _build_epoch(pair, n, variant, impl, device, dtype):
    """One whole SST-2 training epoch (6,920 sentences, batch 32, Adam) with its dev evaluation,
    through pifi_fast.train, timed once (its first compiled steps included: an epoch's wall
    time includes them)."""
    import tempfile

    from pifi_fast.data import data_root
    from pifi_fast.train import TrainConfig, train

    if not (data_root() / "sst2").is_dir():
        return {"skip": f"SST-2 not found under {data_root()}"}
    precision = w4_precision(impl, dtype)  # bench --dtype as the trainer's --precision
    options = {"pifi_fast": {}, "pifi_fast_compiled": {"compile": True},
               "hf_sdpa": {"implementation": "reference"},
               "hf_compile": {"implementation": "reference", "compile": True},
               "authors": {"authors_setup": True}}[impl]
    out_dir = tempfile.mkdtemp(prefix="pifi-epoch-")
    # the training loop's own seconds (no loading, evaluation or checkpoint), filled in by the
    # timed run: the row's JSON keeps it beside the whole epoch's wall time
    loop = {}

    def epoch():
        import shutil

        try:
            res = train(TrainConfig(data="sst2", slm="minilm", llm="smollm2", epochs=1,
                                    seed=1, batch_size=32, lr=5e-5, max_length=100,
                                    test_split=None, output_dir=out_dir, precision=precision,
                                    device=str(device), **options))
            loop["seconds"] = res["history"][0]["epoch_seconds"]
        finally:
            shutil.rmtree(out_dir, ignore_errors=True)

    path = {}
    if impl == "pifi_fast":
        from pifi_fast.packed_slm import packs_by_default

        path["path"] = ("W4 sst2 epoch pifi_fast: packed_slm=auto ("
                        + ("packed" if packs_by_default(device.type) else "the SLM's own forward")
                        + f" on {device.type})")
    return {"fn": epoch, "tokens": _sst2_train_tokens(), "reps": 1, "warmup": 0,
            "peak_memory": False, "training_loop": loop, **path,
            "dtype": "float32" if precision == "fp32" else str(dtype).replace("torch.", "")}


@functools.lru_cache(maxsize=1)
def _sst2_train_tokens() -> int:
    """Real tokens of one SST-2 training epoch under MiniLM's tokenizer (at most 100 each)."""
    from transformers import AutoTokenizer

    from pifi_fast.data import load_split
    from pifi_fast.offline import minilm_dir

    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    texts = [r["text"] for r in load_split("sst2", "train")]
    return sum(len(ids) for ids in tok(texts, truncation=True, max_length=100)["input_ids"])


def all_cases(level: str, device: torch.device, dtype: torch.dtype,
              workloads=("W1", "W2", "W3", "W4")) -> list[Case]:
    sizes = size_lists(level, device)
    impls = sizes["impls"]
    cases = []
    if "W1" in workloads or "W2" in workloads:
        cases += [c for c in _w1_w2_cases(sizes, device, dtype, impls) if c.workload in workloads]
    if "W3" in workloads:
        cases += _w3_cases(sizes, device, dtype)
    if "W4" in workloads:
        cases += _w4_cases(sizes, device, dtype)
    return cases


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs (what users train in), fp32 on CPU (the trainer's CPU default; a CPU with
    bf16 instructions runs the bf16 rows with --dtype bfloat16)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32

