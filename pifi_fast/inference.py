"""Running a trained PiFi model on new inputs: batch prediction, and the compiled and CUDA-graph
runners that evaluation, prediction and the benchmarks call instead of the model.

PredictionMixin gives PiFiBase its predict(); compile_model and inference_runner are how
pifi_fast compiles a model everywhere. Imports downward only (data); pifi_base imports it.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from pifi_fast.data import pad_to_bucket


class PredictionMixin:
    """predict() for a PiFiBase: raw texts in, labels and probabilities out."""

    @torch.no_grad()
    def predict(self, texts, pairs=None, *, tokenizer=None, batch_size: int = 64,
                max_length: int = 100, progress=None, execution: str = "eager",
                length_bucket: int = 16) -> list[dict]:
        """Classify raw texts (and second sentences for pair tasks): for each, the predicted
        label (as the training data spelled it, when the model knows its labels) and every
        label's probability. The tokenizer saved beside the model is used unless one is given.
        Sentences are batched by length (little padding) and run in inference mode, under
        bf16/fp16 autocast on a GPU; results come back in the input order. ``progress``: a
        callable taking the number of sentences just done (e.g. a tqdm bar's update).
        ``execution``: "eager", "compile" or "cuda-graphs" (see inference_runner); compiled,
        batch lengths are padded to multiples of ``length_bucket`` (few distinct shapes)."""
        if self.task != "classification":
            raise ValueError(f"predict() classifies; this model's task is {self.task!r}")
        tok = tokenizer or getattr(self, "tokenizer", None)
        if tok is None:
            raise ValueError("predict() needs a tokenizer: pass tokenizer=..., or load a "
                             "checkpoint saved with one (pifi-fast train saves it)")
        texts = [texts] if isinstance(texts, str) else list(texts)
        if pairs is not None and len(pairs) != len(texts):
            raise ValueError(f"{len(pairs)} pairs for {len(texts)} texts")
        device = next(self.parameters()).device
        names = self.labels or list(range(self.num_labels))
        dtype = (torch.bfloat16 if device.type == "cuda" and torch.cuda.get_device_capability(
            device)[0] >= 8 else torch.float16)
        autocast = torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda")
        # one runner per execution and device, kept: a fresh torch.compile per call would
        # compile again each time (and fall back to eager after torch's recompile limit)
        runners = self.__dict__.setdefault("_inference_runners", {})
        key = (execution, str(device))
        if key not in runners:
            runners[key] = inference_runner(self, execution)
        runner = runners[key]
        bucket = length_bucket if runner is not self else None
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        results: list[dict | None] = [None] * len(texts)
        was_training = self.training
        self.eval()
        try:
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                enc = tok([texts[i] for i in idx], [pairs[i] for i in idx] if pairs else None,
                          truncation=True, max_length=max_length, padding=True,
                          return_tensors="pt")
                enc = pad_to_bucket(enc, bucket, max_length, tok.pad_token_id).to(device)
                # (compiled: no_grad only, not inference_mode: compiling in inference mode can
                # break the same model's later compilation for training, pytorch/pytorch#135892)
                with torch.inference_mode(runner is self), autocast:
                    logits = runner(**{k: v for k, v in enc.items() if k in (
                        "input_ids", "attention_mask", "token_type_ids")}).logits
                probs = logits.float().softmax(-1).cpu()
                for row, i in enumerate(idx):
                    p = probs[row].tolist()
                    best = max(range(len(p)), key=p.__getitem__)
                    results[i] = {"label": names[best],
                                  "probabilities": {str(n): v for n, v in zip(names, p)}}
                if progress is not None:
                    progress(len(idx))
        finally:
            self.train(was_training)
        return results


EXECUTIONS = ("eager", "compile", "cuda-graphs")


def compile_model(model: nn.Module, cuda_graphs: bool = False):
    """torch.compile(model) as pifi_fast compiles it everywhere (training, evaluation, prediction,
    benchmarks). On a CPU, random ops (dropout) fall back to ATen's (Inductor's fallback_random):
    Inductor's own CPU random numbers cost more than the whole compile gains. Measured on 2 cores
    (MiniLM + SmolLM2, fp32, median of 3 alternating runs): train step on 32 sentences x1.00 of
    eager with Inductor's RNG, x1.08 with ATen's; QA step on 8 x 384 tokens x0.87 -> x1.05. On a
    GPU Inductor fuses its RNG into the generated kernels, so it stays on there.
    ``cuda_graphs``: mode="reduce-overhead" (CUDA devices; see inference_runner).

    Without CUDA graphs the compiled model's calls run with Dynamo's
    capture_dynamic_output_shape_ops on (for its calls only, not globally), so a classification
    model that packs its SLM (pifi_fast.packed_slm: a token count that depends on the mask)
    stays one graph and packs compiled as it does eager. Measured on 2 cores (MiniLM, 32 random
    SST-2 sentences, SLM forward + backward): compiled packed 417 ms, eager packed 495 ms,
    compiled on the padded layout 764 ms. CUDA graphs need static shapes: under them the SLM
    keeps the padded layout."""
    if cuda_graphs:
        return torch.compile(model, mode="reduce-overhead")
    if next(model.parameters()).device.type == "cpu":
        compiled = torch.compile(model, options={"fallback_random": True})
    else:
        compiled = torch.compile(model)
    capture = torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True)
    compiled.forward = capture(compiled.forward)
    return compiled


def inference_runner(model: nn.Module, execution: str = "eager"):
    """What evaluation and prediction call instead of ``model``: the model itself ("eager"),
    ``torch.compile(model)`` ("compile"), or ("cuda-graphs") the model compiled with
    mode="reduce-overhead", which records one CUDA graph per input shape and replays it: the
    hundreds of small kernel launches of a short-sentence batch become one. The fused layer's
    op that unpads a padding mask (a host sync) is tagged cudagraph_unsafe and runs eagerly
    between captured parts; in [CLS] mode it has nothing to unpad and is captured with the rest.
    CUDA graphs need a CUDA device: elsewhere "cuda-graphs" warns and compiles without them.
    Outputs of a CUDA-graph replay are overwritten by the next call: use them (argmax, .cpu())
    before calling again, as evaluation and predict() do."""
    if execution not in EXECUTIONS:
        raise ValueError(f"execution must be one of {EXECUTIONS}, got {execution!r}")
    if execution == "eager":
        return model
    device = next(model.parameters()).device
    if execution == "cuda-graphs" and device.type != "cuda":
        warnings.warn(f"CUDA graphs need a CUDA device; the model is on {device}, so it runs "
                      "compiled without them (torch.compile, default mode)", RuntimeWarning,
                      stacklevel=2)
        execution = "compile"
    if execution == "compile":
        return compile_model(model)
    compiled = compile_model(model, cuda_graphs=True)

    def replay(*args, **kwargs):
        # each call is a new step of the CUDA graph trees: the previous call's outputs may be
        # overwritten now (they were consumed), so no step is kept alive waiting for them
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(*args, **kwargs)

    return replay
