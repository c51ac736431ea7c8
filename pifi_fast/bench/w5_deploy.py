"""W5, what PiFi costs at inference: classification forward passes of SST-2-length sentences at
batch 1 (latency) and batch 32 (throughput) for the SLM alone, the reference PiFi, pifi_fast
(eager, compiled, int8 layer, bf16 layer) and the exported model under ONNX Runtime (fp32,
int8), and the frozen layer alone in CLS mode against its weight-streaming bound.

Implementations (W5 rows):
  slm_alone           the same SLM and head without the frozen layer (PiFi's own baseline)
  hf_sdpa             the reference PiFi (pifi_fast.reference, the Hugging Face layer)
  pifi_fast           pifi_fast.PiFiModel, eager (packed SLM on a CPU)
  pifi_fast_compiled  the same under torch.compile (pifi_fast.inference.compile_model)
  pifi_fast_int8      the frozen layer in int8 with one scale per channel (weights=
                      "int8-channel": torch's weight-only int8 GEMM on a CPU)
  pifi_fast_bf16      the frozen layer in bf16 (its weights and compute; the SLM in fp32):
                      oneDNN's bf16 GEMMs, faster than int8's kernel from a few rows on
  ort_fp32, ort_int8  the model exported by pifi_fast.export, run by ONNX Runtime (CPU); int8
                      is ONNX Runtime's dynamic quantization of the whole graph (SLM included)

The "cls layer fwd" rows time the frozen layer alone on one token per sentence: its bytes_moved
is its weights as stored, so pct_of_ceiling is its share of the weight-streaming bound (those
bytes over the copy bandwidth measured in the same run). overhead() reads a run's rows back into
the ratios the deployment page reports.
"""
from __future__ import annotations

import atexit
import copy
import functools
import shutil
import tempfile

import torch

from pifi_fast import PiFiModel
from pifi_fast.bench.common import Case, pair_parts, pifi_models, sst2_lengths
from pifi_fast.export import export_model, load_exported
from pifi_fast.inference import compile_model

MODEL_IMPLS = ("slm_alone", "hf_sdpa", "pifi_fast", "pifi_fast_compiled", "pifi_fast_int8",
               "pifi_fast_bf16", "ort_fp32", "ort_int8")
LAYER_IMPLS = ("pifi_fast", "pifi_fast_int8", "pifi_fast_bf16")
INT8_MODE = "int8-channel"


def cases(sizes, device, dtype) -> list[Case]:
    """The W5 rows of a size list (sizes["w5_shapes"], sizes["w5_batches"]); CPU only: the
    deployment question is the CPU's (a GPU run lists none yet)."""
    if device.type != "cpu" or not sizes.get("w5_shapes"):
        return []
    impls = sizes.get("w5_impls", MODEL_IMPLS)
    out = []
    for pair in sizes["w5_shapes"]:
        for batch in sizes["w5_batches"]:
            for impl in impls:
                out.append(Case("W5", "cls infer", pair, batch, impl, functools.partial(
                    _build_model_case, pair, batch, impl, device, dtype)))
            for impl in LAYER_IMPLS:
                if impl in impls:
                    out.append(Case("W5", "cls layer fwd", pair, batch, impl, functools.partial(
                        _build_layer_case, pair, batch, impl, device, dtype)))
    return out


def _batch(model, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """n sentences of SST-2 dev lengths as token tensors (random ids, [CLS] first)."""
    lengths = sst2_lengths(n, seed=seed)
    vocab = model.slm.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(n, max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, :length] = torch.randint(min(1000, vocab // 2), vocab, (length,), generator=g)
        ids[row, 0], ids[row, length - 1] = 101, 102  # BERT's [CLS] / [SEP] (both SLMs' ids)
        mask[row, :length] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


@functools.lru_cache(maxsize=2)
def _deploy_models(pair: str, device_str: str, dtype_str: str):
    """The W5 models of a pair beyond pifi_models': the SLM alone, the int8-channel model and
    the bf16-layer model, with the same trainable weights (the authors' model's); built once
    per pair."""
    models, _ = pifi_models(pair, device_str, dtype_str, "classification")
    weights = models["authors"].state_dict()
    slm_part, llm = pair_parts(pair)
    alone = PiFiModel.from_parts(slm_part, None, task="classification")
    alone.load_state_dict({k: v for k, v in weights.items()
                           if k.startswith(("slm.", "head."))})
    llm.module.to(getattr(torch, dtype_str))
    int8 = PiFiModel.from_parts(slm_part, llm, task="classification",
                                llm_dtype=getattr(torch, dtype_str), weights=INT8_MODE)
    int8.load_state_dict(weights)
    llm_bf16 = copy.deepcopy(llm)
    llm_bf16.module.to(torch.bfloat16)  # (llm_dtype applies to layers read from a source only)
    bf16 = PiFiModel.from_parts(slm_part, llm_bf16, task="classification")
    bf16.load_state_dict(weights)  # (the layer's weights rounded to bf16 as they load)
    if bf16.layer_dtype != torch.bfloat16:
        raise RuntimeError(f"the bf16 row's layer is {bf16.layer_dtype}")
    return {"slm_alone": alone.eval().to(device_str), "pifi_fast_int8": int8.eval().to(device_str),
            "pifi_fast_bf16": bf16.eval().to(device_str)}


_EXPORTS: dict = {}


def _exported(pair: str, device_str: str, dtype_str: str, int8: bool):
    """The pair's PiFi exported to ONNX once (fp32 and ONNX Runtime's dynamic int8) into a
    temporary folder removed at exit, loaded with this process's thread count."""
    key = (pair, device_str, dtype_str)
    if key not in _EXPORTS:
        folder = tempfile.mkdtemp(prefix="pifi-w5-export-")
        atexit.register(shutil.rmtree, folder, True)
        ref = pifi_models(pair, device_str, dtype_str, "classification")[0]["hf_sdpa"]
        export_model(ref, f"{folder}/onnx", format="onnx", quantize="int8",
                     progress=lambda _: None)
        _EXPORTS[key] = f"{folder}/onnx"
    return load_exported(_EXPORTS[key], int8=int8, threads=torch.get_num_threads())


def _build_model_case(pair, batch, impl, device, dtype):
    if impl.startswith("ort_"):
        try:
            import onnxruntime  # noqa: F401  # deferred: optional (the export extra)
        except ImportError:
            return {"skip": "onnxruntime is not installed (pip install 'pifi-fast[export]')"}
    if dtype != torch.float32 and impl.startswith("ort_"):
        return {"skip": "the ONNX rows are fp32 (the exported graph's dtype)"}
    models, _ = pifi_models(pair, str(device), str(dtype).replace("torch.", ""),
                             "classification")
    dtype_str = str(dtype).replace("torch.", "")
    inputs = _batch(models["authors"], batch)
    if impl.startswith("ort_"):
        exported = _exported(pair, str(device), dtype_str, int8=impl == "ort_int8")

        def fn():
            return exported(**inputs)
    else:
        if impl in ("slm_alone", "pifi_fast_int8", "pifi_fast_bf16"):
            model = _deploy_models(pair, str(device), dtype_str)[impl]
        elif impl == "pifi_fast_compiled":
            model = compile_model(models["pifi_fast"].eval())
        else:
            model = models[impl].eval()
        inputs = {k: v.to(device) for k, v in inputs.items()}
        # compiled: no_grad, not inference_mode (see PiFiModel.predict)
        grad_off = torch.no_grad if impl == "pifi_fast_compiled" else torch.inference_mode

        def fn():
            with grad_off():
                return model(**inputs).logits
    return {"fn": fn, "tokens": batch, "dtype": "float32" if impl.startswith("ort_")
            else dtype_str, "peak_memory": False,
            "real_tokens": int(inputs["attention_mask"].sum())}


def _build_layer_case(pair, batch, impl, device, dtype):
    """The frozen layer alone in CLS mode: one token per sentence, forward, its weights as
    stored streamed once."""
    dtype_str = str(dtype).replace("torch.", "")
    if impl == "pifi_fast":
        model = pifi_models(pair, str(device), dtype_str, "classification")[0]["pifi_fast"]
    else:
        model = _deploy_models(pair, str(device), dtype_str)[impl]
    layer = model.llm_layer
    x = torch.randn(batch, 1, model.llm_config.hidden_size, device=device,
                    dtype=model.layer_dtype, generator=None)

    def fn():
        with torch.inference_mode():
            return layer(x, None)
    weight_bytes = sum(p.numel() * p.element_size() for p in layer.parameters())
    return {"fn": fn, "tokens": batch, "dtype": dtype_str, "peak_memory": False,
            "bytes_moved": weight_bytes, "weights": INT8_MODE if impl.endswith("int8") else
            str(model.layer_dtype).replace("torch.", "")}


# -- reading a run back ---------------------------------------------------------------------------
def overhead(rows: list[dict]) -> list[dict]:
    """Per pair, batch and implementation of the W5 "cls infer" rows: median ms, sentences/s,
    the ratio to the SLM alone (time / SLM-alone time: x1.10 = 10 % slower) and the speed-up
    over the reference (reference time / time), with the layer rows' share of the streaming
    bound beside the pifi_fast rows it belongs to."""
    timed = [r for r in rows if r.get("workload") == "W5" and "median_s" in r]
    by = {(r["variant"], r["shape"], r["size"], r["impl"]): r for r in timed}
    out = []
    for r in timed:
        if r["variant"] != "cls infer":
            continue
        alone = by.get(("cls infer", r["shape"], r["size"], "slm_alone"))
        ref = by.get(("cls infer", r["shape"], r["size"], "hf_sdpa"))
        layer = by.get(("cls layer fwd", r["shape"], r["size"],
                        r["impl"] if r["impl"] in LAYER_IMPLS else "pifi_fast"))
        out.append({
            "pair": r["shape"], "batch": r["size"], "impl": r["impl"],
            "median_ms": r["median_s"] * 1e3, "sentences_per_s": r["size"] / r["median_s"],
            "vs_slm_alone": None if alone is None else r["median_s"] / alone["median_s"],
            "speedup_vs_reference": None if ref is None else ref["median_s"] / r["median_s"],
            "layer_ms": None if layer is None or r["impl"] in ("slm_alone", "hf_sdpa")
            or r["impl"].startswith("ort_") else layer["median_s"] * 1e3,
            "layer_pct_of_streaming_bound": None if layer is None
            or r["impl"] not in LAYER_IMPLS else layer["pct_of_ceiling"],
        })
    return out


def deploy_targets(rows: list[dict]) -> list[dict]:
    """The deployment issue's targets read off one run (CPU): the 8B-shaped layer's overhead
    over the SLM alone at batch 32 (<= x1.10) and with the int8 layer at batch 1 (<= x1.5); the
    best pifi_fast path's speed-up over the reference at batch 1 and 32 (>= x2); the int8
    layer's CLS latency within 1.5x of its streaming bound (>= 66.7 % of it)."""
    table = overhead(rows)
    big = "bert-base+llama-3.1-8b"

    def find(batch, impl):
        return next((t for t in table if t["pair"] == big and t["batch"] == batch
                     and t["impl"] == impl), None)

    def best(batch, exported: bool):
        # pifi_fast's PyTorch paths, or those and its exports run by ONNX Runtime
        prefixes = ("pifi_fast", "ort_") if exported else ("pifi_fast",)
        ours = [t for t in table if t["pair"] == big and t["batch"] == batch
                and t["impl"].startswith(prefixes) and t["speedup_vs_reference"]]
        return max(ours, key=lambda t: t["speedup_vs_reference"], default=None)

    out = []

    def add(what, row, value, goal, kind):
        met = None if value is None else value >= goal if kind == "min" else value <= goal
        out.append({"target": what, "impl": None if row is None else row["impl"],
                    "value": value, "goal": goal, "kind": kind, "met": met})

    for batch, goal, impl in ((32, 1.10, "pifi_fast"), (1, 1.5, "pifi_fast_int8")):
        # the fastest pifi_fast row (eager, compiled, int8) of that batch for the fp32 target
        row = (min((t for t in table if t["pair"] == big and t["batch"] == batch
                    and t["impl"].startswith("pifi_fast") and t["vs_slm_alone"]),
                   key=lambda t: t["vs_slm_alone"], default=None)
               if impl == "pifi_fast" else find(batch, impl))
        add(f"PiFi over the SLM alone, batch {batch}" + (" (int8 layer)" if batch == 1 else ""),
            row, None if row is None else row["vs_slm_alone"], goal, "max")
    for batch in (1, 32):
        for exported, what in ((False, "best pifi_fast PyTorch path"),
                               (True, "best pifi_fast path, exports included")):
            row = best(batch, exported)
            add(f"{what} over the reference, batch {batch}", row,
                None if row is None else row["speedup_vs_reference"], 2.0, "min")
    row = find(1, "pifi_fast_int8")
    pct = None if row is None else row["layer_pct_of_streaming_bound"]
    add("int8 layer CLS latency, % of its weight-streaming bound (batch 1)", row, pct,
        100 / 1.5, "min")
    return out


def plot(rows: list[dict], path) -> bool:
    """Bars of each implementation's time relative to the SLM alone, per pair and batch (the
    deployment page's figure). False without matplotlib or W5 rows."""
    table = [t for t in overhead(rows) if t["vs_slm_alone"] is not None]
    if not table:
        return False
    try:  # deferred: matplotlib is optional (plots only)
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = sorted({(t["pair"], t["batch"]) for t in table})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, (pair, batch) in zip(axes[0], panels):
        sel = [t for t in table if t["pair"] == pair and t["batch"] == batch]
        sel.sort(key=lambda t: MODEL_IMPLS.index(t["impl"]) if t["impl"] in MODEL_IMPLS else 99)
        ax.barh([t["impl"] for t in sel], [t["vs_slm_alone"] for t in sel],
                color=["0.6" if t["impl"] == "slm_alone" else "C3" if t["impl"] == "hf_sdpa"
                       else "C0" if t["impl"].startswith("pifi") else "C2" for t in sel])
        ax.axvline(1.0, color="k", lw=0.8)
        ax.invert_yaxis()
        ax.set_title(f"{pair}, batch {batch}", fontsize=9)
        ax.set_xlabel("time / SLM alone (lower is better)", fontsize=8)
        for i, t in enumerate(sel):
            ax.text(t["vs_slm_alone"], i, f" x{t['vs_slm_alone']:.2f}", va="center", fontsize=7)
        ax.tick_params(labelsize=8)
    fig.suptitle("PiFi inference on the CPU: time relative to the SLM alone (W5)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def markdown(rows: list[dict]) -> str:
    """The W5 section of a run's results.md ("" without W5 rows)."""
    table = overhead(rows)
    if not table:
        return ""
    lines = ["## W5: PiFi's inference overhead (classification, CPU)", "",
             "Time per batch relative to the SLM alone (x1.10 = 10 % slower) and speed-up over "
             "the reference PiFi, same run. Layer: the frozen layer alone in CLS mode and its "
             "share of the weight-streaming bound (its stored weights over the copy bandwidth "
             "of this run).", "",
             "| pair | batch | impl | median ms | sentences/s | vs SLM alone | "
             "speed-up vs reference | layer ms | layer % of streaming bound |",
             "|---|---|---|---|---|---|---|---|---|"]

    def f(v, fmt):
        return "" if v is None else format(v, fmt)
    for t in table:
        lines.append(f"| {t['pair']} | {t['batch']} | {t['impl']} | {t['median_ms']:.2f} | "
                     f"{t['sentences_per_s']:.1f} | {f(t['vs_slm_alone'], '.2f')} | "
                     f"{f(t['speedup_vs_reference'], '.2f')} | {f(t['layer_ms'], '.2f')} | "
                     f"{f(t['layer_pct_of_streaming_bound'], '.0f')} |")
    lines += ["", "| target (bert-base + Llama-3.1-8B-shaped layer) | measured | row | goal | "
              "met |", "|---|---|---|---|---|"]
    for t in deploy_targets(rows):
        value = "not in this run" if t["value"] is None else f"{t['value']:.2f}"
        met = "-" if t["met"] is None else ("yes" if t["met"] else "**no**")
        goal = (">= " if t["kind"] == "min" else "<= ") + f"{t['goal']:.3g}"
        lines.append(f"| {t['target']} | {value} | {t['impl'] or '-'} | {goal} | {met} |")
    return "\n".join(lines) + "\n"
