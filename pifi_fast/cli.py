"""pifi-fast command line.

  pifi-fast demo   offline PiFi on real small models (all-MiniLM-L6-v2 + SmolLM2-135M's last
                   layer): a few training steps on SST-2 sentences, the fast model checked
                   against the reference, and the frozen layer's step time against it
  pifi-fast info   versions, extension and device status

`train`, `eval` and `bench` arrive with the training and benchmark issues; they are not
registered until they exist.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
from pathlib import Path

import torch

BUILTIN_SENTENCES = [  # used only when the SST-2 copy in ../shared/data is absent
    (1, "a gripping , beautifully shot film ."), (0, "dull , lifeless and far too long ."),
    (1, "the lead performance is a joy to watch ."), (0, "a mess of a script ."),
    (1, "funny , warm and surprisingly wise ."), (0, "i wanted my two hours back ."),
    (1, "one of the year 's best ."), (0, "the jokes land with a thud ."),
]


def _sst2_rows(limit: int):
    root = Path(os.environ.get("PIFI_FAST_DATA",
                               Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))
    path = root / "sst2" / "stsa.binary.train"
    if not path.is_file():
        return BUILTIN_SENTENCES * (limit // len(BUILTIN_SENTENCES) + 1), "built-in sentences"
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            label, text = line.rstrip("\n").split(" ", 1)
            rows.append((int(label), text))
            if len(rows) == limit:
                break
    return rows, str(path.resolve())


def _time_layer(model, h, mask, repeats=3):
    """Median seconds of forward + input-gradient backward through the frozen layer alone."""
    times = []
    for _ in range(repeats + 1):
        x = h.detach().requires_grad_()
        t0 = time.perf_counter()
        model._run_layer(x, mask).sum().backward()
        times.append(time.perf_counter() - t0)
    return sorted(times[1:])[len(times[1:]) // 2]


def demo(args) -> int:
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from pifi_fast import PiFiModel, load_llm_layer, reference
    from pifi_fast._ext import HAS_EXTENSION
    from pifi_fast.offline import minilm_dir, smollm2_gguf

    torch.manual_seed(args.seed)
    slm_dir, gguf = minilm_dir(), smollm2_gguf()
    print(f"SLM: all-MiniLM-L6-v2 ({slm_dir})")
    print(f"LLM: SmolLM2-135M-Instruct GGUF ({gguf}), last layer")
    t0 = time.perf_counter()
    llm = load_llm_layer(gguf, layer=-1)
    print(f"  loaded layer {llm.index} of {llm.config.num_hidden_layers} in "
          f"{time.perf_counter() - t0:.1f}s (only that block's tensors were dequantized)")
    tok = AutoTokenizer.from_pretrained(slm_dir)
    rows, source = _sst2_rows(args.steps * args.batch_size)
    print(f"data: {len(rows)} sentences from {source}")

    fast = PiFiModel.from_parts(str(slm_dir), copy.deepcopy(llm), task="classification",
                                num_labels=2, label_smoothing=0.05)
    ref = reference.PiFiModel.from_parts(str(slm_dir), llm, task="classification", num_labels=2)
    ref.load_state_dict(fast.state_dict())
    print(f"pifi_fast: fused layer={fast.fused}, compiled extension={HAS_EXTENSION}")

    opt = torch.optim.Adam([p for p in fast.parameters() if p.requires_grad], lr=5e-5)
    fast.train()
    bar = tqdm(range(args.steps), desc="train (PiFi, fused layer)", unit="step")
    for step in bar:
        chunk = rows[step * args.batch_size:(step + 1) * args.batch_size]
        enc = tok([t for _, t in chunk], padding=True, truncation=True, max_length=100,
                  return_tensors="pt")
        out = fast(**enc, labels=torch.tensor([y for y, _ in chunk]))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(fast.parameters(), 5.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{out.loss.item():.4f}")

    # The same weights in the reference: logits must agree (eval mode: no dropout).
    ref.load_state_dict(fast.state_dict())
    fast.eval(), ref.eval()
    enc = tok([t for _, t in rows[:16]], padding=True, return_tensors="pt")
    with torch.no_grad():
        a, b = fast(**enc).logits, ref(**enc).logits
    err = ((a - b).norm() / b.norm()).item()
    print(f"fast vs reference logits after training: relative error {err:.2e}")

    # Frozen layer alone, full-sequence mode on this batch (seq {S}), fp32 on this device.
    with torch.no_grad():
        h = fast.adapter_in(fast.slm(**enc).last_hidden_state)
    mask = enc["attention_mask"] != 0
    t_fast = _time_layer(fast, h, mask)
    t_ref = _time_layer(ref, h, mask)
    print(f"frozen layer fwd+bwd, batch {tuple(h.shape[:2])}, {h.device.type}: "
          f"pifi_fast {t_fast * 1e3:.1f} ms, reference {t_ref * 1e3:.1f} ms "
          f"(x{t_ref / t_fast:.2f}; a demo timing, not a benchmark)")
    return 0 if err <= 1e-4 else 1


def info(args) -> int:
    import transformers

    from pifi_fast import __version__
    from pifi_fast._ext import EXTENSION_WITH_CUDA, HAS_EXTENSION

    print(f"pifi_fast {__version__}; python {platform.python_version()}; torch {torch.__version__}"
          f"; transformers {transformers.__version__}")
    print(f"compiled extension: {HAS_EXTENSION} (CUDA kernels: {EXTENSION_WITH_CUDA})")
    print(f"CUDA device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="pifi-fast", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="offline PiFi demo on real small models")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=demo)
    sub.add_parser("info", help="versions, extension and device").set_defaults(func=info)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
