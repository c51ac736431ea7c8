"""The paper's tasks by name: each preset's Hugging Face dataset, columns, labels, split rules and
metric as the authors' code loads them (khyun8072/PiFi; see ../shared/datasets.md), the
loader that applies them (`load_preset`), local copies of Hub repositories
($PIFI_FAST_DATASETS), and the fixed-seed dev-from-train rule shared with pifi_fast.data.

A preset's rows are the records pifi_fast.data returns: {"text", "text_pair"?, "label"} for
classification, {"question", "context", "answer_text", "answer_start", "answers_all"} for
question answering, {"source", "target"} for seq2seq. Labels are the dataset's class ids.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import random
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

KINDS = ("classification", "question_answering", "seq2seq")

# A dataset without a dev split of its own: dev is a fixed-seed DEV_FRACTION of its train split
# and train the rest (the authors' rule, 20 %; they shuffle with each run's seed, we with a fixed
# one, so every run and seed of a comparison is scored on the same dev rows).
DEV_FRACTION = 0.2
DEV_SPLIT_SEED = 0


def dev_from_train(rows, split: str):
    """train minus its dev share, or the dev share (DEV_FRACTION of a seeded shuffle)."""
    order = list(range(len(rows)))
    random.Random(DEV_SPLIT_SEED).shuffle(order)
    n_dev = int(len(rows) * DEV_FRACTION)
    chosen = order[:n_dev] if split == "dev" else order[n_dev:]
    return [rows[i] for i in sorted(chosen)]


def drop_unlabelled(rows: list[dict], where: str) -> list[dict]:
    """Rows without their label -1 ("no gold label" in SNLI, GLUE's and IMDB's unlabelled
    splits): never a class of its own. Prints how many went."""
    kept = [r for r in rows if r.get("label") != -1]
    if len(kept) < len(rows):
        print(f"data: {where}: dropped {len(rows) - len(kept)} rows labelled -1 (no gold label)")
    return kept


@dataclasses.dataclass(frozen=True)
class SplitRule:
    """How one of our splits (train, dev, test) is cut from one of the Hub dataset's splits."""
    hub_split: str
    take: str = "all"  # all | seeded_train | seeded_dev (DEV_FRACTION) | head | tail
    rows: int = 0  # head: all but the last `rows`; tail: the last `rows`

    def describe(self) -> str:
        return {"all": self.hub_split,
                "seeded_train": f"{self.hub_split} minus the seeded {DEV_FRACTION:.0%}",
                "seeded_dev": f"seeded {DEV_FRACTION:.0%} of {self.hub_split}",
                "head": f"{self.hub_split}[:-{self.rows:,}]",
                "tail": f"{self.hub_split}[-{self.rows:,}:]"}[self.take]


def _official(train="train", dev="validation", test="test") -> dict:
    return {"train": SplitRule(train), "dev": SplitRule(dev), "test": SplitRule(test)}


def _carved(test="test") -> dict:
    """The authors' rule for a dataset without a validation split: dev = 20 % of train."""
    return {"train": SplitRule("train", "seeded_train"), "dev": SplitRule("train", "seeded_dev"),
            "test": SplitRule(test)}


@dataclasses.dataclass(frozen=True)
class TaskPreset:
    """One of the paper's tasks, as the authors' code loads it."""
    name: str
    hub_id: str  # the repository on the Hub today
    config: str | None
    kind: str  # classification | question_answering | seq2seq
    columns: dict  # our record key -> the dataset's column
    label_names: tuple | None  # our class ids 0..C-1, in order (after drop/remap)
    splits: dict  # train / dev / test -> SplitRule
    metric: str  # the key of pifi_fast.metrics' result the run selects on
    sizes: tuple  # rows of train, dev, test after our rules (None: not verified)
    deviation: str = ""  # one line: where we differ from the authors, and why
    drop_labels: tuple = ()  # class ids dropped before remapping
    label_remap: dict | None = None  # class id -> our id, after dropping
    authors_id: str | None = None  # the name their code passes to load_dataset, if not hub_id
    authors_name: str | None = None  # their --task_dataset, if not name
    revision: str | None = None  # a Hub revision (the parquet conversion of a script repo)
    raw_tsv: dict | None = None  # split -> file: a local copy of the original TSV files
    paper: dict | None = None  # the paper's reported numbers (None: not found in sources)

    @property
    def source(self) -> str:
        return self.hub_id + (f" ({self.config})" if self.config else "")


_SENTIMENT = ("negative", "positive")

PRESETS = {p.name: p for p in (
    TaskPreset("sst2", "SetFit/sst2", None, "classification", {"text": "text", "label": "label"},
               _SENTIMENT, _official(), "accuracy", (6920, 872, 1821)),
    TaskPreset("sst5", "SetFit/sst5", None, "classification", {"text": "text", "label": "label"},
               ("very negative", "negative", "neutral", "positive", "very positive"),
               _official(), "accuracy", (8544, None, None),
               deviation="the authors' loader has it, but their --task_dataset choices do not: "
                         "no run of theirs to match"),
    TaskPreset("cola", "nyu-mll/glue", "cola", "classification",
               {"text": "sentence", "label": "label"}, ("unacceptable", "acceptable"),
               _carved(test="validation"), "mcc", (6841, 1710, 1043),
               deviation="selects on MCC (GLUE's metric); the authors report accuracy and macro "
                         "F1"),
    TaskPreset("mnli", "nyu-mll/glue", "mnli", "classification",
               {"text": "premise", "text_pair": "hypothesis", "label": "label"},
               ("entailment", "neutral", "contradiction"),
               {"train": SplitRule("train", "head", 9832), "dev": SplitRule("train", "tail", 9832),
                "test": SplitRule("validation_mismatched")}, "accuracy", (382870, 9832, 9832),
               authors_id="glue"),
    TaskPreset("snli", "stanfordnlp/snli", None, "classification",
               {"text": "premise", "text_pair": "hypothesis", "label": "label"},
               ("entailment", "neutral", "contradiction"), _official(), "accuracy",
               (549367, 9842, 9824), authors_id="snli"),
    TaskPreset("imdb", "stanfordnlp/imdb", None, "classification",
               {"text": "text", "label": "label"}, ("neg", "pos"), _carved(), "accuracy",
               (20000, 5000, 25000), authors_id="imdb",
               deviation="text as the dataset has it (the authors strip HTML tags such as `<br />` "
                         "with BeautifulSoup)"),
    TaskPreset("tweet_sentiment", "cardiffnlp/tweet_eval", "sentiment", "classification",
               {"text": "text", "label": "label"}, _SENTIMENT, _official(), "accuracy",
               (None, None, None), drop_labels=(1,), label_remap={0: 0, 2: 1},
               authors_id="tweet_eval", authors_name="tweet_sentiment_binary"),
    TaskPreset("tweet_offensive", "cardiffnlp/tweet_eval", "offensive", "classification",
               {"text": "text", "label": "label"}, ("non-offensive", "offensive"), _official(),
               "accuracy", (11916, 1324, 860)),
    TaskPreset("trec", "CogComp/trec", None, "classification",
               {"text": "text", "label": "coarse_label"},
               ("ABBR", "ENTY", "DESC", "HUM", "LOC", "NUM"), _carved(), "accuracy",
               (4362, 1090, 500), authors_id="trec", revision="refs/convert/parquet",
               deviation="read from the Hub's parquet conversion (the repository is a loading "
                         "script, which datasets 4+ no longer runs)"),
    TaskPreset("subj", "SetFit/subj", None, "classification", {"text": "text", "label": "label"},
               ("objective", "subjective"), _carved(), "accuracy", (None, None, None)),
    TaskPreset("ag_news", "fancyzhx/ag_news", None, "classification",
               {"text": "text", "label": "label"}, ("World", "Sports", "Business", "Sci/Tech"),
               _carved(), "accuracy", (96000, 24000, 7600), authors_id="ag_news",
               authors_name="agnews"),
    TaskPreset("cr", "SetFit/SentEval-CR", None, "classification",
               {"text": "text", "label": "label"}, _SENTIMENT, _carved(), "accuracy",
               (None, None, None)),
    TaskPreset("dbpedia", "fancyzhx/dbpedia_14", None, "classification",
               {"text": "content", "label": "label"},
               ("Company", "EducationalInstitution", "Artist", "Athlete", "OfficeHolder",
                "MeanOfTransportation", "Building", "NaturalPlace", "Village", "Animal", "Plant",
                "Album", "Film", "WrittenWork"), _carved(), "accuracy", (448000, 112000, 70000),
               authors_id="dbpedia_14"),
    TaskPreset("yelp_polarity", "fancyzhx/yelp_polarity", None, "classification",
               {"text": "text", "label": "label"}, ("1", "2"), _carved(), "accuracy",
               (448000, 112000, 38000), authors_id="yelp_polarity"),
    TaskPreset("yelp_full", "Yelp/yelp_review_full", None, "classification",
               {"text": "text", "label": "label"},
               ("1 star", "2 star", "3 stars", "4 stars", "5 stars"), _carved(), "accuracy",
               (520000, 130000, 50000), authors_id="yelp_review_full"),
    TaskPreset("yahoo", "community-datasets/yahoo_answers_topics", None, "classification",
               {"text": "question_title", "label": "topic"},
               ("Society & Culture", "Science & Mathematics", "Health", "Education & Reference",
                "Computers & Internet", "Sports", "Business & Finance", "Entertainment & Music",
                "Family & Relationships", "Politics & Government"), _carved(), "accuracy",
               (1120000, 280000, 60000), authors_id="yahoo_answers_topics",
               authors_name="yahoo_answers_title"),
    TaskPreset("nsmc", "e9t/nsmc", None, "classification", {"text": "document", "label": "label"},
               _SENTIMENT, _carved(), "accuracy", (120000, 30000, 50000),
               revision="refs/convert/parquet",
               raw_tsv={"train": "ratings_train.txt", "test": "ratings_test.txt"},
               deviation="read from the Hub's parquet conversion, or a local copy of the original "
                         "ratings_{train,test}.txt (the repository is a loading script)"),
    TaskPreset("squad", "rajpurkar/squad", None, "question_answering",
               {"question": "question", "context": "context", "answers": "answers"}, None,
               {"train": SplitRule("train", "head", 10570), "dev": SplitRule("validation"),
                "test": SplitRule("train", "tail", 10570)}, "f1", (77029, 10570, 10570),
               authors_id="squad",
               deviation="none: test is the last 10,570 train rows (one gold answer each) and "
                         "dev the official validation, as the authors, so scores compare with "
                         "theirs"),
    TaskPreset("multi30k", "bentrevett/multi30k", None, "seq2seq",
               {"source": "en", "target": "de"}, None, _official(), "bleu", (29000, 1014, 1000),
               deviation="no task prefix on the source (the authors prepend \"translate English "
                         "to French: \", sic, for T5)"),
    TaskPreset("cnn_dailymail", "abisee/cnn_dailymail", "2.0.0", "seq2seq",
               {"source": "article", "target": "highlights"}, None, _official(), "bleu",
               (287113, 13368, 11490),
               deviation="config 2.0.0 as the authors (the same text as 3.0.0); no \"Summarize:\" "
                         "prefix; scored by sacreBLEU (the authors also report ROUGE, METEOR, "
                         "BERTScore, BARTScore)"),
)}
# Their --task_dataset names, where ours differ: accepted too
ALIASES = {p.authors_name: p.name for p in PRESETS.values() if p.authors_name}


def find_preset(name: str) -> TaskPreset | None:
    """The preset a name (ours or the authors') means, or None."""
    return PRESETS.get(ALIASES.get(name, name))


def preset_names() -> list[str]:
    return sorted(PRESETS)


# -- where a dataset comes from ---------------------------------------------------------------
def datasets_root() -> Path | None:
    """$PIFI_FAST_DATASETS: a folder of local copies of Hub dataset repositories, each under its
    id (SetFit/sst2/, nyu-mll/glue/, ...), its files laid out as the repository has them."""
    env = os.environ.get("PIFI_FAST_DATASETS")
    return Path(env).expanduser() if env else None


def local_copy(*repo_ids: str) -> Path | None:
    """The first of these repositories with a local copy under $PIFI_FAST_DATASETS."""
    root = datasets_root()
    for repo in repo_ids:
        if root is not None and repo and (root / repo).is_dir():
            return root / repo
    return None


_DATA_SUFFIXES = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv",
                  ".tsv": "csv"}
_NOT_DATA = {"dataset_infos.json", "dataset_info.json", "dataset_dict.json", "state.json"}
# Hub file names: train-00000-of-00001.parquet (maybe -HASH before the suffix), dev.jsonl
_SPLIT_FILE = re.compile(r"^([A-Za-z][A-Za-z0-9_]*?)(?:-\d{5}-of-\d{5}[^.]*)?\.[a-z]+$")
_VALIDATION = {"dev", "val", "valid", "validation"}


def _split_of(name: str) -> str:
    return "validation" if name in _VALIDATION else name


def _is_split_name(name: str) -> bool:
    return name.split("_")[0] in _VALIDATION | {"train", "test", "unsupervised"}


def local_data_files(folder: Path, config: str | None = None) -> dict[str, list[str]]:
    """split -> data files of a local copy, named by split as the Hub names them
    (train-00000-of-00001.parquet, validation_mismatched-..., dev.jsonl, val.jsonl) or in
    folders named by split (the Hub's parquet conversion: default/train/0000.parquet). Read in
    folder/CONFIG when there is one, else in the folder, going down through a lone wrapping
    folder (plain_text/, default/, data/)."""
    base = folder / config if config and (folder / config).is_dir() else folder
    while True:
        entries = [p for p in sorted(base.iterdir()) if not p.name.startswith(".")]
        dirs = [p for p in entries if p.is_dir()]
        if (len(dirs) == 1 and not _is_split_name(dirs[0].name)
                and not any(p.suffix in _DATA_SUFFIXES for p in entries if p.is_file())):
            base = dirs[0]
            continue
        break
    files: dict[str, list[str]] = {}
    for path in entries:
        if path.is_dir():
            inner = [str(p) for p in sorted(path.rglob("*")) if p.suffix in _DATA_SUFFIXES]
            if inner:
                files.setdefault(_split_of(path.name), []).extend(inner)
            continue
        match = _SPLIT_FILE.match(path.name)
        if path.suffix in _DATA_SUFFIXES and path.name not in _NOT_DATA and match:
            files.setdefault(_split_of(match.group(1)), []).append(str(path))
    return files


def _has_config_card(folder: Path) -> bool:
    """Whether the folder's README declares its configs (a Hub snapshot): datasets reads it."""
    card = folder / "README.md"
    if not card.is_file():
        return False
    head = card.read_text(encoding="utf-8", errors="replace").split("\n---", 1)[0]
    return head.startswith("---") and "\nconfigs:" in head


def _import_datasets():
    try:  # deferred: datasets is optional (the train extra), for Hub data and presets only
        import datasets
    except ImportError as exc:
        raise ImportError("Hub datasets and task presets need `pip install datasets` (the train "
                          "extra)") from exc
    return datasets


def open_dataset(repo_id: str, config: str | None = None, revision: str | None = None,
                 also_local: tuple = (), raw_tsv: dict | None = None,
                 folder: Path | None = None):
    """A DatasetDict: from a local copy (`folder`, else $PIFI_FAST_DATASETS/<repo_id> or one of
    `also_local`) when there is one, else through datasets.load_dataset (the Hub, or its offline
    cache with HF_DATASETS_OFFLINE=1). FileNotFoundError saying how to give a local copy when
    neither answers."""
    datasets = _import_datasets()
    folder = folder or local_copy(repo_id, *also_local)
    if folder is not None:
        return _open_local(datasets, folder, config, raw_tsv)
    hub_log = logging.getLogger("huggingface_hub")
    level, offline = hub_log.level, datasets.config.HF_HUB_OFFLINE
    hub_log.setLevel(logging.ERROR)  # its retry warnings would precede the one line we print
    # no route to the Hub: its cache alone, at once, not after half a minute of retries
    datasets.config.HF_HUB_OFFLINE = offline or not _hub_resolvable()
    try:
        return datasets.load_dataset(repo_id, config, revision=revision)
    except Exception as exc:  # no network, no cache, a script repo, gated: all say the same
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise FileNotFoundError(
            f"dataset {repo_id}{f' ({config})' if config else ''} is not reachable: {first}. "
            f"Give a local copy: the repository's files under $PIFI_FAST_DATASETS/{repo_id}/ "
            f"(e.g. huggingface-cli download --repo-type dataset {repo_id}"
            f"{f' --revision {revision}' if revision else ''} --local-dir "
            f"$PIFI_FAST_DATASETS/{repo_id}), or load it once online so that the datasets "
            "cache answers with HF_DATASETS_OFFLINE=1") from exc
    finally:
        hub_log.setLevel(level)
        datasets.config.HF_HUB_OFFLINE = offline


def _hub_resolvable() -> bool:
    """Whether the Hub's host name resolves (behind a proxy: assumed to)."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def _open_local(datasets, folder: Path, config, raw_tsv):
    if raw_tsv and all((folder / name).is_file() for name in raw_tsv.values()):
        return datasets.load_dataset(
            "csv", data_files={s: str(folder / n) for s, n in raw_tsv.items()}, delimiter="\t",
            quoting=3, keep_default_na=False)  # QUOTE_NONE; an empty document stays ""
    if _has_config_card(folder):
        return datasets.load_dataset(str(folder), config)
    files = local_data_files(folder, config)
    builders = {_DATA_SUFFIXES[Path(f).suffix] for fs in files.values() for f in fs}
    if not files or len(builders) != 1:
        raise FileNotFoundError(
            f"{folder}: no data files named by split (train-00000-of-00001.parquet, "
            f"train.jsonl, dev.jsonl, ...) in {f'{config}/ or ' if config else ''}the folder"
            + (f", or they mix formats: {sorted(builders)}" if len(builders) > 1 else ""))
    builder = builders.pop()
    extra = {"delimiter": "\t"} if all(f.endswith(".tsv") for fs in files.values()
                                       for f in fs) else {}
    return datasets.load_dataset(builder, data_files=files, **extra)


# -- a preset's split -------------------------------------------------------------------------
def load_preset(name: str, split: str) -> list[dict]:
    """Records of one split of a preset (train, dev or test), cut, filtered and mapped as the
    preset says."""
    preset = find_preset(name)
    if preset is None:
        raise KeyError(f"no task preset {name!r}; presets: {', '.join(preset_names())}")
    if split not in preset.splits:
        raise KeyError(f"{preset.name} has splits {sorted(preset.splits)}, not {split!r}")
    rule = preset.splits[split]
    ds = open_dataset(preset.hub_id, preset.config, preset.revision,
                      also_local=tuple(i for i in (preset.authors_id,) if i),
                      raw_tsv=preset.raw_tsv)
    if rule.hub_split not in ds:
        raise KeyError(f"{preset.source} has no split {rule.hub_split!r} (it has "
                       f"{sorted(ds)}), which {preset.name}'s {split} is cut from")
    part = ds[rule.hub_split]
    n = len(part)
    if rule.take in ("seeded_train", "seeded_dev"):
        part = part.select(dev_from_train(range(n), split))
    elif rule.take in ("head", "tail"):
        if rule.rows >= n:
            raise ValueError(f"{preset.source} {rule.hub_split} has {n} rows: too few to keep "
                             f"the last {rule.rows} apart")
        part = part.select(range(n - rule.rows) if rule.take == "head" else range(n - rule.rows, n))
    columns = preset.columns
    missing = sorted(set(columns.values()) - set(part.column_names))
    if missing:
        raise KeyError(f"{preset.source} {rule.hub_split}: no column {missing} (columns: "
                       f"{part.column_names})")
    table = part.select_columns(sorted(set(columns.values()))).to_dict()
    raw = [{ours: table[theirs][i] for ours, theirs in columns.items()} for i in range(len(part))]
    where = f"{preset.name} {split}"
    if preset.kind == "classification":
        return _labelled(preset, raw, where)
    if preset.kind == "question_answering":
        return [_qa_record(r) for r in raw]
    return [{"source": r["source"] or "", "target": r["target"] or ""} for r in raw]


def _labelled(preset: TaskPreset, rows: list[dict], where: str) -> list[dict]:
    for r in rows:
        r["text"] = r["text"] or ""  # an empty document (nsmc) is read as None by some builders
        r["label"] = int(r["label"])
    rows = drop_unlabelled(rows, where)
    if preset.drop_labels:
        kept = [r for r in rows if r["label"] not in preset.drop_labels]
        print(f"data: {where}: dropped {len(rows) - len(kept)} rows labelled "
              f"{', '.join(map(str, preset.drop_labels))}, as the authors")
        rows = kept
    if preset.label_remap:
        for r in rows:
            r["label"] = preset.label_remap[r["label"]]
    return rows


def _qa_record(r: dict) -> dict:
    answers = r.pop("answers")
    texts, starts = list(answers["text"]), list(answers["answer_start"])
    return {"question": r["question"].strip(), "context": r["context"],  # strip: as the authors
            "answer_text": texts[0] if texts else "", "answer_start": starts[0] if starts else 0,
            "answers_all": texts}


# -- listing ----------------------------------------------------------------------------------
def _sizes(preset: TaskPreset) -> str:
    return " / ".join("?" if n is None else f"{n:,}" for n in preset.sizes)


def _splits(preset: TaskPreset) -> str:
    text = "; ".join(f"{s} = {preset.splits[s].describe()}" for s in ("train", "dev", "test"))
    if preset.drop_labels:
        text += f"; every split drops label {', '.join(map(str, preset.drop_labels))}"
    if preset.label_remap:
        text += ", maps " + ", ".join(f"{a} -> {b}" for a, b in preset.label_remap.items())
    return text


def preset_table(builtin_found=None) -> list[dict]:
    """One row per preset: name, source, splits, sizes, metric, the paper's numbers, where a
    local copy is (``builtin_found(name)``: whether pifi_fast.data's own files answer)."""
    rows = []
    for name in preset_names():
        p = PRESETS[name]
        folder = local_copy(p.hub_id, *(i for i in (p.authors_id,) if i))
        local = ("built-in files" if builtin_found and builtin_found(name)
                 else str(folder) if folder else "no")
        rows.append({"name": name + (f" ({p.authors_name})" if p.authors_name else ""),
                     "kind": p.kind, "source": p.source, "splits": _splits(p),
                     "sizes": _sizes(p), "metric": p.metric,
                     "paper": ", ".join(f"{k} {v}" for k, v in p.paper.items()) if p.paper
                     else "-", "local": local, "deviation": p.deviation or "-"})
    return rows


def markdown_table() -> str:
    """The docs table (docs/training.md, "The paper's tasks by name")."""
    lines = ["| name | source | train / dev / test rows | splits | metric | deviation from the "
             "authors |", "|---|---|---|---|---|---|"]
    for name in preset_names():
        p = PRESETS[name]
        alias = f" (theirs: `{p.authors_name}`)" if p.authors_name else ""
        lines.append(f"| `{name}`{alias} | `{p.hub_id}`{f' `{p.config}`' if p.config else ''} | "
                     f"{_sizes(p)} | {_splits(p)} | {p.metric} | {p.deviation or '-'} |")
    return "\n".join(lines)
