"""Write docs/cli.md, the command-line reference, from the parser the `pifi-fast` command uses.

    python scripts/gen_cli_reference.py            rewrite docs/cli.md
    python scripts/gen_cli_reference.py --check    exit 1 when docs/cli.md differs from a fresh
                                                   rendering (tests/test_docs.py runs this check)

Everything on the page comes from pifi_fast.cli.build_parser(): each command's usage, its
arguments, their help with defaults and choices. Usage lines are wrapped at a fixed width, so
the page does not depend on the terminal that generated it.
"""
from __future__ import annotations

import argparse
import html
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "docs" / "cli.md"
WIDTH = 96

HEADER = """\
# Command-line reference

Generated from the `pifi-fast` parser by `python scripts/gen_cli_reference.py`; do not edit by
hand (`tests/test_docs.py` fails when this page is stale). `pifi-fast COMMAND --help` prints the
same text in a terminal.

On/off options follow one convention in every command: `--flag` alone turns it on, and
`--flag true` or `--flag false` sets it (so a switch that is on by default can be turned off).
"""


def _usage(parser: argparse.ArgumentParser) -> str:
    fmt = argparse.HelpFormatter(prog=parser.prog, width=WIDTH)
    fmt.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups)
    return fmt.format_help().strip()


def _name(action: argparse.Action) -> str:
    if not action.option_strings:
        return action.metavar or action.dest
    flags = ", ".join(action.option_strings)
    if action.nargs == 0:
        return flags
    fmt = argparse.HelpFormatter(prog="")
    default = action.dest.upper()
    return f"{flags} {fmt._format_args(action, default)}"


def _help(action: argparse.Action, prog: str) -> str:
    if not action.help:
        return ""
    text = argparse.HelpFormatter(prog=prog)._expand_help(action)
    return html.escape(" ".join(text.split()), quote=False)


def _text(text: str | None) -> str:
    return html.escape(" ".join((text or "").split()), quote=False)


def _subcommands(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield name, helps.get(name, ""), sub


def _arguments(parser: argparse.ArgumentParser) -> list[str]:
    lines = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        lines.append(f"- `{_name(action)}`: {_help(action, parser.prog)}".rstrip(": "))
    return lines


def render(parser: argparse.ArgumentParser | None = None) -> str:
    if parser is None:
        if str(ROOT) not in sys.path:  # run as a script: the checkout's package
            sys.path.insert(0, str(ROOT))
        from pifi_fast.cli import build_parser

        parser = build_parser()
    commands = list(_subcommands(parser))
    out = [HEADER, "```text", _usage(parser), "```", ""]
    if parser.description:
        out += [html.escape(parser.description, quote=False), ""]
    out += ["| command | what it does |", "|---|---|"]
    out += [f"| [`{name}`](#pifi-fast-{name}) | {_text(h)} |" for name, h, _ in commands]
    if parser.epilog:
        out += ["", "```text", parser.epilog.strip(), "```"]
    for name, h, sub in commands:
        out += ["", f"## pifi-fast {name}", ""]
        if h:
            out += [html.escape(" ".join(h.split()), quote=False) + ".", ""]
        if sub.description:
            out += [html.escape(" ".join(sub.description.split()), quote=False), ""]
        out += ["```text", _usage(sub), "```", ""]
        out += _arguments(sub)
    return "\n".join(out).rstrip() + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 when docs/cli.md is stale")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        current = TARGET.read_text() if TARGET.is_file() else ""
        if current != text:
            print(f"{TARGET.relative_to(ROOT)} is stale: run python scripts/gen_cli_reference.py",
                  file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    print(f"wrote {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
