"""Evaluation: a model's per-task metrics on rows (classification, extractive QA answer
decoding, seq2seq BLEU), and the metrics of a saved checkpoint on a dataset split."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from pifi_fast import data as data_mod
from pifi_fast import hub
from pifi_fast import metrics as metrics_mod
from pifi_fast.inference import inference_runner
from pifi_fast.model import PiFiModel
from pifi_fast.persistence import looks_like_repo_id
from pifi_fast.training.batches import TaskData, load_rows
from pifi_fast.training.config import TrainConfig, load_tokenizer, packed_slm_option
from pifi_fast.training.faults import fault_point
from pifi_fast.training.runtime import precision_autocast, to_device


@torch.no_grad()
def evaluate(model, task_data: TaskData, rows, device, precision="fp32", batch_size=64,
             runner=None) -> dict:
    """Per-task metrics of `model` on `rows` (run through `runner`, e.g. its compiled form
    from pifi_fast.inference.inference_runner, when given: then batch lengths are bucketed)."""
    runner = model if runner is None else runner
    cfg = task_data.cfg
    was_training = model.training
    model.eval()
    autocast, _ = precision_autocast(device, precision)
    preds, golds = [], []
    loss_sum, n = 0.0, 0
    lengths = task_data.lengths(rows)
    order = sorted(range(len(rows)), key=lengths.__getitem__)  # little padding per batch
    for start in range(0, len(rows), batch_size):
        fault_point("eval")
        chunk = [rows[i] for i in order[start:start + batch_size]]
        raw = task_data.collate(chunk, bucketed=runner is not model)
        batch = to_device(raw, device, compiled=runner is not model)
        with autocast:
            if cfg.task == "seq2seq":
                gen = model.generate(input_ids=batch["input_ids"],
                                     attention_mask=batch["attention_mask"],
                                     max_new_tokens=cfg.max_length, do_sample=False)
                preds += task_data.tok.batch_decode(gen, skip_special_tokens=True)
                golds += [r["target"] for r in chunk]
                continue
            out = runner(**batch)
        if out.loss is not None:
            loss_sum += out.loss.item() * len(chunk)
            n += len(chunk)
        if cfg.task == "classification":
            preds += out.logits.argmax(-1).tolist()
            golds += batch["labels"].tolist()
        else:  # the best span over all windows of each example
            for i, r in enumerate(chunk):
                feats = [f for f, e in enumerate(raw["_example"]) if e == i]
                preds.append(qa_answer([out.start_logits[f] for f in feats],
                                       [out.end_logits[f] for f in feats],
                                       [raw["_offsets"][f] for f in feats],
                                       [raw["_sequence_ids"][f] for f in feats], r["context"]))
                golds.append(r.get("answers_all") or [r["answer_text"]])
    model.train(was_training)
    if cfg.task == "classification":
        result = metrics_mod.classification_metrics(preds, golds)
    elif cfg.task == "seq2seq":
        result = metrics_mod.bleu(preds, golds)
    else:
        result = metrics_mod.qa_metrics(preds, golds)
    if n:
        result["loss"] = loss_sum / n
    result["examples"] = len(rows)  # how many were scored
    return result


def qa_answer(start_logits, end_logits, offsets, sequence_ids, context, max_answer: int = 30,
              n_best: int = 20) -> str:
    """The answer text of one example from all its windows (lists, one entry per window):
    the n_best start and end positions inside the context of each window, every valid pair
    (end >= start, at most max_answer tokens) scored start + end, the best over all windows
    (Hugging Face's recipe). "" when no window holds a valid span."""
    best, text = float("-inf"), ""
    for s_logits, e_logits, offs, seq_ids in zip(start_logits, end_logits, offsets,
                                                  sequence_ids):
        ctx = [t for t, sid in enumerate(seq_ids) if sid == 1]
        if not ctx:
            continue
        lo, hi = ctx[0], ctx[-1]
        s = s_logits[lo:hi + 1].float().cpu()
        e = e_logits[lo:hi + 1].float().cpu()
        k = min(n_best, len(s))
        for i in s.topk(k).indices.tolist():
            for j in e.topk(k).indices.tolist():
                if j < i or j - i >= max_answer:
                    continue
                score = float(s[i] + e[j])
                if score > best:
                    best = score
                    text = context[int(offs[lo + i][0]):int(offs[lo + j][1])]
    return text


def evaluate_checkpoint(checkpoint: str, data: str, split: str = "dev", limit=None,
                        device=None, compile: bool = False, cuda_graphs: bool = False,
                        label_map: dict | None = None,
                        text_column: str | None = None,
                        label_column: str | None = None,
                        packed_slm: str | bool | None = None,
                        layer_weights: str | None = None,
                        layer_dtype: str | None = None) -> dict:
    """Metrics of a saved checkpoint, a local folder or a Hub repo (pifi-fast eval), on its own
    data or another (cross-domain transfer): ``label_map`` renames the data's labels to the
    model's ({"negative": 0, "positive": 1}); the columns default to the training run's.
    ``compile``: torch.compile the model; ``cuda_graphs``: compiled with CUDA graphs (GPU;
    elsewhere compiled without them, with a warning). Both bucket the batch lengths.
    ``packed_slm``: PiFiModel.packed_slm (auto, true or false; None: the training run's).
    ``layer_weights``: run the frozen layer in this weights mode instead of the saved one
    (e.g. "int8-channel", quantized on load: the accuracy cost of 8-bit CPU inference);
    ``layer_dtype``: the frozen layer's dtype instead of the saved one (e.g. "bfloat16").
    A file other than the training data is evaluated whole (``split`` applies to folders,
    built-in names and the training file, whose splits data.load_split cuts)."""
    ckpt = Path(checkpoint).expanduser()
    if not ckpt.exists() and looks_like_repo_id(str(checkpoint)):
        ckpt = hub.download(str(checkpoint))
    saved = json.loads((ckpt / "train_config.json").read_text())
    labels = saved.pop("label_map")
    known = {f.name for f in dataclasses.fields(TrainConfig)}  # (older checkpoints: fewer)
    cfg = dataclasses.replace(TrainConfig(**{k: v for k, v in saved.items() if k in known}),
                              data=data or saved["data"])
    cfg.text_column = text_column or cfg.text_column
    cfg.label_column = label_column or cfg.label_column
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = load_tokenizer(ckpt / "tokenizer")
    task_data = TaskData(cfg, tokenizer, label_map=None if labels is None else
                         {k: v for k, v in labels})
    model = PiFiModel.from_pretrained(
        ckpt, layer_dtype=layer_dtype,
        **({"weights": layer_weights} if layer_weights else {})).to(device)
    model.packed_slm = packed_slm_option(cfg.packed_slm if packed_slm is None else packed_slm)
    if model.labels is not None:  # the vocabulary stored with the weights wins
        task_data.label_map = {data_mod.normalize_label(k): i for i, k in enumerate(model.labels)}
    if data and data != saved["data"] and Path(data).is_file():
        split = "all"  # a file of its own (another domain): evaluated whole, not cut in splits
    rows = data_mod.apply_label_map(load_rows(cfg, split, limit), label_map)
    task_data.check_rows(rows, split)
    execution = "cuda-graphs" if cuda_graphs else "compile" if compile else "eager"
    return evaluate(model, task_data, rows, device, cfg.precision,
                    runner=inference_runner(model, execution))
