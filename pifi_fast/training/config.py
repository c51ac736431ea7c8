"""A training run's configuration, and the names in it resolved: the SLM, the LLM (offline
short names minilm / smollm2), the tokenizer, the baseline, and the model built for it."""
from __future__ import annotations

import dataclasses

import torch
from transformers import AutoTokenizer

from pifi_fast import reference
from pifi_fast.frozen.options import LayerOptions
from pifi_fast.model import PiFiModel
from pifi_fast.offline import gemma3_270m_gguf, minilm_dir, smollm2_gguf, smollm2_hf_dir


@dataclasses.dataclass
class TrainConfig:
    data: str = "sst2"  # built-in name, folder, file or hub:NAME/CONFIG (see pifi_fast.data)
    task: str = "classification"  # classification | question_answering | seq2seq
    slm: str = "minilm"  # Hub id or folder; "minilm" = the offline all-MiniLM-L6-v2
    llm: str | None = "smollm2"  # Hub id, folder, .gguf; "smollm2" = offline; None = SLM alone
    layer: int | str = -1  # an index, or "auto": pifi_fast.training.select_layer picks it
    layer_selection: str | None = None  # --layer auto: a selection.json (or its folder)
    # written by pifi-fast select-layer, instead of running the selection first
    baseline: str = "none"  # none | llm-lora: the whole --llm with LoRA, no plugged layer
    layers: str | None = None  # several plugged layers, run in this order: "27,28,29" or
    # "-3,-2,-1" (on the command line --layers=-3,-2,-1); overrides layer
    freeze: bool = True
    implementation: str = "fast"  # fast (pifi_fast.PiFiModel) | reference
    kernels: str = "auto"  # fused layer: auto (Triton on CUDA) | triton | torch
    recompute: str = "none"  # fused layer memory mode: none | mlp (recompute gate/up in backward)
    attention: str = "auto"  # fused layer attention backend: auto | flash_attn | torch_varlen | sdpa
    gemm: str = "cublas"  # fused layer projections: cublas | triton (fused epilogues)
    layer_weights: str = "auto"  # fused layer: auto (dtype) | int8 | int8-channel | fp8
    adapter: str = "linear"  # L_in / L_out: linear (the paper's) | mlp (Linear-GELU-Linear)
    adapter_width: int = 0  # mlp adapters' hidden width (0: the SLM's hidden size)
    lora_r: int = 0  # LoRA rank on the SLM (0: full fine-tuning); the export is merged
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str | None = None  # comma list of SLM module names (default: peft's for it)
    packed_slm: str = "auto"  # classification: the SLM's sentence vectors from the real
    # tokens only (pifi_fast.packed_slm): auto (on CPU) | true | false
    pooling: str = "auto"  # classification's sentence vector: auto (cls for encoders, last for
    # decoder-only SLMs) | cls | mean | mean-with-padding | last (see pifi_base.POOLINGS)
    chunk_tokens: int = -1  # fused layer: MLP block over this many tokens at a time (-1: auto,
    # 4096 on CUDA, on CPU by bytes: see FrozenLlamaLayer; 0: all at once)
    authors_setup: bool = False  # fp32, pad to max_length, attend to padding, no grouping,
    # torch's default (unfused) Adam
    seed: int = 42
    precision: str = "auto"  # auto (bf16/fp16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16; with
    # bf16/fp16 the frozen layer is loaded in that dtype (autocast for the rest; fp16 loss scaling)
    epochs: int = 3
    batch_size: int = 32
    lr: float = 5e-5
    weight_decay: float = 0.0
    fused_adam: bool = True  # Adam as one fused kernel over all parameters (CPU and CUDA): the
    # same update to rounding, 4-6x less optimizer time on CPU (see make_optimizer)
    max_length: int | None = None  # tokens per input (default: 384 for question_answering,
    # 100 otherwise: the authors' value)
    doc_stride: int = 128  # question_answering: tokens shared by consecutive context windows
    clip: float = 5.0
    label_smoothing: float = 0.05
    head_dropout: float = 0.2
    group_by_length: bool = True
    output_dir: str = "runs/default"
    resume: bool = False
    max_steps: int | None = None  # stop after this many optimiser steps (smoke runs)
    limit_train: int | None = None
    limit_eval: int | None = None
    eval_split: str = "dev"
    test_split: str | None = "test"
    test_data: str | None = None  # other datasets (comma list) whose test split the best
    # checkpoint is also scored on: cross-domain, the authors' --test_dataset
    test_label_map: str | None = None  # DATA=MODEL,... for those datasets' labels
    text_column: str = "text"
    pair_column: str | None = None
    label_column: str = "label"
    encoding: str = "utf-8"  # csv / tsv / jsonl files' text encoding (latin-1, cp1252, ...)
    drop_empty_labels: bool = False  # drop csv / tsv / jsonl rows whose label is empty
    full_checkpoints: bool = False  # store the frozen layer in every checkpoint (default: a
    # reference to its source and a sha256, re-read on load: lean checkpoints)
    on_nonfinite: str = "stop"  # a NaN/inf loss or gradient norm: stop (default) | skip the step
    deterministic: bool = False  # GPU: deterministic algorithms only (see docs/reliability.md)
    compile: bool = False  # torch.compile the model (the fused layer is one custom op in it);
    # batch lengths are padded to multiples of length_bucket so recompilation stays bounded
    length_bucket: int = 16
    eval_cuda_graphs: bool = False  # evaluation runs the model compiled with CUDA graphs
    # (mode="reduce-overhead", lengths in buckets; GPU only: elsewhere compiled without them)
    no_dropout: bool = False  # turn every dropout off (exact comparisons, e.g. DDP tests)
    distributed: str = "ddp"  # several processes (torchrun / accelerate launch): ddp (each holds
    # the whole model) | fsdp (FSDP2: the SLM's blocks, adapters and head sharded; see
    # pifi_fast.training.sharding)
    activation_checkpointing: bool = False  # recompute the SLM's blocks in backward instead of
    # keeping their activations (the SLM's own forward, not the packed one)
    device: str | None = None


def resolve_slm(name: str) -> str:
    if name == "minilm":
        return str(minilm_dir())
    if name == "smollm2":  # the whole small LLM as the encoder (the LLM + LoRA baseline)
        return str(smollm2_hf_dir())
    return name


BASELINES = ("none", "llm-lora")


def apply_baseline(cfg: TrainConfig) -> TrainConfig:
    """--baseline llm-lora: the comparison the paper did not make. The whole small LLM named by
    --llm (smollm2 by default) fine-tuned with LoRA (rank --lora-r, 8 if unset) as a sequence
    classifier: the LLM is the encoder, its last real token feeds the same head, no plugged
    layer."""
    if cfg.baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {cfg.baseline!r}")
    if cfg.baseline == "none":
        return cfg
    if cfg.llm in (None, "", "none") or str(cfg.llm).endswith(".gguf"):
        raise ValueError("--baseline llm-lora needs --llm smollm2, a Hub id or a Transformers "
                         f"folder (a .gguf other than the offline SmolLM2 is not converted), got "
                         f"{cfg.llm!r}")
    if cfg.task != "classification":
        raise ValueError("--baseline llm-lora is a sequence classifier: task classification")
    return dataclasses.replace(cfg, baseline="none", slm=cfg.llm, llm=None,
                               lora_r=cfg.lora_r or 8, layers=None)


def load_tokenizer(path):
    """The SLM's tokenizer. One without a padding token (decoder-only tokenizers such as GPT-2's
    or Llama's; SmolLM2's as transformers 5.17 converts it from the GGUF, where 5.24 sets
    <|im_end|>) pads with its end-of-sequence token, as SmolLM2's own configuration does:
    padding is masked out, and a decoder-only SLM reads its last real token."""
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"the tokenizer of {path} has neither a padding token nor an "
                             "end-of-sequence token to pad with: set tokenizer.pad_token and "
                             "save it with the model")
        tok.pad_token = tok.eos_token
    return tok


def resolve_llm(name):
    if name in (None, "", "none"):
        return None
    if name == "smollm2":
        return str(smollm2_gguf())
    if name == "gemma3-270m":  # assembled once from its four PyPI parts into the cache
        return str(gemma3_270m_gguf())
    return name


def build_model(cfg: TrainConfig, num_labels: int, precision: str | None = None):
    """The model for a config. ``precision`` (resolved: fp32, bf16 or fp16) sets the frozen
    layer's dtype: it computes in its own dtype under autocast (pifi_fast.frozen.module), so it is
    loaded in the autocast dtype to run at 16-bit speed; fp32 (or None) keeps the source's."""
    cls = reference.PiFiModel if (cfg.implementation == "reference" or cfg.authors_setup) \
        else PiFiModel
    options = dict(task=cfg.task, label_smoothing=cfg.label_smoothing, freeze=cfg.freeze,
                   attend_to_padding=cfg.authors_setup)
    if cfg.task == "classification":
        options.update(num_labels=num_labels, head_dropout=cfg.head_dropout,
                       pooling=None if cfg.pooling == "auto" else cfg.pooling)
    elif cfg.pooling != "auto":
        raise ValueError(f"--pooling {cfg.pooling} applies to task classification only, not "
                         f"{cfg.task}")
    if cfg.lora_r:
        options["lora"] = {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout,
                           "targets": cfg.lora_targets}
    llm = resolve_llm(cfg.llm)
    if cfg.adapter != "linear" or cfg.adapter_width:
        options.update(adapter=cfg.adapter, adapter_width=cfg.adapter_width or None)
    if cfg.layer_weights != "auto" and (cls is not PiFiModel or llm is None or not cfg.freeze):
        raise ValueError(f"--layer-weights {cfg.layer_weights} needs the fused frozen layer "
                         "(implementation fast, an LLM, freeze true, not the authors' setup)")
    if cls is PiFiModel and llm is not None and cfg.freeze:
        options.update(layer_options(cfg).as_dict())
    llm_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if cfg.authors_setup:
        llm_dtype = torch.float32
    model = cls.from_parts(resolve_slm(cfg.slm), llm, layer=layer_indices(cfg),
                           llm_dtype=llm_dtype, seed=cfg.seed, **options)
    if cls is PiFiModel:
        model.packed_slm = packed_slm_option(cfg.packed_slm)
    if cfg.no_dropout:
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    return model


def layer_options(cfg: TrainConfig) -> LayerOptions:
    """The fused layer's options of a run (validated: an unknown value is a ValueError)."""
    return LayerOptions.from_command_line(
        kernels=cfg.kernels, recompute=cfg.recompute, attention=cfg.attention, gemm=cfg.gemm,
        chunk_tokens=cfg.chunk_tokens, weights=cfg.layer_weights)


def packed_slm_option(value: str | bool) -> str | bool:
    """PiFiModel.packed_slm from its command-line spelling: auto, true or false."""
    if isinstance(value, bool) or value == "auto":
        return value
    if value in ("true", "false"):
        return value == "true"
    raise ValueError(f"packed_slm must be auto, true or false, got {value!r}")


def layer_indices(cfg: TrainConfig) -> int | list[int]:
    """cfg.layer, or the list cfg.layers names ("27,28,29")."""
    if not cfg.layers:
        if not isinstance(cfg.layer, int):
            raise ValueError(f"layer must be an index (or 'auto' before training resolves it), "
                             f"got {cfg.layer!r}")
        return cfg.layer
    try:
        return [int(part) for part in str(cfg.layers).split(",")]
    except ValueError:
        raise ValueError(f"--layers takes comma-separated layer indices (e.g. --layers=-2,-1), "
                         f"got {cfg.layers!r}") from None
