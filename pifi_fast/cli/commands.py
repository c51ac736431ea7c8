"""The body of each `pifi-fast` command: parsed arguments in, one library call, its result
printed, the exit status out. The work itself lives in the library (pifi_fast.train,
pifi_fast.demo, pifi_fast.batch_predict, pifi_fast.export, pifi_fast.environment,
pifi_fast.bench.suite, pifi_fast.kernels.compile_report), callable from Python without the
command line."""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch.distributed as dist

from pifi_fast import environment, tasks
from pifi_fast.batch_predict import predict_file
from pifi_fast.bench import suite
from pifi_fast.data import builtin_found, parse_label_map
from pifi_fast.demo import run_demo, summary_lines
from pifi_fast.export import export_model
from pifi_fast.kernels import compile_report
from pifi_fast.model import PiFiModel
from pifi_fast.train import TrainConfig, evaluate_checkpoint, train
from pifi_fast.training import sweep
from pifi_fast.training.select_layer import (SelectionOptions, compare_with_sweep, decide,
                                             read_selection, render_table, select_layer,
                                             write_selection)


def train_cmd(args) -> int:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    if cfg.test_split in ("", "none"):
        cfg.test_split = None
    res = train(cfg)
    res.pop("model", None)
    if dist.is_initialized() and dist.get_rank() != 0:  # one summary per run, not per process
        return 0
    print(json.dumps({k: res[k] for k in ("metric", "best_dev", "best_epoch") if k in res}))
    if "test" in res:
        print(f"test: {json.dumps(res['test'])}")
    return 0


def _grid_from_flags(args) -> dict:
    """A sweep spec (as its TOML would read) from the sweep command's grid flags."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    train_options = {}
    for item in args.set:
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in fields:
            raise ValueError(f"--set {item!r}: expected OPTION=VALUE with a train option")
        # numbers, true/false and null as JSON spells them; anything else is a string
        train_options[key] = json.loads(value) if _is_json(value) else value
    arms = [{"name": "slm-alone", "llm": "none"}] if args.slm_alone else []
    arms.append({"name": Path(args.llm).stem, "llm": args.llm,
                 "layers": [int(v) for v in args.layers.split(",") if v.strip()]})
    return {"sweep": {"name": args.name, "tasks": args.tasks.split(","),
                      "slms": args.slms.split(","),
                      "seeds": [int(v) for v in args.seeds.split(",")]},
            "train": train_options, "arm": arms}


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def sweep_cmd(args) -> int:
    spec = (sweep.load_spec(args.spec) if args.spec
            else sweep.spec_from_dict(_grid_from_flags(args)))
    out = args.out or f"runs/sweeps/{spec.name}/results"
    summary = sweep.run_sweep(spec, out, work=args.work, only=args.only, shard=args.shard,
                              report_only=args.report_only,
                              keep_checkpoints=args.keep_checkpoints)
    print(f"{summary['finished']} of {summary['cells']} cells finished; report: "
          f"{out}/results.md")
    return 0


def select_layer_cmd(args) -> int:
    cfg = TrainConfig(data=args.data, slm=args.slm, llm=args.llm, eval_split=args.eval_split,
                      text_column=args.text_column, pair_column=args.pair_column,
                      label_column=args.label_column, device=args.device)
    opts = SelectionOptions(layers=args.layers, sample=args.sample, steps=args.steps,
                            repeats=args.repeats, seed=args.seed)
    if args.reuse and args.against:  # its stored scores, decided by today's rule
        selection = read_selection(args.out)
        selection.update(decide(selection["layers"], selection.get("confirmation")))
        if selection["confirmed"] is False:
            raise ValueError(f"{args.out}: layer {selection['choice']} leads its ranking but was "
                             "never scored with fresh seeds (a selection written before "
                             "pifi_fast confirmed its leader): run it again without --reuse")
    else:
        selection = select_layer(cfg, opts, out=args.out)
    if args.against:
        selection["validation"] = compare_with_sweep(selection, sweep.read_records(args.against))
        write_selection(selection, args.out)
    print(render_table(selection))
    print(f"wrote {args.out}/selection.json, selection.md, selection.png")
    return 0


def eval_cmd(args) -> int:
    print(json.dumps(evaluate_checkpoint(args.checkpoint, args.data, args.split, args.limit,
                                         compile=args.compile, cuda_graphs=args.cuda_graphs,
                                         label_map=parse_label_map(args.label_map),
                                         text_column=args.text_column,
                                         label_column=args.label_column,
                                         packed_slm=args.packed_slm,
                                         layer_weights=args.layer_weights,
                                         layer_dtype=args.layer_dtype), indent=2))
    return 0


def predict_cmd(args) -> int:
    """Batch prediction: a csv/tsv/jsonl file (or a dataset split) in, JSONL out."""
    execution = "cuda-graphs" if args.cuda_graphs else "compile" if args.compile else "eager"
    res = predict_file(args.checkpoint, args.data, args.output, split=args.split,
                       limit=args.limit, batch_size=args.batch_size, max_length=args.max_length,
                       text_column=args.text_column, pair_column=args.pair_column,
                       packed_slm=args.packed_slm, device=args.device, execution=execution,
                       layer_weights=args.layer_weights, layer_dtype=args.layer_dtype)
    print(f"{res['predictions']} predictions in {res['seconds']:.1f} s "
          f"({res['sentences_per_second']:.1f} sentences/s on {res['device']}, "
          f"{res['execution']}) -> {res['output']}")
    return 0


def export_cmd(args) -> int:
    """A saved model as ONNX or an AOTInductor package, checked against PyTorch."""
    res = export_model(args.checkpoint, args.out, format=args.format,
                       quantize="int8" if args.int8 else None, check=args.check)
    check = res.get("check")
    print(f"exported {args.checkpoint} ({res['task']}) as {res['format']} -> {res['directory']}"
          + (f" (max abs error vs PyTorch {check['max_abs_error']:.2g})" if check else ""))
    if "int8" in res:
        err = res["int8"].get("max_abs_error")
        print(f"int8 model: {res['int8']['file']}"
              + (f" (max abs error vs PyTorch fp32 {err:.2g})" if err is not None else ""))
    return 0


def push_cmd(args) -> int:
    model = PiFiModel.from_pretrained(args.checkpoint)
    url = model.push_to_hub(args.repo_id, private=args.private, token=args.token)
    print(f"uploaded {args.checkpoint} to {args.repo_id}: {url}")
    return 0


def demo_cmd(args) -> int:
    """Offline PiFi end to end: the SLM alone against the SLM + PiFi, same data and seed."""
    result = run_demo(args.output_dir, args.epochs, args.batch_size, args.seed,
                      args.limit_train)
    print("\n".join(summary_lines(result)))
    print(f"wrote {result['path']}")
    return 0


def bench_cmd(args) -> int:
    result = suite.run_benchmarks("quick" if args.quick else args.sizes, args.workloads,
                                  device=args.device, dtype=args.dtype, only=args.only or None,
                                  skip=tuple(args.skip), reps=args.reps,
                                  time_budget=args.time_budget, out=args.out,
                                  compare=args.compare)
    print(result["markdown"])
    for kind, path in result["paths"].items():
        print(f"wrote {kind}: {path}")
    flagged = result["flagged"]
    if flagged is not None:  # None: no --compare
        print("\n".join(flagged) if flagged else f"no case slower than in {args.compare}")
    return 1 if flagged else 0


def breakdown_cmd(args) -> int:
    result = suite.run_breakdown(args.pairs, args.impls, args.sentences, args.reps,
                                 device=args.device, out=args.out)
    if result["markdown"] is None:
        print(f"nothing timed: every pair's files are missing ({', '.join(result['missing'])})")
        return 1
    print(result["markdown"])
    for kind, path in result["paths"].items():
        print(f"wrote {kind}: {path}")
    return 0


def kernels_cmd(args) -> int:
    if args.tuned:  # on a GPU: the autotuner's picks against the tables
        picks = compile_report.autotuner_picks()
        for p in picks:
            print(json.dumps({k: v for k, v in p.items() if k != "timings_ms"}))
        if args.out:
            compile_report.write_autotuner_picks(picks, args.out)
        return 0
    result = compile_report.compile_all(args.targets, args.dtypes, args.only, args.jobs,
                                        out=args.out)
    print(result["table"])
    print(f"({result['seconds']:.0f} s on {args.jobs or 'all'} worker processes)")
    for kind, path in result["paths"].items():
        print(f"wrote {kind}: {path}")
    return 0 if result["ok"] else 1


def info_cmd(args) -> int:
    print("\n".join(environment.host_lines()))
    if args.llm:
        try:
            line = environment.llm_line(args.llm, args.layer)
        except environment.LLM_ERRORS as exc:
            print(f"pifi-fast info: error: --llm {args.llm}: {exc}", file=sys.stderr)
            return 2
        print(line)
    for line in environment.gpu_lines():
        print(line)
    return 0


def tasks_cmd(args) -> int:
    """The task presets: name, source, rows per split, metric, the paper's numbers, local copy."""
    if args.markdown:
        print(tasks.markdown_table())
        return 0
    rows = tasks.preset_table(builtin_found)
    keys = ("name", "kind", "source", "sizes", "metric", "paper", "local")
    widths = {k: max(len(k), *(len(r[k]) for r in rows)) for k in keys}
    print("  ".join(k.ljust(widths[k]) for k in keys).rstrip())
    for r in rows:
        print("  ".join(r[k].ljust(widths[k]) for k in keys).rstrip())
    print(f"sizes: train / dev / test rows (?: not verified); local copies: $PIFI_FAST_DATASETS"
          f"/<source id>/ ({tasks.datasets_root() or 'not set'}); splits and deviations from "
          "the authors: pifi-fast tasks --markdown")
    return 0
