"""The fused FrozenLlamaLayer against the Hugging Face layer: Triton kernels (under the
interpreter on CPU) and the PyTorch twins, padded and packed batches, memory modes, compile."""
import copy

import pytest
import torch
from helpers import NEW_FUSED, rel_err, tiny_llm, tiny_slm

from pifi_fast import attention as attn_module
from pifi_fast.frozen import function as frozen_function
from pifi_fast.kernels import common as kernels
from pifi_fast.bench.timing import saved_activation_bytes
from pifi_fast.bench.workloads import llm_config
from pifi_fast.hf_layer import run_hf_layer
from pifi_fast.layer import FrozenLlamaLayer
from pifi_fast.families import make_rotary
from pifi_fast.loading import random_layer

# The Triton path on CPU tensors needs the interpreter (set by the root conftest without a GPU);
# on a GPU machine the CUDA checks below cover the kernels instead.
KERNELS = ["torch"] + (["triton"] if kernels.HAS_TRITON and kernels.interpreting() else [])


def _pair(kind, seed=0, **options):
    llm = random_layer(tiny_llm(kind), -1, dtype=torch.float32, seed=seed)
    fused = FrozenLlamaLayer.from_hf(llm.module, llm.config, llm.rotary, **options)
    return llm, fused


def _run_both(llm, fused, x, mask):
    """Output and input gradient of both layers for the same upstream gradient. The upstream
    gradient is zero at padding (a loss never looks there): the Hugging Face layer would
    otherwise send it from padding queries into real keys and values."""
    grad = torch.randn_like(x)
    if mask is not None:
        grad = grad * mask[..., None]
    xs = [x.clone().requires_grad_() for _ in range(2)]
    out_ref = run_hf_layer(llm.module, llm.rotary, xs[0], mask)
    out_ref.backward(grad)
    out = fused(xs[1], None if mask is None else mask.long())
    out.backward(grad)
    return out_ref.detach(), xs[0].grad, out.detach(), xs[1].grad


def _ragged(lengths, hidden):
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    return torch.randn(len(lengths), max(lengths), hidden), mask


@pytest.mark.parametrize("kernel_impl", KERNELS)
@pytest.mark.parametrize("kind", ["llama", "mistral", "mistral-window", "qwen2", "qwen3"]
                         + NEW_FUSED)
@pytest.mark.parametrize("lengths", [[9, 9, 9], [9, 4, 1, 7], [1, 1, 1], [23, 2, 3, 1, 2]],
                         ids=["dense", "ragged", "one-token-rows", "one-long-among-short"])
def test_fused_layer_matches_hf_layer(kernel_impl, kind, lengths):
    llm, fused = _pair(kind, kernels=kernel_impl)
    x, mask = _ragged(lengths, llm.config.hidden_size)
    mask_arg = None if all(n == max(lengths) for n in lengths) else mask
    out_ref, dx_ref, out, dx = _run_both(llm, fused, x, mask_arg)
    real = mask
    assert rel_err(out[real], out_ref[real]) <= 1e-5
    assert rel_err(dx[real], dx_ref[real]) <= 1e-5
    # Padding is passed through unchanged and never NaN.
    assert torch.equal(out[~real], x[~real])
    assert torch.isfinite(out).all() and torch.isfinite(dx).all()
    assert all(p.grad is None for p in fused.parameters())


@pytest.mark.slow  # over 2 s on 2 cores: not in make check
@pytest.mark.skipif("triton" not in KERNELS, reason="needs Triton's interpreter (or CUDA)")
@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "gemma2", "falcon", "falcon-40b"])
@pytest.mark.parametrize("recompute", ["none", "mlp"])
def test_triton_gemm_epilogues_match_hf_layer(kind, recompute, monkeypatch):
    """gemm="triton": fused residual, the activation's epilogue (recompute="mlp" forward,
    inference) and its backward epilogue (SwiGLU, GeGLU-tanh or GELU by family); fp32 under
    the interpreter. The epilogues that ran are recorded, so a silent fallback fails here."""
    from pifi_fast.frozen.elementwise import ACT_EPILOGUE
    from pifi_fast.kernels import gemm as G

    ran, gemm = [], G.gemm

    def recording_gemm(a, b, epilogue="none", **kwargs):
        ran.append(epilogue)
        return gemm(a, b, epilogue, **kwargs)

    monkeypatch.setattr(G, "gemm", recording_gemm)
    llm, fused = _pair(kind, kernels="triton", gemm="triton", recompute=recompute)
    x, mask = _ragged([9, 4, 1, 7], llm.config.hidden_size)
    out_ref, dx_ref, out, dx = _run_both(llm, fused, x, mask)
    assert rel_err(out[mask], out_ref[mask]) <= 1e-5
    assert rel_err(dx[mask], dx_ref[mask]) <= 1e-5
    epilogue = ACT_EPILOGUE[fused.spec.act]
    assert epilogue + "_bwd" in ran
    assert (epilogue in ran) == (recompute == "mlp")
    ran.clear()
    with torch.no_grad():  # inference takes the fused gate/up + activation epilogue
        assert rel_err(fused(x, mask.long())[mask], out_ref[mask]) <= 1e-5
    assert epilogue in ran


@pytest.mark.parametrize("kernel_impl", KERNELS)
def test_packed_batch_equals_each_row_alone(kernel_impl):
    _, fused = _pair("llama", kernels=kernel_impl)
    lengths = [11, 3, 1, 6]
    x, mask = _ragged(lengths, fused.hidden_size)
    batched = fused(x, mask.long())
    for i, n in enumerate(lengths):
        alone = fused(x[i:i + 1, :n])
        assert rel_err(batched[i, :n], alone[0]) <= 1e-6


def test_cls_mode_matches_hf_layer():
    llm, fused = _pair("qwen2")
    x = torch.randn(5, 1, llm.config.hidden_size)
    out_ref, dx_ref, out, dx = _run_both(llm, fused, x, None)
    assert rel_err(out, out_ref) <= 1e-5 and rel_err(dx, dx_ref) <= 1e-5


@pytest.mark.parametrize("kernel_impl", KERNELS)
def test_causal_option_matches_hf_causal_attention(kernel_impl):
    llm, fused = _pair("llama", kernels=kernel_impl, causal=True)
    b, s = 2, 7
    x = torch.randn(b, s, llm.config.hidden_size)
    causal = torch.full((s, s), torch.finfo(x.dtype).min).triu(1).expand(b, 1, s, s)
    pos = torch.arange(s).expand(b, s)
    ref = llm.module(x, attention_mask=causal, position_ids=pos,
                     position_embeddings=llm.rotary(x, pos))
    ref = ref[0] if isinstance(ref, tuple) else ref
    assert rel_err(fused(x), ref) <= 1e-5


def test_position_ids_and_llama3_rope_tables_follow_the_model():
    llm, fused = _pair("llama")
    x = torch.randn(2, 5, llm.config.hidden_size)
    pos = torch.tensor([[3, 4, 5, 6, 7], [0, 2, 4, 6, 8]])
    ref = llm.module(x, attention_mask=torch.zeros(2, 1, 5, 5), position_ids=pos,
                     position_embeddings=llm.rotary(x, pos))
    ref = ref[0] if isinstance(ref, tuple) else ref
    assert rel_err(fused(x, position_ids=pos), ref) <= 1e-5


def test_all_padding_row_is_an_error():
    _, fused = _pair("llama")
    x, mask = _ragged([4, 2], fused.hidden_size)
    mask[1] = False
    with pytest.raises(ValueError, match="no real token"):
        fused(x, mask.long())


def test_bad_options_are_rejected():
    llm = random_layer(tiny_llm("llama"), -1, seed=0)
    for kw, msg in (({"kernels": "cuda"}, "kernels"), ({"recompute": "all"}, "recompute"),
                    ({"attention": "xformers"}, "attention"), ({"gemm": "cutlass"}, "gemm")):
        with pytest.raises(ValueError, match=msg):
            FrozenLlamaLayer.from_hf(llm.module, llm.config, llm.rotary, **kw)


@pytest.mark.parametrize("kernel_impl", KERNELS)
@pytest.mark.parametrize("recompute", ["none", "mlp"])
@pytest.mark.parametrize("kind", ["qwen2", "gemma2", "falcon"])
def test_mlp_chunking_changes_nothing(kernel_impl, recompute, kind):
    """The MLP block over token chunks (5 tokens here, 4096 by default) equals one pass (the
    sandwich block's MLP output and norm statistics, the parallel block's MLP input from x)."""
    llm, whole = _pair(kind, kernels=kernel_impl, recompute=recompute, chunk_tokens=None)
    chunked = copy.copy(whole)
    chunked.chunk_tokens = 5
    x, mask = _ragged([9, 4, 1, 7], llm.config.hidden_size)
    outs = []
    for layer in (whole, chunked):
        leaf = x.clone().requires_grad_()
        out = layer(leaf, mask.long())
        out.backward(torch.ones_like(out))
        outs.append((out.detach(), leaf.grad))
    assert rel_err(outs[1][0], outs[0][0]) <= 1e-6 and rel_err(outs[1][1], outs[0][1]) <= 1e-6
    with pytest.raises(ValueError, match="chunk_tokens"):
        FrozenLlamaLayer.from_hf(llm.module, llm.config, llm.rotary, chunk_tokens=0)


def test_recompute_mlp_gives_the_same_gradient_and_saves_less():
    llm, fused = _pair("llama")
    lean = copy.copy(fused)
    lean.recompute = "mlp"
    x, mask = _ragged([9, 4, 7], fused.hidden_size)
    grads, saved = [], []
    for layer in (fused, lean):
        leaf = x.clone().requires_grad_()
        saved.append(saved_activation_bytes(lambda: layer(leaf, mask.long()), []))
        layer(leaf, mask.long()).backward(torch.ones_like(x))
        grads.append(leaf.grad)
    assert torch.equal(grads[0], grads[1])
    assert saved[1] < saved[0]


def llama_8b_layer_config():
    return llm_config("llama-3.1-8b")  # the benchmark suite's Llama-3.1-8B layer shape


@pytest.mark.parametrize("recompute,limit_kb", [("none", 96), ("mlp", 40)])
def test_saved_activation_memory_targets_at_llama_8b_shape(recompute, limit_kb, monkeypatch):
    """Issue targets, bf16, Llama-3.1-8B layer shape: <= 96 KB/token saved by default and
    <= 40 KB/token with recompute="mlp" (the Hugging Face layer with SDPA saves about 173).
    These are the GPU's numbers: the CPU's extra attention graph is switched off here (it is
    measured in the next test)."""
    monkeypatch.setattr(frozen_function, "KEEP_ATTENTION_GRAPH", set())
    cfg = llama_8b_layer_config()
    layer = FrozenLlamaLayer(cfg, make_rotary(cfg), dtype=torch.bfloat16, recompute=recompute)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x, mask = _ragged([16, 5, 11], cfg.hidden_size)
    x = x.to(torch.bfloat16).requires_grad_()
    tokens = int(mask.sum())
    for m in (None, mask):
        per_token = saved_activation_bytes(lambda: layer(x, m), list(layer.parameters()))
        per_token /= x.shape[0] * x.shape[1] if m is None else tokens
        assert per_token <= limit_kb * 1000, f"{per_token / 1000:.1f} KB/token saved"


def test_cpu_keeps_attention_graph_and_stays_under_the_hf_layers_saved_bytes():
    """On CPU (recompute="none") attention's graph is kept for backward, not re-run: the
    backward runs no attention forward, the gradient equals the re-running path's, and the
    saved bytes grow by what attention keeps but stay under the Hugging Face layer's."""
    cfg = llama_8b_layer_config()
    layer = FrozenLlamaLayer(cfg, make_rotary(cfg), dtype=torch.bfloat16)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x, mask = _ragged([16, 5, 11], cfg.hidden_size)
    x = x.to(torch.bfloat16)
    grads, saved, attn_calls = [], [], []
    for keep in ({"cpu"}, set()):
        frozen_function.KEEP_ATTENTION_GRAPH, kept = keep, frozen_function.KEEP_ATTENTION_GRAPH
        try:
            leaf = x.clone().requires_grad_()
            saved.append(saved_activation_bytes(lambda: layer(leaf, mask), []) / int(mask.sum()))
            out = layer(leaf, mask)
            calls = []
            real = attn_module.attention
            attn_module.attention = lambda *a, **k: calls.append(1) or real(*a, **k)
            try:
                out.backward(torch.ones_like(out))
            finally:
                attn_module.attention = real
            attn_calls.append(len(calls))
            grads.append(leaf.grad)
        finally:
            frozen_function.KEEP_ATTENTION_GRAPH = kept
    assert attn_calls == [0, 1]
    assert torch.equal(grads[0], grads[1])
    assert saved[1] < saved[0] < 152_000, saved


@pytest.mark.slow  # over 2 s on 2 cores: not in make check
def test_torch_compile_of_a_pifi_model_with_the_fused_layer():
    from pifi_fast import PiFiModel

    model = PiFiModel.from_parts(tiny_slm("bert"), tiny_llm("llama"), task="question_answering",
                                 head_dropout=0.0)
    assert model.fused
    ids = torch.randint(3, 120, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    eager = model(input_ids=ids, attention_mask=mask).start_logits
    compiled = torch.compile(model)
    out = compiled(input_ids=ids, attention_mask=mask).start_logits
    assert rel_err(out, eager) <= 1e-5
    out.sum().backward()
    assert model.adapter_in.weight.grad is not None


# -- GPU: the fused layer in bf16/fp16 against the Hugging Face layer (the 2x rule) ------------
def _gpu_backends():
    from pifi_fast.attention import available_backends

    return available_backends("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["sdpa", "torch_varlen", "flash_attn"])
@pytest.mark.parametrize("shape", ["qwen2-0.5b", "llama-3.1-8b"])
@pytest.mark.parametrize("padded", [False, True])
def test_fused_layer_on_gpu_within_twice_the_hf_layer_error(dtype, backend, shape, padded):
    if backend not in _gpu_backends():
        pytest.skip(f"attention backend {backend} not available here")
    cfg = llm_config(shape)
    cfg._attn_implementation = "sdpa"
    truth_layer = random_layer(cfg, 0, dtype=torch.float32, seed=0)
    truth_layer.module.cuda()
    truth_layer.rotary.cuda()
    low = random_layer(cfg, 0, dtype=dtype, seed=0)
    low.module.cuda()
    low.rotary.cuda()
    low.module.load_state_dict(truth_layer.module.state_dict())
    fused = FrozenLlamaLayer.from_hf(low.module, cfg, low.rotary, attention=backend)
    assert next(fused.parameters()).is_cuda
    lengths = [13, 64, 7, 128, 1, 40, 90, 33] if padded else [256] * 4
    x, mask = _ragged(lengths, cfg.hidden_size)
    x, mask = x.cuda(), mask.cuda()
    mask_arg = mask if padded else None
    grad = torch.randn_like(x) * mask[..., None]
    results = {}
    for name, layer, rot, dt in (("truth", truth_layer.module, truth_layer.rotary, torch.float32),
                                 ("hf", low.module, low.rotary, dtype),
                                 ("fused", fused, None, dtype)):
        leaf = x.to(dt).requires_grad_()
        out = (layer(leaf, None if mask_arg is None else mask_arg.long()) if rot is None
               else run_hf_layer(layer, rot, leaf, mask_arg))
        out.backward(grad.to(dt))
        results[name] = (out.detach().float()[mask], leaf.grad.float()[mask])
    for i, what in enumerate(("output", "input gradient")):
        e_hf = rel_err(results["hf"][i], results["truth"][i])
        e_fused = rel_err(results["fused"][i], results["truth"][i])
        assert e_fused <= 2 * e_hf + 1e-6, f"{what}: fused {e_fused:.2e} vs HF {e_hf:.2e}"


@pytest.mark.gpu
def test_torch_compile_of_a_pifi_model_on_gpu():
    from pifi_fast import PiFiModel

    model = PiFiModel.from_parts(tiny_slm("bert"), tiny_llm("qwen2"), task="question_answering",
                                 head_dropout=0.0).cuda()
    ids = torch.randint(3, 120, (3, 10), device="cuda")
    mask = torch.ones(3, 10, dtype=torch.long, device="cuda")
    mask[1, 6:] = 0
    eager = model(input_ids=ids, attention_mask=mask).start_logits
    out = torch.compile(model)(input_ids=ids, attention_mask=mask).start_logits
    real = mask.bool()
    assert rel_err(out[real], eager[real]) <= 1e-4
    out[real].sum().backward()
    assert model.adapter_in.weight.grad is not None


@pytest.mark.gpu
@pytest.mark.parametrize("task", ["classification", "question_answering"])
def test_cuda_graph_inference_replays_eager_outputs_on_gpu(task):
    """inference_runner(model, "cuda-graphs") as evaluation and predict() use it: CUDA graphs
    are recorded (none skipped: [CLS] mode is captured whole; padded QA around the layer op that
    unpads, which is tagged cudagraph_unsafe), and every replay on new values equals eager."""
    from torch._inductor import cudagraph_trees

    from pifi_fast import PiFiModel
    from pifi_fast.inference import inference_runner

    torch._dynamo.reset()
    model = PiFiModel.from_parts(tiny_slm("bert"), tiny_llm("qwen2"), task=task, num_labels=3,
                                 head_dropout=0.0).cuda().eval()
    runner = inference_runner(model, "cuda-graphs")
    torch._dynamo.utils.counters.clear()
    for seed in range(4):  # warm-up, recording, then replays on other token ids
        g = torch.Generator(device="cuda").manual_seed(seed)
        ids = torch.randint(3, 120, (3, 16), device="cuda", generator=g)
        mask = torch.ones(3, 16, dtype=torch.long, device="cuda")
        mask[1, 9:] = 0
        with torch.no_grad():
            eager = model(input_ids=ids, attention_mask=mask)
            out = runner(input_ids=ids, attention_mask=mask)
        name = "logits" if task == "classification" else "start_logits"
        y_e, y_c = getattr(eager, name), getattr(out, name)
        real = torch.isfinite(y_e)
        assert rel_err(y_c[real], y_e[real]) <= 1e-4, seed
    assert torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] == 0
    manager = cudagraph_trees.get_manager(create_if_none_exists=False)
    assert manager is not None and sum(map(len, manager.roots.values())) >= 1  # recorded
    torch._dynamo.reset()


def test_attention_falls_back_when_an_automatic_backend_fails(monkeypatch):
    from pifi_fast import attention as attn

    def boom(*args, **kwargs):
        raise RuntimeError("no kernel for this head size")

    monkeypatch.setattr(attn, "failed_backends", {})
    monkeypatch.setattr(attn, "_VARLEN", boom)
    monkeypatch.setattr(attn, "available_backends", lambda device_type="cuda", capability=None: [
        b for b in ("torch_varlen",) if b not in attn.failed_backends] + ["sdpa"])
    q, k, v = (torch.randn(10, h, 16, dtype=torch.bfloat16) for h in (4, 2, 2))
    seg = attn.Segments.from_mask(torch.tensor([[True] * 6, [True] * 4 + [False] * 2]))
    out = attn.attention(q, k, v, seg, 0.25)
    assert "torch_varlen" in attn.failed_backends and attn.backend_used == "sdpa"
    assert torch.equal(out, attn.attention(q, k, v, seg, 0.25, backend="sdpa"))
    with pytest.raises(ValueError, match="cannot run"):  # asked for by name: no silent fallback
        attn.attention(q, k, v, seg, 0.25, backend="torch_varlen")


def test_turing_gets_only_sdpa(monkeypatch):
    """FlashAttention 2 and PyTorch's varlen kernels need sm_80: on a T4 (sm_75) the choice
    falls to SDPA (its memory-efficient kernel runs fp16 there)."""
    from pifi_fast import attention as attn

    monkeypatch.setattr(attn, "failed_backends", {})
    monkeypatch.setattr(attn, "_FLASH", object())
    monkeypatch.setattr(attn, "_VARLEN", object())
    assert attn.available_backends("cuda", (8, 0)) == ["flash_attn", "torch_varlen", "sdpa"]
    assert attn.available_backends("cuda", (9, 0))[0] == "flash_attn"
    assert attn.available_backends("cuda", (7, 5)) == ["sdpa"]
    assert attn.available_backends("cpu") == ["sdpa"]


# -- 16-bit on the CPU: the same 2x rule the GPU check applies (fp16 is first-class) -----------
@pytest.mark.slow  # over 2 s on 2 cores: not in make check
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("kernel_impl", KERNELS)
@pytest.mark.parametrize("gemm", ["cublas", "triton"])
@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma2", "falcon-40b"])
def test_fused_layer_in_16_bit_within_twice_the_hf_layer_error(dtype, kernel_impl, gemm, kind):
    """Output and input gradient of the fused layer in fp16/bf16 against a float64 truth, next
    to the Hugging Face layer run in the same dtype: the fused error is at most twice the HF
    error. Kernels under Triton's interpreter; the Triton GEMM in fp16 only there (the
    interpreter's bf16 tl.dot is wrong, triton-lang/triton#11584)."""
    if gemm == "triton" and (kernel_impl != "triton" or dtype == torch.bfloat16):
        pytest.skip("the Triton GEMM runs under the interpreter in fp16 (and fp32) only")
    truth = random_layer(tiny_llm(kind), -1, dtype=torch.float64, seed=0)
    with torch.no_grad():  # trained-model scales, so the layer's update is as large as its input
        for p in truth.module.parameters():
            p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5 if p.dim() == 2
                    else 1 + 0.1 * torch.randn_like(p))
    low = random_layer(tiny_llm(kind), -1, dtype=dtype, seed=0)
    low.module.load_state_dict(truth.module.state_dict())
    fused = FrozenLlamaLayer.from_hf(low.module, low.config, low.rotary, kernels=kernel_impl,
                                     gemm=gemm)
    # A sliding window (Gemma-2's, 4 here) hides every key from a padding query whose window
    # holds only padding; the float64 truth (Hugging Face's eager softmax in fp32, where the
    # float64 minimum becomes -inf) then gives NaN there, and NaN gradients flow from it into the
    # real keys. Runs of padding shorter than the window avoid that degenerate case.
    lengths = [9, 4, 1, 7] if fused.window is None else [9, 6, 7, 8]
    x, mask = _ragged(lengths, truth.config.hidden_size)
    # inputs exactly representable in the low dtype, so the truth sees the same numbers; and the
    # layer's update (output - input, input gradient - upstream gradient) is compared, since the
    # residual stream passes through exactly and would hide the layer's own error
    x = x.to(dtype).double()
    grad = (torch.randn_like(x) * mask[..., None]).to(dtype).double()
    results = {}
    for name, layer, rot, dt in (("truth", truth.module, truth.rotary, torch.float64),
                                 ("hf", low.module, low.rotary, dtype),
                                 ("fused", fused, None, dtype)):
        leaf = x.detach().to(dt).clone().requires_grad_()
        out = (layer(leaf, mask.long()) if rot is None else run_hf_layer(layer, rot, leaf, mask))
        out.backward(grad.to(dt))
        results[name] = ((out.detach().double() - x)[mask], (leaf.grad.double() - grad)[mask])
    for i, what in enumerate(("update", "input gradient update")):
        e_hf = rel_err(results["hf"][i], results["truth"][i])
        e_fused = rel_err(results["fused"][i], results["truth"][i])
        assert torch.isfinite(results["fused"][i]).all()
        assert e_fused <= 2 * e_hf + 1e-6, f"{what}: fused {e_fused:.2e} vs HF {e_hf:.2e}"
