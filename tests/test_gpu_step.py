"""Issue 10 on the device: the paths the W4 benchmark rows time compute what eager PiFi computes,
as a GPU runs them (bf16 autocast over the whole model, the frozen layer in bf16), before any of
their speed is believed:

- the fused model (padded SLM, GPU's default, and packed_slm=True, the pifi_fast_packed rows)
  and the reference under bf16 autocast, against a float64 truth: the fused error at most twice
  the reference's (docs/development.md, "Numerics"), logits and trainable gradients,
  classification and QA;
- a compiled training step (inference.compile_model) equals the eager one (fp32), over two
  batch shapes, packed and not;
- CUDA-graph inference (inference_runner "cuda-graphs", as evaluation and predict() run it)
  under bf16 autocast, over two batch shapes and replays on new ids, within twice the eager
  reference's error;
- the packed SLM on the device equals the SLM's own forward (fp32), right- and left-padded.

Marked gpu: skipped without CUDA. PIFI_FAST_GPU_DRY_RUN=1 runs them on the CPU (conftest.py;
there "cuda-graphs" falls back to plain compile with a warning), which is how
benchmarks/gpu_check.sh's dry run proves the test code before a GPU is spent on it.
"""
import warnings

import pytest
import torch
from helpers import ragged_batch, rel_err, tiny_llm, tiny_slm, trained_scale_state

from pifi_fast import PiFiModel, packed_slm, reference
from pifi_fast.inference import compile_model, inference_runner

CPU_DRY_RUN = True
pytestmark = pytest.mark.gpu
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TASKS = ["classification", "question_answering"]
LENGTHS = ([11, 3, 16, 1, 7, 16, 9, 5], [6, 13, 2, 13, 4])  # two shapes; rows of length 1, full


def _model(cls, task, state, dtype=None, **options):
    model = cls.from_parts(tiny_slm("bert"), tiny_llm("llama"), task=task, seed=0,
                           head_dropout=0.0, num_labels=3, llm_dtype=dtype, **options)
    model.load_state_dict(state)
    return model.to(DEVICE)


def _batch(lengths, seed, left=False):
    ids, mask = ragged_batch(120, lengths, torch.Generator().manual_seed(seed))
    if left:
        ids, mask = ids.flip(1), mask.flip(1)
    return {"input_ids": ids.to(DEVICE), "attention_mask": mask.to(DEVICE)}


def _outputs(out, task, mask):
    """The outputs to compare, float64 (QA: the real positions; padding holds the dtype minimum)."""
    if task == "classification":
        return out.logits.detach().double()
    y = torch.stack([out.start_logits, out.end_logits]).detach().double()
    return y[:, mask.bool()]


def _step(runner, model, batch, task, autocast=None):
    """Forward under ``autocast`` (a dtype, or None), backward of a fixed random projection of
    the outputs: (outputs, the adapter's and the word embeddings' gradients), float64."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(DEVICE.type, dtype=autocast or torch.bfloat16,
                        enabled=autocast is not None):
        out = runner(**batch)
    y = (out.logits if task == "classification"
         else torch.stack([out.start_logits, out.end_logits])[:, batch["attention_mask"].bool()])
    g = torch.Generator().manual_seed(3)
    (y.double() * torch.randn(y.shape, dtype=torch.float64, generator=g).to(DEVICE)).sum() \
        .backward()
    grads = torch.cat([model.adapter_in.weight.grad.double().flatten(),
                       model.slm.embeddings.word_embeddings.weight.grad.double().flatten()])
    return _outputs(out, task, batch["attention_mask"]), grads


@pytest.mark.parametrize("task,packed", [("classification", False), ("classification", True),
                                         ("question_answering", False)])
def test_w4_models_under_bf16_autocast_within_twice_the_reference_error(task, packed):
    state = trained_scale_state(task, 3)
    batch = _batch(LENGTHS[0], seed=0)
    truth = _model(reference.PiFiModel, task, state).double()
    y_truth, g_truth = _step(truth, truth, batch, task)
    fast = _model(PiFiModel, task, state, torch.bfloat16, packed_slm=packed)
    ref = _model(reference.PiFiModel, task, state, torch.bfloat16)
    assert fast.slm_mode(batch) == ("packed" if packed else None)
    results = {name: _step(m, m, batch, task, torch.bfloat16)
               for name, m in (("fast", fast), ("reference", ref))}
    for i, what in enumerate(("outputs", "trainable gradients")):
        e_fast = rel_err(results["fast"][i], (y_truth, g_truth)[i])
        e_ref = rel_err(results["reference"][i], (y_truth, g_truth)[i])
        assert torch.isfinite(results["fast"][i]).all()
        assert e_fast <= 2 * e_ref + 1e-6, f"{what}: fast {e_fast:.2e} vs reference {e_ref:.2e}"


@pytest.mark.parametrize("task,packed", [("classification", False), ("classification", True),
                                         ("question_answering", False)])
def test_compiled_train_step_equals_eager_on_the_device(task, packed):
    torch._dynamo.reset()
    state = trained_scale_state(task, 3)
    model = _model(PiFiModel, task, state, packed_slm=packed).train()
    compiled = compile_model(model)
    for seed, lengths in enumerate(LENGTHS):  # a second shape: recompiled (or dynamic), not stale
        batch = _batch(lengths, seed)
        y_eager, g_eager = _step(model, model, batch, task)
        y_comp, g_comp = _step(compiled, model, batch, task)
        assert rel_err(y_comp, y_eager) <= 1e-4, (seed, "outputs")
        assert rel_err(g_comp, g_eager) <= 1e-4, (seed, "gradients")
    torch._dynamo.reset()


@pytest.mark.parametrize("task", TASKS)
def test_cuda_graph_inference_under_bf16_autocast_within_twice_the_reference_error(task):
    torch._dynamo.reset()
    state = trained_scale_state(task, 3)
    truth = _model(reference.PiFiModel, task, state).double().eval()
    fast = _model(PiFiModel, task, state, torch.bfloat16).eval()
    ref = _model(reference.PiFiModel, task, state, torch.bfloat16).eval()
    with warnings.catch_warnings():  # on the CPU dry run: "CUDA graphs need a GPU" fallback
        warnings.simplefilter("ignore")
        runner = inference_runner(fast, "cuda-graphs")
    for seed, lengths in enumerate(LENGTHS * 2):  # record per shape, then replay on new ids
        batch = _batch(lengths, seed + 10, left=seed % 2 == 1)
        mask = batch["attention_mask"]
        with torch.no_grad():
            y_truth = _outputs(truth(**batch), task, mask)
            with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
                y_ref = _outputs(ref(**batch), task, mask)
                y_graph = _outputs(runner(**batch), task, mask)  # used before the next call
        e_graph, e_ref = rel_err(y_graph, y_truth), rel_err(y_ref, y_truth)
        assert torch.isfinite(y_graph).all()
        assert e_graph <= 2 * e_ref + 1e-6, f"batch {seed}: {e_graph:.2e} vs {e_ref:.2e}"
    torch._dynamo.reset()


@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
def test_packed_slm_on_the_device_equals_the_slms_own_forward(left):
    torch.manual_seed(0)
    from transformers import AutoModel

    slm = AutoModel.from_config(tiny_slm("bert")).to(DEVICE).eval()
    batch = _batch(LENGTHS[0], seed=4, left=left)
    with torch.no_grad():
        plain = slm(**batch).last_hidden_state[:, :1]
        packed = packed_slm.first_token_states(slm, batch["input_ids"], batch["attention_mask"])
    assert rel_err(packed, plain) <= 1e-5
