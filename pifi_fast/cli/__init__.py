"""pifi-fast command line: the top of the flow kernels -> ops -> layer -> model -> training ->
cli. A thin layer: each command turns its arguments into one library call and prints the result
(parsers in pifi_fast.cli.parsers, command bodies in pifi_fast.cli.commands); nothing in the
library imports it.

  pifi-fast train  fine-tune PiFi (or the SLM alone with --llm none) on a task and dataset
  pifi-fast eval   metrics of a saved checkpoint on a dataset split
  pifi-fast demo   the offline default: all-MiniLM-L6-v2 alone and with SmolLM2-135M's last
                   layer, fine-tuned on Rotten Tomatoes snippets; dev accuracy of both, and the
                   fused layer's step time against the reference layer's
  pifi-fast predict  label a csv/tsv/jsonl file with a saved model (JSONL out)
  pifi-fast push   upload a saved model with its model card to the Hugging Face Hub
  pifi-fast bench  the benchmark workloads against the reference and the Hugging Face layer:
                   a table, JSON, Markdown and PNG plots in a folder (see pifi_fast.bench)
  pifi-fast breakdown  where a training step's time goes (SLM, adapters, layer, head,
                   optimizer, the rest): table, JSON and a stacked-bar plot
  pifi-fast kernels  compile every Triton kernel configuration for five GPU targets (no GPU
                   needed): registers, spills, shared memory, tensor cores; Markdown + JSON
  pifi-fast info   versions, extension and device status
"""
from __future__ import annotations

import os
import sys

# Re-exported: the docs generator (scripts/gen_cli_reference.py), tests and scripts import these
# from pifi_fast.cli, as they did when the command line was one module.
from pifi_fast.cli.parsers import _add_switch, _switch_value, build_parser
from pifi_fast.environment import cpu_bf16_instructions
from pifi_fast.training.loop import PeerLostError

__all__ = ["USER_ERRORS", "_add_switch", "_switch_value", "build_parser",
           "cpu_bf16_instructions", "main"]

# What a user can cause and fix (a missing file or package, a bad value): from the command line
# these end in one "pifi-fast CMD: error: ..." line, not a traceback (PIFI_FAST_DEBUG=1 keeps it).
USER_ERRORS = (FileNotFoundError, NotADirectoryError, ValueError, KeyError, ImportError)


def main(argv=None) -> int:
    """The `pifi-fast` command. Called with argv (from Python, tests), errors propagate; as the
    console command (argv None), a user's error is one line on stderr and exit status 2."""
    args = build_parser().parse_args(argv)
    if argv is not None or os.environ.get("PIFI_FAST_DEBUG") == "1":
        return args.func(args)
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"pifi-fast {args.command}: error: {message}", file=sys.stderr)
        return 2
    except PeerLostError as exc:  # not this process's fault: the line says what to do
        print(f"pifi-fast {args.command}: error: {exc}", file=sys.stderr)
        return 1
