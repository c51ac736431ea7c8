"""What more than one workload shares: the Case, the shapes and size lists, every implementation's
layers (W1-W3) and models (W4), and SST-2 sentence lengths.

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
import importlib
import os
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoConfig, AutoTokenizer, BertConfig

# offline as a module: its functions are looked up when called, so a test that swaps
# offline.minilm_dir (a machine without the offline packages) reaches the model building here
from pifi_fast import PiFiModel, offline, reference
from pifi_fast.families import needs_eager_attention
from pifi_fast.hf_layer import run_hf_layer
from pifi_fast.frozen.module import FrozenLlamaLayer
from pifi_fast.loading import build_layer, load_llm_layer, random_layer

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


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs (what users train in), fp32 on CPU (the trainer's CPU default; a CPU with
    bf16 instructions runs the bf16 rows with --dtype bfloat16)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# -- size lists -----------------------------------------------------------------------------------
def size_lists(level: str, device: torch.device) -> dict:
    gpu = device.type == "cuda"
    if level == "tiny":  # CI smoke run on CPU: seconds
        return {"shapes": ["smollm2-135m"], "dense": [128], "padded": [8], "cls": [4],
                "kernel_tokens": [128], "w4_sentences": [4], "w4_shapes": ["tiny"], "w4_qa": 2,
                "impls": ("pifi_fast", "hf_sdpa", "hf_eager", "authors"), "reps": 3,
                "w5_shapes": ["tiny"], "w5_batches": [1],
                "w5_impls": ("slm_alone", "hf_sdpa", "pifi_fast", "pifi_fast_int8",
                             "pifi_fast_bf16", "ort_fp32")}
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
                # W5 (CPU only): latency at batch 1, throughput at batch 32
                "w5_shapes": ["minilm+smollm2", "bert-base+llama-3.1-8b"], "w5_batches": [1, 32],
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
                "w4_sentences": [32, 128],
                "w4_shapes": ["bert-base+llama-3.1-8b", "minilm+smollm2"],
                "w4_qa": 8, "w4_epoch": True,
                "w5_shapes": ["minilm+smollm2", "bert-base+llama-3.1-8b"], "w5_batches": [1, 32],
                "impls": ("pifi_fast", "pifi_fast_mlp", "pifi_fast_tgemm") + QUANT_IMPLS
                + BASELINES,
                "reps": 20 if gpu else 7}
    raise ValueError(f"unknown size list {level!r}: tiny, quick or full")


# -- the layers of W1-W3 (built lazily, cached) ---------------------------------------------------
def llm_config(shape: str):
    kind, kw = LLM_SHAPES[shape]
    return AutoConfig.for_model(kind, num_hidden_layers=1, **copy.deepcopy(kw))


@functools.lru_cache(maxsize=4)
def bench_layers(shape: str, device_str: str, dtype_str: str):
    """HF layers (sdpa / eager, sharing weights), the fused layer, and an fp32 authors' layer."""
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
    try:  # deferred: liger-kernel is optional (test extra only)
        import liger_kernel  # noqa: F401
    except ImportError:
        return "Liger-Kernel is not installed"
    return None


def liger_layer(hf_layer, config):
    """The Hugging Face layer with Liger-Kernel's modules swapped in, same (shared) weights: its
    RMSNorm for both norms and its SwiGLU MLP. Liger's RoPE replaces a module-level function of
    Transformers (apply_rotary_pos_emb), which would also change the other baselines of the same
    run; run_liger applies it only for the duration of this layer's own call."""
    # deferred: liger-kernel is optional (test extra only)
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
def liger_rope(layer):
    """Liger's RoPE in the layer's attention module for one call (see liger_layer)."""
    # deferred: liger-kernel is optional (test extra only)
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    module = importlib.import_module(type(layer.self_attn).__module__)
    saved = module.apply_rotary_pos_emb
    module.apply_rotary_pos_emb = liger_rotary_pos_emb
    try:
        yield
    finally:
        module.apply_rotary_pos_emb = saved


def _available(impl: str, device: torch.device) -> str | None:
    """None if the implementation can run here, else why not."""
    if impl == "pifi_fast_tgemm" and device.type != "cuda":
        return "the Triton GEMMs run on GPU only here (CPU: Triton's interpreter)"
    if impl == "liger":
        if device.type != "cuda":
            return "Liger-Kernel needs a GPU"
        return _liger_missing()
    return None


def _unbuildable(layers, impl) -> str | None:
    """Why this shape's layers have no `impl` (None when they have it)."""
    if impl == "hf_sdpa" and "sdpa" not in layers:
        return "the Hugging Face layer cannot use SDPA (soft-capped scores): see hf_eager"
    if impl == "liger" and "liger" not in layers:
        return "Liger-Kernel's modules are Llama's kind (RMSNorm, SwiGLU)"
    return None


def layers_for(shape: str, impl: str, device: torch.device, dtype: torch.dtype):
    """(the shape's layers, None) when `impl` runs here, else (None or the layers, why not):
    what every layer workload checks before it builds a case."""
    why = _available(impl, device)
    if why:
        return None, why
    layers = bench_layers(shape, str(device), str(dtype).replace("torch.", ""))
    return layers, _unbuildable(layers, impl)


def layer_fn(layers, impl, x, mask, backward: bool):
    """A zero-arg callable running one implementation of the layer on (x, mask)."""
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
            with liger_rope(layer):
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


# -- SST-2 sentence lengths (W1 padded rows, W4 batches) ------------------------------------------
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
        tok = AutoTokenizer.from_pretrained(offline.minilm_dir())
        texts = [line.split(" ", 1)[1].strip() for line in path.read_text().splitlines()]
    except (OSError, ImportError, IndexError):
        return None
    hist: dict[int, int] = {}
    for ids in tok(texts)["input_ids"]:
        hist[len(ids)] = hist.get(len(ids), 0) + 1
    return hist


# -- the models of W4 (built lazily, cached) ------------------------------------------------------
def pair_parts(pair: str):
    """(SLM config or folder, the LLM layer in fp32) of a W4 pair."""
    if pair == "tiny":
        slm = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128, vocab_size=1000)
        return slm, random_layer(llm_config("smollm2-135m"), 0, dtype=torch.float32, seed=0)
    if pair == "bert-base+llama-3.1-8b":  # BERT-base shape, random weights
        return BertConfig(), random_layer(llm_config("llama-3.1-8b"), 0, dtype=torch.float32,
                                          seed=0)
    if pair == "minilm+smollm2":
        return str(offline.minilm_dir()), load_llm_layer(offline.smollm2_gguf(),
                                                         dtype=torch.float32)
    raise ValueError(pair)


# (4: a time-boxed run visits the pairs' classification and QA models in turn, eager rows first,
# then the compiled ones; a GPU holds all four, ~15 GB in bf16, a CPU run has three)
@functools.lru_cache(maxsize=4)
def pifi_models(pair: str, device_str: str, dtype_str: str, task: str = "classification"):
    """({impl: model}, vocabulary size) of a W4 pair and task, every model with the authors'
    trainable weights; the 8-bit models are built apart, when a row asks (quant_model)."""
    device, dtype = torch.device(device_str), getattr(torch, dtype_str)
    slm, llm = pair_parts(pair)
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
def quant_model(pair: str, device_str: str, dtype_str: str, mode: str):
    """The classification model of a pair with its frozen layer in 8 bits (``mode`` int8 or fp8,
    quantized on load; ~7 s each for the 8B-shaped layer on 2 cores, so only when asked), with
    the same trainable weights as pifi_models' models."""
    dtype = getattr(torch, dtype_str)
    slm, llm = pair_parts(pair)
    llm.module.to(dtype)
    torch.manual_seed(0)
    model = PiFiModel.from_parts(slm, llm, task="classification", llm_dtype=dtype, weights=mode)
    authors = pifi_models(pair, device_str, dtype_str, "classification")[0]["authors"]
    model.load_state_dict(authors.state_dict())
    return model.to(device_str)
