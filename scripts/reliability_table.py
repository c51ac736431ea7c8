"""Try every bad input of docs/reliability.md for real and print the Markdown table of what each
one gets (the doc's table is this script's output). CPU, a minute or so:

    python scripts/reliability_table.py > /tmp/table.md
"""
import json
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import ragged_batch, tiny_llm, tiny_slm  # noqa: E402

from pifi_fast import PiFiModel, load_llm_layer  # noqa: E402


def outcome(fn):
    try:
        result = fn()
    except Exception as exc:  # the point: record what a user sees
        msg = str(exc).splitlines()[0] if str(exc) else ""
        return f"`{type(exc).__name__}`: {msg}"
    return f"works ({result})" if result else "works"


def main():
    tmp = Path(tempfile.mkdtemp())
    rows = []
    model = PiFiModel.from_parts(tiny_slm("bert"), tiny_llm("llama"), num_labels=2, seed=0)
    qa = PiFiModel.from_parts(tiny_slm("bert"), tiny_llm("llama"), task="qa", seed=0)
    ids, mask = ragged_batch(120, [5, 3, 4])

    def with_id(v):
        bad = ids.clone()
        bad[1, 2] = v
        return model(input_ids=bad, attention_mask=mask)

    rows.append(("token id >= the SLM's vocabulary", outcome(lambda: with_id(120))))
    rows.append(("negative token id", outcome(lambda: with_id(-1))))
    rows.append(("label >= num_labels", outcome(
        lambda: model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 5, 1])))))
    emb = model.slm.get_input_embeddings()(ids)
    emb[0, 1] = float("nan")
    finite = bool(torch.isfinite(model(inputs_embeds=emb, attention_mask=mask).logits).all())
    rows.append(("NaN in the inputs", ("finite logits?! " if finite else "NaN logits, no error "
                 "in inference (a check per batch would cost a GPU sync); in training the "
                 "non-finite guard stops the run (`NonFiniteError` naming epoch, step and "
                 "examples), see the faults below")))
    bad_mask = mask.clone()
    bad_mask[2] = 0
    rows.append(("a row with no real token", outcome(
        lambda: model(input_ids=ids, attention_mask=bad_mask))))
    rows.append(("attention_mask of another shape", outcome(
        lambda: model(input_ids=ids, attention_mask=mask[:, :2]))))
    rows.append(("float token ids", outcome(lambda: model(input_ids=ids.float(),
                                                          attention_mask=mask))))
    long_ids = torch.randint(3, 120, (1, 65))
    rows.append(("sequence longer than the LLM's positions (full-sequence task)", outcome(
        lambda: qa(input_ids=long_ids, attention_mask=torch.ones_like(long_ids)))))
    rows.append(("layer input of another dtype, no autocast", outcome(
        lambda: model.llm_layer(torch.randn(1, 2, 72, dtype=torch.float64)))))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rows.append(("fp32 layer under bf16 autocast (was: `frozen_linear: x is BFloat16 but "
                     "weight is Float`)", outcome(lambda: "logits " + str(
                         model(input_ids=ids, attention_mask=mask).logits.dtype))))

    # files
    from transformers import AutoModelForCausalLM

    folder = tmp / "llama"
    AutoModelForCausalLM.from_config(tiny_llm("llama")).save_pretrained(folder,
                                                                        max_shard_size="60KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    rows.append(("layer index out of range", outcome(lambda: load_llm_layer(folder, layer=5))))
    cut = tmp / "cut"
    shutil.copytree(folder, cut)
    shard = cut / index["model.layers.2.mlp.down_proj.weight"]
    shard.write_bytes(shard.read_bytes()[:-100])
    rows.append(("safetensors shard cut short by 100 bytes", outcome(lambda: load_llm_layer(cut))))
    gone = tmp / "gone"
    shutil.copytree(folder, gone)
    (gone / index["model.layers.2.mlp.down_proj.weight"]).unlink()
    rows.append(("index pointing to a missing shard", outcome(lambda: load_llm_layer(gone))))
    shape = tmp / "shape"
    shutil.copytree(folder, shape)
    cfg = json.loads((shape / "config.json").read_text())
    cfg["intermediate_size"] = 64
    (shape / "config.json").write_text(json.dumps(cfg))
    rows.append(("config whose shapes do not match the tensors", outcome(
        lambda: load_llm_layer(shape))))
    try:
        from pifi_fast.offline import smollm2_gguf

        gguf = tmp / "cut.gguf"
        with open(smollm2_gguf(), "rb") as f:
            gguf.write_bytes(f.read(5 * 1024 * 1024))
        rows.append(("GGUF file cut at 5 MB (was: numpy's bare `cannot reshape array of size "
                     "... into shape (49152,612)`)", outcome(lambda: load_llm_layer(gguf))))
    except (ImportError, FileNotFoundError):
        pass
    garbage = tmp / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file" * 100)
    rows.append(("garbage GGUF", outcome(lambda: load_llm_layer(garbage))))
    model.save_pretrained(tmp / "ckpt")
    weights = tmp / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    rows.append(("saved model whose weights file is cut", outcome(
        lambda: PiFiModel.from_pretrained(tmp / "ckpt"))))

    # labels
    from pifi_fast import data as data_mod

    vocab = data_mod.label_vocabulary([{"label": v} for v in ("10", "2", "1")])
    rows.append(("csv labels `10`, `2`, `1` (were ordered as strings)", f"classes {vocab}"))
    rows.append(("label spelled `1`, `\"1\"`, `1.0` against a model trained on int 1", outcome(
        lambda: [data_mod.encode_label({0: 0, 1: 1}, v) for v in (1, "1", 1.0)])))
    rows.append(("a label the model never saw", outcome(
        lambda: data_mod.encode_label({0: 0, 1: 1}, "7", "row 3 of test"))))

    print("| bad input | what happens now |\n|---|---|")
    for what, got in rows:
        got = got.replace(str(tmp), "…").replace("|", "\\|")
        print(f"| {what} | {got} |")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        sys.exit(1)
