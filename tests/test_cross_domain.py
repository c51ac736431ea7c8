"""train --test-data: the best checkpoint also scored on other datasets' test splits, their
labels renamed to the model's (--test-label-map), beside the in-domain score."""
import json

import pytest
from helpers import save_tiny_run_models, write_cue_word_data

from pifi_fast.train import TrainConfig, evaluate_checkpoint, train

offline = pytest.importorskip("pifi_fast.offline")


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("cross")
    sizes = {"train": 12, "dev": 12, "test": 12}
    return {**save_tiny_run_models(root),
            "home": write_cue_word_data(root / "home", sizes, seed=2),
            "away": write_cue_word_data(root / "away", sizes, names=("neg", "pos"), seed=3),
            "same": write_cue_word_data(root / "same", sizes, seed=4)}


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
