"""Which layer? Rank an LLM's layers for a classification task in minutes, without fine-tuning
the SLM once per layer (`pifi-fast select-layer`, `train --layer auto`).

The SLM is kept frozen: its sentence vectors (what PiFi sends through the layer: one token per
sentence) are computed once for a sample of the training split and for the dev split. Then, one
layer read from the checkpoint at a time (never the whole LLM in memory), three scores:

  proxy   L_in, L_out and the head (the model's own modules, freshly initialised) trained for
          a few hundred Adam steps on the cached vectors, through the frozen layer, and scored
          on dev with the task's metric; repeated with several seeds (its uncertainty). "No
          layer" is the same with the vector going straight to the head.
  probe   representation only: a ridge-regression linear probe on the layer's output when L_in
          is left at its random initialisation (no training through the layer).
  cka     representation only: linear CKA between the SLM's dev vectors and that output (how
          much of their geometry the layer keeps).

The choice is a layer only when it beats "no layer" by more than the seed spread twice: in the
ranking, and again when the leading layer and "no layer" are trained with fresh seeds. The
leader of many noisy scores is the one whose noise fell highest (the winner's curse), so its
lead in the ranking overstates it; the fresh seeds measure it without that bias.

Which score predicts the fine-tuned result is measured against a sweep, not assumed
(docs/research.md). The ranking is deterministic for a seed.

Only classification: in QA and seq2seq the whole token sequence goes through the layer, so a
proxy would cache every token's vector (sample x length x d_slm) and train through the layer
over all of them, about `length` times the cost per example; not built yet (refused with a
message).
"""
from __future__ import annotations

import dataclasses
import gc
import json
import math
import random
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from pifi_fast import data as data_mod
from pifi_fast import metrics as metrics_mod
from pifi_fast.loading import load_llm_config, load_llm_layer
from pifi_fast.model import PiFiModel
from pifi_fast.training.batches import TaskData, load_rows
from pifi_fast.training.config import TrainConfig, load_tokenizer, resolve_llm, resolve_slm

SELECTION_NAME = "selection.json"


@dataclasses.dataclass
class SelectionOptions:
    """How the cheap ranking runs (the data, SLM and LLM come from a TrainConfig)."""

    layers: str = "all"  # all | comma-separated indices (negative count from the end)
    sample: int = 2000  # training sentences whose vectors train the proxy
    steps: int = 200  # Adam steps of the proxy per layer and seed
    batch_size: int = 64  # (on cached vectors a step costs little more at 64 than at 32)
    lr: float = 1e-3  # adapters and head from scratch: higher than fine-tuning's 5e-5
    repeats: int = 3  # proxy seeds per layer
    seed: int = 0
    ridge: float = 1.0  # the probe's ridge penalty (on standardised features)


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """"all" or "0,15,-1" -> sorted distinct non-negative indices."""
    if spec in ("all", "", None):
        return list(range(n_layers))
    try:
        indices = [int(v) for v in str(spec).split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--layers takes all or comma-separated layer indices, got {spec!r}") \
            from None
    bad = [i for i in indices if not -n_layers <= i < n_layers]
    if bad:
        raise ValueError(f"layers {bad} are out of range: the LLM has {n_layers} layers")
    return sorted({i % n_layers for i in indices})


@torch.no_grad()
def sentence_vectors(model, task_data: TaskData, rows, device, batch_size: int = 64):
    """(N, d) sentence vectors of rows (the SLM alone's encode: what enters L_in), in row order,
    and their (N,) class indices."""
    model.eval()
    order = sorted(range(len(rows)), key=task_data.lengths(rows).__getitem__)
    out = torch.empty(len(rows), model.slm.config.hidden_size)
    labels = torch.empty(len(rows), dtype=torch.long)
    for start in range(0, len(rows), batch_size):
        idx = order[start:start + batch_size]
        batch = task_data.collate([rows[i] for i in idx], bucketed=False)
        inputs = {k: v.to(device) for k, v in batch.items()
                  if k in ("input_ids", "attention_mask", "token_type_ids")}
        out[idx] = model.encode(**inputs)[:, 0].float().cpu()
        labels[idx] = batch["labels"]
    return out, labels


def _score(logits: torch.Tensor, labels: torch.Tensor, metric: str) -> dict:
    preds = logits.argmax(-1).tolist()
    result = metrics_mod.classification_metrics(preds, labels.tolist())
    result["loss"] = float(nn.functional.cross_entropy(logits.float(), labels))
    result["score"] = result[metric]
    return result


def _trainable(model) -> list[nn.Parameter]:
    return [p for name, p in model.named_parameters()
            if not name.startswith("slm.") and p.requires_grad]


def _reinitialise(model, seed: int) -> None:
    """Adapters and head back to a fresh initialisation drawn from `seed`."""
    torch.manual_seed(seed)
    for part in ("adapter_in", "adapter_out", "head"):
        module = getattr(model, part, None)
        if module is None:
            continue
        for m in module.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()


def train_proxy(model, train_v, train_y, dev_v, dev_y, opts: SelectionOptions, seed: int,
                metric: str, label_smoothing: float) -> dict:
    """Adapters and head trained on cached vectors through the frozen layer; dev metrics."""
    _reinitialise(model, seed)
    params = _trainable(model)
    optimizer = torch.optim.Adam(params, lr=opts.lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    order, at = torch.randperm(len(train_v), generator=gen), 0
    for _ in range(opts.steps):
        if at + opts.batch_size > len(order):
            order, at = torch.randperm(len(train_v), generator=gen), 0
        idx = order[at:at + opts.batch_size]
        at += opts.batch_size
        logits = model.classify_sentence_vectors(train_v[idx].unsqueeze(1))
        loss = nn.functional.cross_entropy(logits.float(), train_y[idx],
                                           label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model.classify_sentence_vectors(dev_v[i:i + 256].unsqueeze(1))
                            for i in range(0, len(dev_v), 256)])
    return _score(logits, dev_y, metric)


def ridge_probe(train_x, train_y, dev_x, dev_y, n_classes: int, metric: str,
                penalty: float) -> dict:
    """A closed-form ridge classifier (one-vs-rest on standardised features) scored on dev."""
    x = train_x.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x = (x - mean) / std
    targets = nn.functional.one_hot(train_y, n_classes).double()
    targets = targets - targets.mean(0)
    gram = x.T @ x + penalty * len(x) * torch.eye(x.shape[1], dtype=x.dtype)
    weight = torch.linalg.solve(gram, x.T @ targets)
    logits = ((dev_x.double() - mean) / std) @ weight
    return _score(logits, dev_y, metric)


def linear_cka(a: torch.Tensor, b: torch.Tensor) -> float:
    """Linear centred kernel alignment of two (N, *) representations of the same N items."""
    a = a.double() - a.double().mean(0)
    b = b.double() - b.double().mean(0)
    cross = (a.T @ b).norm() ** 2
    return float(cross / ((a.T @ a).norm() * (b.T @ b).norm()))


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "values": values}


def select_layer(cfg: TrainConfig, opts: SelectionOptions | None = None, out=None,
                 progress: bool = True) -> dict:
    """Rank the layers of cfg.llm (and "no layer") for cfg.data with cfg.slm; returns the
    selection (also written to out/selection.json with a table and a plot when out is given)."""
    opts = opts or SelectionOptions()
    if cfg.task != "classification":
        raise ValueError("select-layer ranks layers for classification tasks only (the [CLS] "
                         "path); QA and seq2seq would send every token through each layer: "
                         "not built yet, see docs/research.md")
    llm = resolve_llm(cfg.llm)
    if llm is None:
        raise ValueError("select-layer needs an LLM (--llm) whose layers to rank")
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t_start = time.perf_counter()
    config = load_llm_config(llm)
    layers = parse_layers(opts.layers, config.num_hidden_layers)
    metric = data_mod.TASK_METRIC.get(cfg.data, "accuracy")
    cfg = dataclasses.replace(cfg, max_length=cfg.max_length or 100)

    train_rows = load_rows(cfg, "train", cfg.limit_train)
    dev_rows = load_rows(cfg, cfg.eval_split, cfg.limit_eval)
    tokenizer = load_tokenizer(resolve_slm(cfg.slm))
    task_data = TaskData(cfg, tokenizer, train_rows)
    task_data.check_rows(dev_rows, cfg.eval_split)
    n_classes = len(task_data.label_map)
    sample = (train_rows if len(train_rows) <= opts.sample
              else random.Random(opts.seed).sample(train_rows, opts.sample))
    base = PiFiModel.from_parts(resolve_slm(cfg.slm), None, task="classification",
                                num_labels=n_classes,  # the sentence vector training will use
                                pooling=None if cfg.pooling == "auto" else cfg.pooling).to(device)
    for p in base.slm.parameters():
        p.requires_grad_(False)
    t0 = time.perf_counter()
    train_v, train_y = sentence_vectors(base, task_data, sample, device)
    dev_v, dev_y = sentence_vectors(base, task_data, dev_rows, device)
    vectors_seconds = time.perf_counter() - t0
    train_v, dev_v = train_v.to(device), dev_v.to(device)
    train_y, dev_y = train_y.to(device), dev_y.to(device)

    def score(index, seeds, representation: bool) -> dict:
        """One candidate (a layer index, or None for no layer), read from the checkpoint now
        and dropped after: the proxy for each seed, and the representation scores."""
        t0 = time.perf_counter()
        one = None if index is None else load_llm_layer(llm, index)
        load_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        torch.manual_seed(opts.seed)
        model = PiFiModel(base.slm, one, task="classification", num_labels=n_classes,
                          label_smoothing=cfg.label_smoothing,
                          head_dropout=cfg.head_dropout).to(device)
        del one  # the model holds the layer now (one in memory at a time)
        row = {"layer": index}
        if representation:  # the representation scores: L_in at its random initialisation
            with torch.no_grad():
                model.eval()
                out_train = train_v if index is None else _layer_output(model, train_v)
                out_dev = dev_v if index is None else _layer_output(model, dev_v)
            row["probe"] = ridge_probe(out_train.cpu(), train_y.cpu(), out_dev.cpu(),
                                       dev_y.cpu(), n_classes, metric, opts.ridge)["score"]
            row["cka"] = 1.0 if index is None else linear_cka(dev_v.cpu(), out_dev.cpu())
        runs = [train_proxy(model, train_v, train_y, dev_v, dev_y, opts, seed, metric,
                            cfg.label_smoothing) for seed in seeds]
        row.update({"proxy": _stats([r["score"] for r in runs]),
                    "proxy_loss": _stats([r["loss"] for r in runs]),
                    "load_seconds": load_seconds, "score_seconds": time.perf_counter() - t0})
        del model
        gc.collect()
        return row

    ranking_seeds = [opts.seed + r for r in range(opts.repeats)]
    results = []
    bar = tqdm([None] + layers, desc="select-layer", unit="layer", disable=not progress)
    for index in bar:
        bar.set_postfix(layer="none" if index is None else index)
        results.append(score(index, ranking_seeds, representation=True))
    confirmation = None
    leader = decide(results)["choice"]
    if leader is not None:  # the leader and no layer again, with seeds the ranking never used
        fresh = [opts.seed + opts.repeats + r for r in range(opts.repeats)]
        if progress:
            tqdm.write(f"select-layer: layer {leader} leads; confirming it against no layer "
                       f"with {len(fresh)} fresh seeds")
        confirmation = {"layer": leader, "seeds": fresh,
                        "rows": [score(index, fresh, representation=False)
                                 for index in (None, leader)]}
    selection = {
        "data": cfg.data, "slm": cfg.slm, "llm": cfg.llm, "llm_layers":
        config.num_hidden_layers, "metric": metric, "eval_split": cfg.eval_split,
        "options": dataclasses.asdict(opts), "train_examples": len(sample),
        "dev_examples": len(dev_rows), **decide(results, confirmation), "layers": results,
        "confirmation": confirmation,
        "seconds": {"total": time.perf_counter() - t_start, "vectors": vectors_seconds,
                    "per_layer_mean": statistics.fmean(
                        r["load_seconds"] + r["score_seconds"] for r in results
                        if r["layer"] is not None) if layers else 0.0}}
    if out is not None:
        write_selection(selection, out)
    return selection


def _lead(layer_row: dict, none_row: dict) -> tuple[float, float]:
    """A layer's proxy margin over no layer, and the larger of the two seed spreads."""
    return (layer_row["proxy"]["mean"] - none_row["proxy"]["mean"],
            max(layer_row["proxy"]["std"], none_row["proxy"]["std"]))


def decide(results: list[dict], confirmation: dict | None = None) -> dict:
    """The ranking (by proxy score, its dev loss breaking ties), the best layer, and the choice.

    The best layer leads when its proxy score beats no layer's by more than the larger seed
    spread. A leader is chosen only when `confirmation` (the leader and no layer scored again
    with fresh seeds, as select_layer does) shows the same; without it the leader is returned
    as the choice with "confirmed": False (select_layer's first look, and selections written
    before the confirmation existed). Otherwise the choice is None: the SLM alone."""
    ranking = sorted(results, key=lambda r: (-r["proxy"]["mean"], r["proxy_loss"]["mean"]))
    none = next(r for r in results if r["layer"] is None)
    best = next(r for r in ranking if r["layer"] is not None)
    margin, spread = _lead(best, none)
    decided = {"ranking": [r["layer"] for r in ranking], "best_layer": best["layer"]}
    if margin <= spread:
        return {**decided, "choice": None, "confirmed": None, "verdict": (
            f"no layer is expected to help: the best, layer {best['layer']}, scores "
            f"{margin * 100:+.2f} points against the SLM alone (spread {spread * 100:.2f})")}
    layer = best["layer"]
    leads = (f"leads the ranking by {margin * 100:.2f} points over the SLM alone (spread "
             f"{spread * 100:.2f})")
    if confirmation is None or confirmation["layer"] != layer:
        return {**decided, "choice": layer, "confirmed": False,
                "verdict": f"layer {layer} {leads}; not confirmed with fresh seeds"}
    rows = {r["layer"]: r for r in confirmation["rows"]}
    fresh_margin, fresh_spread = _lead(rows[layer], rows[None])
    again = (f"with {len(confirmation['seeds'])} fresh seeds it scores "
             f"{fresh_margin * 100:+.2f} points (spread {fresh_spread * 100:.2f})")
    if fresh_margin > fresh_spread:
        return {**decided, "choice": layer, "confirmed": True,
                "verdict": f"layer {layer} is expected to help: it {leads}, and {again}"}
    return {**decided, "choice": None, "confirmed": True, "verdict": (
        f"no layer is expected to help: layer {layer} {leads}, but {again}: its lead was the "
        "luck of the best of many noisy scores")}


def _layer_output(model, vectors: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """The frozen layer's output (N, d_llm) for cached sentence vectors through L_in."""
    parts = []
    for i in range(0, len(vectors), chunk):
        h = model.adapter_in(vectors[i:i + chunk].unsqueeze(1)).to(model.layer_dtype)
        parts.append(model._run_layer(h, None)[:, 0].float())
    return torch.cat(parts)


def read_selection(path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / SELECTION_NAME
    selection = json.loads(path.read_text())
    if "choice" not in selection or "layers" not in selection:
        raise ValueError(f"{path}: not a selection written by pifi-fast select-layer")
    return selection


def write_selection(selection: dict, out) -> dict:
    """selection.json, selection.md (the table) and selection.png (the plot) into out."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / SELECTION_NAME).write_text(json.dumps(selection, indent=1))
    (out / "selection.md").write_text(render_table(selection))
    plot_selection(selection, out / "selection.png")
    return selection


def render_table(selection: dict) -> str:
    metric = selection["metric"]
    choice = ("no layer (the SLM alone)" if selection["choice"] is None
              else f"layer {selection['choice']}")
    lines = [f"# Layer selection: {selection['llm']} for {selection['data']} "
             f"(SLM {selection['slm']})", "",
             f"Proxy: adapters and head trained {selection['options']['steps']} steps on "
             f"{selection['train_examples']} cached training vectors, scored on "
             f"{selection['dev_examples']} {selection['eval_split']} sentences ({metric} x 100, "
             f"mean ± std over {selection['options']['repeats']} seeds). Probe: ridge on the "
             "layer's output with L_in untrained. CKA: SLM vectors against that output.", "",
             f"**Choice: {choice}.** {selection['verdict']}.", "",
             "| rank | layer | proxy | proxy dev loss | probe | CKA | seconds (load + score) |",
             "|---|---|---|---|---|---|---|"]
    rank = {layer: i + 1 for i, layer in enumerate(selection["ranking"])}
    for r in sorted(selection["layers"], key=lambda r: rank[r["layer"]]):
        p = r["proxy"]
        lines.append(f"| {rank[r['layer']]} | {'none' if r['layer'] is None else r['layer']} | "
                     f"{p['mean'] * 100:.2f} ± {p['std'] * 100:.2f} | "
                     f"{r['proxy_loss']['mean']:.4f} | {r['probe'] * 100:.2f} | "
                     f"{r['cka']:.3f} | {r['load_seconds']:.1f} + {r['score_seconds']:.1f} |")
    s = selection["seconds"]
    lines += ["", f"Total {s['total']:.0f} s: sentence vectors {s['vectors']:.0f} s, "
              f"{s['per_layer_mean']:.1f} s per layer.", ""]
    confirmation = selection.get("confirmation")
    if confirmation:
        lines += [f"Confirmation with fresh seeds {confirmation['seeds']} (the leader and no "
                  "layer trained again):", "", "| layer | proxy | proxy dev loss | seconds |",
                  "|---|---|---|---|"]
        for r in confirmation["rows"]:
            lines.append(f"| {'none' if r['layer'] is None else r['layer']} | "
                         f"{r['proxy']['mean'] * 100:.2f} ± {r['proxy']['std'] * 100:.2f} | "
                         f"{r['proxy_loss']['mean']:.4f} | "
                         f"{r['load_seconds'] + r['score_seconds']:.1f} |")
        lines.append("")
    if selection.get("validation"):
        lines += render_validation(selection["validation"], metric)
    return "\n".join(lines)


def render_validation(v: dict, metric: str) -> list[str]:
    """The comparison with a sweep (compare_with_sweep) as Markdown lines."""
    def cell(stat):
        return "-" if not stat else f"{stat['mean'] * 100:.2f} ± {stat['std'] * 100:.2f}"

    def rho(x):
        return "- (fewer than 3 points)" if x is None else f"{x:+.2f}"

    c = v["correlation"]
    lines = ["## Against the sweep", "",
             f"Spearman correlation with the sweep's dev means over {c['points']} points "
             f"(layers {v['layers_compared']}, and no layer): proxy {rho(c['proxy'])}, probe "
             f"{rho(c['probe'])}, CKA (layers only) {rho(c['cka'])}.", "",
             f"| fine-tuned ({metric} x 100, mean ± std over seeds) | layer | seeds | dev | test |",
             "|---|---|---|---|---|"]
    for name, key in (("the selection's pick", "pick"), ("the last layer", "last"),
                      ("the SLM alone", "slm_alone"), ("the sweep's best layer", "sweep_best")):
        stat = v.get(key)
        layer = "-" if not stat else ("none" if stat["layer"] is None else stat["layer"])
        lines.append(f"| {name} | {layer} | {stat['seeds'] if stat else 0} | "
                     f"{cell(stat and stat['dev'])} | {cell(stat and stat['test'])} |")
    if not v["pick_in_sweep"]:
        lines += ["", "The pick has no finished cell in the sweep: nothing to compare it with."]
    return lines + [""]


def plot_selection(selection: dict, path) -> None:
    """Proxy score per layer with its seed spread, the probe beside it, the SLM alone as a
    band."""
    # deferred: matplotlib (the test and bench extras) only for the figure
    import matplotlib
    import matplotlib.pyplot as plt

    matplotlib.use("Agg")
    rows = sorted((r for r in selection["layers"] if r["layer"] is not None),
                  key=lambda r: r["layer"])
    none = next(r for r in selection["layers"] if r["layer"] is None)
    fig, ax = plt.subplots(figsize=(7, 4))
    m, s = none["proxy"]["mean"] * 100, none["proxy"]["std"] * 100
    ax.axhspan(m - s, m + s, color="0.85", zorder=0)
    ax.axhline(m, color="0.4", lw=1, label="no layer (proxy)")
    if rows:
        xs = [r["layer"] for r in rows]
        ax.errorbar(xs, [r["proxy"]["mean"] * 100 for r in rows],
                    yerr=[r["proxy"]["std"] * 100 for r in rows], marker="o", capsize=3,
                    label="proxy (adapters + head trained)")
        ax.plot(xs, [r["probe"] * 100 for r in rows], marker="s", ls="--", alpha=0.7,
                label="probe (ridge, L_in untrained)")
    confirmation = selection.get("confirmation")
    if confirmation:  # the leader and no layer again, with fresh seeds
        fresh = {r["layer"]: r["proxy"] for r in confirmation["rows"]}
        leader = confirmation["layer"]
        ax.errorbar([leader + 0.3], [fresh[leader]["mean"] * 100],
                    yerr=[fresh[leader]["std"] * 100], marker="D", mfc="white", capsize=3,
                    color="tab:red", ls="none", label=f"layer {leader}, fresh seeds")
        ax.axhline(fresh[None]["mean"] * 100, color="tab:red", lw=1, ls=":",
                   label="no layer, fresh seeds")
    ax.set_xlabel("LLM layer index")
    ax.set_ylabel(f"dev {selection['metric']} x 100")
    ax.set_title(f"{selection['llm']} layers for {selection['data']}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation (None below 3 points or without variation)."""
    if len(a) != len(b) or len(a) < 3:
        return None
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return None if var == 0 else cov / var


def compare_with_sweep(selection: dict, records: dict) -> dict:
    """How the selection's scores agree with a sweep's fine-tuned results (its cell records,
    pifi_fast.training.sweep.read_records) for the same data, SLM and LLM: per score (proxy,
    probe, CKA) the Spearman correlation with the sweep's dev means over the layers both have
    (no layer included for the proxy and the probe), and the pick's dev and test against the
    last layer, the SLM alone and the sweep's best layer, each mean ± std over seeds."""
    def cells(layer):
        llm = None if layer is None else selection["llm"]
        return [r for r in records.values() if r["task"] == selection["data"]
                and r["slm"] == selection["slm"] and r.get("llm") == llm
                and (layer is None or r.get("layer") == layer)]

    def summary(layer):
        recs = cells(layer)
        if not recs:
            return None
        dev = [r["dev"] for r in recs]
        test = [(r.get("test") or {}).get(r["metric"]) for r in recs]
        test = [t for t in test if t is not None]
        return {"layer": layer, "seeds": len(recs), "dev": _stats(dev),
                "test": _stats(test) if test else None}

    swept = {}
    for r in selection["layers"]:
        got = summary(r["layer"])
        if got is not None:
            swept[r["layer"]] = got
    common = [r for r in selection["layers"] if r["layer"] in swept]
    dev_means = [swept[r["layer"]]["dev"]["mean"] for r in common]
    layers_only = [r for r in common if r["layer"] is not None]
    correlation = {
        "proxy": spearman([r["proxy"]["mean"] for r in common], dev_means),
        "probe": spearman([r["probe"] for r in common], dev_means),
        "cka": spearman([r["cka"] for r in layers_only],
                        [swept[r["layer"]]["dev"]["mean"] for r in layers_only]),
        "points": len(common)}
    in_sweep = [layer for layer in swept if layer is not None]
    best = max(in_sweep, key=lambda k: swept[k]["dev"]["mean"]) if in_sweep else None
    last = selection["llm_layers"] - 1
    pick = selection["choice"]
    return {"correlation": correlation, "pick": swept.get(pick), "last": swept.get(last),
            "slm_alone": swept.get(None), "sweep_best": swept.get(best),
            "layers_compared": sorted(in_sweep), "pick_in_sweep": pick in swept}


def resolve_auto_layer(cfg: TrainConfig, run_dir, opts: SelectionOptions | None = None):
    """``train --layer auto``: (the config with the chosen layer, or llm=None where the SLM
    alone is expected to do best; the selection). The selection is cfg.layer_selection's file
    when given (it must be for this data, SLM and LLM), the run folder's own from an earlier
    start of the same run, or run now; it is kept in run_dir/layer-selection/ either way, and
    cfg.layer_selection points at it (train_config.json records it with the model)."""
    if cfg.layers:
        raise ValueError("--layer auto picks one layer; it cannot be combined with --layers")
    kept = Path(run_dir) / "layer-selection"
    if cfg.layer_selection:
        selection = read_selection(cfg.layer_selection)
        mismatch = [k for k in ("data", "slm", "llm") if selection.get(k) != getattr(cfg, k)]
        if mismatch:
            raise ValueError(
                f"--layer-selection {cfg.layer_selection} ranks layers for "
                + ", ".join(f"{k} {selection.get(k)!r}" for k in mismatch) + ", not this run's "
                + ", ".join(f"{getattr(cfg, k)!r}" for k in mismatch))
        write_selection(selection, kept)
    elif (kept / SELECTION_NAME).is_file():
        selection = read_selection(kept)
    else:
        selection = select_layer(dataclasses.replace(cfg, layer=-1), opts, out=kept)
    choice = selection["choice"]
    if choice is not None and not selection.get("confirmed"):
        raise ValueError(f"{cfg.layer_selection or kept}: its choice, layer {choice}, was not "
                         "confirmed with fresh seeds (a selection written before pifi_fast "
                         "confirmed its leader): run pifi-fast select-layer again")
    resolved = dataclasses.replace(cfg, layer_selection=str(kept / SELECTION_NAME),
                                   **({"llm": None, "layer": -1} if choice is None
                                      else {"layer": choice}))
    return resolved, selection


__all__ = ["SELECTION_NAME", "SelectionOptions", "compare_with_sweep", "decide", "linear_cka", "parse_layers", "read_selection",
           "resolve_auto_layer", "ridge_probe", "select_layer", "sentence_vectors", "spearman",
           "write_selection"]
