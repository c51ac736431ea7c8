"""W4, a whole PiFi step: its cases and how each is built.

The classification training step (forward + backward; the optimizer, the same for all, is in
the epoch rows and pifi-fast breakdown) and inference batch on SST-2 sentence lengths, and the
QA training step on 384-token windows, per SLM + LLM-layer pair: pifi_fast eager, compiled,
under CUDA graphs (GPU) and packed (GPU), its 8-bit variants, the reference PiFi eager and
compiled, and the authors' setup. The whole-epoch rows of W4 are in pifi_fast.bench.epoch.
"""
from __future__ import annotations

import functools
import time

import torch

from pifi_fast.bench.common import (AUTHORS_MAX_LENGTH, QUANT_IMPLS, Case, pifi_models,
                                    quant_model, sst2_lengths)
from pifi_fast.inference import compile_model, inference_runner
from pifi_fast.training.runtime import precision_autocast

# W4 implementations besides the fused model's 8-bit variants: eager and compiled pifi_fast and
# reference (the Hugging Face layer; "hf_compile" = the reference model under torch.compile),
# pifi_fast inference through CUDA graphs (GPU), and the authors' setup.
W4_IMPLS = ("pifi_fast", "pifi_fast_compiled", "pifi_fast_cudagraphs", "pifi_fast_packed",
            "hf_sdpa", "hf_compile", "authors")
# GPU-only W4 rows: CUDA graphs (inference), and pifi_fast with packed_slm=True (classification):
# on a CPU pifi_fast packs by default (packed_slm="auto"); on a GPU packing stays opt-in until
# these rows have measured it there.
GPU_ONLY_W4 = ("pifi_fast_cudagraphs", "pifi_fast_packed")
QA_TOKENS = 384  # the QA train step: windows of 384 tokens (SQuAD's setting), all full


def cases(sizes, device, dtype) -> list[Case]:
    gpu = device.type == "cuda"
    out = []

    def add(variant, pair, n, impls, build):
        for impl in impls:
            out.append(Case("W4", variant, pair, n, impl,
                            functools.partial(build, pair, n, variant, impl, device, dtype)))

    for pair in sizes["w4_shapes"]:
        tiny = pair == "tiny"
        # CPU: compiling BERT-base + an 8B-shaped layer costs minutes per variant; the compiled
        # rows run on the real MiniLM + SmolLM2 pair there (every pair on GPU)
        compiled = gpu or pair == "minilm+smollm2"
        for n in sizes["w4_sentences"]:
            for variant in ("train step", "inference"):
                impls = [i for i in W4_IMPLS if (compiled or "compile" not in i)
                         and (i != "pifi_fast_cudagraphs" or variant == "inference")
                         and (i != "pifi_fast_packed" or gpu)]
                if not tiny:
                    impls[1:1] = QUANT_IMPLS
                add(variant, pair, n, impls, build_w4)
        if sizes.get("w4_qa") and (gpu or pair != "bert-base+llama-3.1-8b"):
            # (CPU: 8 x 384 tokens through BERT-base and an 8B-shaped layer is ~15 s a step)
            impls = [i for i in W4_IMPLS if i not in GPU_ONLY_W4
                     and (compiled or "compile" not in i)]
            add("qa train step", pair, sizes["w4_qa"], impls, build_w4)
    return out


def w4_batch(pair, n, variant, impl, device, vocab):
    """(ids, mask, label keywords, real tokens) of one W4 batch: SST-2 sentence lengths (the
    authors pad to 100), or n full QA windows of QA_TOKENS tokens with start/end labels."""
    gen = torch.Generator().manual_seed(1)
    if variant == "qa train step":
        lengths, seq = [QA_TOKENS] * n, QA_TOKENS
    else:
        lengths = sst2_lengths(n, seed=n)
        if impl == "authors":  # padding='max_length', max_length=100
            lengths = [min(x, AUTHORS_MAX_LENGTH) for x in lengths]
        seq = AUTHORS_MAX_LENGTH if impl == "authors" else max(lengths)
    ids = torch.randint(1000 if vocab > 2000 else 5, vocab, (n, seq), generator=gen).to(device)
    mask = torch.zeros(n, seq, dtype=torch.long, device=device)
    for i, length in enumerate(lengths):
        mask[i, :length] = 1
    if variant == "qa train step":
        start = torch.randint(0, QA_TOKENS - 16, (n,), generator=gen)
        labels = {"start_positions": start.to(device),
                  "end_positions": (start + torch.randint(0, 16, (n,), generator=gen)).to(device)}
    else:
        labels = {"labels": torch.randint(0, 2, (n,), generator=gen).to(device)}
    return ids, mask, labels, sum(lengths)


def _w4_runner(models, impl, device):
    """(model, what to call, why not) for an implementation: the model eager, under
    torch.compile, or compiled with CUDA graphs as evaluation and predict() run it
    (pifi_base.inference_runner, mode="reduce-overhead"; GPU only, not yet run on one)."""
    base = impl.replace("_compiled", "").replace("_cudagraphs", "").replace("hf_compile",
                                                                            "hf_sdpa")
    model = models[base]
    if impl.endswith("_cudagraphs"):
        if device.type != "cuda":
            return model, None, "CUDA graphs need a GPU"
        return model, inference_runner(model, "cuda-graphs"), None
    if impl.endswith("_compiled") or impl == "hf_compile":
        # both compiled the same way (on a CPU: ATen's random numbers, see compile_model)
        return model, compile_model(model), None
    return model, model, None


def w4_precision(impl: str, dtype: torch.dtype) -> str:
    """The trainer's --precision for a W4 row: the run's dtype as autocast over the whole model
    (bf16 / fp16, as pifi-fast train runs it on a GPU; fp32 on the CPU by default), and fp32 for
    the authors' setup, fp32 by definition."""
    if impl == "authors":
        return "fp32"
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def build_w4(pair, n, variant, impl, device, dtype):
    task = "question_answering" if variant == "qa train step" else "classification"
    dtype_str = str(dtype).replace("torch.", "")
    try:
        models, vocab = pifi_models(pair, str(device), dtype_str, task)
        if impl in QUANT_IMPLS:  # built apart, when a row asks
            models = {impl: quant_model(pair, str(device), dtype_str,
                                         impl.removeprefix("pifi_fast_"))}
    except FileNotFoundError as exc:
        return {"skip": str(exc)}
    model, runner, why = _w4_runner(models, impl, device)
    if why:
        return {"skip": why}
    train = variant != "inference"
    ids, mask, labels, tokens = w4_batch(pair, n, variant, impl, device, vocab)
    model.train(train)
    # the whole model under the trainer's autocast (the SLM is most of a step: without it a GPU
    # row would time the SLM in fp32, which pifi-fast train never runs there); backward outside
    # it, as in the training loop (fp16's loss scaling is left out: one multiply)
    autocast, precision = precision_autocast(device, w4_precision(impl, dtype))

    def step():
        model.zero_grad(set_to_none=True)
        with autocast:
            loss = runner(input_ids=ids, attention_mask=mask, **labels).loss
        loss.backward()

    def infer():  # as predict() runs it: inference mode eager, no_grad compiled
        with torch.inference_mode(runner is model), torch.no_grad(), autocast:
            runner(input_ids=ids, attention_mask=mask)

    fn = step if train else infer
    out = {"dtype": "float32" if impl == "authors" else str(dtype).replace("torch.", ""),
           "precision": precision, "tokens": tokens}
    if impl.startswith("pifi_fast") and task == "classification":
        out["path"] = f"W4 {impl} classification: " + slm_path(model, impl, ids, mask)
    if device.type == "cpu":  # a step is seconds here: fewer repetitions keep W4 in budget
        out.update(reps=3, warmup=1)
    if "compile" in impl or "cudagraphs" in impl:
        out["warmup"] = 2  # the first calls compile (and capture); never timed as a rep
        # ...but the first call's wall time (compiling included) is the row's "first call"
        # (filled in when the warm-up runs; Inductor's on-disk cache can make it shorter)
        first, timed = {}, fn

        def fn():
            if "seconds" in first:
                return timed()
            t0 = time.perf_counter()
            timed()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            first["seconds"] = time.perf_counter() - t0

        out["first_call"] = first
    out["fn"] = fn
    return out


def slm_path(model, impl, ids, mask) -> str:
    """How a W4 pifi_fast row runs its SLM (PiFiModel.slm_mode for this batch: eager and
    compiled (pifi_base.compile_model) pack alike; under CUDA graphs the padded layout)."""
    mode = model.slm_mode({"input_ids": ids, "attention_mask": mask})
    if mode is not None and impl.endswith("_cudagraphs"):
        mode = "padded"
    return {"packed": "packed_slm, the real tokens only",
            "padded": "packed_slm on the padded layout (CUDA graphs; last layer for [CLS] only)",
            None: "the SLM's own forward"}[mode]

