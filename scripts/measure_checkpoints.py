"""Size and save time of full against lean checkpoints, BERT-base + a Llama-3.1-8B-shaped frozen
layer (random weights, bf16, written once as a one-layer Hugging Face folder so that a lean
checkpoint can reference it). CPU, about 1.5 GB of disk in a temporary folder:

    python scripts/measure_checkpoints.py
"""
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import BertConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pifi_fast import PiFiModel  # noqa: E402
from pifi_fast.bench.workloads import llm_config  # noqa: E402
from pifi_fast.loading import random_layer  # noqa: E402


def main():
    tmp = Path(tempfile.mkdtemp())
    try:
        cfg = llm_config("llama-3.1-8b")
        layer = random_layer(cfg, 0, dtype=torch.bfloat16, seed=0)
        src = tmp / "llama-8b-one-layer"
        src.mkdir()
        cfg.save_pretrained(src)
        save_file({f"model.layers.0.{k}": v.contiguous() for k, v in
                   layer.module.state_dict().items()}, str(src / "model.safetensors"))
        del layer
        model = PiFiModel.from_parts(BertConfig(), str(src), llm_dtype=torch.bfloat16, seed=0)
        rows = {}
        for kind in ("full", "reference"):
            t0 = time.perf_counter()
            out = model.save_pretrained(tmp / kind, frozen_layer=kind)
            seconds = time.perf_counter() - t0
            size = sum(p.stat().st_size for p in out.iterdir())
            t0 = time.perf_counter()
            PiFiModel.from_pretrained(out)
            rows[kind] = {"bytes": size, "save_s": round(seconds, 2),
                          "load_s": round(time.perf_counter() - t0, 2)}
        print(json.dumps(rows, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
