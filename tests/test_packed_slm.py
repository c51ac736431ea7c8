"""pifi_fast.packed_slm: the SLM's sentence vectors from the real tokens only (and on the padded
layout, CUDA graphs' mode) equal the SLM's own forward (values and every parameter's gradient,
float64) for each supported model type on ragged batches of awkward shapes, right- and
left-padded, inside PiFiModel too (LoRA included) and under torch.compile (one graph, packed as
eager); padding really is skipped (the layers see only real tokens, the last layer only the
first ones); and every case it does not support falls back to the SLM's own forward under
"auto" and is a clear error under True."""
import pytest
import torch
from helpers import (
    assert_grads_close,
    ragged_batch,
    tiny_llm,
    tiny_slm,
    trainable_grads,
)
from transformers import (
    AutoModel,
    BertConfig,
    DebertaV2Config,
    ElectraConfig,
    RobertaConfig,
    XLMRobertaConfig,
)

from pifi_fast import PiFiModel, packed_slm, reference

COMMON = {"vocab_size": 97, "hidden_size": 36, "num_hidden_layers": 3, "num_attention_heads": 3,
          "intermediate_size": 50, "max_position_embeddings": 40, "hidden_dropout_prob": 0.0,
          "attention_probs_dropout_prob": 0.0}
CONFIGS = {"bert": lambda: BertConfig(**COMMON, type_vocab_size=2),
           "electra": lambda: ElectraConfig(**COMMON, embedding_size=20, type_vocab_size=2),
           "roberta": lambda: RobertaConfig(**COMMON, pad_token_id=1, type_vocab_size=1),
           "xlm-roberta": lambda: XLMRobertaConfig(**COMMON, pad_token_id=1, type_vocab_size=1)}
LENGTHS = [13, 2, 7, 1, 13, 10]  # one row of length 1, two full rows


def _slm(kind, dtype=torch.float64):
    torch.manual_seed(0)
    return AutoModel.from_config(CONFIGS[kind]()).to(dtype)


@pytest.mark.parametrize("padding", ["right", "left", None])
@pytest.mark.parametrize("kind", list(CONFIGS))
def test_first_token_states_equal_the_slms_own_forward(kind, padding):
    """A left-padded row's first position is padding: its state (what the plain forward's
    [:, 0] reads) is computed from the real keys all the same."""
    slm = _slm(kind)
    assert packed_slm.unsupported(slm) is None
    g = torch.Generator().manual_seed(1)
    ids, mask = ragged_batch(97, LENGTHS if padding else [9] * 4, generator=g)
    if padding == "left":
        ids, mask = ids.flip(1), mask.flip(1)
    types = (torch.randint(0, 2, ids.shape, generator=g) * mask
             if kind in ("bert", "electra") else None)
    cotangent = torch.randn(ids.shape[0], 1, 36, generator=g, dtype=torch.float64)
    results = []
    for packed in (False, True):
        slm.zero_grad()
        kwargs = {} if types is None else {"token_type_ids": types}
        if packed:
            out = packed_slm.first_token_states(slm, ids, mask, types)
        else:
            out = slm(input_ids=ids, attention_mask=mask, **kwargs).last_hidden_state[:, :1]
        (out * cotangent).sum().backward()
        results.append((out.detach(), trainable_grads(slm)))
    (plain, plain_grads), (packed, packed_grads) = results
    torch.testing.assert_close(packed, plain, rtol=1e-10, atol=1e-10)
    # the pooler (unused by PiFi) gets no gradient from the packed path: it does not run
    assert set(packed_grads) == {n for n in plain_grads if not n.startswith("pooler.")}
    for name, grad in packed_grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-9, atol=1e-11, msg=name)


def test_mask_none_is_one_full_batch():
    slm = _slm("bert").eval()
    ids = torch.randint(3, 97, (3, 8))
    torch.testing.assert_close(packed_slm.first_token_states(slm, ids, None),
                               slm(input_ids=ids).last_hidden_state[:, :1])


def test_padding_is_skipped_and_the_last_layer_runs_for_the_first_tokens_only():
    """The saving itself, counted: every feed-forward block but the last sees the real tokens
    (sum of lengths), the last one a row per sentence; the SLM's own forward sees B x S."""
    slm = _slm("bert", torch.float32)
    ids, mask = ragged_batch(97, LENGTHS)
    seen = []
    hooks = [layer.intermediate.register_forward_hook(lambda m, a, o: seen.append(a[0].shape))
             for layer in slm.encoder.layer]
    try:
        packed_slm.first_token_states(slm, ids, mask)
        packed_rows = [s[0] for s in seen]
        seen.clear()
        slm(input_ids=ids, attention_mask=mask)
        plain_rows = [s[0] * s[1] for s in seen]
    finally:
        for h in hooks:
            h.remove()
    assert packed_rows == [sum(LENGTHS)] * 2 + [len(LENGTHS)]
    assert plain_rows == [len(LENGTHS) * max(LENGTHS)] * 3
    # left-padded: each row whose first position is padding adds that position (as a query)
    seen.clear()
    hook = slm.encoder.layer[0].intermediate.register_forward_hook(
        lambda m, a, o: seen.append(a[0].shape))
    try:
        packed_slm.first_token_states(slm, ids.flip(1), mask.flip(1))
    finally:
        hook.remove()
    assert seen[0][0] == sum(LENGTHS) + sum(n < max(LENGTHS) for n in LENGTHS)


def test_dropout_is_applied_while_training():
    """Training draws dropout on the packed path too (attention and hidden), eval does not."""
    torch.manual_seed(0)
    slm = AutoModel.from_config(BertConfig(**{**COMMON, "hidden_dropout_prob": 0.3,
                                              "attention_probs_dropout_prob": 0.3}))
    ids, mask = ragged_batch(97, LENGTHS)
    slm.eval()
    eval_out = packed_slm.first_token_states(slm, ids, mask)
    torch.testing.assert_close(packed_slm.first_token_states(slm, ids, mask), eval_out)
    slm.train()
    a, b = (packed_slm.first_token_states(slm, ids, mask) for _ in range(2))
    assert not torch.allclose(a, eval_out) and not torch.allclose(a, b)


def _pifi(slm_config, **options):
    return PiFiModel.from_parts(slm_config, tiny_llm("llama"), num_labels=3, seed=0,
                                head_dropout=0.0, **options)


@pytest.mark.parametrize("lora", [None, {"r": 4, "alpha": 8, "targets": "query,value,dense"}],
                         ids=["full", "lora"])
def test_pifi_model_packed_equals_the_plain_slm_and_the_reference(lora):
    """Logits and every trained gradient: packed == packed_slm=False (the SLM's own forward) to
    float64 rounding, and both match the reference PiFi."""
    options = {"lora": lora} if lora else {}
    model = _pifi(tiny_slm("bert"), **options).double()
    ref = reference.PiFiModel.from_parts(tiny_slm("bert"), tiny_llm("llama"), num_labels=3,
                                         seed=0, head_dropout=0.0, **options).double()
    ref.load_state_dict(model.state_dict())
    ids, mask = ragged_batch(120, [9, 3, 1, 6, 9])
    labels = torch.tensor([0, 2, 1, 1, 0])
    runs = {}
    for name, net, packed in (("packed", model, "auto"), ("plain", model, False),
                              ("reference", ref, None)):
        if packed is not None:
            net.packed_slm = packed
        net.zero_grad()
        out = net(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        runs[name] = (out.logits.detach(), trainable_grads(net))
    (logits, grads), (plain_logits, plain_grads) = runs["packed"], runs["plain"]
    torch.testing.assert_close(logits, plain_logits, rtol=1e-10, atol=1e-10)
    assert set(grads) == set(plain_grads) and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-8, atol=1e-10, msg=name)
    # the reference's Hugging Face layer normalises in float32 even in a float64 model
    torch.testing.assert_close(logits, runs["reference"][0], rtol=1e-6, atol=1e-7)
    assert_grads_close(grads, runs["reference"][1])


def test_slm_mode_per_device_batch_and_option():
    """"auto" on a CPU packs (left-padded batches too); inputs_embeds and packed_slm=False run
    the SLM's own forward; True refuses what it cannot run."""
    model = _pifi(tiny_slm("bert"))
    ids, mask = ragged_batch(120, [5, 2, 4])
    inputs = {"input_ids": ids, "attention_mask": mask, "inputs_embeds": None}
    left = {"input_ids": ids.flip(1), "attention_mask": mask.flip(1), "inputs_embeds": None}
    embeds = {**inputs, "input_ids": None, "inputs_embeds": torch.randn(3, 5, 40)}
    assert model.packed_slm == "auto"
    assert model.slm_mode(inputs) == "packed" and model.slm_mode(left) == "packed"
    assert model.slm_mode({**inputs, "attention_mask": None}) == "packed"
    assert model.slm_mode(embeds) is None
    model.packed_slm = False
    assert model.slm_mode(inputs) is None and model.slm_mode(left) is None
    model.packed_slm = True
    with pytest.raises(ValueError, match="inputs_embeds"):
        model(inputs_embeds=embeds["inputs_embeds"], attention_mask=mask)
    with pytest.raises(ValueError, match="packed_slm must be"):
        model.packed_slm = "yes"
    # every mode gives the reference's logits, the left-padded batch included
    ref = reference.PiFiModel.from_parts(tiny_slm("bert"), tiny_llm("llama"), num_labels=3,
                                         seed=0, head_dropout=0.0)
    ref.load_state_dict(model.state_dict())
    model.eval(), ref.eval()
    for batch in (inputs, left):
        kwargs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        expected = ref(**kwargs).logits
        for option in ("auto", False):
            model.packed_slm = option
            torch.testing.assert_close(model(**kwargs).logits, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["bert", "electra"])
def test_padded_layout_equals_the_slms_own_forward(kind):
    """pack=False (the static-shape mode: CUDA graphs, and torch.compile when Dynamo may not
    capture data-dependent sizes): same vectors and gradients, right- or left-padded."""
    slm = _slm(kind)
    ids, mask = ragged_batch(97, LENGTHS)
    for m in (mask, mask.flip(1)):
        got = packed_slm.first_token_states(slm, ids, m, pack=False)
        (got ** 2).sum().backward()
        got_grads = trainable_grads(slm)
        slm.zero_grad()
        want = slm(input_ids=ids, attention_mask=m).last_hidden_state[:, :1]
        (want ** 2).sum().backward()
        want_grads = trainable_grads(slm)
        slm.zero_grad()
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        for name, grad in got_grads.items():
            torch.testing.assert_close(grad, want_grads[name], rtol=1e-9, atol=1e-11, msg=name)


def test_unsupported_slms_fall_back_or_refuse():
    deberta = DebertaV2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=40, vocab_size=97)
    assert "deberta-v2" in packed_slm.unsupported(AutoModel.from_config(deberta))
    model = _pifi(deberta)
    assert model.slm_mode({"input_ids": torch.randint(3, 97, (2, 4))}) is None
    with pytest.raises(ValueError, match="cannot be packed.*deberta-v2"):
        model.packed_slm = True
    checkpointed = AutoModel.from_config(tiny_slm("bert"))
    # (transformers 5.24 names it activation_checkpointing_enable, 5.17 (the GPU image's)
    # gradient_checkpointing_enable)
    enable = (getattr(checkpointed, "activation_checkpointing_enable", None)
              or checkpointed.gradient_checkpointing_enable)
    enable()
    assert "gradient checkpointing" in packed_slm.unsupported(checkpointed)


def test_other_tasks_use_the_slms_own_forward():
    """Only classification reads one vector per sentence."""
    model = PiFiModel.from_parts(tiny_slm("bert"), tiny_llm("llama"), task="question_answering",
                                 seed=0)
    model.packed_slm = True  # accepted: it has no effect outside classification
    calls = []
    hook = model.slm.register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        ids, mask = ragged_batch(120, [5, 2])
        model(input_ids=ids, attention_mask=mask)
    finally:
        hook.remove()
    assert calls == [1]


def _traced_ops(classifier, ids, mask) -> tuple[int, int, bool]:
    """(graphs, graph breaks, whether the graph packs: a nonzero among its nodes)."""
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(classifier)(input_ids=ids, attention_mask=mask)
    packs = any("nonzero" in str(node.target) for graph in explanation.graphs
                for node in graph.graph.nodes)
    return explanation.graph_count, explanation.graph_break_count, packs


@pytest.mark.slow  # over 2 s on 2 cores: not in make check
def test_compile_traces_one_graph_packed_when_dynamo_may_capture_the_token_count():
    """Plain torch.compile: the padded layout (static shapes), one graph. With Dynamo's
    capture_dynamic_output_shape_ops (what inference.compile_model turns on): packed, still one
    graph, and the compiled logits and gradients equal eager packing's on right- and
    left-padded batches of other lengths (no recompile for a new token count)."""
    classifier = _pifi(tiny_slm("bert")).double()
    ids, mask = ragged_batch(120, [5, 2, 4])
    assert _traced_ops(classifier, ids, mask) == (1, 0, False)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        assert _traced_ops(classifier, ids, mask) == (1, 0, True)
    torch._dynamo.reset()
    compiled = torch.compile(classifier, backend="aot_eager", fullgraph=True)
    compiled.forward = torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True)(
        compiled.forward)
    labels = torch.tensor([0, 2, 1])
    counters = torch._dynamo.utils.counters
    counters.clear()
    for lengths, left in (([5, 2, 4], False), ([7, 1, 4], False), ([6, 6, 2], True)):
        ids, mask = ragged_batch(120, lengths)
        if left:
            ids, mask = ids.flip(1), mask.flip(1)
        runs = []
        for runner in (classifier, compiled):
            classifier.zero_grad()
            out = runner(input_ids=ids, attention_mask=mask, labels=labels)
            out.loss.backward()
            runs.append((out.logits.detach(), trainable_grads(classifier)))
        torch.testing.assert_close(runs[1][0], runs[0][0], rtol=1e-10, atol=1e-10)
        assert_grads_close(runs[1][1], runs[0][1], tol=1e-9)
    # 11, 12 and 14 tokens, lengths 5, 7, 6: one graph, one recompile when the length changes
    # (then dynamic); the token count never adds one
    assert counters["stats"]["unique_graphs"] == 2
