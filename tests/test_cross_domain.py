"""train --test-data: the best checkpoint also scored on other datasets' test splits, their
labels renamed to the model's (--test-label-map), beside the in-domain score."""
import json

import pytest
import torch
from helpers import tiny_llm

from pifi_fast.train import TrainConfig, evaluate_checkpoint, train

offline = pytest.importorskip("pifi_fast.offline")
WORDS = ["good", "great", "fine", "bad", "awful", "poor", "film", "plot", "cast", "very"]


def _write(folder, names, gen, n=12):
    folder.mkdir()
    for split in ("train", "dev", "test"):
        with open(folder / f"{split}.jsonl", "w") as f:
            for row in range(n):  # both labels in every split; a cue word decides it
                label = row % 2
                idx = torch.randint(6, len(WORDS), (4,), generator=gen).tolist()
                words = [WORDS[i] for i in idx] + [WORDS[1 if label else 4]]
                f.write(json.dumps({"text": " ".join(words), "label": names[label]}) + "\n")


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, BertConfig

    root = tmp_path_factory.mktemp("cross")
    tok = AutoTokenizer.from_pretrained(offline.minilm_dir())
    torch.manual_seed(0)
    AutoModel.from_config(BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
        vocab_size=tok.vocab_size, max_position_embeddings=128)).save_pretrained(root / "bert")
    tok.save_pretrained(root / "bert")
    AutoModelForCausalLM.from_config(tiny_llm("llama")).save_pretrained(root / "llama")
    gen = torch.Generator().manual_seed(2)
    _write(root / "home", [0, 1], gen)
    _write(root / "away", ["neg", "pos"], gen)
    _write(root / "same", [0, 1], gen)
    return {k: str(root / k) for k in ("bert", "llama", "home", "away", "same")}


def test_test_data_scores_other_datasets_beside_the_in_domain_test(parts, tmp_path):
    cfg = TrainConfig(data=parts["home"], slm=parts["bert"], llm=parts["llama"], epochs=1,
                      batch_size=8, output_dir=str(tmp_path / "run"),
                      test_data=f"{parts['away']},{parts['same']}", test_label_map="neg=0,pos=1")
    res = train(cfg)
    assert "accuracy" in res["test"]
    cross = res["cross_domain"]
    assert list(cross) == [parts["away"], parts["same"]]
    again = evaluate_checkpoint(str(tmp_path / "run" / "best"), parts["away"], "test",
                                label_map={"neg": 0, "pos": 1})
    assert cross[parts["away"]]["accuracy"] == again["accuracy"]
    assert cross[parts["same"]]["examples"] == 12
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["cross_domain"][parts["away"]]["accuracy"] == again["accuracy"]


def test_an_unmapped_label_of_another_dataset_is_an_error_naming_it(parts, tmp_path):
    cfg = TrainConfig(data=parts["home"], slm=parts["bert"], llm=None, epochs=1, batch_size=8,
                      output_dir=str(tmp_path / "run"), test_data=parts["away"])
    with pytest.raises(ValueError, match="'neg'|'pos'"):
        train(cfg)
