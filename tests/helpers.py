"""Tiny random configs and comparison helpers shared by the tests."""
from __future__ import annotations

import torch
from transformers import (
    BartConfig,
    BertConfig,
    FalconConfig,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
    T5Config,
)

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}


def tiny_llm(kind: str):
    """Awkward small shapes: hidden 72, head_dim 12, GQA ratio 3 (or 1), MLP 100."""
    common = dict(hidden_size=72, intermediate_size=100, num_attention_heads=6,
                  num_key_value_heads=2, num_hidden_layers=3, max_position_embeddings=64,
                  rms_norm_eps=1e-5)
    if kind == "llama":
        return LlamaConfig(**common, rope_parameters=dict(LLAMA3_ROPE))
    if kind == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if kind == "mistral-window":  # a sliding window shorter than the tests' longer rows
        return MistralConfig(**common, sliding_window=4)
    if kind == "qwen2":
        return Qwen2Config(**{**common, "num_key_value_heads": 6})
    if kind == "qwen3":
        return Qwen3Config(**common, head_dim=16)
    rms = {k: v for k, v in common.items() if k != "rms_norm_eps"}
    if kind == "gemma":
        return GemmaConfig(**rms, head_dim=12, rms_norm_eps=1e-6)
    if kind == "gemma2":  # the last layer (index 2) is a sliding one: window 4, soft-cap 3
        return Gemma2Config(**rms, head_dim=12, rms_norm_eps=1e-6, query_pre_attn_scalar=20,
                            attn_logit_softcapping=3.0, sliding_window=4)
    if kind == "gemma3":  # q/k norms; the last layer sliding, with the local rotary
        return Gemma3TextConfig(**rms, head_dim=16, rms_norm_eps=1e-6, sliding_window=4,
                                query_pre_attn_scalar=24,
                                layer_types=["full_attention"] * 2 + ["sliding_attention"])
    falcon = dict(hidden_size=72, ffn_hidden_size=100, num_attention_heads=6,
                  num_hidden_layers=3, max_position_embeddings=64, layer_norm_epsilon=1e-5,
                  bias=False, alibi=False)
    if kind == "falcon":  # Falcon-7B's style: multi-query, the parallel block, one norm
        return FalconConfig(**falcon, multi_query=True, parallel_attn=True, num_kv_heads=1)
    if kind == "falcon-40b":  # grouped KV (3 queries a group), two norms, q/k/v bias
        return FalconConfig(**{**falcon, "bias": True}, new_decoder_architecture=True,
                            num_kv_heads=2)
    if kind == "falcon-sequential":  # neither: per-head interleaved q/k/v, a sequential block
        return FalconConfig(**falcon, multi_query=False, parallel_attn=False, num_kv_heads=6)
    raise ValueError(kind)


# the families FrozenLlamaLayer fuses beyond the Llama kind, for tests that go over all of them
NEW_FUSED = ["gemma", "gemma2", "gemma3", "falcon", "falcon-40b", "falcon-sequential"]


# Every decoder family the frozen layer is checked on (tests/test_families.py): model_type ->
# the options that make a tiny random model of it. Shapes: hidden 64, 4 query heads of 16, 2 KV
# heads (GQA 2), MLP 96, two layers (the last, index 1, is plugged in).
FAMILY_COMMON = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                     num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=64,
                     vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    "llama": {}, "mistral": dict(sliding_window=5),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2": {},
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48),
    "qwen3": dict(head_dim=16),
    "qwen3_moe": dict(head_dim=16, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=32),
    "gemma": dict(head_dim=16),
    # layer 1 is full attention, layer 0 sliding (window 5, shorter than the test's sequences)
    "gemma2": dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=5,
                   attn_logit_softcapping=3.0),
    "gemma3_text": dict(head_dim=16, sliding_window=5,
                        layer_types=["full_attention", "sliding_attention"]),
    "falcon": dict(num_kv_heads=1, multi_query=True, parallel_attn=True, bias=False),
    "falcon-40b": dict(model_type="falcon", new_decoder_architecture=True, num_kv_heads=2,
                       parallel_attn=True, bias=False),
    "phi": {}, "phi3": {}, "gpt_neox": {}, "olmo": {}, "olmo2": {}, "granite": {},
    "cohere": {}, "starcoder2": {}, "stablelm": {},
}


def tiny_family(name: str):
    """A tiny config of a FAMILIES entry (random weights come from the model built from it)."""
    from transformers import AutoConfig

    options = dict(FAMILIES[name])
    model_type = options.pop("model_type", name)
    return AutoConfig.for_model(model_type, **FAMILY_COMMON, **options)


def tiny_slm(kind: str):
    if kind == "bert":
        return BertConfig(hidden_size=40, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=56, vocab_size=120, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0, max_position_embeddings=64)
    if kind == "t5":
        return T5Config(d_model=40, d_kv=10, d_ff=56, num_layers=2, num_decoder_layers=2,
                        num_heads=4, vocab_size=120, dropout_rate=0.0, decoder_start_token_id=0,
                        pad_token_id=0, eos_token_id=1)
    if kind == "bart":
        return BartConfig(d_model=40, encoder_layers=2, decoder_layers=2,
                          encoder_attention_heads=4, decoder_attention_heads=4,
                          encoder_ffn_dim=56, decoder_ffn_dim=56, vocab_size=120,
                          max_position_embeddings=64, dropout=0.0, attention_dropout=0.0,
                          activation_dropout=0.0, pad_token_id=1, bos_token_id=0,
                          eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None)
    raise ValueError(kind)


def ragged_batch(vocab: int, lengths, generator=None):
    """Right-padded ids and mask with the given real lengths."""
    seq = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), seq), generator=generator)
    mask = torch.zeros(len(lengths), seq, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return ids, mask


def rel_err(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> float:
    return ((a - b).norm() / max(b.norm().item(), floor, 1e-30)).item()


# -- a Triton kernel against its plain PyTorch twin (tests/test_kernels.py, test_norm_kernel.py,
# test_activations.py) ----------------------------------------------------------------------------
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error of a against b, computed in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def check_2x(kernel_out, twin_out, truth, what=""):
    """The kernels' accuracy rule: the kernel's error against the float64 truth is at most twice
    its twin's run in the same precision, plus two fp32 epsilons (the kernels compute in fp32,
    and in fp32 the twin is sometimes exact by luck)."""
    e_kernel, e_twin = rel(kernel_out, truth), rel(twin_out, truth)
    bound = 2 * e_twin + 2 * torch.finfo(torch.float32).eps
    assert e_kernel <= bound, f"{what}: kernel error {e_kernel:.3e} > 2 x twin {e_twin:.3e}"


def randn(*shape, dtype, scale=1.0):
    """Normal samples drawn in float64 (the same values for every dtype), on KERNEL_DEVICE."""
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(device=KERNEL_DEVICE,
                                                                  dtype=dtype)


def f64(*ts):
    return [None if t is None else t.double() for t in ts]


def trainable_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


STRICT = ("slm.embeddings.", "slm.shared.", "slm.model.shared.", "adapter_in.", "adapter_out.",
          "head.")


def assert_grads_close(g_fast, g_ref, tol=1e-5):
    """Relative error <= tol for the input embeddings, adapters and head (the issue's bar), each
    parameter on its own. Inside the SLM, some gradients are mathematically zero (attention key
    biases: softmax ignores a shift along the key axis) and hold only rounding noise, so every
    other parameter is judged against the largest gradient's scale as well."""
    assert g_fast.keys() == g_ref.keys(), g_fast.keys() ^ g_ref.keys()
    scale = max(g.norm().item() for g in g_ref.values())
    for name in g_ref:
        floor = 0.0 if name.startswith(STRICT) else 1e-3 * scale
        err = rel_err(g_fast[name], g_ref[name], floor=floor)
        assert err <= tol, f"gradient of {name}: relative error {err:.3e} > {tol}"


def trained_scale_state(task: str, num_labels: int) -> dict:
    """The state dict of a tiny PiFiModel (BERT SLM, Llama layer) with trained-model scales in
    the frozen layer (its update as large as its input), fixed per task: mixed-precision tests
    compare errors against a float64 truth on it."""
    from pifi_fast import PiFiModel

    base = PiFiModel.from_parts(tiny_slm("bert"), tiny_llm("llama"), task=task, seed=0,
                                head_dropout=0.0, num_labels=num_labels)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in base.llm_layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5 if p.dim() == 2
                    else 1 + 0.1 * torch.randn(p.shape, generator=g))
    return base.state_dict()


def quant_update_errors(base, mode: str, x, mask=None):
    """Relative errors of an 8-bit layer (weights=mode) against the dense one built from the
    same LLMLayer ``base``: on the layer's update (output - input) and on the input gradient,
    over the real tokens."""
    from pifi_fast import FrozenLlamaLayer  # (as trained_scale_state above imports PiFiModel)

    dense = FrozenLlamaLayer.from_hf(base.module, base.config, base.rotary)
    quant = FrozenLlamaLayer.from_hf(base.module, base.config, base.rotary, weights=mode)
    grad = torch.randn_like(x) * (mask[..., None] if mask is not None else 1)
    results = []
    for layer in (dense, quant):
        leaf = x.clone().requires_grad_()
        out = layer(leaf, None if mask is None else mask.long())
        out.backward(grad)
        results.append(((out.detach() - x), (leaf.grad - grad)))
    real = mask if mask is not None else torch.ones(x.shape[:2], dtype=torch.bool)
    return [rel_err(results[1][i][real], results[0][i][real]) for i in (0, 1)]


def save_tiny_run_models(root) -> dict:
    """A tiny random BERT saved with the real MiniLM tokenizer, and a tiny 3-layer Llama, as
    folders under root (what short real training runs in the tests use): {"bert", "llama"}."""
    from pathlib import Path

    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, BertConfig

    from pifi_fast import offline

    root = Path(root)
    tok = AutoTokenizer.from_pretrained(offline.minilm_dir())
    torch.manual_seed(0)
    AutoModel.from_config(BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
        vocab_size=tok.vocab_size, max_position_embeddings=128)).save_pretrained(root / "bert")
    tok.save_pretrained(root / "bert")
    AutoModelForCausalLM.from_config(tiny_llm("llama")).save_pretrained(root / "llama")
    return {"bert": str(root / "bert"), "llama": str(root / "llama")}


CUE_WORDS = ["good", "great", "fine", "bad", "awful", "poor", "film", "plot", "cast", "very"]


def write_cue_word_data(folder, sizes: dict, names=(0, 1), seed: int = 1) -> str:
    """A folder of {split}.jsonl files of short texts whose label a cue word decides (both
    labels in every split, alternating), labels spelled as ``names``: a task tiny models learn."""
    import json
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    for split, n in sizes.items():
        with open(folder / f"{split}.jsonl", "w") as f:
            for row in range(n):
                label = row % 2
                idx = torch.randint(6, len(CUE_WORDS), (4,), generator=gen).tolist()
                words = [CUE_WORDS[i] for i in idx] + [CUE_WORDS[1 if label else 4]]
                f.write(json.dumps({"text": " ".join(words), "label": names[label]}) + "\n")
    return str(folder)
