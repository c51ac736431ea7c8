"""Mixed precision: PiFiModel with the fused layer under torch.autocast, for every pair of layer
dtype {fp32, bf16, fp16} and autocast {off, bf16, fp16}, against the reference under the same
autocast. The rule (pifi_fast.frozen.module): the frozen layer computes in its own dtype with
autocast off inside, and returns its input's dtype.

Yardstick (docs/development.md, "Numerics"): both models against a float64 truth (the
reference in float64, same weights, no autocast); the fast model's error is at most twice the
reference's, for the logits and for the trainable gradients (adapter and embedding), in
classification and QA.
"""
import pytest
import torch
from helpers import ragged_batch, rel_err, tiny_llm, tiny_slm, trained_scale_state

from pifi_fast import PiFiModel, reference
from pifi_fast.layer import FrozenLlamaLayer
from pifi_fast.loading import random_layer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TASKS = ["classification", "question_answering"]


def _run(model, batch, task, autocast, upstream):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        out = model(**batch)
    y = (out.logits if task == "classification"
         else torch.stack([out.start_logits, out.end_logits]))
    if task != "classification":  # padding positions hold the dtype's minimum by design
        y = y[:, batch["attention_mask"].bool()]
    (y.double() * upstream(y)).sum().backward()
    grads = torch.cat([model.adapter_in.weight.grad.double().flatten(),
                       model.slm.embeddings.word_embeddings.weight.grad.double().flatten()])
    return y.detach().double(), grads


@pytest.fixture(scope="module")
def setups():
    out = {}
    for task in TASKS:
        g = torch.Generator().manual_seed(2)
        ids, mask = ragged_batch(120, torch.randint(1, 12, (16,), generator=g).tolist(), g)
        out[task] = (trained_scale_state(task, 5), {"input_ids": ids, "attention_mask": mask})
    return out


@pytest.mark.parametrize("autocast", ["off", "bf16", "fp16"])
@pytest.mark.parametrize("layer_dtype", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("task", TASKS)
def test_fused_model_under_autocast_within_twice_the_reference_error(setups, task, layer_dtype,
                                                                      autocast):
    state, batch = setups[task]
    ups = {}

    def upstream(y):  # one fixed random upstream gradient per output shape
        if y.shape not in ups:
            ups[y.shape] = torch.randn(y.shape, dtype=torch.float64,
                                       generator=torch.Generator().manual_seed(3))
        return ups[y.shape]

    truth = reference.PiFiModel.from_parts(tiny_slm("bert"), tiny_llm("llama"), task=task,
                                           seed=0, head_dropout=0.0, num_labels=5).double()
    truth.load_state_dict(state)
    y_truth, g_truth = _run(truth, batch, task, None, upstream)
    ac = None if autocast == "off" else DTYPES[autocast]
    results = {}
    for name, cls in (("fast", PiFiModel), ("reference", reference.PiFiModel)):
        model = cls.from_parts(tiny_slm("bert"), tiny_llm("llama"), task=task, seed=0,
                               head_dropout=0.0, num_labels=5, llm_dtype=DTYPES[layer_dtype])
        model.load_state_dict(state)
        results[name] = _run(model, batch, task, ac, upstream)
    assert model.layer_dtype == DTYPES[layer_dtype]
    for i, what in enumerate(("logits", "trainable gradients")):
        e_fast = rel_err(results["fast"][i], (y_truth, g_truth)[i])
        e_ref = rel_err(results["reference"][i], (y_truth, g_truth)[i])
        assert torch.isfinite(results["fast"][i]).all()
        assert e_fast <= 2 * e_ref + 1e-6, f"{what}: fast {e_fast:.2e} vs reference {e_ref:.2e}"


@pytest.mark.parametrize("layer_dtype", ["fp32", "bf16"])
def test_layer_computes_in_its_dtype_and_returns_the_input_dtype_under_autocast(layer_dtype):
    llm = random_layer(tiny_llm("llama"), -1, dtype=DTYPES[layer_dtype], seed=0)
    layer = FrozenLlamaLayer.from_hf(llm.module, llm.config, llm.rotary)
    x = torch.randn(2, 5, llm.config.hidden_size, requires_grad=True)  # fp32 input
    with torch.autocast("cpu", dtype=torch.float16):
        out = layer(x.to(torch.float16) if layer_dtype == "bf16" else x)
    assert out.dtype == (torch.float16 if layer_dtype == "bf16" else torch.float32)
    out.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    # outside autocast a mismatch is still the caller's mistake, said clearly
    with pytest.raises(ValueError, match="under torch.autocast the layer casts"):
        layer(torch.randn(2, 5, llm.config.hidden_size, dtype=torch.float64))
