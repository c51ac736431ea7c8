"""Real small models that install offline: all-MiniLM-L6-v2 + SmolLM2-135M's last layer (GGUF)."""
import pytest
import torch
from helpers import assert_grads_close, rel_err, trainable_grads

from pifi_fast import PiFiModel, load_llm_layer
from pifi_fast import reference
from pifi_fast.hf_layer import bidirectional_mask

offline = pytest.importorskip("pifi_fast.offline")
try:
    MINILM, SMOLLM2 = offline.minilm_dir(), offline.smollm2_gguf()
except FileNotFoundError as exc:  # pragma: no cover
    pytest.skip(str(exc), allow_module_level=True)


@pytest.fixture(scope="module")
def smollm2_layer():
    return load_llm_layer(SMOLLM2)


@pytest.fixture(scope="module")
def batch():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MINILM)
    texts = ["a gripping, beautifully shot film.", "dull.",
             "the plot wanders, but the lead performance keeps it afloat for most of its length"]
    return tok(texts, padding=True, return_tensors="pt")


def test_gguf_layer_equals_transformers_own_gguf_load(smollm2_layer):
    from transformers import AutoModelForCausalLM

    full = AutoModelForCausalLM.from_pretrained(SMOLLM2.parent, gguf_file=SMOLLM2.name,
                                                dtype=torch.float32)
    theirs = full.model.layers[-1].state_dict()
    ours = smollm2_layer.module.state_dict()
    assert smollm2_layer.index == full.config.num_hidden_layers - 1 == 29
    assert theirs.keys() == ours.keys()
    for k in theirs:
        assert torch.equal(theirs[k], ours[k]), k


@pytest.mark.parametrize("task", ["classification", "question_answering"])
def test_minilm_smollm2_fast_matches_reference(smollm2_layer, batch, task):
    import copy

    torch.manual_seed(0)
    ref = reference.PiFiModel.from_parts(str(MINILM), copy.deepcopy(smollm2_layer), task=task,
                                         head_dropout=0.0)
    fast = PiFiModel.from_parts(str(MINILM), copy.deepcopy(smollm2_layer), task=task,
                                head_dropout=0.0)
    fast.load_state_dict(ref.state_dict())
    ref.eval(), fast.eval()  # the SLM's own dropout off, so both see the same function
    results = []
    for model in (ref, fast):
        out = model(**batch)
        logits = out.logits if task == "classification" else torch.stack(
            [out.start_logits, out.end_logits], -1)
        (logits * torch.linspace(-1, 1, logits.numel()).view_as(logits)).sum().backward()
        results.append((logits.detach(), trainable_grads(model)))
    assert rel_err(results[1][0], results[0][0]) <= 1e-5
    assert_grads_close(results[1][1], results[0][1])


def test_reference_cls_mode_is_the_layer_on_the_first_token(smollm2_layer, batch):
    torch.manual_seed(0)
    ref = reference.PiFiModel.from_parts(str(MINILM), smollm2_layer, head_dropout=0.0).eval()
    with torch.no_grad():
        h = ref.slm(**batch).last_hidden_state[:, :1]
        x = ref.adapter_in(h)
        pos = torch.zeros(x.shape[0], 1, dtype=torch.long)
        layer_out = smollm2_layer.module(
            x, attention_mask=bidirectional_mask(None, x.shape[0], 1, x.dtype, x.device),
            position_ids=pos, position_embeddings=smollm2_layer.rotary(x, pos))
        expected = ref.head(ref.adapter_out(layer_out)[:, 0])
        got = ref(**batch).logits
    assert torch.equal(got, expected)
