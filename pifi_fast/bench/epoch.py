"""The W4 epoch rows: one whole SST-2 training epoch with evaluation, through pifi_fast.train
(optimizer, data loading and all), per implementation, eager and under torch.compile."""
from __future__ import annotations

import functools
import shutil
import tempfile

from transformers import AutoTokenizer

from pifi_fast import offline
from pifi_fast.bench.common import Case
from pifi_fast.bench.w4_step import GPU_ONLY_W4, W4_IMPLS, w4_precision
from pifi_fast.data import data_root, load_split
from pifi_fast.packed_slm import packs_by_default
from pifi_fast.training.config import TrainConfig
from pifi_fast.training.loop import train

SST2_TRAIN_SENTENCES = 6920


def cases(sizes, device, dtype) -> list[Case]:
    """The epoch rows of the size lists that ask for them (sizes["w4_epoch"]), on the real
    MiniLM + SmolLM2 pair; they follow the other W4 rows."""
    if not sizes.get("w4_epoch"):
        return []
    pair, n, variant = "minilm+smollm2", SST2_TRAIN_SENTENCES, "sst2 epoch"
    return [Case("W4", variant, pair, n, impl,
                 functools.partial(build_epoch, pair, n, variant, impl, device, dtype))
            for impl in W4_IMPLS if impl not in GPU_ONLY_W4]


def build_epoch(pair, n, variant, impl, device, dtype):
    """One whole SST-2 training epoch (6,920 sentences, batch 32, Adam) with its dev evaluation,
    through pifi_fast.train, timed once (its first compiled steps included: an epoch's wall
    time includes them)."""
    if not (data_root() / "sst2").is_dir():
        return {"skip": f"SST-2 not found under {data_root()}"}
    precision = w4_precision(impl, dtype)  # bench --dtype as the trainer's --precision
    options = {"pifi_fast": {}, "pifi_fast_compiled": {"compile": True},
               "hf_sdpa": {"implementation": "reference"},
               "hf_compile": {"implementation": "reference", "compile": True},
               "authors": {"authors_setup": True}}[impl]
    out_dir = tempfile.mkdtemp(prefix="pifi-epoch-")
    # the training loop's own seconds (no loading, evaluation or checkpoint), filled in by the
    # timed run: the row's JSON keeps it beside the whole epoch's wall time
    loop = {}

    def epoch():
        try:
            res = train(TrainConfig(data="sst2", slm="minilm", llm="smollm2", epochs=1,
                                    seed=1, batch_size=32, lr=5e-5, max_length=100,
                                    test_split=None, output_dir=out_dir, precision=precision,
                                    device=str(device), **options))
            loop["seconds"] = res["history"][0]["epoch_seconds"]
        finally:
            shutil.rmtree(out_dir, ignore_errors=True)

    path = {}
    if impl == "pifi_fast":
        path["path"] = ("W4 sst2 epoch pifi_fast: packed_slm=auto ("
                        + ("packed" if packs_by_default(device.type) else "the SLM's own forward")
                        + f" on {device.type})")
    return {"fn": epoch, "tokens": _sst2_train_tokens(), "reps": 1, "warmup": 0,
            "peak_memory": False, "training_loop": loop, **path,
            "dtype": "float32" if precision == "fp32" else str(dtype).replace("torch.", "")}


@functools.lru_cache(maxsize=1)
def _sst2_train_tokens() -> int:
    """Real tokens of one SST-2 training epoch under MiniLM's tokenizer (at most 100 each)."""
    tok = AutoTokenizer.from_pretrained(str(offline.minilm_dir()))
    texts = [r["text"] for r in load_split("sst2", "train")]
    return sum(len(ids) for ids in tok(texts, truncation=True, max_length=100)["input_ids"])
