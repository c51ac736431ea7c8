"""Where a PiFi training step's time goes: the SLM, the adapters, the frozen layer, the head and
loss, the optimizer (zero_grad, gradient clipping and Adam as `pifi-fast train` runs it: fused
for pifi_fast and the reference, torch's default Adam for the authors' setup) and what is left
(Python, glue ops, autograd bookkeeping), measured on the W4 classification step.

Forward parts are timed with forward pre/post hooks on the model's modules (adapter_in,
llm_layer, adapter_out, head); the SLM's forward is the span from the model's forward to
adapter_in's (pifi_fast.PiFiModel may compute the sentence vectors from the SLM's sub-modules,
pifi_fast.packed_slm, without calling the SLM module itself). Backward runs in the reverse
order, so a part's backward is the time from the moment the gradient of its output is ready (a
hook on that tensor; the SLM's output is adapter_in's input) to the moment the next part's is;
the SLM's ends when backward returns. On a GPU every timestamp is
taken after a device synchronisation, which itself costs time: read GPU figures as shares,
not as the step's speed (that comes from the W4 rows of `pifi-fast bench`).
"""
from __future__ import annotations

import statistics
import time

import torch

from pifi_fast.bench.common import pifi_models, default_dtype
from pifi_fast.bench.w4_step import w4_batch, w4_precision
from pifi_fast.training.optim import make_optimizer
from pifi_fast.training.runtime import precision_autocast

PARTS = ("slm", "adapter_in", "llm_layer", "adapter_out", "head")
LABELS = {"slm": "SLM", "adapter_in": "adapter in", "llm_layer": "frozen layer",
          "adapter_out": "adapter out", "head": "head + loss", "optimizer": "optimizer",
          "other": "other (Python, glue, autograd)"}


def step_breakdown(pair: str = "minilm+smollm2", impl: str = "pifi_fast", sentences: int = 32,
                   reps: int = 5, device: torch.device | None = None,
                   dtype: torch.dtype | None = None) -> dict:
    """Median seconds per part of one training step (forward + backward + optimizer) of a W4
    model (impl: pifi_fast, hf_sdpa = the reference, or authors) on SST-2 sentence lengths."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or default_dtype(device)
    if impl not in ("pifi_fast", "hf_sdpa", "authors"):
        raise ValueError(f"impl must be pifi_fast, hf_sdpa or authors, got {impl!r}")
    models, vocab = pifi_models(pair, str(device), str(dtype).replace("torch.", ""))
    model = models[impl]
    model.train()
    ids, mask, labels, tokens = w4_batch(pair, sentences, "train step", impl, device, vocab)
    params = [p for p in model.parameters() if p.requires_grad]
    autocast, _ = precision_autocast(device, w4_precision(impl, dtype))  # as train

    optimizer = make_optimizer(params, lr=1e-5, fused=impl != "authors")  # as train runs them

    def now():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    marks: dict[str, float] = {}

    def on_gradient(tensor, name):
        if tensor.requires_grad:  # backward reaches a part when its output's gradient is ready
            tensor.register_hook(lambda g: marks.__setitem__(f"b0 {name}", now()))

    def before_forward(args, name):
        marks[f"f0 {name}"] = now()
        if name == "adapter_in":  # its input is the SLM's output
            marks["f1 slm"] = marks[f"f0 {name}"]
            on_gradient(args[0], "slm")

    def after_forward(out, name):
        marks[f"f1 {name}"] = now()
        on_gradient(out, name)

    handles = [model.register_forward_pre_hook(lambda m, a: marks.__setitem__("f0 slm", now()))]
    for name in PARTS[1:]:
        module = getattr(model, name)
        handles += [
            module.register_forward_pre_hook(lambda m, a, n=name: before_forward(a, n)),
            module.register_forward_hook(lambda m, a, o, n=name: after_forward(o, n))]
    samples: dict[str, list[float]] = {k: [] for k in (*PARTS, "optimizer", "other", "total")}
    try:
        for rep in range(reps + 1):  # the first step warms up (allocations, Adam's state)
            marks.clear()
            t0 = now()
            optimizer.zero_grad(set_to_none=True)
            t1 = now()
            with autocast:
                loss = model(input_ids=ids, attention_mask=mask, **labels).loss
            loss.backward()
            t2 = now()
            torch.nn.utils.clip_grad_norm_(params, 5.0)
            optimizer.step()
            t3 = now()
            if rep == 0:
                continue
            order = sorted((marks[f"b0 {n}"], n) for n in PARTS if f"b0 {n}" in marks)
            backward = {n: (order[i + 1][0] if i + 1 < len(order) else t2) - start
                        for i, (start, n) in enumerate(order)}
            parts = {n: marks[f"f1 {n}"] - marks[f"f0 {n}"] + backward.get(n, 0.0)
                     for n in PARTS}
            parts["optimizer"] = (t1 - t0) + (t3 - t2)
            parts["total"] = t3 - t0
            parts["other"] = parts["total"] - sum(parts[n] for n in (*PARTS, "optimizer"))
            for k, v in parts.items():
                samples[k].append(v)
    finally:
        for h in handles:
            h.remove()
    median = {k: statistics.median(v) for k, v in samples.items()}
    return {"pair": pair, "impl": impl, "sentences": sentences, "tokens": tokens,
            "device": device.type, "dtype": str(dtype).replace("torch.", "")
            if impl != "authors" else "float32", "reps": reps, "median_s": median}


def markdown(results: list[dict]) -> str:
    keys = (*PARTS, "optimizer", "other")
    lines = ["| pair | impl | step ms | " + " | ".join(LABELS[k] for k in keys) + " |",
             "|---|---|---|" + "---|" * len(keys)]
    for r in results:
        m, total = r["median_s"], r["median_s"]["total"]
        cells = [f"{m[k] * 1e3:.0f} ({100 * m[k] / total:.0f} %)" for k in keys]
        lines.append(f"| {r['pair']} | {r['impl']} | {total * 1e3:.0f} | " + " | ".join(cells)
                     + " |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path) -> bool:
    """Stacked bars, one per (pair, impl): milliseconds per part. False without matplotlib."""
    try:  # deferred: matplotlib is optional (plots only)
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: matplotlib is optional; after use("Agg")

    keys = (*PARTS, "optimizer", "other")
    fig, ax = plt.subplots(figsize=(1.6 * len(results) + 3, 4))
    names = [f"{r['pair']}\n{r['impl']}" for r in results]
    bottom = [0.0] * len(results)
    for i, k in enumerate(keys):
        vals = [r["median_s"][k] * 1e3 for r in results]
        ax.bar(names, vals, bottom=bottom, label=LABELS[k], color=f"C{i}")
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("ms per training step (median)")
    ax.set_title(f"Where a PiFi training step's time goes ({results[0]['device']}, "
                 f"{results[0]['sentences']} SST-2 sentences)", fontsize=9)
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
