"""Pooling of the classification sentence vector (the authors' --padding): cls, mean,
mean-with-padding and last each equal a plain computation from the SLM's own last_hidden_state,
in the reference and the fused model alike, are saved and reloaded with the model, reach the
model from `pifi-fast train --pooling`, and a checkpoint saved without the option keeps its SLM
kind's old default."""
import json

import pytest
import torch
from helpers import ragged_batch, rel_err, tiny_llm, tiny_slm
from transformers import AutoModel, AutoModelForCausalLM

from pifi_fast import PiFiModel, reference
from pifi_fast.pifi_base import POOLINGS

MODES = ["cls", "mean", "mean-with-padding", "last"]
LENGTHS = [9, 2, 6, 1]  # very different real lengths, right-padded to 9


def _pair(pooling, **opts):
    """Reference and fused models with the same weights (BERT SLM, Llama layer)."""
    ref = reference.PiFiModel.from_parts(tiny_slm("bert"), tiny_llm("llama"), seed=0,
                                         num_labels=3, head_dropout=0.0, pooling=pooling, **opts)
    fast = PiFiModel.from_parts(tiny_slm("bert"), tiny_llm("llama"), seed=1, num_labels=3,
                                head_dropout=0.0, pooling=pooling, **opts)
    fast.load_state_dict(ref.state_dict())
    return ref.eval(), fast.eval()


def _batch(seed=0):
    ids, mask = ragged_batch(120, LENGTHS, generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": mask}


def _plain(hidden, lengths, mode, left=False):
    """The pooled vectors (B, d) computed row by row from the real lengths, in plain torch."""
    rows = []
    seq = hidden.shape[1]
    for i, n in enumerate(lengths):
        real = hidden[i, seq - n:] if left else hidden[i, :n]
        if mode == "cls":
            rows.append(hidden[i, 0])
        elif mode == "mean":
            rows.append(real.mean(0))
        elif mode == "mean-with-padding":
            rows.append(hidden[i].sum(0) / seq)
        else:
            rows.append(real[-1])
    return torch.stack(rows)


@pytest.mark.parametrize("mode", MODES)
def test_the_sentence_vector_is_the_plain_pooling_in_both_models(mode):
    """(a) the vector entering L_in equals the plain computation; forward's logits are the
    layer and head on exactly that vector. (b) reference and fused logits agree."""
    ref, fast = _pair(mode)
    assert ref.pooling == fast.pooling == mode
    batch = _batch()
    with torch.no_grad():
        hidden = ref.slm(**batch).last_hidden_state
        want = _plain(hidden, LENGTHS, mode)
        for model in (ref, fast):
            got = model._sentence_vectors(dict(batch, inputs_embeds=None))
            assert got.shape == (len(LENGTHS), 1, hidden.shape[-1])
            torch.testing.assert_close(got[:, 0], want, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(model(**batch).logits,
                                       model.classify_sentence_vectors(want.unsqueeze(1)),
                                       rtol=1e-5, atol=1e-6)
        assert rel_err(fast(**batch).logits, ref(**batch).logits) <= 1e-5


@pytest.mark.parametrize("mode", ["mean", "last"])
def test_left_padding_pools_the_same_real_tokens(mode):
    """mean and last read the real tokens wherever the padding is (left-padded here)."""
    ref, _ = _pair(mode)
    batch = {k: v.flip(1) for k, v in _batch(1).items()}
    with torch.no_grad():
        hidden = ref.slm(**batch).last_hidden_state
        got = ref._sentence_vectors(dict(batch, inputs_embeds=None))[:, 0]
    torch.testing.assert_close(got, _plain(hidden, LENGTHS, mode, left=True), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_the_packed_slm_applies_to_cls_only(mode):
    """(b) On a CPU packed_slm "auto" and True pack for cls and give packed_slm=False's logits;
    for the other modes they fall back to the SLM's own forward (same logits, exactly)."""
    _, fast = _pair(mode)
    batch = _batch(2)
    inputs = dict(batch, inputs_embeds=None)
    logits = {}
    with torch.no_grad():
        for option in (False, "auto", True):
            fast.packed_slm = option
            logits[option] = fast(**batch).logits
            expected_mode = "packed" if mode == "cls" and option is not False else None
            assert fast.slm_mode(inputs) == expected_mode, option
    for option in ("auto", True):
        if mode == "cls":
            torch.testing.assert_close(logits[option], logits[False], rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(logits[option], logits[False])


@pytest.mark.parametrize("mode", MODES)
def test_the_mode_is_saved_and_reloaded_with_the_model(mode, tmp_path):
    """(c) save_pretrained -> from_pretrained keeps the mode and the logits, in either class."""
    _, fast = _pair(mode)
    batch = _batch(3)
    with torch.no_grad():
        before = fast(**batch).logits
    folder = fast.save_pretrained(tmp_path / "ckpt")
    assert json.loads((folder / "pifi_config.json").read_text())["options"]["pooling"] == mode
    for cls in (PiFiModel, reference.PiFiModel):
        again = cls.from_pretrained(folder).eval()
        assert again.pooling == mode
        with torch.no_grad():
            assert rel_err(again(**batch).logits, before) <= 1e-5


def test_a_mode_set_as_an_attribute_is_saved(tmp_path):
    _, fast = _pair(None)
    assert fast.pooling == "cls"
    fast.pooling = "mean"
    folder = fast.save_pretrained(tmp_path / "ckpt")
    assert PiFiModel.from_pretrained(folder).pooling == "mean"
    fast.pooling = None  # the SLM kind's default again
    assert fast.pooling == "cls" and fast._options["pooling"] == "cls"


def test_a_bad_mode_is_an_error_naming_the_choices():
    """(d) at construction, as an attribute, and on a task that has no sentence vector."""
    choices = ".*".join(POOLINGS)
    with pytest.raises(ValueError, match=f"pooling must be one of .*{choices}.*'max'"):
        PiFiModel.from_parts(tiny_slm("bert"), tiny_llm("llama"), pooling="max")
    with pytest.raises(ValueError, match=f"pooling must be one of .*{choices}"):
        reference.PiFiModel.from_parts(tiny_slm("bert"), None, pooling="first")
    model = PiFiModel.from_parts(tiny_slm("bert"), None)
    with pytest.raises(ValueError, match=choices):
        model.pooling = "average"
    assert model.pooling == "cls"
    with pytest.raises(ValueError, match="classification'? only"):
        PiFiModel.from_parts(tiny_slm("bert"), tiny_llm("llama"), task="question_answering",
                             pooling="mean")


def test_a_checkpoint_saved_without_a_pooling_loads_with_the_old_default(tmp_path):
    """(e) a checkpoint from before the option (no "pooling" in its options) loads with its
    SLM kind's old default: the first token for an encoder, the last real token for a
    decoder-only SLM."""
    batch = _batch(4)
    _, cls_model = _pair("cls")
    for slm, name, default in ((AutoModel.from_config(tiny_slm("bert")), "bert", "cls"),
                               (AutoModel.from_config(tiny_llm("llama")), "llama", "last")):
        model = PiFiModel(slm, None, num_labels=3, head_dropout=0.0, pooling="mean")
        folder = model.save_pretrained(tmp_path / name)
        config = json.loads((folder / "pifi_config.json").read_text())
        del config["options"]["pooling"]
        (folder / "pifi_config.json").write_text(json.dumps(config))
        assert PiFiModel.from_pretrained(folder).pooling == default
        assert reference.PiFiModel.from_pretrained(folder).pooling == default
    # and the logits are the old ones: a pre-pooling BERT PiFi reloads as the cls model
    folder = cls_model.save_pretrained(tmp_path / "old")
    config = json.loads((folder / "pifi_config.json").read_text())
    del config["options"]["pooling"]
    (folder / "pifi_config.json").write_text(json.dumps(config))
    with torch.no_grad():
        torch.testing.assert_close(PiFiModel.from_pretrained(folder).eval()(**batch).logits,
                                   cls_model(**batch).logits)


def test_a_decoder_only_slm_keeps_last_as_its_default():
    slm = AutoModel.from_config(tiny_llm("llama"))
    model = reference.PiFiModel(slm, None, num_labels=2, head_dropout=0.0).eval()
    assert model.pooling == "last"
    cls_model = PiFiModel(slm, None, num_labels=2, head_dropout=0.0, pooling="cls")
    assert cls_model.pooling == "cls"  # a named mode wins over the kind's default
    ids, mask = ragged_batch(100, [5, 2, 3])
    with torch.no_grad():
        hidden = slm(input_ids=ids, attention_mask=mask).last_hidden_state
        got = model._sentence_vectors({"input_ids": ids, "attention_mask": mask})[:, 0]
    torch.testing.assert_close(got, hidden[torch.arange(3), torch.tensor([4, 1, 2])])


def test_train_pooling_reaches_the_model(tmp_path, monkeypatch):
    """(f) `pifi-fast train --pooling mean` builds a model with pooling "mean"; auto keeps the
    SLM kind's default; a bad value is refused by the parser."""
    from pifi_fast.cli import commands, main
    from pifi_fast.train import TrainConfig, build_model

    AutoModel.from_config(tiny_slm("bert")).save_pretrained(tmp_path / "bert")
    AutoModelForCausalLM.from_config(tiny_llm("llama")).save_pretrained(tmp_path / "llama")
    built = []

    def fake_train(cfg):
        built.append(build_model(cfg, 2))
        return {"metric": "accuracy"}

    monkeypatch.setattr(commands, "train", fake_train)
    common = ["train", "--slm", str(tmp_path / "bert"), "--llm", str(tmp_path / "llama")]
    assert main(common + ["--pooling", "mean"]) == 0
    assert main(common) == 0
    assert [m.pooling for m in built] == ["mean", "cls"]
    with pytest.raises(SystemExit):
        main(common + ["--pooling", "max"])
    ref = build_model(TrainConfig(slm=str(tmp_path / "bert"), llm=str(tmp_path / "llama"),
                                  implementation="reference", pooling="last"), 2)
    assert isinstance(ref, reference.PiFiModel) and ref.pooling == "last"
    with pytest.raises(ValueError, match="classification'? only"):
        build_model(TrainConfig(slm=str(tmp_path / "bert"), llm=None, pooling="mean",
                                task="question_answering"), 2)
