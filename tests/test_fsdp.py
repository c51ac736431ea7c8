"""`pifi-fast train --distributed fsdp` with two gloo processes on the CPU and tiny real models:
the same losses and model as one process, the frozen layer outside gradients and optimizer,
per-rank memory halved, a killed rank reported by the other, --resume to the same weights."""
import copy
import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import save_tiny_run_models, write_cue_word_data
from safetensors.torch import load_file

from pifi_fast.train import TrainConfig, train
from pifi_fast.training import loop, sharding

pytest.importorskip("pifi_fast.offline")
ROOT = Path(__file__).resolve().parent.parent

# Two epochs of 10 global batches of 8 (4 per rank): 20 optimizer steps.
STEPS = 20
# Bound on |loss| and weight differences between one and two processes. Both compute the same
# math; the order of fp32 additions differs (each rank sums its 4 rows' losses, and the gradient
# is reduce-scattered as the mean of two 4-row means instead of one 8-row mean), so each step
# differs by a few fp32 ulps (1.2e-7 relative). Adam divides by sqrt(v), so a rounding-level
# gradient difference becomes a rounding-level update difference, and over 20 steps of
# lr 1e-3 it stays orders of magnitude below anything a real change in the computation moves:
# a rank's half of the batch missing from the gradient, or a rank stepping on its own gradient,
# changes the first step's update by up to lr = 1e-3. (Adam's update does not depend on the
# gradient's scale, so a sum where a mean belongs would pass: the gradient clipping at 5 is the
# only place it shows.) Seen here: 1.2e-7 on the losses, 3.0e-7 on the weights.
LOSS_TOL = 1e-5
WEIGHT_TOL = 1e-5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    models = save_tiny_run_models(root / "models")
    data = write_cue_word_data(root / "data", {"train": 80, "dev": 16, "test": 16})
    cfg = TrainConfig(data=data, slm=models["bert"], llm=models["llama"], epochs=2, batch_size=8,
                      lr=1e-3, no_dropout=True, test_split=None, seed=3,
                      output_dir=str(root / "fsdp"), distributed="fsdp")
    return root, cfg


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _recording_step(record: dict):
    """loop.optimizer_step, recording each step's loss and whether any frozen-layer parameter
    had a gradient or sat in the optimizer when the step ran."""
    real = loop.optimizer_step

    def step(model, optimizer, *args, **kwargs):
        frozen = {id(p) for p in model.llm_layer.parameters()}
        record["loss"].append(float(args[2].detach()))  # (scaler, clip, loss, world)
        record["frozen_grad"] |= any(p.grad is not None for p in model.llm_layer.parameters())
        record["frozen_in_optimizer"] |= any(id(p) in frozen for g in optimizer.param_groups
                                             for p in g["params"])
        return real(model, optimizer, *args, **kwargs)

    return step


def _worker(rank, world, port, cfg_dict, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    record = {"loss": [], "frozen_grad": False, "frozen_in_optimizer": False}
    loop.optimizer_step = _recording_step(record)
    res = train(TrainConfig(**cfg_dict))
    record["rank_memory"] = res["rank_memory"]
    Path(f"{out}.{rank}.json").write_text(json.dumps(record))
    import torch.distributed as dist

    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_run(setup):
    """The 2-process FSDP run, uninterrupted: its per-rank records, and its output folder."""
    import torch.multiprocessing as mp

    root, cfg = setup
    out = str(root / "record")
    mp.spawn(_worker, args=(2, _free_port(), dataclasses.asdict(cfg), out), nprocs=2,
             join=True)
    return [json.loads(Path(f"{out}.{r}.json").read_text()) for r in (0, 1)], cfg


@pytest.mark.slow  # over 2 s on 2 cores: not in make check
def test_two_process_fsdp_matches_one_process(two_process_run, monkeypatch, setup):
    """Same global batch and seed: the first 20 losses (the mean of the two ranks' half-batch
    losses) and the saved model equal a one-process run's within fp32 reduction rounding; the
    frozen layer never has a gradient nor a place in the optimizer; each rank holds half the
    trained parameters and half of Adam's moments."""
    (r0, r1), cfg = two_process_run
    root, _ = setup
    torch.set_num_threads(1)
    record = {"loss": [], "frozen_grad": False, "frozen_in_optimizer": False}
    monkeypatch.setattr(loop, "optimizer_step", _recording_step(record))
    single_dir = root / "single"
    single = train(dataclasses.replace(cfg, distributed="ddp", output_dir=str(single_dir)))

    assert len(r0["loss"]) == len(r1["loss"]) == len(record["loss"]) == STEPS
    two = [(a + b) / 2 for a, b in zip(r0["loss"], r1["loss"])]  # equal halves of each batch
    worst = max(abs(a - b) for a, b in zip(two, record["loss"]))
    assert worst <= LOSS_TOL, (worst, two, record["loss"])
    print(f"worst loss difference over {STEPS} steps: {worst:.1e}")
    for r in (r0, r1, record):
        assert not r["frozen_grad"] and not r["frozen_in_optimizer"]

    fsdp_dir = Path(cfg.output_dir)
    for name in ("checkpoint-last", "best"):  # the files a one-process run writes, and loadable
        assert sorted(p.name for p in (fsdp_dir / name).iterdir()) == \
            sorted(p.name for p in (single_dir / name).iterdir())
    a = load_file(str(fsdp_dir / "checkpoint-last" / "model.safetensors"))
    b = load_file(str(single_dir / "checkpoint-last" / "model.safetensors"))
    assert a.keys() == b.keys() and not any(k.startswith("llm_layer.") for k in a)  # lean
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= WEIGHT_TOL, worst
    print(f"worst weight difference: {worst:.1e}")
    from pifi_fast import PiFiModel

    loaded = PiFiModel.from_pretrained(fsdp_dir / "best")  # one process, no process group
    assert loaded.llm_layer.state_dict().keys() == single["model"].llm_layer.state_dict().keys()

    state = torch.load(fsdp_dir / "checkpoint-last" / "trainer_state.pt", weights_only=True)
    assert state["layout"] == "fsdp"
    assert state["optimizer"]["state"] and not any(
        k.startswith("llm_layer.") for k in state["optimizer"]["state"])

    full = single["rank_memory"]
    for r in (r0, r1):  # every trained tensor's rows split in two (odd sizes: one row apart)
        half = r["rank_memory"]
        assert abs(half["trained_parameter_bytes"] - full["trained_parameter_bytes"] / 2) \
            <= 0.01 * full["trained_parameter_bytes"]
        assert abs(half["optimizer_state_bytes"] - full["optimizer_state_bytes"] / 2) \
            <= 0.01 * full["optimizer_state_bytes"]
        assert half["frozen_layer_bytes"] == full["frozen_layer_bytes"] > 0  # replicated

    with pytest.raises(ValueError, match="resume it with --distributed fsdp"):
        train(dataclasses.replace(cfg, distributed="ddp", resume=True))


def _cli_flags(cfg: TrainConfig) -> list[str]:
    flags = []
    for key in ("data", "slm", "llm", "epochs", "batch_size", "lr", "seed", "output_dir",
                "distributed"):
        flags += ["--" + key.replace("_", "-"), str(getattr(cfg, key))]
    return flags + ["--no-dropout", "--test-split", "none"]


def _launch(cfg: TrainConfig, fault_rank=None, fault="", extra=()):
    """Two `python -m pifi_fast.cli train` processes as torchrun would start them (rank, world
    size and rendezvous in the environment); rank fault_rank with PIFI_FAST_FAULT=fault."""
    port = _free_port()
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                   LOCAL_RANK=str(rank), WORLD_SIZE="2", OMP_NUM_THREADS="1",
                   PIFI_FAST_FAULT=fault if rank == fault_rank else "")
        env.pop("PIFI_FAST_DEBUG", None)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "pifi_fast.cli", "train", *_cli_flags(cfg), *extra],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]


@pytest.mark.slow  # over 2 s on 2 cores: not in make check
def test_a_killed_rank_stops_the_other_with_a_clear_error_and_resume_continues(
        two_process_run, setup):
    """Rank 1 SIGKILLed in the second epoch: rank 0 ends with one line naming the lost peer
    and the checkpoint to resume from; --resume on both ranks finishes the run with the
    uninterrupted run's weights, bit for bit."""
    _, straight = two_process_run
    root, _ = setup
    cfg = dataclasses.replace(straight, output_dir=str(root / "killed"))
    (rc0, _, err0), (rc1, _, _) = _launch(cfg, fault_rank=1, fault="step:15")
    assert rc1 == -9  # SIGKILL
    assert rc0 == 1, err0[-2000:]
    line = err0.strip().splitlines()[-1]
    assert line.startswith("pifi-fast train: error: rank 0: another process of this 2-process "
                           "run stopped"), line
    assert f"{cfg.output_dir}/checkpoint-last" in line and "--resume" in line

    (rc0, out0, err0), (rc1, _, err1) = _launch(cfg, extra=["--resume"])
    assert rc0 == 0 and rc1 == 0, (err0[-2000:], err1[-2000:])
    assert "resumed from" in out0 + err0
    results = json.loads((root / "killed" / "results.json").read_text())
    assert [h["epoch"] for h in results["history"]] == [1, 2]
    a = load_file(str(root / "killed" / "checkpoint-last" / "model.safetensors"))
    b = load_file(str(Path(straight.output_dir) / "checkpoint-last" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_fsdp_needs_several_processes_and_says_what_is_not_supported(setup):
    _, cfg = setup
    with pytest.raises(ValueError, match="torchrun --nproc-per-node"):
        train(cfg)  # one process
    for change, words in ((dict(lora_r=8), "LoRA"), (dict(compile=True), "--compile"),
                          (dict(task="seq2seq"), "seq2seq"), (dict(freeze=False), "frozen"),
                          (dict(packed_slm="true"), "--packed-slm")):
        with pytest.raises(ValueError, match=words):
            sharding.check_supported(dataclasses.replace(cfg, **change), "fp32", 2)
    with pytest.raises(ValueError, match="--precision bf16"):
        sharding.check_supported(cfg, "fp16", 2)
    with pytest.raises(ValueError, match="distributed must be"):
        train(dataclasses.replace(cfg, distributed="zero3"))


def test_the_slm_blocks_are_the_units_and_checkpointing_recomputes_them(setup):
    """slm_blocks finds BERT's layers; --activation-checkpointing runs each block's forward
    twice per step (once more in backward) and gives the same gradients."""
    from pifi_fast import PiFiModel

    _, cfg = setup
    grads, calls = [], []
    built = PiFiModel.from_parts(cfg.slm, cfg.llm, num_labels=2, packed_slm=False,
                                 head_dropout=0.0)
    ids = torch.randint(1000, 2000, (3, 9))
    for checkpointing in (False, True):
        model = copy.deepcopy(built)
        units = sharding.slm_blocks(model.slm)  # what Transformers never splits: BERT's
        blocks = list(model.slm.encoder.layer)  # layers, and its embeddings
        assert {type(u).__name__ for u in units} == {"BertLayer", "BertEmbeddings"}
        assert all(any(b is u for u in units) for b in blocks)
        if checkpointing:
            loop.enable_activation_checkpointing(model)
        n = [0]
        # on a module inside the block (Transformers checkpoints the block's forward, its own
        # hooks outside), and a pre-hook: the recomputation stops once it has the tensors
        # backward needs, before a forward hook would run
        blocks[0].attention.register_forward_pre_hook(lambda *a: n.__setitem__(0, n[0] + 1))
        model.train()
        torch.manual_seed(0)  # the same dropout masks (checkpointing replays them in backward)
        model(input_ids=ids, attention_mask=torch.ones_like(ids),
              labels=torch.tensor([0, 1, 1])).loss.backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()
                      if p.grad is not None})
        calls.append(n[0])
    assert calls == [1, 2]
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("device", [
    pytest.param("cpu", marks=pytest.mark.slow),  # over 2 s on 2 cores: not in make check
    pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_sharded_model_steps_as_the_plain_one_in_one_process(setup, device):
    """The FSDP path in one process (what benchmarks/gpu_check.sh runs on a GPU): the fused
    layer inside a sharded model, bf16 parameters with fp32 reduction on CUDA; three Adam
    steps give the plain model's losses, the frozen layer gets no gradient, and the gathered
    full state loads into a plain model."""
    import torch.distributed as dist

    from pifi_fast import PiFiModel
    from pifi_fast.train import make_optimizer

    _, cfg = setup
    cuda = device == "cuda"
    precision = "bf16" if cuda else "fp32"
    dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0,
                            world_size=1)
    try:
        built = PiFiModel.from_parts(cfg.slm, cfg.llm, num_labels=2, packed_slm=False,
                                     head_dropout=0.0,
                                     llm_dtype=torch.bfloat16 if cuda else None).to(device)
        for m in built.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        assert built.fused
        plain, sharded = copy.deepcopy(built), copy.deepcopy(built)
        sharding.shard_model(sharded, precision)
        ids = torch.randint(1000, 2000, (4, 11), device=device)
        batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                     labels=torch.tensor([0, 1, 1, 0], device=device))
        losses = []
        for model in (plain, sharded):
            opt = make_optimizer([p for p in model.parameters() if p.requires_grad], 1e-3)
            run = []
            for _ in range(3):
                with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
                    loss = model(**batch).loss
                loss.backward()
                assert all(p.grad is None for p in model.llm_layer.parameters())
                opt.step()
                opt.zero_grad(set_to_none=True)
                run.append(loss.item())
            losses.append(run)
        # fp32: rounding only; bf16: the sharded model computes with bf16 weights everywhere
        # (LayerNorm included) where autocast keeps some ops in fp32
        tol = 2e-2 if cuda else 1e-6
        assert losses[1] == pytest.approx(losses[0], abs=tol), losses
        full = sharding.full_model_state(sharded)
        fresh = copy.deepcopy(built)
        fresh.load_state_dict(full)
        for k, v in sharded.state_dict().items():
            torch.testing.assert_close(fresh.state_dict()[k], v.full_tensor().to(
                fresh.state_dict()[k].device) if hasattr(v, "full_tensor") else v)
    finally:
        dist.destroy_process_group()


def _accelerate(script_args, out_dir, fsdp_on_cpu):
    """docs/examples/trainer_fsdp.py under `accelerate launch` with the example's config file,
    two CPU processes; with fsdp_on_cpu through tests/accelerate_fsdp_on_cpu.py."""
    wrapper = [str(ROOT / "tests" / "accelerate_fsdp_on_cpu.py")] if fsdp_on_cpu else []
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "docs" / "examples" / "accelerate_fsdp2.yaml"),
           "--main_process_port", str(_free_port()), *wrapper,
           str(ROOT / "docs" / "examples" / "trainer_fsdp.py"), "--output-dir", str(out_dir),
           *script_args]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow  # four launches, about a minute on 2 cores: not in make check
def test_the_accelerate_example_runs_and_pifitrainer_resumes_under_fsdp2(setup):
    """The example as written (on the CPU Accelerate runs it as DDP, and it says so); then with
    the FSDP2 plugin applied on the CPU as Accelerate applies it on GPUs: the model is sharded,
    every checkpoint loads with PiFiModel.from_pretrained in one process, and 4 steps resumed
    to 6 give the weights of 6 uninterrupted steps bit for bit."""
    from pifi_fast import PiFiModel

    root, _ = setup
    models = {"--slm": str(root / "models" / "bert"), "--llm": str(root / "models" / "llama")}
    flags = [x for kv in models.items() for x in kv]
    out = _accelerate([*flags, "--max-steps", "2"], root / "acc-ddp", fsdp_on_cpu=False)
    assert "2 processes, the model replicated (not FSDP)" in out, out

    out = _accelerate([*flags, "--max-steps", "4"], root / "acc-resumed", fsdp_on_cpu=True)
    assert "2 processes, the model sharded with FSDP2" in out, out
    assert sorted(p.name for p in (root / "acc-resumed").iterdir()) == [
        "checkpoint-2", "checkpoint-4"]
    _accelerate([*flags, "--max-steps", "6", "--resume"], root / "acc-resumed", fsdp_on_cpu=True)
    _accelerate([*flags, "--max-steps", "6"], root / "acc-straight", fsdp_on_cpu=True)

    a = load_file(str(root / "acc-resumed" / "checkpoint-6" / "model.safetensors"))
    b = load_file(str(root / "acc-straight" / "checkpoint-6" / "model.safetensors"))
    c = load_file(str(root / "acc-straight" / "checkpoint-4" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(b[k], c[k]) for k in b)  # steps 5 and 6 did train
    model = PiFiModel.from_pretrained(str(root / "acc-resumed" / "checkpoint-6"))
    loaded = model.state_dict()
    assert loaded.keys() == a.keys()
    assert all(torch.equal(loaded[k], v) for k, v in a.items())
