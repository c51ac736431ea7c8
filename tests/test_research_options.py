"""The paper's open questions as options: several plugged layers (fused stack against the
reference, on tiny and on SmolLM2's real weights; one unpadding for the whole stack; save and
reload, full and lean) and MLP adapters (against the reference, keys, save/reload, errors)."""
import pytest
import torch
from helpers import assert_grads_close, ragged_batch, rel_err, tiny_llm, tiny_slm, trainable_grads

from pifi_fast import PiFiModel, reference
from pifi_fast.attention import Segments
from pifi_fast.layer import FrozenLayerStack


def _pair(llm, task="classification", **opts):
    ref = reference.PiFiModel.from_parts(tiny_slm("bert"), llm, task=task, seed=0,
                                         head_dropout=0.0, num_labels=3, **opts)
    fast = PiFiModel.from_parts(tiny_slm("bert"), llm, task=task, seed=1, head_dropout=0.0,
                                num_labels=3, **opts)
    assert set(ref.state_dict()) == set(fast.state_dict())
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def _logits(model, ids, mask, task):
    out = model(input_ids=ids, attention_mask=mask)
    logits = out.logits if task != "question_answering" else torch.stack(
        [out.start_logits, out.end_logits], -1)
    return logits[mask.bool()] if logits.dim() == 3 else logits  # real positions only


def _run(model, ids, mask, task):
    model.zero_grad(set_to_none=True)
    logits = _logits(model, ids, mask, task)
    (logits * torch.linspace(-1, 1, logits.numel()).view_as(logits)).sum().backward()
    return logits.detach(), trainable_grads(model)


# -- several plugged layers ---------------------------------------------------------------------
@pytest.mark.parametrize("llm_kind", ["llama", "qwen3"])
@pytest.mark.parametrize("task", ["classification", "question_answering",
                                  "token_classification"])
def test_layer_stack_matches_the_reference(llm_kind, task):
    ref, fast = _pair(tiny_llm(llm_kind), task, layers=[0, 2, 1])
    assert isinstance(fast.llm_layer, FrozenLayerStack) and fast.llm_index == [0, 2, 1]
    assert "llm_layer.2.mlp.down_proj.weight" in fast.state_dict()
    ids, mask = ragged_batch(120, [9, 4, 1, 7])
    logits_ref, g_ref = _run(ref, ids, mask, task)
    logits_fast, g_fast = _run(fast, ids, mask, task)
    assert rel_err(logits_fast, logits_ref) <= 1e-5
    assert_grads_close(g_fast, g_ref)
    # the layers and their order matter (a stack is not its first layer, nor another order)
    for other in ([0], [0, 1, 2]):
        _, o_fast = _pair(tiny_llm(llm_kind), task, layers=other)
        sd = {k: v for k, v in ref.state_dict().items() if not k.startswith("llm_layer.")}
        o_fast.load_state_dict({**o_fast.state_dict(), **sd})
        with torch.no_grad():
            assert rel_err(_logits(o_fast, ids, mask, task), logits_ref) > 1e-4, other


def test_layer_stack_unpads_once(monkeypatch):
    _, fast = _pair(tiny_llm("llama"), "token_classification", layers=[0, 1, 2])
    calls = []
    real = Segments.from_mask
    monkeypatch.setattr(Segments, "from_mask",
                        staticmethod(lambda m: calls.append(1) or real(m)))
    ids, mask = ragged_batch(120, [9, 4, 1, 7])
    fast(input_ids=ids, attention_mask=mask).logits.sum().backward()
    assert len(calls) == 1


def test_layer_stack_on_smollm2s_last_three_layers():
    """Real weights (the offline GGUF): only the named layers are read; fused equals the
    reference in a full-sequence task and in CLS mode."""
    offline = pytest.importorskip("pifi_fast.offline")
    from pifi_fast.loading import load_llm_layer

    llms = [load_llm_layer(offline.smollm2_gguf(), i) for i in (-3, -2, -1)]
    assert [one.index for one in llms] == [27, 28, 29]
    for task in ("question_answering", "classification"):
        ref, fast = _pair(llms, task)
        assert fast.llm_index == [27, 28, 29]
        ids, mask = ragged_batch(120, [12, 5, 9])
        logits_ref, g_ref = _run(ref, ids, mask, task)
        logits_fast, g_fast = _run(fast, ids, mask, task)
        assert rel_err(logits_fast, logits_ref) <= 1e-5, task
        assert_grads_close(g_fast, g_ref)


def test_layer_stack_saves_and_reloads_full_and_lean(tmp_path):
    offline = pytest.importorskip("pifi_fast.offline")
    model = PiFiModel.from_parts(tiny_slm("bert"), offline.smollm2_gguf(), layers=[-2, -1],
                                 seed=0, head_dropout=0.0)
    ids = torch.randint(3, 120, (2, 6))
    want = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "full")
    model.save_pretrained(tmp_path / "lean", frozen_layer="reference")
    for folder in ("full", "lean"):
        again = PiFiModel.from_pretrained(tmp_path / folder)
        assert again.llm_index == [28, 29]
        assert again.frozen_layer_sha256() == model.frozen_layer_sha256()
        assert torch.equal(again(input_ids=ids).logits, want), folder
    # a pifi_fast checkpoint of a stack loads into the reference model and gives its logits
    ref = reference.PiFiModel.from_pretrained(tmp_path / "full")
    assert rel_err(ref(input_ids=ids).logits, want) <= 1e-5


def test_layer_options_are_checked():
    with pytest.raises(ValueError, match="same layer twice"):
        PiFiModel.from_parts(tiny_slm("bert"), tiny_llm("llama"), layers=[-1, 2])
    with pytest.raises(ValueError, match="not both"):
        PiFiModel.from_parts(tiny_slm("bert"), tiny_llm("llama"), layer=0, layers=[1, 2])
    with pytest.raises(ValueError, match="int indices"):
        PiFiModel.from_parts(tiny_slm("bert"), tiny_llm("llama"), layers=[])
    with pytest.raises(IndexError):
        PiFiModel.from_parts(tiny_slm("bert"), tiny_llm("llama"), layers=[0, 7])


# -- MLP adapters --------------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["classification", "question_answering"])
def test_mlp_adapters_match_the_reference(task):
    ref, fast = _pair(tiny_llm("llama"), task, adapter="mlp", adapter_width=24)
    sd = fast.state_dict()
    assert sd["adapter_in.0.weight"].shape == (24, 40) and sd["adapter_in.2.weight"].shape == (
        72, 24)
    assert sd["adapter_out.0.weight"].shape == (24, 72) and "adapter_out.2.bias" in sd
    ids, mask = ragged_batch(120, [9, 4, 1, 7])
    logits_ref, g_ref = _run(ref, ids, mask, task)
    logits_fast, g_fast = _run(fast, ids, mask, task)
    assert rel_err(logits_fast, logits_ref) <= 1e-5
    assert_grads_close(g_fast, g_ref)
    assert "adapter_in.0.weight" in g_fast and "adapter_out.2.weight" in g_fast


def test_mlp_adapters_default_width_save_and_reload(tmp_path):
    model = PiFiModel.from_parts(tiny_slm("bert"), tiny_llm("llama"), adapter="mlp", seed=0,
                                 head_dropout=0.0)
    assert model.adapter_in[0].out_features == 40  # the SLM's hidden size
    linear = PiFiModel.from_parts(tiny_slm("bert"), tiny_llm("llama"), seed=0)
    assert "adapter_in.weight" in linear.state_dict()  # the paper's keys by default
    model.save_pretrained(tmp_path / "m")
    again = PiFiModel.from_pretrained(tmp_path / "m")
    ids = torch.randint(3, 120, (2, 5))
    assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)
    with pytest.raises(RuntimeError):  # an MLP-adapter checkpoint does not fit linear adapters
        linear.load_state_dict(model.state_dict())


def test_adapter_options_are_checked():
    for bad, match in (({"adapter": "conv"}, "adapter must be one of"),
                       ({"adapter": "linear", "adapter_width": 8}, "needs adapter='mlp'"),
                       ({"adapter": "mlp", "adapter_width": 0}, "positive int")):
        with pytest.raises(ValueError, match=match):
            PiFiModel.from_parts(tiny_slm("bert"), tiny_llm("llama"), **bad)
    with pytest.raises(ValueError, match="needs an LLM layer"):
        PiFiModel.from_parts(tiny_slm("bert"), None, adapter="mlp")
