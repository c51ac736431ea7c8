"""Records in, model inputs out: a split's rows loaded for a task, and TaskData, which turns them
into batches (classification, extractive QA windows, seq2seq) with dynamic padding."""
from __future__ import annotations

import torch

from pifi_fast import data as data_mod
from pifi_fast import tasks
from pifi_fast.training.config import TrainConfig


class TaskData:
    """Turns records into model inputs for the configured task."""

    def __init__(self, cfg: TrainConfig, tokenizer, train_rows=None, label_map=None):
        self.cfg, self.tok = cfg, tokenizer
        self.label_map = None
        if label_map is not None:  # keys as the data spells them: normalized like loaded rows
            self.label_map = {data_mod.normalize_label(k): v for k, v in label_map.items()}
        elif cfg.task == "classification":
            self.label_map = data_mod.label_vocabulary(train_rows)

    @property
    def labels(self) -> list | None:
        """Class index -> label (what a model stores with its weights)."""
        if self.label_map is None:
            return None
        return [k for k, _ in sorted(self.label_map.items(), key=lambda kv: kv[1])]

    def check_rows(self, rows, split: str) -> None:
        """Every label of a split known to the model, checked once when the data is loaded:
        ValueError naming the label, the row and the known labels."""
        if self.label_map is None:
            return
        for i, r in enumerate(rows):
            data_mod.encode_label(self.label_map, r["label"], f"row {i} of {split}")

    def lengths(self, rows):
        key = {"classification": "text", "question_answering": "context",
               "seq2seq": "source"}[self.cfg.task]
        return [len(r[key]) + len(r.get("text_pair") or "") for r in rows]

    def collate(self, rows, bucketed: bool | None = None):
        """A batch of rows as tensors; ``bucketed`` (default: cfg.compile) pads its length to a
        multiple of cfg.length_bucket: compiled models then see few distinct lengths."""
        cfg = self.cfg
        bucketed = cfg.compile if bucketed is None else bucketed
        bucket = cfg.length_bucket if bucketed else None
        if cfg.task == "classification":
            return data_mod.collate_classification(self.tok, rows, cfg.max_length, self.label_map,
                                                   pad_to_max=cfg.authors_setup,
                                                   pad_to_multiple_of=bucket)
        if cfg.task == "seq2seq":
            enc = data_mod.pad_to_bucket(
                self.tok([r["source"] for r in rows], truncation=True, max_length=cfg.max_length,
                         padding=True, return_tensors="pt"), bucket, cfg.max_length,
                self.tok.pad_token_id)
            tgt = data_mod.pad_to_bucket(
                self.tok(text_target=[r["target"] for r in rows], truncation=True,
                         max_length=cfg.max_length, padding=True, return_tensors="pt"), bucket,
                cfg.max_length, self.tok.pad_token_id)
            labels = tgt["input_ids"].masked_fill(tgt["attention_mask"] == 0, -100)
            return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                    "labels": labels}
        return self._collate_qa(rows, bucket)

    def _collate_qa(self, rows, bucket: int | None = None):
        """Extractive QA as Hugging Face's recipe does it: each context cut into windows of
        max_length tokens (question included) overlapping by doc_stride tokens, every window a
        feature of the batch; a window that does not hold the answer points at [CLS]. The
        authors' setup keeps one truncated window per example (answers past the cut are lost)."""
        windows = not self.cfg.authors_setup
        enc = self.tok([r["question"] for r in rows], [r["context"] for r in rows],
                       truncation="only_second", max_length=self.cfg.max_length, padding=True,
                       stride=self.cfg.doc_stride if windows else 0,
                       return_overflowing_tokens=windows, return_offsets_mapping=True,
                       return_tensors="pt")
        example = (enc["overflow_to_sample_mapping"].tolist() if windows
                   else list(range(len(rows))))
        sequence_ids = [enc.sequence_ids(f) for f in range(len(example))]
        if bucket:  # padded positions: no sequence, offsets (0, 0)
            before = enc["input_ids"].shape[1]
            enc = data_mod.pad_to_bucket(enc, bucket, self.cfg.max_length,
                                         self.tok.pad_token_id)
            sequence_ids = [ids + [None] * (enc["input_ids"].shape[1] - before)
                            for ids in sequence_ids]
        starts, ends = [], []
        for f, i in enumerate(example):
            r = rows[i]
            a_start = int(r["answer_start"])
            a_end = a_start + len(r["answer_text"])
            seq_ids = sequence_ids[f]
            s_tok = e_tok = 0  # [CLS]: the answer is not in this window
            for t, (off, sid) in enumerate(zip(enc["offset_mapping"][f].tolist(), seq_ids)):
                if sid != 1:
                    continue
                if off[0] <= a_start < off[1] and s_tok == 0:
                    s_tok = t
                if off[0] < a_end <= off[1]:
                    e_tok = t
            if e_tok < s_tok or (s_tok == 0) != (e_tok == 0):
                s_tok = e_tok = 0
            starts.append(s_tok)
            ends.append(e_tok)
        batch = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
        batch["start_positions"] = torch.tensor(starts)
        batch["end_positions"] = torch.tensor(ends)
        batch["_offsets"] = enc["offset_mapping"]
        batch["_sequence_ids"] = sequence_ids
        batch["_example"] = example
        return batch


def load_rows(cfg: TrainConfig, split: str, limit):
    preset = tasks.find_preset(cfg.data)
    if preset is not None and preset.kind != cfg.task:
        raise ValueError(f"--data {cfg.data} is a {preset.kind} task: pass --task {preset.kind}")
    columns = {"text": cfg.text_column, "text_pair": cfg.pair_column, "label": cfg.label_column}
    rows = data_mod.load_split(cfg.data, split, columns if cfg.task == "classification" else None,
                               encoding=cfg.encoding, drop_empty_labels=cfg.drop_empty_labels)
    if cfg.task == "question_answering":
        rows = [squad_record(r) for r in rows]
    return rows[:limit] if limit else rows


def squad_record(r):
    if "answers" in r and isinstance(r["answers"], dict):
        texts, starts = r["answers"]["text"], r["answers"]["answer_start"]
        return {**r, "answer_text": texts[0], "answer_start": starts[0], "answers_all": texts}
    return r
