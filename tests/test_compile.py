"""torch.compile of a whole PiFiModel: the fused layer is one custom op (pifi_fast::frozen_layer)
holding the unpadding and every data-dependent size, so the model traces into one graph (0
graph breaks, torch._dynamo.explain on the CPU) in every task and fused-layer option, with and
without a padding mask; compiled outputs and gradients equal eager ones (fullgraph: also for
several plugged layers and MLP adapters)."""
import pytest
import torch
from helpers import (NEW_FUSED, assert_grads_close, rel_err, tiny_llm, tiny_slm,
                     trainable_grads)

from pifi_fast import PiFiModel
from pifi_fast.kernels import common as kernels

INTERPRETER = kernels.HAS_TRITON and kernels.interpreting()
TASKS = ["classification", "question_answering", "token_classification", "seq2seq"]
OPTIONS = [{}, {"recompute": "mlp"}, {"chunk_tokens": 3}, {"attention": "sdpa"},
           {"weights": "int8"}, {"layers": [0, 2]}, {"adapter": "mlp"}]
OPTIONS += [{"kernels": "triton", "gemm": "triton"}] if INTERPRETER else []


def _model(task, llm="llama", **options):
    slm = tiny_slm("t5" if task == "seq2seq" else "bert")
    return PiFiModel.from_parts(slm, tiny_llm(llm), task=task, num_labels=3, seed=0,
                                head_dropout=0.0, **options)


def _inputs(task, masked):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 120, (3, 7), generator=g)
    mask = torch.ones(3, 7, dtype=torch.long)
    if masked:
        mask[1, 4:] = 0
        mask[2, 1:] = 0
    batch = {"input_ids": ids, "attention_mask": mask if masked else None}
    if task == "seq2seq":
        batch["labels"] = torch.randint(3, 120, (3, 5), generator=g)
    return batch


def _loss(task, out):
    if task == "seq2seq":
        return out.loss
    y = out.logits if task != "question_answering" else out.start_logits
    return y.float().masked_fill(~torch.isfinite(y), 0).square().mean()


@pytest.mark.parametrize("masked", [True, False], ids=["mask", "dense"])
@pytest.mark.parametrize("task", TASKS)
def test_zero_graph_breaks(task, masked):
    torch._dynamo.reset()
    model = _model(task)
    explanation = torch._dynamo.explain(model)(**_inputs(task, masked))
    reasons = [b.reason.splitlines()[0] for b in explanation.break_reasons]
    assert explanation.graph_break_count == 0, reasons
    assert explanation.graph_count == 1


@pytest.mark.slow  # over 2 s on 2 cores: not in make check
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in
                                                                     o.items()) or "default")
@pytest.mark.parametrize("task", ["question_answering", "classification"])
def test_compiled_equals_eager_outputs_and_gradients(task, options):
    """Through AOTAutograd (fake implementations, the registered backward) without code
    generation: the layer op and its backward op against the eager autograd Function."""
    _check_compiled_equals_eager(task, "llama", **options)


def _check_compiled_equals_eager(task, llm, **options):
    """A compiled model (aot_eager, fullgraph) against its eager twin: outputs and trainable
    gradients after one backward."""
    torch._dynamo.reset()
    eager, compiled_src = _model(task, llm, **options), _model(task, llm, **options)
    compiled_src.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_src, backend="aot_eager", fullgraph=True)
    batch = _inputs(task, masked=True)
    for model, runner in ((eager, eager), (compiled_src, compiled)):
        model.zero_grad(set_to_none=True)
        _loss(task, runner(**batch)).backward()
    out_e = eager(**batch)
    out_c = compiled(**batch)
    y_e = out_e.start_logits if task == "question_answering" else out_e.logits
    y_c = out_c.start_logits if task == "question_answering" else out_c.logits
    real = torch.isfinite(y_e)
    assert rel_err(y_c[real], y_e[real]) <= 1e-5
    # (eager classification packs the SLM, pifi_fast.packed_slm; a plain torch.compile keeps
    # the padded layout: the gradients that are rounding noise differ, so each is judged
    # against the largest gradient's scale)
    assert_grads_close(trainable_grads(compiled_src), trainable_grads(eager), tol=1e-4)


def test_inductor_compiles_a_masked_qa_step():
    """The default backend (Inductor) end to end: forward and backward of the padded QA model."""
    torch._dynamo.reset()
    eager, src = _model("question_answering"), _model("question_answering")
    src.load_state_dict(eager.state_dict())
    compiled = torch.compile(src)
    batch = _inputs("question_answering", masked=True)
    y_e, y_c = eager(**batch).start_logits, compiled(**batch).start_logits
    real = torch.isfinite(y_e)
    assert rel_err(y_c[real], y_e[real]) <= 1e-4
    _loss("question_answering", compiled(**batch)).backward()
    assert src.adapter_in.weight.grad is not None


@pytest.mark.parametrize("task,masked,expected", [
    ("classification", True, "frozen_layer_dense"),  # [CLS] mode: one token, nothing to unpad
    ("question_answering", False, "frozen_layer_dense"),
    ("question_answering", True, "frozen_layer"),  # unpads: a host sync
])
def test_only_the_layer_op_that_syncs_is_kept_out_of_cuda_graphs(task, masked, expected):
    """CUDA graphs (mode="reduce-overhead") cannot capture a host sync: the op that unpads a
    padding mask is tagged cudagraph_unsafe (Inductor runs it between captured parts); the op
    with nothing to unpad is not, so [CLS]-mode inference is captured whole."""
    torch._dynamo.reset()
    seen = []

    def backend(gm, example_inputs):
        seen.extend(n.target for n in gm.graph.nodes if n.op == "call_function"
                    and "pifi_fast" in str(n.target))
        return gm.forward

    model = _model(task).eval()
    with torch.no_grad():
        torch.compile(model, backend=backend, fullgraph=True)(**_inputs(task, masked))
    names = [getattr(t, "_qualified_op_name", None) or t.name() for t in seen]
    assert names == [f"pifi_fast::{expected}"], seen
    op = getattr(torch.ops.pifi_fast, expected).default
    unsafe = torch.Tag.cudagraph_unsafe in op.tags
    assert unsafe == (expected == "frozen_layer")
    backward = getattr(torch.ops.pifi_fast, expected + "_backward").default
    assert (torch.Tag.cudagraph_unsafe in backward.tags) == unsafe


def test_compile_model_uses_atens_random_numbers_on_cpu_only(monkeypatch):
    """compile_model: on a CPU random ops fall back to ATen (Inductor's CPU RNG made the compiled
    step slower than eager, measured in compile_model's docstring); elsewhere torch's defaults,
    and mode="reduce-overhead" for CUDA graphs."""
    from pifi_fast.inference import compile_model

    calls = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: calls.append(kw) or model)
    compile_model(torch.nn.Linear(2, 2))
    compile_model(torch.nn.Linear(2, 2).to("meta"))  # (a non-CPU device without needing one)
    compile_model(torch.nn.Linear(2, 2), cuda_graphs=True)
    assert calls == [{"options": {"fallback_random": True}}, {}, {"mode": "reduce-overhead"}]


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_compile_model_lets_dynamo_capture_the_packed_token_count(monkeypatch, cuda_graphs):
    """compile_model's calls (only they) run with capture_dynamic_output_shape_ops, so packing
    the SLM stays in the one graph; CUDA graphs need static shapes and keep it off."""
    from pifi_fast.inference import compile_model

    class Probe(torch.nn.Linear):
        def forward(self):
            return torch._dynamo.config.capture_dynamic_output_shape_ops

    monkeypatch.setattr(torch, "compile", lambda model, **kw: model)
    assert not torch._dynamo.config.capture_dynamic_output_shape_ops
    assert compile_model(Probe(1, 1), cuda_graphs=cuda_graphs)() is not cuda_graphs
    assert not torch._dynamo.config.capture_dynamic_output_shape_ops


@pytest.mark.slow  # over 2 s on 2 cores: not in make check
@pytest.mark.parametrize("recompute", ["none", "mlp"])
@pytest.mark.parametrize("llm", NEW_FUSED)
def test_other_families_compile_to_one_graph_and_equal_eager(llm, recompute):
    """The Gemma and Falcon blocks (sandwich and parallel: other saved tensors, whose fake
    shapes the op declares) through the same custom op: 0 graph breaks, compiled == eager."""
    torch._dynamo.reset()
    task = "question_answering"
    model = _model(task, llm, recompute=recompute)
    assert model.fused
    explanation = torch._dynamo.explain(model)(**_inputs(task, True))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    _check_compiled_equals_eager(task, llm, recompute=recompute)


def test_sandwich_block_compiles_for_inference_too():
    """Without gradients the sandwich block saves nothing extra: the op's fake outputs say so
    (a compiled inference call would fail on a shape mismatch otherwise)."""
    torch._dynamo.reset()
    model = _model("question_answering", "gemma2").eval()
    batch = _inputs("question_answering", masked=True)
    with torch.no_grad():
        eager = model(**batch).start_logits
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(**batch).start_logits
    real = torch.isfinite(eager)
    assert rel_err(compiled[real], eager[real]) <= 1e-5
