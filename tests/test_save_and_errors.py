"""save_pretrained / from_pretrained, atomic saves, and clear errors for bad input."""
import pytest
import torch
from helpers import ragged_batch, tiny_llm, tiny_slm

from pifi_fast import PiFiModel, reference
from pifi_fast.persistence import CONFIG_NAME, WEIGHTS_NAME


@pytest.mark.parametrize("slm_kind,task", [("bert", "classification"), ("t5", "seq2seq")])
def test_save_reload_round_trip_and_cross_loading(tmp_path, slm_kind, task):
    model = PiFiModel.from_parts(tiny_slm(slm_kind), tiny_llm("qwen2"), task=task, seed=5).eval()
    ids, mask = ragged_batch(120, [7, 3])
    kw = {"labels": torch.randint(3, 120, (2, 4))} if task == "seq2seq" else {}
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, **kw).logits
    folder = model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in folder.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    from safetensors import safe_open

    with safe_open(str(folder / WEIGHTS_NAME), "pt") as f:
        layer_keys = [k for k in f.keys() if k.startswith("llm_layer.")]
    assert len(layer_keys) == len(set(layer_keys)) == 12  # 9 Llama tensors + q/k/v biases, once
    for cls in (PiFiModel, reference.PiFiModel):
        again = cls.from_pretrained(folder).eval()
        with torch.no_grad():
            got = again(input_ids=ids, attention_mask=mask, **kw).logits
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6), cls


def test_interrupted_save_leaves_no_checkpoint_and_keeps_the_old_one(tmp_path, monkeypatch):
    import safetensors.torch

    model = PiFiModel.from_parts(tiny_slm("bert"), tiny_llm("llama"), seed=1)
    target = tmp_path / "ckpt"

    def broken_save(*a, **k):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(target)
    assert not target.exists() and list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    model.save_pretrained(target)
    before = (target / WEIGHTS_NAME).read_bytes()
    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(target)
    assert (target / WEIGHTS_NAME).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    with pytest.raises(FileNotFoundError, match="not a PiFi checkpoint"):
        PiFiModel.from_pretrained(tmp_path)


@pytest.fixture(scope="module")
def model():
    return PiFiModel.from_parts(tiny_slm("bert"), tiny_llm("llama"), task="question_answering")


def test_bad_batches_raise_clear_errors(model):
    ids, mask = ragged_batch(120, [5, 3])
    with pytest.raises(ValueError, match="empty batch"):
        model(input_ids=ids[:0], attention_mask=mask[:0])
    bad = mask.clone()
    bad[1] = 0
    with pytest.raises(ValueError, match=r"rows \[1\] are all zeros"):
        model(input_ids=ids, attention_mask=bad)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(input_ids=ids, attention_mask=mask[:, :3])
    long_ids = torch.randint(3, 120, (1, 65))
    with pytest.raises(ValueError, match="exceeds the LLM's max_position_embeddings"):
        model(input_ids=long_ids, attention_mask=torch.ones_like(long_ids))
    with pytest.raises(ValueError, match="inputs are on meta"):
        model(input_ids=ids.to("meta"), attention_mask=mask)
    with pytest.raises(TypeError, match="integer token ids"):
        model(input_ids=ids.float(), attention_mask=mask)
    with pytest.raises(ValueError, match="unknown task"):
        PiFiModel.from_parts(tiny_slm("bert"), tiny_llm("llama"), task="poetry")


def test_layer_rejects_mixed_dtypes_and_devices(model):
    layer = model.llm_layer
    x = torch.randn(2, 4, layer.hidden_size, dtype=torch.float64)
    with pytest.raises(ValueError, match="input is torch.float64 .* weights are torch.float32"):
        layer(x)
    with pytest.raises(ValueError, match=r"expects \(batch, seq, 72\)"):
        layer(torch.randn(2, 4, 70))
    with pytest.raises(ValueError, match="no real token"):
        layer(torch.randn(2, 4, 72), torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]]))


def test_hidden_size_mismatch_in_state_dict_is_named(model):
    other = PiFiModel.from_parts(tiny_slm("bert"), tiny_llm("qwen3"), task="question_answering")
    with pytest.raises(RuntimeError, match="size mismatch for llm_layer"):
        model.load_state_dict(other.state_dict())


def test_slm_kind_must_fit_the_task(tmp_path):
    from transformers import AutoModel

    folder = tmp_path / "bert"
    AutoModel.from_config(tiny_slm("bert")).save_pretrained(folder)
    with pytest.raises(ValueError, match="needs an encoder-decoder SLM"):
        PiFiModel.from_parts(str(folder), tiny_llm("llama"), task="seq2seq")


# -- lean checkpoints: the frozen layer referenced, not copied -----------------------------------
def _llm_folder(tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_llm("llama")).save_pretrained(tmp_path / "llm")
    return tmp_path / "llm"


@pytest.mark.parametrize("weights", ["auto", "int8"])
def test_lean_checkpoint_rereads_and_verifies_the_frozen_layer(tmp_path, weights):
    import json
    import shutil

    from pifi_fast.loading import CheckpointError

    src = _llm_folder(tmp_path)
    model = PiFiModel.from_parts(tiny_slm("bert"), str(src), weights=weights, seed=0,
                                 head_dropout=0.0)
    model.save_pretrained(tmp_path / "full")
    model.save_pretrained(tmp_path / "lean", frozen_layer="reference")
    full_bytes = (tmp_path / "full" / "model.safetensors").stat().st_size
    lean_bytes = (tmp_path / "lean" / "model.safetensors").stat().st_size
    assert lean_bytes < full_bytes
    ref = json.loads((tmp_path / "lean" / "pifi_config.json").read_text())["frozen_layer"]
    assert ref["source"] == str(src) and ref["layer"] == 2 and ref["weights"] == weights
    ids = torch.randint(3, 120, (2, 6))
    again = PiFiModel.from_pretrained(tmp_path / "lean")
    assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)
    # the files moved: say where to point, then follow the pointer
    moved = tmp_path / "moved"
    shutil.move(str(src), str(moved))
    with pytest.raises(FileNotFoundError, match="lean checkpoint.*llm_source"):
        PiFiModel.from_pretrained(tmp_path / "lean")
    again = PiFiModel.from_pretrained(tmp_path / "lean", llm_source=str(moved))
    assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)
    # the source changed: the hash says so
    from safetensors.torch import load_file, save_file

    sd = load_file(str(moved / "model.safetensors"))
    sd["model.layers.2.mlp.up_proj.weight"] += 1e-3
    save_file(sd, str(moved / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="differs from the one trained with: sha256"):
        PiFiModel.from_pretrained(tmp_path / "lean", llm_source=str(moved))


def test_lean_checkpoint_refuses_layers_it_cannot_reference(tmp_path):
    random_model = PiFiModel.from_parts(tiny_slm("bert"), tiny_llm("llama"), seed=0)
    with pytest.raises(ValueError, match="random weights"):
        random_model.save_pretrained(tmp_path / "x", frozen_layer="reference")
    src = _llm_folder(tmp_path)
    unfrozen = PiFiModel.from_parts(tiny_slm("bert"), str(src), freeze=False, seed=0)
    with pytest.raises(ValueError, match="freeze=False"):
        unfrozen.save_pretrained(tmp_path / "y", frozen_layer="reference")


def test_a_model_built_from_a_named_slm_saves_its_tokenizer_and_predicts_after_reload(tmp_path):
    """from_parts with the SLM's folder (or Hub id) keeps its tokenizer: save_pretrained writes
    it beside the weights and the reloaded model's predict() needs nothing more (before, a model
    saved from Python had no tokenizer and predict() failed)."""
    offline = pytest.importorskip("pifi_fast.offline")
    folder = str(offline.minilm_dir())
    model = PiFiModel.from_parts(folder, tiny_llm("llama"), num_labels=2, seed=0).eval()
    assert model.tokenizer is not None
    direct = model.predict(["a fine film", "dull"])
    saved = model.save_pretrained(tmp_path / "ckpt")
    assert (saved / "tokenizer").is_dir()
    again = PiFiModel.from_pretrained(saved).eval()
    reloaded = again.predict(["a fine film", "dull"])
    assert [p["label"] for p in reloaded] == [p["label"] for p in direct]
    for a, b in zip(reloaded, direct):
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-6)


def test_an_unfused_model_refuses_the_fused_layers_options():
    """A model that runs the Hugging Face layer (fused=False) takes the frozen-layer options
    only at their defaults (LayerOptions'; None counts as not asked): another value would be
    ignored silently, an unknown name is a TypeError as on the fused path."""
    slm, llm = tiny_slm("bert"), tiny_llm("llama")
    PiFiModel.from_parts(slm, llm, fused=False, kernels="auto", gemm="cublas",
                         chunk_tokens=None, attention=None)
    with pytest.raises(ValueError, match="apply to the fused layer only"):
        PiFiModel.from_parts(slm, llm, fused=False, kernels="torch")
    with pytest.raises(ValueError, match="apply to the fused layer only"):
        PiFiModel.from_parts(slm, llm, fused=False, weights="int8")
    with pytest.raises(TypeError, match="unknown frozen-layer options"):
        PiFiModel.from_parts(slm, llm, fused=False, kernel="torch")
