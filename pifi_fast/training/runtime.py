"""Where a run executes: the device's precision (autocast), the processes of a distributed run,
the random state (seeding, saving and restoring it), batches moved to the device, peak memory."""
from __future__ import annotations

import os
import random
import resource

import numpy as np
import torch
import torch.distributed as dist


def dist_setup():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def barrier(world):
    if world > 1:
        dist.barrier()


# -- RNG state ------------------------------------------------------------------------------------
def seed_everything(seed: int):
    random.seed(seed)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def rng_state():
    """The random state of Python, NumPy and torch (CPU and every CUDA device) as tensors and
    plain values only, so that a checkpoint holding it loads with torch.load(weights_only=True)
    (NumPy's own state holds an ndarray, which that refuses)."""
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state = {"python": {"version": version, "gauss_next": gauss_next,
                        "internal": torch.tensor(internal, dtype=torch.int64)},
             "numpy": {"bit_generator": str(name), "pos": int(pos), "has_gauss": int(has_gauss),
                       "cached_gaussian": float(cached_gaussian),
                       "keys": torch.from_numpy(keys.astype(np.int64))},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Restores rng_state(); also the layout runs wrote before it (Python's state as its tuple,
    no NumPy state: NumPy's stays as seeded)."""
    python = state["python"]
    if isinstance(python, dict):
        python = (python["version"], tuple(python["internal"].tolist()), python["gauss_next"])
    random.setstate(python)
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state((n["bit_generator"], n["keys"].numpy().astype(np.uint32), n["pos"],
                             n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def precision_autocast(device: torch.device, precision: str):
    """(the autocast context the model's forward runs in, the resolved precision) for
    --precision: what training, evaluation and the W4 benchmark rows run under."""
    if precision == "auto":
        if device.type != "cuda":
            precision = "fp32"
        else:
            # bf16 from Ampere (sm_80) on; a T4 (sm_75) only emulates it: fp16 with loss scaling
            major = torch.cuda.get_device_capability(device)[0]
            precision = "bf16" if major >= 8 else "fp16"
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False), precision
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype), precision


def to_device(batch, device, compiled: bool = False):
    """The model's inputs of a collated batch on ``device``. ``compiled``: for a compiled
    runner, the batch and length dimensions are marked dynamic from the first call, so Dynamo
    compiles one graph (per training / evaluation) instead of a static one first, then a
    dynamic one at the next length and again at the first smaller batch (each 30-40 s on 2 CPU
    cores; maybe_mark_dynamic stays static where the model needs a fixed size)."""
    out = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()
           if not k.startswith("_")}
    if compiled:
        for v in out.values():
            if torch.is_tensor(v):
                for dim in range(min(v.dim(), 2)):
                    torch._dynamo.maybe_mark_dynamic(v, dim)
    return out


def peak_memory(device: torch.device) -> int:
    """The run's peak memory: CUDA memory allocated on a GPU, the process's peak resident set
    on the CPU (which includes the Python runtime and libraries)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB
