"""Every decoder family Transformers ships, as PiFi's frozen layer: a tiny random model of each
is saved with save_pretrained (sharded), one layer is read back from the files, and PiFi runs
classification, question answering and token classification with it, pifi_fast against the
reference, forward and backward, then saved and reloaded (full and lean checkpoints)."""
import functools
import json
import re
import warnings
from types import SimpleNamespace

import pytest
import torch
from helpers import FAMILIES, assert_grads_close, rel_err, tiny_family, tiny_slm, trainable_grads
from transformers import AutoConfig, AutoModelForCausalLM

from pifi_fast import PiFiModel, families, load_llm_layer
from pifi_fast.frozen import elementwise
from pifi_fast.kernels import common as kernels
from pifi_fast.hf_layer import bidirectional_mask
from pifi_fast.reference import PiFiModel as ReferencePiFi

TASKS = ("classification", "question_answering", "token_classification")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (folder of the saved tiny LLM, the LLM itself)"""
    root = tmp_path_factory.mktemp("families")
    cache = {}

    def get(name):
        if name not in cache:
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(tiny_family(name)).eval()
            with torch.no_grad():  # norms away from their init of 1 (or 0), so each one counts
                for key, p in model.named_parameters():
                    if p.dim() == 1:
                        p.add_(0.1 * torch.randn_like(p))
            folder = root / name
            # several shards, so the layer's own shard is found through the index
            model.save_pretrained(folder, max_shard_size="40KB")
            cache[name] = folder, model
        return cache[name]

    return get


def _batch(task, generator):
    ids = torch.randint(3, 120, (3, 9), generator=generator)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    labels = {"classification": dict(labels=torch.tensor([0, 2, 1])),
              "token_classification": dict(labels=torch.randint(0, 3, (3, 9), generator=generator)
                                           .masked_fill(mask == 0, -100)),
              "question_answering": dict(start_positions=torch.tensor([1, 2, 0]),
                                         end_positions=torch.tensor([3, 4, 2]))}[task]
    return dict(input_ids=ids, attention_mask=mask, **labels)


def _outputs(out, task, mask):
    if task == "question_answering":
        return [out.start_logits[mask.bool()], out.end_logits[mask.bool()]]
    if task == "token_classification":
        return [out.logits[mask.bool()]]
    return [out.logits]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_loads_runs_and_matches_the_reference(checkpoints, tmp_path, name):
    folder, llm = checkpoints(name)
    config = AutoConfig.from_pretrained(folder)
    assert json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    layer = load_llm_layer(folder)
    assert layer.index == 1
    theirs = llm.model.layers[1].state_dict() if hasattr(llm, "model") else None
    if theirs is None:  # GPT-NeoX's blocks: gpt_neox.layers; Falcon's: transformer.h
        base = getattr(llm, "gpt_neox", None) or getattr(llm, "transformer")
        theirs = (base.layers if hasattr(base, "layers") else base.h)[1].state_dict()
    ours = layer.module.state_dict()
    assert ours.keys() == theirs.keys()
    for k in theirs:  # MoE experts stacked from their per-expert tensors, exactly
        assert torch.equal(ours[k], theirs[k]), k
    g = torch.Generator().manual_seed(3)
    for task in TASKS:
        batch = _batch(task, g)
        models = []
        for cls in (ReferencePiFi, PiFiModel):
            torch.manual_seed(1)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the unfused families' one warning
                model = cls.from_parts(tiny_slm("bert"), folder, task=task, num_labels=3,
                                       head_dropout=0.0)
            out = model(**batch)
            out.loss.backward()
            models.append((model, out))
        (ref, ref_out), (fast, fast_out) = models
        assert fast.fused == families.is_fusable(config)
        assert ("unfused" in repr(fast)) != fast.fused
        # fp32 rounding only (unfused too: pifi_fast packs the SLM's tokens on a CPU)
        tol = 1e-5
        for a, b in zip(_outputs(fast_out, task, batch["attention_mask"]),
                        _outputs(ref_out, task, batch["attention_mask"])):
            assert torch.isfinite(a).all()
            assert rel_err(a, b) <= tol, (task, rel_err(a, b))
        g_fast, g_ref = trainable_grads(fast), trainable_grads(ref)
        if task == "question_answering":
            # the start/end head's bias gets sum(softmax - one-hot) over the positions: zero up
            # to rounding, which no relative comparison can judge
            for bias_grad in (g_fast.pop("head.bias"), g_ref.pop("head.bias")):
                assert bias_grad.abs().max() < 1e-6
        assert_grads_close(g_fast, g_ref, tol=tol)
        assert all(p.grad is None for p in fast.llm_layer.parameters())
        # save and reload: a full checkpoint, and a lean one that re-reads the layer from folder
        fast.eval()
        with torch.no_grad():
            want = _outputs(fast(**batch), task, batch["attention_mask"])
        for kind in ("full", "reference"):
            saved = fast.save_pretrained(tmp_path / f"{task}-{kind}", frozen_layer=kind)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                back = PiFiModel.from_pretrained(saved).eval()
            with torch.no_grad():
                got = _outputs(back(**batch), task, batch["attention_mask"])
            for a, b in zip(got, want):
                assert torch.equal(a, b), (task, kind)


def test_every_family_of_the_list_is_covered():
    """The issue's list of families, each with a tiny config here."""
    wanted = {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma",
              "gemma2", "gemma3_text", "falcon", "phi", "phi3", "gpt_neox", "olmo", "olmo2",
              "granite", "cohere", "starcoder2", "stablelm"}
    assert wanted <= {tiny_family(n).model_type for n in FAMILIES}
    assert tiny_family("falcon-40b").new_decoder_architecture


def test_attention_implementation_follows_what_the_layer_supports():
    gemma2, llama = tiny_family("gemma2"), tiny_family("llama")
    families.use_attention_implementation(gemma2)
    families.use_attention_implementation(llama)
    assert (gemma2._attn_implementation, llama._attn_implementation) == ("eager", "sdpa")
    chosen = tiny_family("llama")
    chosen._attn_implementation = "eager"  # a choice (the benchmarks' eager baseline) is kept
    families.use_attention_implementation(chosen)
    assert chosen._attn_implementation == "eager"
    forced = tiny_family("gemma2")
    forced._attn_implementation = "sdpa"
    with pytest.raises(ValueError, match="cannot use SDPA"):
        families.use_attention_implementation(forced)


def test_sliding_windows_per_layer_type():
    gemma2 = tiny_family("gemma2")  # layer 0 sliding, layer 1 full
    assert [families.attention_window(gemma2, i) for i in (0, 1)] == [5, None]
    mistral = tiny_family("mistral")  # no layer types: every layer windowed
    assert [families.attention_window(mistral, i) for i in (0, 1)] == [5, 5]
    assert families.attention_window(tiny_family("llama"), 0) is None
    # symmetric: |i - j| < window visible, padding hidden as before
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    add = bidirectional_mask(mask, 1, 7, torch.float32, "cpu", window=3)[0, 0]
    visible = add == 0
    i, j = torch.meshgrid(torch.arange(7), torch.arange(7), indexing="ij")
    assert torch.equal(visible, ((i - j).abs() < 3) & mask[0][None, :])


def test_the_window_changes_a_sliding_layer_and_not_a_full_one(checkpoints):
    """Gemma-2's layer 0 is sliding (window 5 < 9 tokens): hiding far keys must change its
    output; layer 1 (full attention) must not depend on the window at all."""
    from pifi_fast.hf_layer import run_hf_layer

    folder, _ = checkpoints("gemma2")
    x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(0))
    sliding = load_llm_layer(folder, layer=0)
    out = run_hf_layer(sliding.module, sliding.rotary, x, None)
    with torch.no_grad():
        plain = sliding.module(x, attention_mask=bidirectional_mask(None, 2, 9, x.dtype, "cpu"),
                               position_embeddings=sliding.rotary(x, torch.arange(9)[None]))
    plain = plain[0] if isinstance(plain, tuple) else plain
    assert rel_err(out, plain) > 1e-3


def test_families_that_cannot_work_are_refused_with_the_reason(tmp_path):
    qwen3_next = AutoConfig.for_model("qwen3_next", hidden_size=32, num_hidden_layers=4,
                                      num_attention_heads=2, num_key_value_heads=1)
    with pytest.raises(ValueError, match="'linear_attention' block.*layer 3 is the last"):
        PiFiModel.from_parts(tiny_slm("bert"), qwen3_next, layer=0)
    bloom = AutoConfig.for_model("bloom", hidden_size=32, n_layer=2, n_head=2)
    with pytest.raises(ValueError, match="ALiBi"):
        PiFiModel.from_parts(tiny_slm("bert"), bloom)
    falcon_alibi = tiny_family("falcon")
    falcon_alibi.alibi = True
    with pytest.raises(ValueError, match="ALiBi"):
        PiFiModel.from_parts(tiny_slm("bert"), falcon_alibi)
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps({
        "model_type": "fancy_remote", "num_hidden_layers": 2,
        "auto_map": {"AutoConfig": "configuration_fancy.FancyConfig"}}))
    with pytest.raises(ValueError, match="'fancy_remote' exists only as code inside the "
                                         "checkpoint.*never runs"):
        load_llm_layer(remote)


def test_info_says_which_path_a_layer_takes(checkpoints, capsys, tmp_path):
    from pifi_fast import cli

    gemma2, _ = checkpoints("gemma2")
    phi3, _ = checkpoints("phi3")
    assert cli.main(["info", "--llm", str(gemma2), "--layer", "0"]) == 0
    out = capsys.readouterr().out
    assert "gemma2 layer 0: fused" in out and "sliding window 5" in out and "soft-capped" in out
    assert cli.main(["info", "--llm", str(phi3)]) == 0
    assert "phi3 layer 1: unfused" in capsys.readouterr().out
    assert cli.main(["info", "--llm", str(tmp_path / "missing")]) == 2
    assert "not a checkpoint folder" in capsys.readouterr().err


FUSED = sorted(n for n in FAMILIES if families.is_fusable(tiny_family(n)))
# "<kernels module>.<function>" as the description names them (labels and words have no dot)
NAMED = re.compile(r"[a-z_0-9]+\.[a-z_0-9]+")


def _expected(spec, table):
    """The functions the fused layer calls from a dispatch table (_TWINS / _TRITON), forward,
    by the rule pifi_fast.frozen follows: Llama's RMSNorm or the family norm, SwiGLU or the family
    activation, then RoPE; per-head q/k norms always through their PyTorch twins."""
    fns = [table.rms_fwd if spec.norm == "rms" else table.norm_fwd,
           table.swiglu_fwd if spec.act == "silu" else table.act_fwd, table.rope_]
    return fns + ([elementwise.QK_NORMS[spec.qk_norm][0]] if spec.qk_norm else [])


def _recorder(calls):
    """A wrapper that makes a function record its name in `calls` (and keep that name)."""
    def wrap(fn):
        @functools.wraps(fn)
        def recorded(*args, **kwargs):
            calls.append(elementwise.kernel_name(fn))
            return fn(*args, **kwargs)
        return recorded
    return wrap


def test_the_description_names_what_the_dispatcher_runs(checkpoints, monkeypatch):
    """For every fused family, the description (pifi-fast info --llm, the model's repr) names,
    per op, the function the layer's dispatch table gives it on CUDA and on the CPU; on the CPU
    it is checked against a real forward + backward, whose table records what it calls."""
    monkeypatch.delenv("PIFI_FAST_KERNELS", raising=False)
    cuda_table = elementwise.TRITON if kernels.HAS_TRITON else elementwise.TWINS
    cpu_table = elementwise.elementwise_impl(torch.empty(1))
    assert cpu_table is elementwise.TWINS
    for name in FUSED:
        config = tiny_family(name)
        spec = families.layer_spec(config)
        cpu = [elementwise.kernel_name(f) for f in _expected(spec, cpu_table)]
        cuda = [elementwise.kernel_name(f) for f in _expected(spec, cuda_table)]
        assert list(elementwise.layer_kernels(spec, "cpu").values()) == _expected(spec, cpu_table)
        assert list(elementwise.layer_kernels(spec, "cuda").values()) == _expected(spec, cuda_table)
        text = families.describe(config, 1, "cpu")
        found = re.search(r"on CUDA: (.*); on CPU \(here\): (.*); input-gradient", text)
        assert found, text
        assert NAMED.findall(found[1]) == cuda and NAMED.findall(found[2]) == cpu, text
        here = re.search(r"on CUDA \(here\): (.*); input-grad", families.describe(config, 1,
                                                                                  "cuda"))
        assert NAMED.findall(here[1]) == cuda
        # what a CPU forward + backward calls: the forwards named, and their backwards
        calls = []
        wrap = _recorder(calls)
        folder, _ = checkpoints(name)
        with monkeypatch.context() as patched:
            patched.setattr(elementwise, "TWINS", SimpleNamespace(**{
                k: wrap(v) if callable(v) else v for k, v in vars(elementwise.TWINS).items()}))
            patched.setattr(elementwise, "QK_NORMS", {k: (wrap(f), wrap(b))
                                              for k, (f, b) in elementwise.QK_NORMS.items()})
            torch.manual_seed(1)
            model = PiFiModel.from_parts(tiny_slm("bert"), folder, task="token_classification",
                                         num_labels=3)
            assert model.fused
            batch = _batch("token_classification", torch.Generator().manual_seed(3))
            model(**batch).loss.backward()
        forwards = {c for c in calls if "_bwd" not in c}
        assert forwards == set(cpu), (name, calls)
        assert {c for c in calls if "_bwd" in c} == {
            c.replace("_fwd", "_bwd") for c in cpu if "_fwd" in c}, (name, calls)
        # the model's repr carries the same line, for the device its layer is on
        assert families.describe(config, 1, "cpu") in repr(model)


@pytest.mark.skipif(not kernels.HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("name", ["gemma2", "falcon", "falcon-40b"])
def test_gemma2_and_falcon_name_their_triton_kernels_on_cuda(checkpoints, capsys, name):
    from pifi_fast import cli

    folder, _ = checkpoints(name)
    assert cli.main(["info", "--llm", str(folder)]) == 0
    out = capsys.readouterr().out
    norm = "rms_1p norm" if name == "gemma2" else "layer norm"
    act = "gelu_tanh MLP" if name == "gemma2" else "gelu MLP"
    assert (f"on CUDA{' (here)' if torch.cuda.is_available() else ''}: Triton "
            f"family_ops.norm_fwd ({norm}), family_ops.act_fwd ({act}), rope.rope_ (RoPE)") in out
    assert "no Triton kernels" not in out and "as PyTorch ops" not in out


def test_without_triton_the_description_says_the_twins_run_everywhere(monkeypatch):
    monkeypatch.delenv("PIFI_FAST_KERNELS", raising=False)
    monkeypatch.setattr(elementwise, "TRITON", None)
    monkeypatch.setattr(elementwise.kernels, "HAS_TRITON", False)
    text = families.describe(tiny_family("gemma2"), 1, "cpu")
    assert ("on every device (triton not installed): PyTorch family_ops.norm_fwd_ref (rms_1p "
            "norm), family_ops.act_fwd_ref (gelu_tanh MLP), rope.rope_ref_ (RoPE); "
            "input-gradient") in text
    assert "on CUDA" not in text
    # kernels="triton" cannot run there: said, not raised (a repr must not fail)
    assert "cannot run" in families.describe(tiny_family("falcon"), 1, "cpu", "triton")


# -- GGUF: the layer read from a file written the way llama.cpp's converter writes it ------------
def _llama_cpp_gguf(model, config, arch: str, path):
    """A GGUF file of `model` as llama.cpp's converter lays it out: its names (gguf-py's table),
    Gemma's norms stored with +1, Falcon-40B's q/k/v regrouped into [q | k | v], the metadata
    its loader reads. Written here independently of pifi_fast.loading's inverse."""
    import gguf

    table = gguf.get_tensor_name_map(
        next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_head_count(config.num_attention_heads)
    if arch == "falcon":
        writer.add_feed_forward_length(config.ffn_hidden_size)
        writer.add_head_count_kv(config.num_kv_heads if config.new_decoder_architecture else 1)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
    else:
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
        writer.add_float32(f"{arch}.attn_logit_softcapping", config.attn_logit_softcapping)
        writer.add_sliding_window(config.sliding_window)
    heads, d = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    for name, tensor in model.state_dict().items():
        base, suffix = name.rsplit(".", 1)
        gguf_name = table.get_name(base)
        if gguf_name is None or not gguf_name.startswith("blk."):
            continue
        t = tensor.float()
        if arch == "gemma2" and base.endswith("norm"):
            t = t + 1
        if arch == "falcon" and base.endswith("query_key_value") and \
                config.new_decoder_architecture:
            kv = config.num_kv_heads
            grouped = t.reshape(kv, heads // kv + 2, d, -1)
            t = torch.cat((grouped[:, :-2].reshape(-1, t.shape[1]),
                           grouped[:, -2].reshape(-1, t.shape[1]),
                           grouped[:, -1].reshape(-1, t.shape[1])))
        writer.add_tensor(f"{gguf_name}.{suffix}", t.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("name,arch", [("gemma2", "gemma2"), ("falcon", "falcon"),
                                       ("falcon-40b", "falcon")])
def test_gguf_blocks_of_gemma2_and_falcon_read_back_exactly(tmp_path, name, arch, monkeypatch):
    monkeypatch.setenv("PIFI_FAST_CACHE", str(tmp_path / "cache"))
    config = tiny_family(name)
    if name == "gemma2":  # GGUF has no query scale: llama.cpp uses the key length (not 27B)
        config.query_pre_attn_scalar = config.head_dim
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    path = tmp_path / f"{name}.gguf"
    _llama_cpp_gguf(model, config, arch, path)
    for index in (0, 1):
        layer = load_llm_layer(path, layer=index)
        got = layer.config
        if name == "gemma2":
            assert (got.attn_logit_softcapping, got.query_pre_attn_scalar) == (3.0, 16)
            assert families.attention_window(got, index) == (5 if index == 0 else None)
        else:
            assert got.new_decoder_architecture == config.new_decoder_architecture
            assert got.ffn_hidden_size == config.ffn_hidden_size
        base = model.model if hasattr(model, "model") else model.transformer
        blocks = base.layers if hasattr(base, "layers") else base.h
        theirs, ours = blocks[index].state_dict(), layer.module.state_dict()
        assert ours.keys() == theirs.keys()
        for k in theirs:  # Gemma's norms went through +1 and -1 in fp32: a rounding apart
            assert torch.allclose(ours[k], theirs[k], rtol=0, atol=1e-6), k
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, config.hidden_size, generator=g)
    from pifi_fast.hf_layer import run_hf_layer

    with torch.no_grad():
        want = run_hf_layer(blocks[1], layer.rotary, x, None)
        assert rel_err(run_hf_layer(layer.module, layer.rotary, x, None), want) < 1e-5


@pytest.mark.parametrize("name", ["mixtral", "gemma2", "falcon"])
def test_hub_layout_downloads_only_the_layers_shards(checkpoints, monkeypatch, name):
    """The Hub path (mocked: files served from the saved folder) reads the config, the index
    and only the shards holding the layer, MoE experts converted as from a folder."""
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    folder, llm = checkpoints(name)
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    layer_one = re.compile(r"^(model\.layers|transformer\.h)\.1\.")
    needed = {f for k, f in weight_map.items() if layer_one.match(k)}
    requested = []

    def fake_download(repo_id, filename, revision=None, **kw):
        requested.append(filename)
        if not (folder / filename).exists():
            raise EntryNotFoundError(f"{filename} not in repo")
        return str(folder / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr("pifi_fast.loading.ensure_hub_reachable", lambda: None)
    layer = load_llm_layer(f"someone/tiny-{name}")
    assert set(requested) == {"config.json", "model.safetensors.index.json"} | needed
    assert torch.equal(torch.cat([t.flatten() for t in layer.module.state_dict().values()]),
                       torch.cat([t.flatten() for t in load_llm_layer(folder).module
                                  .state_dict().values()]))
