"""pifi_fast.export: the exported model, run by the real runtimes (ONNX Runtime on the CPU,
PyTorch's AOTInductor loader), gives the PyTorch model's outputs on ragged batches, on the real
MiniLM + SmolLM2 pair (offline)."""
import copy
import json

import pytest
import torch

from pifi_fast import PiFiModel, load_llm_layer, reference
from pifi_fast.cli import main
from pifi_fast.export import ExportError, export_model, load_exported

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
offline = pytest.importorskip("pifi_fast.offline")
try:
    MINILM, SMOLLM2 = offline.minilm_dir(), offline.smollm2_gguf()
except FileNotFoundError as exc:  # pragma: no cover
    pytest.skip(str(exc), allow_module_level=True)

pytestmark = pytest.mark.slow
TEXTS = ["a gripping, beautifully shot film.", "dull.", "the plot wanders, but the lead "
         "performance keeps it afloat for most of its considerable length", "fine", "meh ."]


@pytest.fixture(scope="module")
def smollm2_layer():
    return load_llm_layer(SMOLLM2)


def _model(layer, cls=PiFiModel, task="classification", seed=0, **options):
    torch.manual_seed(seed)  # the same adapters and head for every class built with this seed
    kwargs = {"num_labels": 3} if task != "question_answering" else {}
    return cls.from_parts(str(MINILM), copy.deepcopy(layer), task=task, head_dropout=0.0,
                          labels=["neg", "mid", "pos"] if task == "classification" else None,
                          **kwargs, **options).eval()


def _ragged(model, texts):
    """A ragged batch of real sentences (other sizes than the export traced)."""
    enc = model.tokenizer(texts, padding=True, return_tensors="pt")
    assert enc["attention_mask"].sum(1).unique().numel() > 1  # really ragged
    return dict(enc)


def _outputs(model, batch):
    with torch.no_grad():
        out = model(**batch)
    if model.task == "question_answering":
        return [out.start_logits, out.end_logits]
    return [out.logits]


def _max_err(got, want, mask):
    worst = 0.0
    for g, w in zip(got, want):
        assert g.shape == w.shape
        diff = (g - w).abs()
        if g.dim() >= 2 and g.shape[:2] == mask.shape:  # per-token outputs: real tokens only
            diff = diff[mask.bool()]
        worst = max(worst, float(diff.max()))
    return worst


@pytest.mark.parametrize("task", ["classification", "token_classification",
                                  "question_answering"])
def test_onnx_export_matches_the_fused_model(smollm2_layer, task, tmp_path):
    model = _model(smollm2_layer, task=task)
    assert model.fused  # the fused layer, exported through its reference twin
    manifest = export_model(model, tmp_path / "onnx", format="onnx", progress=lambda _: None)
    assert manifest["check"]["max_abs_error"] <= 1e-4
    exported = load_exported(tmp_path / "onnx")
    assert exported.input_names == ["input_ids", "attention_mask", "token_type_ids"]
    for texts in (TEXTS, TEXTS[:2], TEXTS[1:2] * 7):
        batch = _ragged(model, texts) if len(set(texts)) > 1 else \
            dict(model.tokenizer(texts, padding=True, return_tensors="pt"))
        got = exported(**batch)
        assert _max_err(got, _outputs(model, batch), batch["attention_mask"]) <= 1e-4
    on_disk = json.loads((tmp_path / "onnx" / "export.json").read_text())
    assert on_disk["task"] == task and on_disk["opset"] >= 18
    assert [o["name"] for o in on_disk["outputs"]] == (
        ["start_logits", "end_logits"] if task == "question_answering" else ["logits"])
    assert (tmp_path / "onnx" / "tokenizer" / "tokenizer_config.json").is_file()


def test_pt2_package_matches_the_model_and_runs_without_its_code(smollm2_layer, tmp_path):
    model = _model(smollm2_layer)
    export_model(model, tmp_path / "pt2", format="pt2", progress=lambda _: None)
    exported = load_exported(tmp_path / "pt2")
    batch = _ragged(model, TEXTS)
    assert _max_err(exported(**batch), _outputs(model, batch), batch["attention_mask"]) <= 1e-4
    # the loader needs no pifi_fast model code: a fresh process with only torch loads and runs it
    import subprocess
    import sys
    code = ("import sys, torch; f = torch._inductor.aoti_load_package(sys.argv[1]); "
            "ids = torch.tensor([[101, 2204, 3185, 102], [101, 2204, 102, 0]]); "
            "m = (ids != 0).long(); out = f(ids, m, torch.zeros_like(ids)); "
            "out = out[0] if isinstance(out, (list, tuple)) else out; print(tuple(out.shape))")
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "pt2" / "model.pt2")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().endswith("(2, 3)")


def test_fused_checkpoint_exports_what_the_reference_exports(smollm2_layer, tmp_path):
    """A checkpoint of the fused model and the reference model with the same weights export
    to models that give the same logits."""
    fast = _model(smollm2_layer, seed=3)
    ref = _model(smollm2_layer, cls=reference.PiFiModel, seed=3)
    assert fast.fused and torch.equal(fast.head[0].weight, ref.head[0].weight)
    fast.save_pretrained(tmp_path / "fast-ckpt")
    assert main(["export", str(tmp_path / "fast-ckpt"), "--out", str(tmp_path / "fast"),
                 "--int8"]) == 0
    export_model(ref, tmp_path / "ref", format="onnx", progress=lambda _: None)
    batch = _ragged(fast, TEXTS)
    got_fast = load_exported(tmp_path / "fast")(**batch)[0]
    got_ref = load_exported(tmp_path / "ref")(**batch)[0]
    assert _max_err([got_fast], [got_ref], batch["attention_mask"]) <= 1e-6
    # the int8 model (ONNX Runtime's dynamic quantization) runs and predicts as a classifier
    int8 = load_exported(tmp_path / "fast", int8=True)
    preds = int8.predict(TEXTS)
    assert len(preds) == len(TEXTS) and {p["label"] for p in preds} <= {"neg", "mid", "pos"}
    manifest = json.loads((tmp_path / "fast" / "export.json").read_text())
    assert manifest["labels"] == ["neg", "mid", "pos"] and manifest["int8"]["file"]
    # predict() through ONNX Runtime equals the model's own predict()
    fp32 = load_exported(tmp_path / "fast")
    assert [p["label"] for p in fp32.predict(TEXTS)] == [p["label"] for p in fast.predict(TEXTS)]


def test_an_8bit_layer_exports_with_its_dequantized_weights(smollm2_layer, tmp_path):
    model = _model(smollm2_layer, weights="int8")
    manifest = export_model(model, tmp_path / "int8-layer", format="onnx",
                            progress=lambda _: None)
    assert manifest["check"]["max_abs_error"] <= 1e-4
    batch = _ragged(model, TEXTS)
    got = load_exported(tmp_path / "int8-layer")(**batch)
    assert _max_err(got, _outputs(model, batch), batch["attention_mask"]) <= 1e-4


def test_what_is_not_exported_says_so(smollm2_layer, tmp_path):
    with pytest.raises(ValueError, match="format"):
        export_model(_model(smollm2_layer), tmp_path / "x", format="tflite")
    with pytest.raises(ValueError, match="ONNX"):
        export_model(_model(smollm2_layer), tmp_path / "x", format="pt2", quantize="int8")
    with pytest.raises(FileNotFoundError):
        load_exported(tmp_path / "nothing-here")
    t5 = PiFiModel.from_parts(str(MINILM), None, task="classification")
    t5.task = "seq2seq"  # (no offline seq2seq SLM: the task alone decides)
    with pytest.raises(ExportError, match="seq2seq"):
        export_model(t5, tmp_path / "s2s")
    assert not (tmp_path / "x").exists() and not (tmp_path / "s2s").exists()
