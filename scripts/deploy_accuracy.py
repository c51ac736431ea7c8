"""The accuracy cost of 8-bit CPU inference on SST-2 dev, over 3 training seeds.

For each seed: fine-tune MiniLM + SmolLM2's last layer on SST-2 (pifi_fast.train), then score
the dev split (872 sentences) with the same trained weights run six ways: pifi_fast fp32,
pifi_fast with the frozen layer in int8-channel (torch's weight-only int8 GEMM on the CPU) and
in bf16, the reference PiFi, the ONNX export under ONNX Runtime fp32, and ONNX Runtime's
dynamic int8 quantization of the whole graph (SLM included). Writes results.json and
results.md into --out.

    python scripts/deploy_accuracy.py --out benchmarks/results/cpu-2026-12-02-deploy-accuracy
    (about 2-3 minutes per seed on 2 quiet CPU cores with --limit-train 2048)
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from pifi_fast import PiFiModel
from pifi_fast.data import load_split, normalize_label
from pifi_fast.export import export_model, load_exported, reference_twin
from pifi_fast.train import TrainConfig, train

WAYS = ("pifi_fast fp32", "pifi_fast int8-channel layer", "pifi_fast bf16 layer",
        "reference fp32", "ONNX Runtime fp32", "ONNX Runtime int8 (dynamic, whole graph)")


def accuracy(predict, rows, batch: int = 64) -> float:
    right = 0
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        preds = predict([r["text"] for r in chunk])
        right += sum(normalize_label(p["label"]) == normalize_label(r["label"])
                     for p, r in zip(preds, chunk))
    return right / len(rows)


def one_seed(seed: int, limit_train: int | None, workdir: Path) -> dict:
    out = workdir / f"seed{seed}"
    t0 = time.perf_counter()
    train(TrainConfig(data="sst2", slm="minilm", llm="smollm2", epochs=1, seed=seed,
                      limit_train=limit_train, test_split=None, output_dir=str(out)))
    train_s = time.perf_counter() - t0
    ckpt = out / "best"
    rows = load_split("sst2", "dev")
    scores = {}
    fp32 = PiFiModel.from_pretrained(ckpt).eval()
    scores["pifi_fast fp32"] = accuracy(fp32.predict, rows)
    int8 = PiFiModel.from_pretrained(ckpt, weights="int8-channel").eval()
    scores["pifi_fast int8-channel layer"] = accuracy(int8.predict, rows)
    bf16 = PiFiModel.from_pretrained(ckpt, layer_dtype="bfloat16").eval()
    scores["pifi_fast bf16 layer"] = accuracy(bf16.predict, rows)
    ref = reference_twin(fp32)  # the reference class with the same weights
    scores["reference fp32"] = accuracy(ref.predict, rows)
    export_model(fp32, out / "onnx", format="onnx", quantize="int8", progress=lambda _: None)
    scores["ONNX Runtime fp32"] = accuracy(load_exported(out / "onnx").predict, rows)
    scores["ONNX Runtime int8 (dynamic, whole graph)"] = accuracy(
        load_exported(out / "onnx", int8=True).predict, rows)
    return {"seed": seed, "train_seconds": train_s, "dev_sentences": len(rows),
            "accuracy": scores}


def markdown(results: list[dict], limit_train) -> str:
    lines = ["# The accuracy cost of 8-bit CPU inference (SST-2 dev, 3 seeds)", "",
             f"MiniLM + SmolLM2's last layer fine-tuned 1 epoch on "
             f"{limit_train or 'all'} SST-2 training sentences per seed (pifi_fast.train "
             "defaults otherwise), then the same weights scored on SST-2 dev "
             f"({results[0]['dev_sentences']} sentences) six ways. Command: "
             "`python scripts/deploy_accuracy.py --out DIR`.", "",
             "| way | " + " | ".join(f"seed {r['seed']}" for r in results)
             + " | mean | change vs fp32 |", "|---|" + "---|" * (len(results) + 2)]
    base = statistics.mean(r["accuracy"]["pifi_fast fp32"] for r in results)
    for way in WAYS:
        vals = [r["accuracy"][way] for r in results]
        mean = statistics.mean(vals)
        lines.append(f"| {way} | " + " | ".join(f"{v:.4f}" for v in vals)
                     + f" | {mean:.4f} | {100 * (mean - base):+.2f} points |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for results.json / results.md")
    parser.add_argument("--seeds", default="1,2,3", help="(default: %(default)s)")
    parser.add_argument("--limit-train", type=int, default=2048,
                        help="training sentences per seed (0: all 6,920) (default: %(default)s)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    limit = args.limit_train or None
    results = []
    with tempfile.TemporaryDirectory(prefix="pifi-deploy-acc-") as work:
        for seed in tqdm([int(s) for s in args.seeds.split(",")], desc="seeds", unit="seed"):
            results.append(one_seed(seed, limit, Path(work)))
            (out / "results.json").write_text(json.dumps(
                {"limit_train": limit, "results": results}, indent=1))
    (out / "results.md").write_text(markdown(results, limit))
    print(markdown(results, limit))


if __name__ == "__main__":
    main()
