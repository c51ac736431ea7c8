"""pifi-fast select-layer and train --layer auto: the proxy's parts against plain computations,
a deterministic ranking, one layer in memory at a time, the choice recorded with the run."""
import gc
import json
import weakref

import pytest
import torch
from helpers import save_tiny_run_models, write_cue_word_data

from pifi_fast import PiFiModel, cli
from pifi_fast.train import TrainConfig, train
from pifi_fast.training import select_layer as sel

offline = pytest.importorskip("pifi_fast.offline")


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A tiny BERT with MiniLM's tokenizer, a tiny 3-layer Llama, and a labelled data folder."""
    root = tmp_path_factory.mktemp("select-parts")
    return {**save_tiny_run_models(root),
            "data": write_cue_word_data(root / "data", {"train": 60, "dev": 24, "test": 12})}


def _cfg(parts, **kw):
    return TrainConfig(**{"data": parts["data"], "slm": parts["bert"], "llm": parts["llama"],
                          **kw})


FAST = sel.SelectionOptions(steps=12, repeats=2, sample=40, batch_size=16)


def test_classify_sentence_vectors_is_what_forward_runs_after_the_slm(parts):
    torch.manual_seed(0)
    model = PiFiModel.from_parts(parts["bert"], parts["llama"], layer=1, num_labels=2).eval()
    alone = PiFiModel(model.slm, None, num_labels=2).eval()
    batch = model.tokenizer(["good film", "a very awful plot indeed"], padding=True,
                            return_tensors="pt")
    with torch.no_grad():
        want = model(**batch).logits
        got = model.classify_sentence_vectors(alone.encode(**batch))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_cka_and_the_ridge_probe_against_plain_facts():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(50, 6, generator=gen)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen))
    assert sel.linear_cka(a, a) == pytest.approx(1.0)
    assert sel.linear_cka(a, 3.0 * a @ q) == pytest.approx(1.0)  # rotation and scale invariant
    assert sel.linear_cka(a, torch.randn(50, 6, generator=gen)) < 0.5
    y = (a[:, 0] > 0).long()  # linearly separable: the probe finds it
    scored = sel.ridge_probe(a[:40], y[:40], a[40:], y[40:], 2, "accuracy", penalty=1e-3)
    assert scored["accuracy"] == 1.0 and scored["score"] == 1.0


def test_parse_layers():
    assert sel.parse_layers("all", 4) == [0, 1, 2, 3]
    assert sel.parse_layers("0,-1,3", 4) == [0, 3]
    with pytest.raises(ValueError, match="out of range"):
        sel.parse_layers("7", 4)
    with pytest.raises(ValueError, match="comma-separated"):
        sel.parse_layers("last", 4)


@pytest.mark.slow  # over 2 s on 2 cores: not in make check
def test_ranking_is_deterministic_and_one_layer_is_held_at_a_time(parts, tmp_path,
                                                                   monkeypatch):
    held, real = [], sel.load_llm_layer

    def tracked(source, index, *a, **k):
        gc.collect()
        alive = [ref() for ref in held if ref() is not None]
        assert not alive, f"layer {index} loaded while {len(alive)} earlier one(s) are alive"
        one = real(source, index, *a, **k)
        held.append(weakref.ref(one))
        return one

    monkeypatch.setattr(sel, "load_llm_layer", tracked)
    first = sel.select_layer(_cfg(parts), FAST, out=tmp_path / "a", progress=False)
    assert len(held) == 3  # every layer, each read once
    second = sel.select_layer(_cfg(parts), FAST, out=tmp_path / "b", progress=False)
    for key in ("choice", "ranking", "verdict"):
        assert first[key] == second[key]
    assert [r["proxy"]["values"] for r in first["layers"]] == \
        [r["proxy"]["values"] for r in second["layers"]]
    assert sorted(first["ranking"], key=lambda v: -1 if v is None else v) == [None, 0, 1, 2]
    none = next(r for r in first["layers"] if r["layer"] is None)
    assert none["cka"] == 1.0 and len(none["proxy"]["values"]) == 2
    for name in ("selection.json", "selection.md", "selection.png"):
        assert (tmp_path / "a" / name).is_file()
    assert sel.read_selection(tmp_path / "a")["ranking"] == first["ranking"]
    other = sel.select_layer(_cfg(parts), sel.SelectionOptions(
        steps=12, repeats=2, sample=40, batch_size=16, seed=5, layers="0,-1"), progress=False)
    assert [r["layer"] for r in other["layers"]] == [None, 0, 2]


def test_select_layer_refuses_what_it_cannot_rank(parts):
    with pytest.raises(ValueError, match="classification"):
        sel.select_layer(_cfg(parts, task="question_answering"), FAST, progress=False)
    with pytest.raises(ValueError, match="needs an LLM"):
        sel.select_layer(_cfg(parts, llm="none"), FAST, progress=False)


@pytest.mark.slow  # over 2 s on 2 cores: not in make check
def test_train_layer_auto_runs_the_selection_and_records_it(parts, tmp_path, monkeypatch):
    monkeypatch.setattr(sel, "SelectionOptions", lambda: FAST)  # the default options, cheap
    res = train(_cfg(parts, layer="auto", epochs=1, batch_size=16,
                     output_dir=str(tmp_path / "run"), test_split=None))
    selection = res["layer_selection"]
    kept = tmp_path / "run" / "layer-selection" / "selection.json"
    assert kept.is_file() and selection["file"] == str(kept)
    saved = json.loads((tmp_path / "run" / "best" / "train_config.json").read_text())
    assert saved["layer_selection"] == str(kept)
    if selection["choice"] is None:
        assert saved["llm"] is None and res["model"].llm_config is None
    else:
        assert saved["layer"] == selection["choice"] == res["model"].llm_index

    # a given selection is used as it is: nothing is ranked again
    def no_ranking(*a, **k):
        raise AssertionError("ranked again")

    monkeypatch.setattr(sel, "select_layer", no_ranking)
    again = train(_cfg(parts, layer="auto", layer_selection=str(kept), epochs=1, batch_size=16,
                       output_dir=str(tmp_path / "run2"), test_split=None))
    assert again["layer_selection"]["choice"] == selection["choice"]
    with pytest.raises(ValueError, match="ranks layers for"):
        train(_cfg(parts, layer="auto", layer_selection=str(kept), slm=offline.minilm_dir(),
                   epochs=1, output_dir=str(tmp_path / "run3")))


@pytest.mark.slow  # over 2 s on 2 cores: not in make check
def test_select_layer_command(parts, tmp_path, capsys):
    assert cli.main(["select-layer", "--data", parts["data"], "--slm", parts["bert"], "--llm",
                     parts["llama"], "--layers=0,-1", "--sample", "40", "--steps", "10",
                     "--repeats", "2", "--out", str(tmp_path / "sel")]) == 0
    out = capsys.readouterr().out
    assert "| rank | layer |" in out and "Choice:" in out
    selection = json.loads((tmp_path / "sel" / "selection.json").read_text())
    assert [r["layer"] for r in selection["layers"]] == [None, 0, 2]
    # compared with a sweep's records, reusing the ranking just written
    before = json.loads((tmp_path / "sel" / "selection.json").read_text())
    assert cli.main(["select-layer", "--data", parts["data"], "--slm", parts["bert"], "--llm",
                     parts["llama"], "--out", str(tmp_path / "sel"), "--reuse",
                     "--against", str(tmp_path / "no-sweep")]) == 0
    again = json.loads((tmp_path / "sel" / "selection.json").read_text())
    assert again["ranking"] == before["ranking"]
    assert again["validation"]["correlation"]["points"] == 0
    assert "## Against the sweep" in (tmp_path / "sel" / "selection.md").read_text()
    assert cli.build_parser().parse_args(["train", "--layer", "auto"]).layer == "auto"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["train", "--layer", "last"])


def test_spearman_and_the_comparison_with_a_sweep():
    assert sel.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert sel.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert sel.spearman([3, 1, 2, 5], [2, 1, 4, 3]) == pytest.approx(0.4)  # 1 - 6*6/(4*15)
    assert sel.spearman([1, 2], [2, 1]) is None
    proxy = {None: 0.70, 0: 0.72, 1: 0.60, 2: 0.66}
    selection = {"data": "t", "slm": "s", "llm": "m", "llm_layers": 3, "choice": 0,
                 "layers": [{"layer": k, "proxy": {"mean": v}, "probe": v, "cka": 0.5 + v}
                            for k, v in proxy.items()]}
    dev = {None: 0.80, 0: 0.85, 1: 0.70, 2: 0.75}  # the same order as the proxy's
    records = {}
    for layer, mean in dev.items():
        for seed, delta in ((1, -0.01), (2, 0.01)):
            records[f"{layer}-{seed}"] = {
                "task": "t", "slm": "s", "llm": None if layer is None else "m", "layer": layer,
                "seed": seed, "metric": "accuracy", "dev": mean + delta,
                "test": {"accuracy": mean}}
    records["other"] = {**records["0-1"], "task": "other-task", "dev": 0.0}  # not this task
    got = sel.compare_with_sweep(selection, records)
    assert got["correlation"]["points"] == 4
    assert got["correlation"]["proxy"] == pytest.approx(1.0)
    assert got["correlation"]["cka"] == pytest.approx(1.0)
    assert got["pick"]["layer"] == 0 and got["pick"]["dev"]["mean"] == pytest.approx(0.85)
    assert got["sweep_best"]["layer"] == 0 and got["last"]["layer"] == 2
    assert got["slm_alone"]["seeds"] == 2
    assert "## Against the sweep" in "\n".join(sel.render_validation(got, "accuracy"))


def test_the_choice_is_a_layer_only_when_it_beats_no_layer_by_more_than_the_spread():
    def row(layer, mean, std, loss=0.5):
        return {"layer": layer, "proxy": {"mean": mean, "std": std},
                "proxy_loss": {"mean": loss}}

    close = sel.decide([row(None, 0.70, 0.02), row(0, 0.71, 0.01), row(5, 0.65, 0.01)])
    assert close["ranking"] == [0, None, 5] and close["best_layer"] == 0
    assert close["choice"] is None and close["verdict"].startswith("no layer")
    rows = [row(None, 0.70, 0.01), row(0, 0.75, 0.01), row(5, 0.75, 0.01, 0.4)]
    clear = sel.decide(rows)
    assert clear["ranking"] == [5, 0, None]  # a tie broken by the lower dev loss
    assert clear["choice"] == 5 and clear["confirmed"] is False
    assert clear["verdict"] == ("layer 5 leads the ranking by 5.00 points over the SLM alone "
                                "(spread 1.00); not confirmed with fresh seeds")
    below = sel.decide([row(None, 0.70, 0.0), row(3, 0.60, 0.0)])
    assert below["choice"] is None and below["best_layer"] == 3 and below["confirmed"] is None

    # the leader is chosen only when fresh seeds show the lead again
    kept = sel.decide(rows, {"layer": 5, "seeds": [3, 4, 5],
                             "rows": [row(None, 0.70, 0.01), row(5, 0.73, 0.02)]})
    assert kept["choice"] == 5 and kept["confirmed"] is True
    assert kept["verdict"].startswith("layer 5 is expected to help: it leads the ranking by 5.00")
    assert kept["verdict"].endswith("with 3 fresh seeds it scores +3.00 points (spread 2.00)")
    lost = sel.decide(rows, {"layer": 5, "seeds": [3, 4, 5],
                             "rows": [row(None, 0.70, 0.01), row(5, 0.71, 0.02)]})
    assert lost["choice"] is None and lost["confirmed"] is True
    assert lost["verdict"].startswith("no layer is expected to help: layer 5 leads")
    assert "+1.00 points (spread 2.00)" in lost["verdict"]
    other = sel.decide(rows, {"layer": 0, "seeds": [3], "rows": [row(None, 0.7, 0), row(0, 1, 0)]})
    assert other["choice"] == 5 and other["confirmed"] is False  # not the leader's


def test_a_leading_layer_is_scored_again_with_fresh_seeds(parts, tmp_path, monkeypatch):
    """Every layer leads no layer in the ranking (seeds 0 and 1) and ties with it under fresh
    seeds (2 and 3): the leader is read once more, alone, and the choice is no layer."""
    seen, loads, real = [], [], sel.load_llm_layer

    def proxy(model, *args):
        seed = args[5]
        plugged = getattr(model, "llm_layer", None) is not None  # no layer: no such module
        seen.append((plugged, seed))
        high = plugged and seed < FAST.repeats
        return {"score": 0.9 if high else 0.5, "loss": 0.3}

    def load(source, index, *a, **k):
        loads.append(index)
        return real(source, index, *a, **k)

    monkeypatch.setattr(sel, "train_proxy", proxy)
    monkeypatch.setattr(sel, "load_llm_layer", load)
    got = sel.select_layer(_cfg(parts), FAST, out=tmp_path, progress=False)
    assert loads == [0, 1, 2, 0]  # the ranking, then the leader (layer 0: ties keep the order)
    assert seen[-4:] == [(False, 2), (False, 3), (True, 2), (True, 3)]
    assert got["confirmation"]["layer"] == 0 and got["confirmation"]["seeds"] == [2, 3]
    assert got["choice"] is None and got["confirmed"] is True and got["best_layer"] == 0
    assert "Confirmation with fresh seeds [2, 3]" in (tmp_path / "selection.md").read_text()
    assert sel.read_selection(tmp_path)["confirmation"] == got["confirmation"]
