"""Peak memory of one forward + input-gradient backward at the Llama-3.1-8B layer shape in bf16,
on CPU: the Hugging Face layer (SDPA) against the fused layer per memory mode and MLP chunk size.

    python benchmarks/peak_memory_cpu.py --tokens 2048 --chunks none auto 512

Peak = the process's peak resident set above its size before the step (Linux; see
pifi_fast.bench.timing.peak_memory), so malloc caching blurs it by some tens of MB: compare
ratios, and repeat a run before trusting a small difference. The GPU figure (CUDA allocator
statistics) comes from `pifi-fast bench` on a GPU.
"""
import argparse
import sys

import torch

from pifi_fast.bench.timing import peak_memory
from pifi_fast.bench.workloads import llm_config
from pifi_fast.hf_layer import run_hf_layer
from pifi_fast.frozen.module import FrozenLlamaLayer
from pifi_fast.loading import random_layer


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2048, help="rows of 512 tokens, no padding")
    p.add_argument("--chunks", nargs="+", default=["none", "auto"])
    args = p.parse_args()
    cfg = llm_config("llama-3.1-8b")
    cfg._attn_implementation = "sdpa"
    hf = random_layer(cfg, 0, dtype=torch.bfloat16, seed=0)
    x = torch.randn(max(1, args.tokens // 512), min(512, args.tokens), cfg.hidden_size,
                    dtype=torch.bfloat16)
    grad = torch.randn_like(x)
    cpu = torch.device("cpu")

    def step(run):
        leaf = x.clone().requires_grad_()
        run(leaf).backward(grad)

    results = {"hf_sdpa": peak_memory(lambda: step(
        lambda h: run_hf_layer(hf.module, hf.rotary, h, None)), cpu)}
    for recompute in ("none", "mlp"):
        for chunk in args.chunks:
            chunk_tokens = None if chunk == "none" else chunk if chunk == "auto" else int(chunk)
            layer = FrozenLlamaLayer.from_hf(hf.module, cfg, hf.rotary, recompute=recompute,
                                             chunk_tokens=chunk_tokens)
            results[f"pifi_fast recompute={recompute} chunk_tokens={chunk}"] = peak_memory(
                lambda: step(layer), cpu)
    if results["hf_sdpa"] is None:
        sys.exit("peak memory is not measurable here (needs Linux /proc/self/clear_refs)")
    print(f"{x.shape[0] * x.shape[1]} tokens, Llama-3.1-8B layer shape, bf16, CPU")
    for name, peak in results.items():
        print(f"{name:45s} {peak / 2**20:8.0f} MiB   x{peak / results['hf_sdpa']:.2f} of HF")


if __name__ == "__main__":
    main()
