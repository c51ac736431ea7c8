"""Exporting a trained PiFi model for runtimes without pifi_fast: ONNX and AOTInductor packages.

    from pifi_fast.export import export_model, load_exported
    export_model("runs/sst2/best", "deploy/sst2-onnx", format="onnx")
    exported = load_exported("deploy/sst2-onnx")      # onnxruntime, no pifi_fast model code
    exported.predict(["a gripping film"])             # [{"label": ..., "probabilities": ...}]

What is exported is the reference computation (pifi_fast.reference: the LLM's own Hugging Face
decoder layer), rebuilt from the model's weights: the fused layer's custom ops and Triton
kernels have no ONNX translation, and an AOTInductor package that kept them would call back
into Python. Both give the same logits (the tests hold a fused checkpoint's export to the
reference's). 8-bit layers are exported with their dequantized weights; ONNX Runtime's own
dynamic int8 quantization (``quantize="int8"``) makes an int8 model of the whole graph.

The folder holds ``model.onnx`` (or ``model.pt2``), the SLM's tokenizer (``tokenizer/``) and
``export.json``: the task, the label names, each input's and output's name, dtype and axes, the
format and opset, and the error measured against the PyTorch model when it was written.
Classification, token classification and question answering (start and end logits) export;
seq2seq does not (its decoder runs a generation loop no single graph holds).
"""
from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer

from pifi_fast import reference
from pifi_fast.model import PiFiModel
from pifi_fast.persistence import layers_from_state
from pifi_fast.pifi_base import PiFiBase
from pifi_fast.version import installed_version

FORMATS = ("onnx", "pt2")
EXPORTED_TASKS = ("classification", "token_classification", "question_answering")
MANIFEST = "export.json"
MODEL_FILES = {"onnx": "model.onnx", "pt2": "model.pt2"}
INT8_ONNX = "model.int8.onnx"
# the options of PiFiBase itself; the rest of a model's options choose how its layer runs
_BASE_OPTIONS = ("task", "num_labels", "label_smoothing", "head_dropout", "attend_to_padding",
                 "freeze", "adapter", "adapter_width", "pooling")
# dynamic axes: a sequence of at least 2 tokens ([CLS] and [SEP] at least), so that no size-1
# special case of the trace is baked in, and at most the SLM's position table
_MAX_BATCH = 4096


class ExportError(RuntimeError):
    """The model cannot be exported, or the exported model disagrees with it."""


def reference_twin(model: PiFiBase) -> reference.PiFiModel:
    """The same trained model as pifi_fast.reference computes it: the frozen layer(s) rebuilt as
    the LLM's own Hugging Face decoder layers from the model's weights (8-bit ones dequantized),
    LoRA merged into the SLM, every other weight shared by copy. In eval mode, on the CPU."""
    if model.task == "seq2seq":
        raise ExportError("seq2seq models are not exported: their decoder runs a generation loop "
                          "(model.generate) that no single graph holds; classification, token "
                          "classification and question answering are")
    if model.task not in EXPORTED_TASKS:
        raise ExportError(f"task {model.task!r} is not exported (exported: {EXPORTED_TASKS})")
    source = copy.deepcopy(model).cpu()
    source.merge_lora()
    state = source.state_dict()
    llm = None
    if source.llm_config is not None:
        llm = layers_from_state(source.llm_config, source.llm_index, source.layer_dtype, state,
                                source="the model being exported")
    options = {k: v for k, v in source._options.items() if k in _BASE_OPTIONS}
    twin = reference.PiFiModel(source.slm, llm, labels=source.labels, **options)
    missing, unexpected = twin.load_state_dict(
        {k: v for k, v in state.items() if not k.startswith("llm_layer.")}, strict=False)
    missing = [k for k in missing if not k.startswith("llm_layer.")]
    if missing or unexpected:
        raise ExportError(f"the reference twin does not fit the model's weights: missing "
                          f"{missing[:5]}, unexpected {unexpected[:5]}")
    twin.tokenizer = getattr(model, "tokenizer", None)
    return twin.eval()


class _Graph(nn.Module):
    """The exported function: token ids and mask (and token types, for SLMs that take them) in,
    logits out (start and end logits for question answering)."""

    def __init__(self, model: PiFiBase, input_names: list[str]):
        super().__init__()
        self.model, self.input_names = model, input_names

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        out = self.model(**kwargs)
        if self.model.task == "question_answering":
            return out.start_logits, out.end_logits
        return out.logits


def _input_names(model: PiFiBase) -> list[str]:
    names = ["input_ids", "attention_mask"]
    tok = getattr(model, "tokenizer", None)
    takes_types = (getattr(model.slm.config, "type_vocab_size", 0) or 0) > 1
    if takes_types and (tok is None or "token_type_ids" in tok.model_input_names):
        names.append("token_type_ids")
    return names


def _output_names(task: str) -> list[str]:
    return ["start_logits", "end_logits"] if task == "question_answering" else ["logits"]


def _output_axes(task: str) -> list[str]:
    return {"classification": ["batch", "labels"],
            "token_classification": ["batch", "sequence", "labels"],
            "question_answering": ["batch", "sequence"]}[task]


def example_batch(model: PiFiBase, lengths: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    """A right-padded batch of random token ids with the given real lengths (the first and last
    real tokens the tokenizer's CLS/SEP when it has them), for tracing and for checks."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.slm.config.vocab_size
    tok = getattr(model, "tokenizer", None)
    pad = getattr(tok, "pad_token_id", None) or 0
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad, dtype=torch.long)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(5, vocab, (n,), generator=g)
        for pos, special in ((0, getattr(tok, "cls_token_id", None)),
                             (n - 1, getattr(tok, "sep_token_id", None))):
            if special is not None:
                ids[row, pos] = special
        mask[row, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in _input_names(model):
        types = torch.zeros_like(ids)
        for row, n in enumerate(lengths):  # a sentence pair: the second half typed 1
            types[row, n // 2:n] = 1
        batch["token_type_ids"] = types
    return batch


def _max_length(model: PiFiBase) -> int:
    return int(getattr(model.slm.config, "max_position_embeddings", None) or 512)


def _dynamic_shapes(names: list[str], max_length: int) -> dict:
    batch = torch.export.Dim("batch", min=1, max=_MAX_BATCH)
    sequence = torch.export.Dim("sequence", min=2, max=max_length)
    return {name: {0: batch, 1: sequence} for name in names}


def _param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _all_fp32(module: nn.Module) -> bool:
    return all(p.dtype == torch.float32 for p in module.parameters())


def export_model(model, out, format: str = "onnx", *, quantize: str | None = None,
                 check: bool = True, progress=print) -> dict:
    """Export ``model`` (a PiFiModel, either class, or a checkpoint folder / Hub id) to the
    folder ``out`` as ``format`` "onnx" (torch.onnx's dynamo exporter, the opset it
    recommends, dynamic batch and sequence length) or "pt2" (torch.export + AOTInductor, for
    PyTorch runtimes without Python model code). ``quantize="int8"`` (ONNX only) also writes
    ONNX Runtime's dynamic int8 model of the graph (model.int8.onnx).

    With ``check`` (default), the exported model is run by its runtime on ragged batches of
    other sizes than the traced one and compared with the PyTorch model it was made from (the
    reference twin; an 8-bit layer's twin holds its dequantized weights): fp32 must agree
    within 1e-4 (max abs error), else ExportError and nothing is written. The folder is
    written beside ``out`` and renamed into place when complete. Returns the manifest (also
    written as export.json)."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
    if quantize and format != "onnx":
        raise ValueError("quantize='int8' applies to ONNX exports (ONNX Runtime's dynamic int8 "
                         "quantization); for 8-bit PyTorch inference on the CPU build the model "
                         "with weights='int8-channel'")
    if isinstance(model, (str, os.PathLike)):
        model = PiFiModel.from_pretrained(model)
    twin = reference_twin(model)
    names, outputs = _input_names(twin), _output_names(twin.task)
    graph = _Graph(twin, names).eval()
    traced = example_batch(twin, [8, 5], seed=0)
    args = tuple(traced[n] for n in names)
    target = Path(out).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        path = tmp / MODEL_FILES[format]
        progress(f"exporting to {format} ({_param_bytes(twin) / 2**20:.0f} MiB of weights) ...")
        with torch.no_grad():
            shapes = _dynamic_shapes(names, _max_length(twin))
            extra = (_write_onnx(graph, args, names, outputs, shapes, path) if format == "onnx"
                     else _write_pt2(graph, args, shapes, path))
        manifest = {
            "format": format,
            "file": path.name,
            "task": twin.task,
            "labels": (twin.labels or list(range(twin.num_labels))
                       if twin.task == "classification" else twin.labels),
            "inputs": [{"name": n, "dtype": "int64", "axes": ["batch", "sequence"]}
                       for n in names],
            "outputs": [{"name": n, "dtype": "float32", "axes": _output_axes(twin.task)}
                        for n in outputs],
            "max_batch": _MAX_BATCH, "min_sequence": 2, "max_sequence": _max_length(twin),
            "slm": getattr(twin.slm.config, "_name_or_path", "") or twin.slm.config.model_type,
            "llm": None if twin.llm_config is None else twin.llm_config.model_type,
            "llm_layer": twin.llm_index,
            "pifi_fast_version": installed_version(),
            "torch_version": torch.__version__,
            **extra,
        }
        if getattr(twin, "tokenizer", None) is not None:
            twin.tokenizer.save_pretrained(tmp / "tokenizer")
            manifest["tokenizer"] = "tokenizer"
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if check:
            progress("checking the exported model against PyTorch ...")
            manifest["check"] = check_export(tmp, twin)
            if quantize:
                progress("quantizing to int8 (ONNX Runtime, dynamic) ...")
                manifest["int8"] = quantize_onnx(tmp, twin)
        elif quantize:
            manifest["int8"] = quantize_onnx(tmp, None)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    manifest["directory"] = str(target)
    return manifest


def _write_onnx(graph, args, names, outputs, shapes, path: Path) -> dict:
    import onnx  # deferred: an optional dependency (the export extra)
    # one file up to 2 GB (protobuf's limit); larger models keep their weights in model.onnx.data
    external = _param_bytes(graph) > 2**31 - 2**27
    with warnings.catch_warnings():
        # one Dim object shared by every input's axis is what we mean; the exporter notes it
        warnings.filterwarnings("ignore", message=".*axis name.*shares the same shape")
        program = torch.onnx.export(graph, args, dynamo=True, verbose=False, input_names=names,
                                    output_names=outputs, dynamic_shapes=shapes,
                                    external_data=external)
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    program.save(str(path), external_data=external)
    proto = onnx.load(str(path), load_external_data=False)
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    return {"opset": opset, "onnx_nodes": len(proto.graph.node),
            **({"external_data": path.name + ".data"} if external else {})}


def _write_pt2(graph, args, shapes, path: Path) -> dict:
    program = torch.export.export(graph, args, dynamic_shapes=shapes)
    torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    return {"runtime": "torch._inductor.aoti_load_package"}


class ExportedModel:
    """An exported PiFi model run by its runtime (ONNX Runtime or PyTorch's AOTInductor loader):
    call it with token tensors, or predict() raw texts with the tokenizer saved beside it."""

    def __init__(self, directory, int8: bool = False, threads: int | None = None):
        self.directory = Path(directory)
        self.manifest = json.loads((self.directory / MANIFEST).read_text())
        self.format = self.manifest["format"]
        self.input_names = [i["name"] for i in self.manifest["inputs"]]
        self.output_names = [o["name"] for o in self.manifest["outputs"]]
        self.tokenizer = (AutoTokenizer.from_pretrained(self.directory / "tokenizer")
                          if self.manifest.get("tokenizer") else None)
        if self.format == "onnx":
            import onnxruntime  # deferred: an optional dependency (the export extra)
            options = onnxruntime.SessionOptions()
            if threads:
                options.intra_op_num_threads = threads
            name = INT8_ONNX if int8 else self.manifest["file"]
            self._session = onnxruntime.InferenceSession(
                str(self.directory / name), options, providers=["CPUExecutionProvider"])
        else:
            if int8:
                raise ValueError("int8 applies to ONNX exports only")
            self._runner = torch._inductor.aoti_load_package(
                str(self.directory / self.manifest["file"]))

    def __call__(self, **inputs) -> list[torch.Tensor]:
        """The outputs (in manifest order) for int64 token tensors named as the inputs."""
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise ValueError(f"missing inputs {missing}; this model takes {self.input_names}")
        tensors = [torch.as_tensor(inputs[n]).to(torch.long).contiguous()
                   for n in self.input_names]
        if self.format == "onnx":
            feed = {n: t.numpy() for n, t in zip(self.input_names, tensors)}
            return [torch.from_numpy(o) for o in self._session.run(self.output_names, feed)]
        with torch.no_grad():
            out = self._runner(*tensors)
        return list(out) if isinstance(out, (list, tuple)) else [out]

    def predict(self, texts, pairs=None, max_length: int = 100) -> list[dict]:
        """Classify raw texts as PiFiModel.predict does: the label and every label's
        probability, per text."""
        if self.manifest["task"] != "classification":
            raise ValueError(f"predict() classifies; this model's task is "
                             f"{self.manifest['task']!r}")
        if self.tokenizer is None:
            raise ValueError("this export has no tokenizer beside it; call the model with "
                             "token tensors instead")
        texts = [texts] if isinstance(texts, str) else list(texts)
        enc = self.tokenizer(texts, pairs, truncation=True, max_length=max_length,
                             padding=True, return_tensors="pt")
        if enc["input_ids"].shape[1] < 2:
            raise ValueError("the exported model takes sequences of at least 2 tokens")
        batch = {n: enc[n] if n in enc else torch.zeros_like(enc["input_ids"])
                 for n in self.input_names}
        probs = self(**batch)[0].float().softmax(-1)
        names = self.manifest["labels"]
        return [{"label": names[int(p.argmax())],
                 "probabilities": {str(n): float(v) for n, v in zip(names, p)}}
                for p in probs]


def load_exported(directory, int8: bool = False, threads: int | None = None) -> ExportedModel:
    """An exported folder, ready to run (``int8``: its ONNX Runtime int8 model)."""
    if not (Path(directory) / MANIFEST).is_file():
        raise FileNotFoundError(f"{directory} is not an exported PiFi model (no {MANIFEST})")
    return ExportedModel(directory, int8=int8, threads=threads)


def _max_errors(got: list[torch.Tensor], want: list[torch.Tensor], mask) -> float:
    worst = 0.0
    for g, w in zip(got, want):
        if g.shape != w.shape:
            raise ExportError(f"the exported model returned shape {tuple(g.shape)}, PyTorch "
                              f"{tuple(w.shape)}")
        diff = (g.float() - w.float()).abs()
        if g.dim() == 2 and g.shape == mask.shape:  # QA logits: padding positions are -inf-like
            diff = diff[mask.bool()]
        elif g.dim() == 3:  # token logits: only real tokens are defined
            diff = diff[mask.bool()]
        worst = max(worst, float(diff.max()))
    return worst


def _pytorch_outputs(twin: PiFiBase, batch: dict) -> list[torch.Tensor]:
    with torch.no_grad():
        out = _Graph(twin, list(batch))(**batch)
    return list(out) if isinstance(out, tuple) else [out]


def check_export(directory, twin: PiFiBase, int8: bool = False) -> dict:
    """Run the exported model on two ragged batches of sizes other than the traced one (3
    sentences of 13, 5 and 9 tokens; 1 sentence of 2) and compare with the PyTorch model:
    the max abs error over real tokens. fp32 models must agree within 1e-4."""
    exported = ExportedModel(directory, int8=int8)
    worst = 0.0
    for seed, lengths in ((1, [13, 5, 9]), (2, [2])):
        batch = example_batch(twin, lengths, seed=seed)
        batch = {n: batch[n] for n in exported.input_names}
        worst = max(worst, _max_errors(exported(**batch), _pytorch_outputs(twin, batch),
                                       batch["attention_mask"]))
    tolerance = 1e-4 if _all_fp32(twin) else 5e-2
    if not int8 and worst > tolerance:
        raise ExportError(f"the exported model differs from PyTorch by {worst:.3g} (max abs, "
                          f"tolerance {tolerance:g})")
    return {"max_abs_error": worst, "tolerance": None if int8 else tolerance,
            "batches": [[13, 5, 9], [2]]}


def quantize_onnx(directory, twin: PiFiBase | None) -> dict:
    """ONNX Runtime's dynamic int8 quantization of model.onnx (weights int8 per channel,
    activations quantized per call) into model.int8.onnx; with ``twin``, its max abs error
    against the PyTorch model on the check batches (reported, not bounded: int8 changes the
    logits; its accuracy cost is measured on data, see docs/deployment.md)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic  # deferred: optional
    directory = Path(directory)
    # (its advice to run ONNX Runtime's shape pre-processing first is logged on the root
    # logger; measured on SST-2 dev the model quantizes as it is: docs/deployment.md)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(str(directory / MODEL_FILES["onnx"]), str(directory / INT8_ONNX),
                         weight_type=QuantType.QInt8, per_channel=True)
    finally:
        root.setLevel(level)
    result = {"file": INT8_ONNX, "weight_type": "int8", "per_channel": True}
    if twin is not None:
        result.update(check_export(directory, twin, int8=True))
    return result
