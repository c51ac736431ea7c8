"""The paper's tasks by name (pifi_fast.tasks): every preset loaded through `datasets` from a
small local copy laid out as its Hub repository (the real column names, ClassLabel names, split
names and -1 rows; $PIFI_FAST_DATASETS, no network), its split rules and label filters;
hub:NAME data (premise/hypothesis pairs, -1 rows, a missing validation split); and the errors
a user's own csv / tsv / jsonl files give."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

datasets = pytest.importorskip("datasets")
from datasets import ClassLabel, Dataset, Features, Sequence, Value  # noqa: E402

from pifi_fast import cli, data as data_mod, tasks  # noqa: E402
from pifi_fast.train import TrainConfig  # noqa: E402
from pifi_fast.training.batches import load_rows  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# Sizes that reach past the authors' fixed cuts (the last 9,832 MNLI and 10,570 SQuAD train
# rows) by a few rows
MNLI_TRAIN, SQUAD_TRAIN = 9832 + 7, 10570 + 5


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No network, and datasets' cache in a temporary folder."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def _write(path: Path, table) -> None:
    """A Dataset as parquet (features kept in its schema), or a list of dicts as JSON lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(table, Dataset):
        table.to_parquet(str(path))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in table), encoding="utf-8")


def _shard(folder: str, split: str) -> str:
    return f"{folder}/{split}-00000-of-00001.parquet"


def _labelled(n: int, names, text="text", extra=None, labels=None, prefix="s"):
    columns = {text: [f"{prefix}{i}" for i in range(n)],
               "label": labels if labels is not None else [i % len(names) for i in range(n)]}
    features = {text: Value("string"), "label": ClassLabel(names=list(names))}
    for name, (values, feature) in (extra or {}).items():
        columns[name], features[name] = values, feature
    return Dataset.from_dict(columns, features=Features(features))


def _setfit(n_train, n_dev, n_test, classes):
    rows = lambda n, tag: [{"text": f"{tag}{i}", "label": i % classes, "label_text": str(i % classes)}
                           for i in range(n)]
    files = {"train.jsonl": rows(n_train, "tr"), "test.jsonl": rows(n_test, "te")}
    if n_dev:
        files["dev.jsonl"] = rows(n_dev, "dv")
    return files


NLI = ("entailment", "neutral", "contradiction")


def _pairs(n, labels=None, tag="p"):
    return Dataset.from_dict(
        {"premise": [f"{tag}{i}" for i in range(n)], "hypothesis": [f"h{i}" for i in range(n)],
         "label": labels if labels is not None else [i % 3 for i in range(n)],
         "idx": list(range(n))},
        features=Features({"premise": Value("string"), "hypothesis": Value("string"),
                           "label": ClassLabel(names=list(NLI)), "idx": Value("int32")}))


def _squad(n, tag):
    contexts = [f"{tag} context {i} with answer{i} inside" for i in range(n)]
    return Dataset.from_dict(
        {"id": [str(i) for i in range(n)], "title": ["t"] * n, "context": contexts,
         "question": [f" question {i}? " for i in range(n)],
         "answers": [{"text": [f"answer{i}", f"answer{i} inside"],
                      "answer_start": [c.index("answer"), c.index("answer")]}
                     for i, c in enumerate(contexts)]},
        features=Features({"id": Value("string"), "title": Value("string"),
                           "context": Value("string"), "question": Value("string"),
                           "answers": Sequence({"text": Value("string"),
                                                "answer_start": Value("int32")})}))


GLUE_CARD = """---
configs:
- config_name: cola
  data_files:
  - split: train
    path: cola/train-*
  - split: validation
    path: cola/validation-*
  - split: test
    path: cola/test-*
- config_name: mnli
  data_files:
  - split: train
    path: mnli/train-*
  - split: validation_matched
    path: mnli/validation_matched-*
  - split: validation_mismatched
    path: mnli/validation_mismatched-*
  - split: test_matched
    path: mnli/test_matched-*
  - split: test_mismatched
    path: mnli/test_mismatched-*
---
# GLUE
"""


def build_hub_copies(root: Path) -> None:
    """Every preset's dataset, a few rows each, as its Hub repository lays it out."""
    repos: dict[str, dict] = {
        "SetFit/sst2": _setfit(20, 6, 7, 2),
        "SetFit/sst5": _setfit(25, 6, 7, 5),
        "SetFit/subj": _setfit(20, 0, 6, 2),
        "SetFit/SentEval-CR": _setfit(15, 0, 5, 2),
        # the authors' name for it (GLUE) holds a README declaring the configs, as a snapshot
        "nyu-mll/glue": {
            _shard("cola", "train"): _labelled(30, ("unacceptable", "acceptable"), "sentence",
                                               {"idx": (list(range(30)), Value("int32"))}),
            _shard("cola", "validation"): _labelled(9, ("unacceptable", "acceptable"),
                                                    "sentence", prefix="v"),
            _shard("cola", "test"): _labelled(5, ("unacceptable", "acceptable"), "sentence",
                                              labels=[-1] * 5, prefix="t"),
            _shard("mnli", "train"): _pairs(MNLI_TRAIN),
            _shard("mnli", "validation_matched"): _pairs(6, tag="vm"),
            _shard("mnli", "validation_mismatched"): _pairs(8, tag="vmm"),
            _shard("mnli", "test_matched"): _pairs(4, [-1] * 4, "tm"),
            _shard("mnli", "test_mismatched"): _pairs(4, [-1] * 4, "tmm"),
        },
        "stanfordnlp/snli": {
            _shard("plain_text", "train"): _pairs(12, [0, 1, 2, -1] * 3),
            _shard("plain_text", "validation"): _pairs(6, [0, -1, 2, 1, 1, 0], "v"),
            _shard("plain_text", "test"): _pairs(5, [-1, -1, 2, 1, 0], "t"),
        },
        # under the authors' name ("imdb"), not the Hub id: also found
        "imdb": {
            _shard("plain_text", "train"): _labelled(20, ("neg", "pos"), labels=[0] * 10 + [1] * 10),
            _shard("plain_text", "test"): _labelled(8, ("neg", "pos"), prefix="t"),
            _shard("plain_text", "unsupervised"): _labelled(4, ("neg", "pos"), labels=[-1] * 4),
        },
        "cardiffnlp/tweet_eval": {
            **{_shard("sentiment", s): _labelled(n, ("negative", "neutral", "positive"), prefix=s)
               for s, n in (("train", 12), ("validation", 6), ("test", 9))},
            **{_shard("offensive", s): _labelled(n, ("non-offensive", "offensive"), prefix=s)
               for s, n in (("train", 10), ("validation", 4), ("test", 5))},
        },
        # a script repository, read from its parquet conversion's layout
        "CogComp/trec": {f"default/{s}/0000.parquet": _labelled(
            n, ("ABBR", "ENTY", "DESC", "HUM", "LOC", "NUM"), labels=[0] * n, prefix=s,
            extra={"coarse_label": ([i % 6 for i in range(n)], ClassLabel(
                names=["ABBR", "ENTY", "DESC", "HUM", "LOC", "NUM"])),
                "fine_label": ([i % 50 for i in range(n)],
                               ClassLabel(names=[f"f{i}" for i in range(50)]))}
        ).remove_columns("label") for s, n in (("train", 21), ("test", 5))},
        "fancyzhx/ag_news": {f"data/{s}-00000-of-00001.parquet": _labelled(
            n, ("World", "Sports", "Business", "Sci/Tech"), prefix=s)
            for s, n in (("train", 16), ("test", 4))},
        "fancyzhx/dbpedia_14": {_shard("dbpedia_14", s): _labelled(
            n, [f"c{i}" for i in range(14)], "content", prefix=" " + s,
            extra={"title": ([f"title{i}" for i in range(n)], Value("string"))})
            for s, n in (("train", 28), ("test", 14))},
        "fancyzhx/yelp_polarity": {_shard("plain_text", s): _labelled(n, ("1", "2"), prefix=s)
                                   for s, n in (("train", 10), ("test", 4))},
        "Yelp/yelp_review_full": {_shard("yelp_review_full", s): _labelled(
            n, ("1 star", "2 star", "3 stars", "4 stars", "5 stars"), prefix="a\\nb" + s)
            for s, n in (("train", 15), ("test", 5))},
        "community-datasets/yahoo_answers_topics": {_shard("yahoo_answers_topics", s): Dataset.from_dict(
            {"id": list(range(n)), "topic": [i % 10 for i in range(n)],
             "question_title": [f"title {s}{i}" for i in range(n)],
             "question_content": ["content"] * n, "best_answer": ["answer"] * n},
            features=Features({"id": Value("int32"), "topic": ClassLabel(names=[
                f"t{i}" for i in range(10)]), "question_title": Value("string"),
                "question_content": Value("string"), "best_answer": Value("string")}))
            for s, n in (("train", 20), ("test", 6))},
        "rajpurkar/squad": {_shard("plain_text", "train"): _squad(SQUAD_TRAIN, "tr"),
                            _shard("plain_text", "validation"): _squad(6, "va")},
        "bentrevett/multi30k": {f"{s}.jsonl": [{"en": f"en {s}{i}", "de": f"de {s}{i}"}
                                               for i in range(n)]
                                for s, n in (("train", 8), ("val", 3), ("test", 4))},
        "abisee/cnn_dailymail": {
            **{_shard(c, s): Dataset.from_dict(
                {"article": [f"{c} article {s}{i}" for i in range(n)],
                 "highlights": [f"{c} line one\nline two {i}" for i in range(n)],
                 "id": [f"{i:040x}" for i in range(n)]})
               for c in ("2.0.0", "3.0.0") for s, n in (("train", 6), ("validation", 2),
                                                        ("test", 3))}},
    }
    for repo, files in repos.items():
        for name, table in files.items():
            _write(root / repo / name, table)
    (root / "nyu-mll" / "glue" / "README.md").write_text(GLUE_CARD, encoding="utf-8")
    # NSMC: the original TSV files (header, an empty document), as its loading script reads them
    (root / "e9t" / "nsmc").mkdir(parents=True)
    for split, n in (("train", 10), ("test", 4)):
        lines = ["id\tdocument\tlabel"] + [f"{i}\t{'' if i == 1 else f'문장 {split}{i}'}\t{i % 2}"
                                           for i in range(n)]
        (root / "e9t" / "nsmc" / f"ratings_{split}.txt").write_text("\n".join(lines) + "\n",
                                                                   encoding="utf-8")


@pytest.fixture
def hub(tmp_path, monkeypatch):
    root = tmp_path / "hub-copies"
    build_hub_copies(root)
    monkeypatch.setenv("PIFI_FAST_DATASETS", str(root))
    monkeypatch.setenv("PIFI_FAST_DATA", str(tmp_path / "no-built-in-files"))
    return root


def _texts(rows, key="text"):
    return [r[key] for r in rows]


# -- every preset ------------------------------------------------------------------------------
def test_every_preset_loads_each_split_offline_from_its_hub_layout(hub, capsys):
    expected_keys = {"classification": {"text", "label"},
                     "question_answering": {"question", "context", "answer_text", "answer_start",
                                            "answers_all"},
                     "seq2seq": {"source", "target"}}
    for name, preset in tasks.PRESETS.items():
        splits = {s: data_mod.load_split(name, s) for s in ("train", "dev", "test")}
        for split, rows in splits.items():
            assert rows, (name, split)
            assert expected_keys[preset.kind] <= set(rows[0]), (name, split)
            if preset.kind == "classification":
                assert {r["label"] for r in rows} <= set(range(len(preset.label_names))), name
                assert all(isinstance(r["text"], str) for r in rows), name
        rule = preset.splits["dev"]
        if rule.take == "seeded_dev":  # the authors' 20 % of train, disjoint from train
            train, dev = splits["train"], splits["dev"]
            total = len(train) + len(dev)
            assert len(dev) == int(total * tasks.DEV_FRACTION), name
            assert not set(_texts(train)) & set(_texts(dev)), name


def test_carved_splits_are_the_fixed_seed_rule_of_pifi_fast_data(hub):
    everything = [r["text"] for r in tasks.load_preset("ag_news", "train")
                  + tasks.load_preset("ag_news", "dev")]
    whole = sorted(everything, key=lambda t: int(t[len("train"):]))
    assert len(whole) == 16
    assert _texts(tasks.load_preset("ag_news", "dev")) == tasks.dev_from_train(whole, "dev")
    assert _texts(tasks.load_preset("ag_news", "train")) == tasks.dev_from_train(whole,
                                                                                     "train")
    assert _texts(tasks.load_preset("trec", "test")) == [f"test{i}" for i in range(5)]
    assert [r["label"] for r in tasks.load_preset("trec", "test")] == [0, 1, 2, 3, 4, 5][:5]


def test_cola_test_is_glue_validation_and_train_dev_the_seeded_cut(hub):
    train, dev, test = (data_mod.load_split("cola", s) for s in ("train", "dev", "test"))
    assert _texts(test) == [f"v{i}" for i in range(9)]  # GLUE's validation, not its -1 test
    all_train = [f"s{i}" for i in range(30)]
    assert _texts(dev) == tasks.dev_from_train(all_train, "dev") and len(dev) == 6
    assert _texts(train) == tasks.dev_from_train(all_train, "train") and len(train) == 24


@pytest.mark.skipif(not data_mod.builtin_found("cola"), reason="no built-in CoLA files")
def test_built_in_cola_files_keep_priority_and_mean_the_authors_splits(monkeypatch, tmp_path):
    monkeypatch.delenv("PIFI_FAST_DATA", raising=False)
    monkeypatch.setenv("PIFI_FAST_DATASETS", str(tmp_path / "nothing"))
    sizes = [len(data_mod.load_split("cola", s)) for s in ("train", "dev", "test")]
    assert sizes == list(tasks.PRESETS["cola"].sizes) == [6841, 1710, 1043]


def test_mnli_dev_is_the_last_train_rows_and_test_validation_mismatched(hub):
    train, dev, test = (tasks.load_preset("mnli", s) for s in ("train", "dev", "test"))
    assert _texts(train) == [f"p{i}" for i in range(MNLI_TRAIN - 9832)]
    assert len(dev) == 9832 and dev[0]["text"] == f"p{MNLI_TRAIN - 9832}"
    assert dev[-1]["text"] == f"p{MNLI_TRAIN - 1}"
    assert _texts(test) == [f"vmm{i}" for i in range(8)]
    assert test[0]["text_pair"] == "h0" and test[0]["label"] == 0


def test_squad_test_is_the_last_train_rows_and_dev_the_validation(hub):
    train, dev, test = (tasks.load_preset("squad", s) for s in ("train", "dev", "test"))
    assert len(train) == SQUAD_TRAIN - 10570 and len(test) == 10570 and len(dev) == 6
    assert test[0]["context"].startswith(f"tr context {SQUAD_TRAIN - 10570} ")
    assert dev[0]["context"].startswith("va context 0 ")
    row = test[0]
    assert row["question"] == f"question {SQUAD_TRAIN - 10570}?"  # stripped, as the authors
    start = row["answer_start"]
    assert row["context"][start:start + len(row["answer_text"])] == row["answer_text"]
    assert row["answers_all"] == [row["answer_text"], row["answer_text"] + " inside"]


def test_snli_drops_the_rows_without_a_gold_label_in_every_split(hub, capsys):
    sizes = [len(tasks.load_preset("snli", s)) for s in ("train", "dev", "test")]
    assert sizes == [9, 5, 3]
    out = capsys.readouterr().out
    assert "snli train: dropped 3 rows labelled -1" in out and "snli test: dropped 2" in out
    assert all(r["label"] in (0, 1, 2) for r in tasks.load_preset("snli", "train"))


def test_tweet_sentiment_drops_neutral_and_maps_positive_to_1_in_every_split(hub, capsys):
    for split, n in (("train", 12), ("dev", 6), ("test", 9)):
        rows = data_mod.load_split("tweet_sentiment_binary", split)  # the authors' name
        originally = [i % 3 for i in range(n)]
        assert [r["label"] for r in rows] == [{0: 0, 2: 1}[v] for v in originally if v != 1]
    assert "dropped 4 rows labelled 1, as the authors" in capsys.readouterr().out
    assert tasks.PRESETS["tweet_sentiment"].label_names == ("negative", "positive")


def test_columns_and_configs_as_the_authors_read_them(hub):
    assert tasks.load_preset("yahoo", "test")[0] == {"text": "title test0", "label": 0}
    assert tasks.load_preset("dbpedia", "test")[0]["text"] == " test0"  # content, not title
    assert tasks.load_preset("nsmc", "test")[1]["text"] == ""  # an empty document stays ""
    assert tasks.load_preset("nsmc", "test")[0]["text"] == "문장 test0"
    assert tasks.load_preset("cnn_dailymail", "test")[0]["source"] == "2.0.0 article test0"
    assert tasks.load_preset("multi30k", "dev")[2] == {"source": "en val2", "target": "de val2"}
    assert len(tasks.load_preset("imdb", "test")) == 8  # unsupervised (-1) is never read
    assert len(tasks.load_preset("sst5", "dev")) == 6


def test_a_preset_without_its_data_says_how_to_give_a_local_copy(monkeypatch, tmp_path):
    monkeypatch.setenv("PIFI_FAST_DATASETS", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match=r"\$PIFI_FAST_DATASETS/SetFit/sst5/"):
        tasks.load_preset("sst5", "train")
    with pytest.raises(FileNotFoundError, match="task presets .*sst5"):
        data_mod.load_split("no-such-dataset", "train")
    # a built-in name without its files, and no Hub copy: both said
    monkeypatch.setenv("PIFI_FAST_DATA", str(tmp_path / "no-data"))
    with pytest.raises(FileNotFoundError, match="set PIFI_FAST_DATA.*nor did its Hub copy"):
        data_mod.load_split("sst2", "train")


def test_metrics_and_kinds_come_from_the_table(hub):
    for name, preset in tasks.PRESETS.items():
        assert data_mod.TASK_METRIC[name] == preset.metric
    assert data_mod.TASK_METRIC["agnews"] == data_mod.TASK_METRIC["ag_news"] == "accuracy"
    assert data_mod.TASK_METRIC["cola"] == "mcc" and data_mod.TASK_METRIC["squad"] == "f1"
    with pytest.raises(ValueError, match="--task question_answering"):
        load_rows(TrainConfig(data="squad"), "train", None)
    rows = load_rows(TrainConfig(data="squad", task="question_answering"), "dev", 2)
    assert rows[0]["answer_text"] == "answer0"


def test_the_tasks_command_lists_presets_and_local_copies(hub, capsys):
    assert cli.main(["tasks"]) == 0
    out = capsys.readouterr().out
    for name in tasks.PRESETS:
        assert name in out
    assert str(hub / "SetFit" / "sst2") in out and "6,841 / 1,710 / 1,043" in out
    assert cli.main(["tasks", "--markdown"]) == 0
    assert capsys.readouterr().out.strip() == tasks.markdown_table()


def test_the_docs_table_is_the_presets_table():
    page = (ROOT / "docs" / "training.md").read_text(encoding="utf-8")
    assert tasks.markdown_table() in page, "regenerate it: pifi-fast tasks --markdown"


# -- hub:NAME ------------------------------------------------------------------------------------
COLUMNS = {"text": "text", "text_pair": None, "label": "label"}  # as training asks


def test_hub_pairs_minus_one_rows_and_a_missing_validation_split(hub, capsys):
    rows = data_mod.load_split("hub:stanfordnlp/snli", "train", COLUMNS)  # a local copy, by id
    assert rows[0]["text"] == "p0" and rows[0]["text_pair"] == "h0"  # premise / hypothesis
    assert len(rows) == 9 and -1 not in {r["label"] for r in rows}
    assert "dropped 3 rows labelled -1" in capsys.readouterr().out
    subj = f"hub:{hub / 'SetFit' / 'subj'}"  # a folder path
    train, dev = (data_mod.load_split(subj, s, COLUMNS) for s in ("train", "dev"))
    assert (len(train), len(dev)) == (16, 4) and not set(_texts(train)) & set(_texts(dev))
    assert "no validation split: dev is a fixed-seed 20% of train" in capsys.readouterr().out
    test = data_mod.load_split("hub:nyu-mll/glue:cola", "test", COLUMNS)
    assert test == []  # GLUE's test split: every label -1, all dropped
    offensive = data_mod.load_split("hub:cardiffnlp/tweet_eval/offensive", "dev", COLUMNS)
    assert _texts(offensive) == [f"validation{i}" for i in range(4)]
    with pytest.raises(KeyError, match="has splits"):
        data_mod.load_split("hub:stanfordnlp/snli", "unsupervised", COLUMNS)


# -- a user's own files --------------------------------------------------------------------------
def test_an_empty_label_names_the_file_and_line_unless_dropped(tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "train.csv").write_text("text,label\ngood,1\nbad,\nfine,1\nmeh,\n",
                                      encoding="utf-8")
    with pytest.raises(ValueError, match=r"train\.csv:3: empty label .*1 more"):
        data_mod.load_split(str(folder), "train", {"text": "text", "label": "label"})
    rows = data_mod.load_split(str(folder), "train", {"text": "text", "label": "label"},
                               drop_empty_labels=True)
    assert _texts(rows) == ["good", "fine"]
    assert "dropped 2 rows with an empty label" in capsys.readouterr().out
    (folder / "dev.jsonl").write_text('{"text": "a", "label": null}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"dev\.jsonl:1: empty label"):
        data_mod.load_split(str(folder), "dev", {"text": "text", "label": "label"})
    # without a label column (prediction input), an empty cell is nobody's business
    assert len(data_mod.load_split(str(folder), "train", {"text": "text"})) == 4


def test_a_malformed_jsonl_line_names_the_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a", "label": 1}\n\n{"text": "b", "label": 0\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"train\.jsonl:3: not valid JSON"):
        data_mod.load_split(str(tmp_path), "train", {"text": "text", "label": "label"})
    path.write_text('["a", 1]\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"train\.jsonl:1: expected a JSON object"):
        data_mod.load_split(str(tmp_path), "train", {"text": "text", "label": "label"})


def test_a_latin1_file_names_the_file_and_the_encoding_option(tmp_path):
    folder = tmp_path / "latin"
    folder.mkdir()
    (folder / "train.tsv").write_bytes("text\tlabel\ncafé crème\t1\nnaïve\t0\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"train\.tsv: not utf-8 text .*--encoding latin-1"):
        data_mod.load_split(str(folder), "train", {"text": "text", "label": "label"})
    rows = data_mod.load_split(str(folder), "train", {"text": "text", "label": "label"},
                               encoding="latin-1")
    assert _texts(rows) == ["café crème", "naïve"]


def test_training_passes_encoding_and_empty_label_dropping_through(tmp_path, capsys):
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "train.csv").write_bytes("text,label\ncafé,1\nthé,\n".encode("latin-1"))
    args = cli.build_parser().parse_args(["train", "--data", str(folder), "--encoding",
                                          "latin-1", "--drop-empty-labels"])
    assert (args.encoding, args.drop_empty_labels) == ("latin-1", True)
    cfg = TrainConfig(data=str(folder), encoding=args.encoding,
                      drop_empty_labels=args.drop_empty_labels)
    assert load_rows(cfg, "train", None) == [{"text": "café", "label": 1}]
    with pytest.raises(ValueError, match="--encoding"):
        load_rows(TrainConfig(data=str(folder)), "train", None)
