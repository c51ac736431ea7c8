"""The frozen layer under FSDP, replicated or sharded: bytes per rank and time per training step
with two processes (gloo, CPU), for `pifi-fast train --distributed fsdp`'s choice.

    python benchmarks/fsdp_frozen_layer.py --steps 10                  # MiniLM + SmolLM2's layer
    python benchmarks/fsdp_frozen_layer.py --slm DIR --llm DIR --steps 10

Both modes shard the SLM's blocks, the adapters and the head the same way
(pifi_fast.training.sharding.shard_model); "shard" makes the frozen layer an FSDP unit of its
own, gathered before its forward and again before its backward (the fused op's input gradient
reads the weights), "replicate" leaves it whole on every rank. Each mode trains the same
batches from the same weights; the table gives rank 0's bytes (the ranks differ by at most a
row of each tensor), the median step time over --steps steps after two warm-up steps, and the
last loss (the two modes compute the same thing: their losses agree to rounding).
"""
import argparse
import copy
import json
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pifi_fast.train import TrainConfig, build_model, make_optimizer
from pifi_fast.training import sharding


def _worker(rank, world, port, args, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = TrainConfig(slm=args.slm, llm=args.llm, packed_slm="false", no_dropout=True, seed=0)
    built = build_model(cfg, num_labels=2)
    gen = torch.Generator().manual_seed(0)
    global_ids = torch.randint(1000, 2000, (args.batch, args.length), generator=gen)
    labels = torch.arange(args.batch) % 2
    mine = slice(rank, None, world)  # each rank its share of the same global batch
    batch = dict(input_ids=global_ids[mine], attention_mask=torch.ones_like(global_ids[mine]),
                 labels=labels[mine])
    rows = {}
    for mode in ("replicate", "shard"):
        model = copy.deepcopy(built)
        sharding.shard_model(model, "fp32", shard_frozen_layer=mode == "shard")
        opt = make_optimizer([p for p in model.parameters() if p.requires_grad], 1e-4)
        times = []
        for step in range(args.steps + 2):
            dist.barrier()
            t0 = time.perf_counter()
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            dist.barrier()
            if step >= 2:
                times.append(time.perf_counter() - t0)
        total = loss.detach().clone()
        dist.all_reduce(total)
        rows[mode] = {**sharding.rank_memory(model, opt),
                      "step_seconds_median": statistics.median(times),
                      "loss": total.item() / world}
        del model, opt
    if rank == 0:
        with open(out, "w") as f:
            json.dump(rows, f, indent=2)
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slm", default="minilm")
    p.add_argument("--llm", default="smollm2")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=16, help="global batch (rows)")
    p.add_argument("--length", type=int, default=32, help="tokens per row")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--out", default="fsdp_frozen_layer.json")
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, args, args.out), nprocs=2, join=True)
    rows = json.load(open(args.out))
    print(f"{args.slm} + {args.llm}, 2 gloo processes x {args.threads} thread(s), global batch "
          f"{args.batch} x {args.length} tokens, fp32\n")
    print("| frozen layer | trained params / rank | frozen layer / rank | Adam state / rank "
          "| step (median) | last loss |")
    print("|---|---|---|---|---|---|")
    for mode, r in rows.items():
        print(f"| {mode} | {r['trained_parameter_bytes'] / 1e6:.1f} MB "
              f"| {r['frozen_layer_bytes'] / 1e6:.1f} MB "
              f"| {r['optimizer_state_bytes'] / 1e6:.1f} MB "
              f"| {r['step_seconds_median'] * 1e3:.0f} ms | {r['loss']:.6f} |")


if __name__ == "__main__":
    main()
