"""Batch prediction with a saved model: a csv/tsv/jsonl file (or a dataset split) in, one JSONL
record per row out, written atomically (what `pifi-fast predict` runs).

    from pifi_fast.batch_predict import predict_file
    stats = predict_file("runs/sst2/best", "reviews.csv", "preds.jsonl")
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from pifi_fast import data as data_mod
from pifi_fast.model import PiFiModel
from pifi_fast.train import packed_slm_option


def predict_file(checkpoint, data: str, output="predictions.jsonl", *, split: str = "test",
                 limit: int | None = None, batch_size: int = 64, max_length: int | None = None,
                 text_column: str = "text", pair_column: str | None = None,
                 packed_slm: str | bool | None = None, device: str | None = None,
                 execution: str = "eager", layer_weights: str | None = None,
                 layer_dtype: str | None = None) -> dict:
    """Label every row of ``data`` with the model saved in ``checkpoint`` (a folder or a Hub
    repo) and write ``output``: per row its text (and text_pair), the predicted label, every
    label's probability, and the row's gold label when it has one.

    ``data``: a file is predicted whole; from a folder or a built-in name ``split`` is taken.
    ``max_length`` and ``packed_slm`` (auto, true, false) default to the training run's
    settings (its train_config.json; 100 and auto without one); ``device`` to cuda when
    present; ``execution``: eager, compile or cuda-graphs; ``layer_weights``: the frozen
    layer's weights mode instead of the saved one (int8-channel: 8-bit inference on a CPU);
    ``layer_dtype``: its dtype instead of the saved one (bfloat16).
    Returns the number of predictions, the seconds they took (compiled: including the first
    batches' compiles), the device, the execution mode and the output path."""
    model = PiFiModel.from_pretrained(
        checkpoint, layer_dtype=layer_dtype,
        **({"weights": layer_weights} if layer_weights else {}))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    saved = Path(model.loaded_from) / "train_config.json"
    run_config = json.loads(saved.read_text()) if saved.is_file() else {}
    model.packed_slm = packed_slm_option(packed_slm or run_config.get("packed_slm", "auto"))
    max_length = max_length or run_config.get("max_length", 100)
    columns = {"text": text_column, "text_pair": pair_column}
    rows = data_mod.load_split(data, "all" if Path(data).is_file() else split,
                               columns)[:limit]
    texts = [r["text"] for r in rows]
    pairs = [r["text_pair"] for r in rows] if pair_column else None
    t0 = time.perf_counter()
    # disable=None: a bar on a terminal, none in log files
    with tqdm(total=len(texts), unit="sentence", desc="predicting", disable=None) as bar:
        preds = model.predict(texts, pairs, batch_size=batch_size, max_length=max_length,
                              progress=bar.update, execution=execution)
    seconds = time.perf_counter() - t0
    out = Path(output)
    _write_jsonl(out, rows, preds, with_pairs=pairs is not None)
    return {"predictions": len(preds), "seconds": seconds,
            "sentences_per_second": len(preds) / max(seconds, 1e-9), "device": device,
            "execution": execution, "output": out}


def _write_jsonl(out: Path, rows: list[dict], preds: list[dict], with_pairs: bool) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row, pred in zip(rows, preds):
            record = {"text": row["text"], **({"text_pair": row["text_pair"]} if with_pairs
                                              else {}), **pred}
            if "label" in row:
                record["gold"] = row["label"]
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(out)  # a complete file or none: a reader never sees half the predictions
