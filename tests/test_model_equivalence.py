"""pifi_fast.PiFiModel against the reference PiFi: same weights, same logits and gradients."""
import pytest
import torch
from helpers import assert_grads_close, ragged_batch, rel_err, tiny_llm, tiny_slm, trainable_grads

from pifi_fast import PiFiModel
from pifi_fast import reference


def _pair(slm_cfg, llm, task, **opts):
    ref = reference.PiFiModel.from_parts(slm_cfg, llm, task=task, seed=0, **opts)
    fast = PiFiModel.from_parts(slm_cfg, llm, task=task, seed=1, **opts)
    assert set(ref.state_dict()) == set(fast.state_dict())
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def _outputs(model, batch, task):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    if task == "question_answering":
        logits = torch.stack([out.start_logits, out.end_logits], -1)
    else:
        logits = out.logits
    if task != "seq2seq" and logits.dim() == 3:
        # Full-sequence tasks: compare real positions only. The fused layer leaves padding
        # positions untouched (documented), the Hugging Face layer computes something there,
        # and QA gives padding the most negative logit in both.
        logits = logits[batch["attention_mask"].bool()]
    # A loss that weighs every logit differently, so every gradient path is exercised.
    weights = torch.linspace(-1, 1, logits.numel()).view_as(logits)
    loss = (logits * weights).sum() + (out.loss if out.loss is not None else 0)
    loss.backward()
    return logits.detach(), trainable_grads(model)


@pytest.mark.parametrize("llm_kind", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("task", ["classification", "question_answering", "token_classification"])
def test_encoder_slm_matches_reference(llm_kind, task):
    llm = tiny_llm(llm_kind)
    ref, fast = _pair(tiny_slm("bert"), llm, task, head_dropout=0.0, num_labels=3)
    assert fast.fused
    ids, mask = ragged_batch(120, [9, 4, 1, 7])
    batch = {"input_ids": ids, "attention_mask": mask}
    if task == "classification":
        batch["labels"] = torch.tensor([0, 2, 1, 1])
    elif task == "token_classification":
        batch["labels"] = torch.randint(0, 3, ids.shape).masked_fill(mask == 0, -100)
    else:
        batch["start_positions"] = torch.tensor([1, 0, 0, 3])
        batch["end_positions"] = torch.tensor([4, 2, 0, 5])
    logits_ref, g_ref = _outputs(ref, batch, task)
    logits_fast, g_fast = _outputs(fast, batch, task)
    assert rel_err(logits_fast, logits_ref) <= 1e-5
    assert_grads_close(g_fast, g_ref)
    assert "slm.embeddings.word_embeddings.weight" in g_ref  # input embeddings are compared
    assert not any(n.startswith("llm_layer.") for n in g_fast)


@pytest.mark.parametrize("slm_kind", ["t5", "bart"])
def test_seq2seq_slm_matches_reference(slm_kind):
    ref, fast = _pair(tiny_slm(slm_kind), tiny_llm("llama"), "seq2seq")
    ids, mask = ragged_batch(120, [8, 3, 6])
    labels = torch.randint(3, 120, (3, 5))
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    logits_ref, g_ref = _outputs(ref, batch, "seq2seq")
    logits_fast, g_fast = _outputs(fast, batch, "seq2seq")
    assert rel_err(logits_fast, logits_ref) <= 1e-5
    assert_grads_close(g_fast, g_ref)
    ref.eval()
    fast.eval()
    gen_ref = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    gen_fast = fast.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert gen_ref.shape[0] == 3 and gen_ref.shape[1] >= 2
    assert torch.equal(gen_ref, gen_fast)


def test_attend_to_padding_reproduces_authors_mask():
    """attend_to_padding=True must equal running the layer with no padding mask at all."""
    llm = tiny_llm("llama")
    ref, fast = _pair(tiny_slm("bert"), llm, "question_answering", attend_to_padding=True)
    ids, mask = ragged_batch(120, [9, 4])
    with torch.no_grad():
        a = fast(input_ids=ids, attention_mask=mask).start_logits
        b = ref(input_ids=ids, attention_mask=mask).start_logits
        enc = ref.slm(input_ids=ids, attention_mask=mask).last_hidden_state
        h = ref.adapter_out(ref._run_layer(ref.adapter_in(enc), None))
        c = ref.head(h)[..., 0]
        masked = PiFiModel.from_parts(tiny_slm("bert"), llm, task="question_answering")
        masked.load_state_dict(ref.state_dict())
        d = masked(input_ids=ids, attention_mask=mask).start_logits
    real = mask.bool()  # QA logits at padding are masked to the dtype's minimum in both models
    assert rel_err(a[real], c[real]) <= 1e-5 and rel_err(b[real], c[real]) <= 1e-5
    assert bool((a[~real] == torch.finfo(a.dtype).min).all())
    assert rel_err(d[1, :4], c[1, :4]) > 1e-4  # masking padding does change the short row


def test_frozen_parameters_get_no_grad_and_optimizer_trains_the_rest():
    for cls in (PiFiModel, reference.PiFiModel):
        model = cls.from_parts(tiny_slm("bert"), tiny_llm("qwen3"), seed=3)
        frozen = {n: p.detach().clone() for n, p in model.named_parameters()
                  if n.startswith("llm_layer.")}
        frozen.update({n: b.clone() for n, b in model.llm_layer.state_dict().items()})
        others = {n: p.detach().clone() for n, p in model.named_parameters()
                  if not n.startswith("llm_layer.")}
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        ids, mask = ragged_batch(120, [6, 3])
        model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1])).loss.backward()
        for n, p in model.named_parameters():
            if n.startswith("llm_layer."):
                assert p.grad is None, n
        opt.step()
        for n, p in model.llm_layer.state_dict().items():
            assert torch.equal(p, frozen[n]), n
        changed = [n for n, p in model.named_parameters() if n in others
                   and not torch.equal(p, others[n])]
        assert any(n.startswith("slm.") for n in changed)
        assert {"adapter_in.weight", "adapter_out.weight", "head.0.weight"} <= set(changed)


def test_unfrozen_ablation_trains_the_layer():
    model = PiFiModel.from_parts(tiny_slm("bert"), tiny_llm("llama"), freeze=False)
    assert not model.fused
    ids, mask = ragged_batch(120, [5, 2])
    model(input_ids=ids, attention_mask=mask, labels=torch.tensor([1, 0])).loss.backward()
    assert model.llm_layer.mlp.down_proj.weight.grad is not None
