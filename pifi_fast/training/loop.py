"""The training loop: train(cfg) runs a configured fine-tuning from data to the best
checkpoint and its test metrics (see pifi_fast.train for the whole story: determinism,
reliability, resuming)."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from pifi_fast import data as data_mod
from pifi_fast.hub import write_model_card
from pifi_fast.inference import compile_model, inference_runner
from pifi_fast.training.batches import TaskData, load_rows
from pifi_fast.training.checkpoints import (TRAINER_STATE, load_best, load_trainer_state,
                                            load_weights, recover_checkpoints, save_checkpoint)
from pifi_fast.training.config import (TrainConfig, apply_baseline, build_model, load_tokenizer,
                                       resolve_slm)
from pifi_fast.training.evaluation import evaluate, evaluate_checkpoint
from pifi_fast.training.faults import fault_point
from pifi_fast.training.optim import make_optimizer, optimizer_step
from pifi_fast.training import sharding
from pifi_fast.training.select_layer import resolve_auto_layer
from pifi_fast.training.runtime import (barrier, dist_setup, peak_memory, precision_autocast,
                                        seed_everything, set_rng_state, to_device)


class NonFiniteError(RuntimeError):
    """A NaN or inf loss or gradient norm stopped training (on_nonfinite="stop")."""


class PeerLostError(RuntimeError):
    """Another process of a distributed run stopped (killed, crashed, out of memory): this
    one's collective failed. The last checkpoint is the run's last good state."""


_PEER_LOST = ("gloo/transport", "Connection reset by peer", "Connection closed by peer")


@contextlib.contextmanager
def peers_lost(world: int, rank: int, last_dir: Path):
    """Turns the backend's error when a collective loses its peers (gloo: "Connection reset by
    peer", NCCL: a watchdog abort) into a PeerLostError that says what happened and how to
    continue; anything else passes through unchanged."""
    if world <= 1:
        yield
        return
    try:
        yield
    except RuntimeError as exc:
        # gloo reports a lost peer as a plain RuntimeError from its transport; NCCL and the
        # store as DistError
        if not (isinstance(exc, torch.distributed.DistError)
                or any(mark in str(exc) for mark in _PEER_LOST)):
            raise
        cause = str(exc).strip().splitlines()[0].split(". ")[0][:200]
        raise PeerLostError(
            f"rank {rank}: another process of this {world}-process run stopped, so a "
            f"collective failed ({cause}); the last complete checkpoint is {last_dir}: start "
            "the run again with --resume") from exc


def enable_activation_checkpointing(model) -> None:
    """The SLM's blocks recomputed in backward (Transformers' own checkpointing, non-reentrant,
    which composes with FSDP's per-block gathers)."""
    if not getattr(model.slm, "supports_gradient_checkpointing", False):
        raise ValueError(f"--activation-checkpointing: the SLM ({type(model.slm).__name__}) "
                         "does not support gradient checkpointing")
    kwargs = {"use_reentrant": False}
    if hasattr(model.slm, "activation_checkpointing_enable"):  # its name from Transformers 5.25
        model.slm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.slm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def train(cfg: TrainConfig) -> dict:
    """Fine-tune as configured; returns the results dict (also written to results.json) with
    the trained model under "model"."""
    if not cfg.deterministic:
        return _train(cfg)
    # cuBLAS needs a fixed workspace for reproducible reductions (PyTorch sizes it from this
    # variable once, at its first cuBLAS call, so it is left set); torch then refuses ops
    # without a deterministic version, and the Triton GEMMs launch their first tile instead of
    # tuning (kernels/_tiles.py: launch). The torch switches are set for this run and restored.
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    try:
        return _train(cfg)
    finally:
        torch.use_deterministic_algorithms(saved[0])
        torch.backends.cudnn.benchmark = saved[1]


def _train(cfg: TrainConfig) -> dict:
    cfg = apply_baseline(cfg)
    rank, world = dist_setup()
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    if cfg.max_length is None:  # 384 for extractive QA (the Hugging Face recipe), else 100
        cfg = dataclasses.replace(cfg, max_length=384 if cfg.task == "question_answering"
                                  and not cfg.authors_setup else 100)
    if cfg.authors_setup:
        cfg = dataclasses.replace(cfg, precision="fp32", group_by_length=False,
                                  fused_adam=False)
    out_dir = Path(cfg.output_dir)
    last_dir, best_dir = out_dir / "checkpoint-last", out_dir / "best"
    selection = None
    if cfg.layer == "auto":  # the cheap ranking first (every rank alike: it is deterministic)
        cfg, selection = resolve_auto_layer(cfg, out_dir)
        if rank == 0:
            choice = ("the SLM alone" if cfg.llm is None else f"layer {cfg.layer}")
            print(f"--layer auto: {choice} ({selection['verdict']}; {cfg.layer_selection})")
    seed_everything(cfg.seed)

    if cfg.on_nonfinite not in ("stop", "skip"):
        raise ValueError(f"on_nonfinite must be 'stop' or 'skip', got {cfg.on_nonfinite!r}")
    if cfg.distributed not in ("ddp", "fsdp"):
        raise ValueError(f"distributed must be 'ddp' or 'fsdp', got {cfg.distributed!r}")
    fsdp = cfg.distributed == "fsdp"
    if fsdp:  # before any data or model is loaded: a misconfigured run stops at once
        sharding.check_supported(cfg, precision_autocast(device, cfg.precision)[1], world)
    train_rows = load_rows(cfg, "train", cfg.limit_train)
    dev_rows = load_rows(cfg, cfg.eval_split, cfg.limit_eval)
    if rank == 0 and data_mod.is_one_file(cfg.data):
        print(data_mod.one_file_note(cfg.data))
    tokenizer = load_tokenizer(resolve_slm(cfg.slm))
    task_data = TaskData(cfg, tokenizer, train_rows)
    task_data.check_rows(dev_rows, cfg.eval_split)  # once, before any training
    num_labels = len(task_data.label_map) if task_data.label_map else 0
    autocast, precision = precision_autocast(device, cfg.precision)
    model = build_model(cfg, num_labels, precision).to(device)
    model.labels = task_data.labels
    vocab = model.slm.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        raise ValueError(f"the tokenizer of {cfg.slm} has {len(tokenizer)} tokens but the SLM's "
                         f"embedding has {vocab} rows: ids {vocab}..{len(tokenizer) - 1} would "
                         "index past it (a tokenizer from another model?)")
    if (fsdp or cfg.activation_checkpointing) and hasattr(model, "packed_slm"):
        # the packed path calls inside the SLM's blocks, past FSDP's gathers and the
        # checkpointing wrappers, which act on each block's own forward
        model.packed_slm = False
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model)
    if rank == 0:
        recover_checkpoints(out_dir)
    barrier(world)  # no rank reads the last checkpoint while rank 0 may be recovering it

    state = {"epoch": 0, "step": 0, "best_metric": None, "history": [], "nonfinite_skipped": 0}
    saved = None
    if cfg.resume and (last_dir / TRAINER_STATE).is_file():
        saved = load_trainer_state(last_dir)  # weights_only: a run folder never runs code
        layout = saved.get("layout", "ddp")
        if layout != cfg.distributed:
            raise ValueError(f"{last_dir} was written by a --distributed {layout} run (its "
                             f"optimizer state is laid out for it): resume it with "
                             f"--distributed {layout}")
        load_weights(model, last_dir, device)  # every rank, before sharding: plain tensors
    if fsdp:
        sharding.shard_model(model, precision)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg.lr, cfg.weight_decay, fused=cfg.fused_adam)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    if saved is not None:
        if fsdp:
            sharding.load_full_optimizer_state(model, optimizer, saved["optimizer"])
        else:
            optimizer.load_state_dict(saved["optimizer"])
        for group in optimizer.param_groups:  # the saved groups carry their run's setting
            group["fused"] = optimizer.defaults["fused"]
        if scaler is not None and saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        set_rng_state(saved["rng"])
        state = saved["state"]
        if rank == 0:
            print(f"resumed from {last_dir}: epoch {state['epoch']} done, step {state['step']}")
    elif cfg.resume and rank == 0:
        print(f"--resume: no checkpoint in {last_dir}, starting fresh")

    compiled = compile_model(model) if cfg.compile else None
    runner = compiled if compiled is not None else model
    # evaluation: the training graph (no_grad, eval mode), or its own CUDA-graph runner
    eval_runner = (inference_runner(model, "cuda-graphs") if cfg.eval_cuda_graphs else compiled)
    if world > 1 and not fsdp:
        runner = torch.nn.parallel.DistributedDataParallel(
            runner, device_ids=[device.index] if device.type == "cuda" else None)
    metric_name = data_mod.TASK_METRIC.get(cfg.data, {"classification": "accuracy",
                                                       "question_answering": "f1",
                                                       "seq2seq": "bleu"}[cfg.task])
    lengths = task_data.lengths(train_rows)
    epoch_times = []
    model.train()
    done = False
    for epoch in range(state["epoch"], cfg.epochs):
        batches = data_mod.length_grouped_batches(
            lengths, cfg.batch_size, cfg.seed, epoch, mega=50 if cfg.group_by_length else 1)
        t_epoch = time.perf_counter()
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                   disable=rank != 0)
        seen, t0 = 0, time.perf_counter()
        for global_batch in bar:
            mine = global_batch[rank::world]  # each rank: its share of the same global batch
            cpu_batch = task_data.collate([train_rows[i] for i in mine])
            # on the CPU, before any GPU kernel sees them (a bad id there is a device assert)
            model.check_values(cpu_batch.get("input_ids"), cpu_batch.get("labels"), rows=mine)
            batch = to_device(cpu_batch, device, compiled=compiled is not None)
            with peers_lost(world, rank, last_dir):
                with autocast:
                    loss = runner(**batch).loss
                (scaler.scale(loss) if scaler is not None else loss).backward()
                stepped = optimizer_step(model, optimizer, scaler, cfg.clip, loss, world)
            if not stepped:
                where = (f"epoch {epoch + 1}, step {state['step'] + 1}, examples "
                         f"{sorted(global_batch)}")
                if cfg.on_nonfinite == "stop":
                    raise NonFiniteError(
                        f"non-finite loss ({loss.item()}) or gradient norm at {where}; stopped "
                        f"before the optimizer step, so the last checkpoint ({last_dir}) is the "
                        "last good state. Lower --lr, check the data, or pass "
                        "--on-nonfinite skip to skip such steps")
                state["nonfinite_skipped"] += 1
                if rank == 0:
                    tqdm.write(f"skipped a non-finite step at {where}")
            state["step"] += 1
            fault_point("step")
            seen += len(global_batch)
            bar.set_postfix(loss=f"{loss.item():.4f}",
                            samples_per_s=f"{seen / (time.perf_counter() - t0):.1f}")
            if cfg.max_steps and state["step"] >= cfg.max_steps:
                done = True
                break
        epoch_times.append(time.perf_counter() - t_epoch)
        # a sharded model evaluates on every rank (its forward gathers from all of them), each
        # rank the whole split, so all agree on the result without exchanging predictions
        with peers_lost(world, rank, last_dir):
            result = (evaluate(model, task_data, dev_rows, device, precision, runner=eval_runner)
                      if rank == 0 or fsdp else {})
        state["history"].append({"epoch": epoch + 1, "step": state["step"],
                                 "epoch_seconds": epoch_times[-1],
                                 f"{cfg.eval_split}": result})
        improved = (rank == 0 or fsdp) and (state["best_metric"] is None
                                            or result[metric_name] > state["best_metric"])
        if improved:
            state["best_metric"] = result[metric_name]
            state["best_epoch"] = epoch + 1
        state["epoch"] = epoch + 1
        gathered = {}
        if fsdp:  # every rank gathers; rank 0 receives the full tensors and writes them
            with peers_lost(world, rank, last_dir):
                gathered = {"model_state": sharding.full_model_state(model),
                            "optimizer_state": sharding.full_optimizer_state(model, optimizer)}
        if rank == 0:
            print(f"epoch {epoch + 1}: {cfg.eval_split} {metric_name} {result[metric_name]:.4f}"
                  f"  ({epoch_times[-1]:.1f}s)")
            # best first: a kill between the two leaves the previous last checkpoint, and the
            # resumed run rewrites best with the same weights
            if improved:
                save_checkpoint(model, task_data, None, state, cfg, best_dir,
                                model_state=gathered.get("model_state"))
            save_checkpoint(model, task_data, optimizer, state, cfg, last_dir, scaler,
                            **gathered)
        with peers_lost(world, rank, last_dir):
            barrier(world)
        if done:
            break

    results = {"config": dataclasses.asdict(cfg), "metric": metric_name,
               "best_dev": state["best_metric"], "best_epoch": state.get("best_epoch"),
               "history": state["history"], "world_size": world,
               "precision": precision, "device": str(device),
               "nonfinite_steps_skipped": state.get("nonfinite_skipped", 0),
               "trainable_parameters": sum(p.numel() for p in params),
               "peak_memory_bytes": peak_memory(device),
               "distributed": cfg.distributed if world > 1 else None,
               "rank_memory": sharding.rank_memory(model, optimizer)}
    if selection is not None:
        results["layer_selection"] = {k: selection[k] for k in ("choice", "verdict", "ranking")}
        results["layer_selection"]["file"] = cfg.layer_selection
    if (rank == 0 or fsdp) and cfg.test_split and best_dir.exists():
        try:
            test_rows = load_rows(cfg, cfg.test_split, cfg.limit_eval)
        except (FileNotFoundError, KeyError):
            test_rows = None
        if test_rows:
            load_best(model, best_dir, device, load_state=(
                (lambda sd, strict: sharding.load_full_model_state(model, sd, strict))
                if fsdp else None))
            results["test"] = evaluate(model, task_data, test_rows, device, precision,
                                       runner=eval_runner)
    if rank == 0 and cfg.test_data and best_dir.exists():
        # other datasets' test splits, through the saved best model as pifi-fast eval reads it
        label_map = data_mod.parse_label_map(cfg.test_label_map)
        results["cross_domain"] = {
            name: evaluate_checkpoint(str(best_dir), name, "test", device=str(device),
                                      label_map=label_map)
            for name in (n.strip() for n in cfg.test_data.split(",")) if name}
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
        if best_dir.exists():  # the exported model carries its numbers and a model card
            if cfg.lora_r:  # exported merged: loads without peft, runs at full speed
                exported = load_best(model, best_dir, device)
                model.merge_lora()
                if not exported:
                    save_checkpoint(model, task_data, None, state, cfg, best_dir)

            (best_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
            write_model_card(model, best_dir, results)
    results["model"] = model
    return results
