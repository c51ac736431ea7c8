"""The documentation stays true: the CLI reference is the parser's, the README stays short, its
links resolve, and its performance figures are the current ones of benchmarks/RESULTS.md.
(The examples themselves: tests/test_doc_examples.py; the site's links and API references:
`make docs`, a strict MkDocs build.)"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def _generator():
    spec = importlib.util.spec_from_file_location("gen_cli_reference",
                                                  ROOT / "scripts" / "gen_cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_cli_reference_is_generated_from_the_current_parser():
    gen = _generator()
    fresh = gen.render()
    committed = gen.TARGET.read_text() if gen.TARGET.is_file() else ""
    assert committed == fresh, ("docs/cli.md is stale: run "
                                "`.venv/bin/python scripts/gen_cli_reference.py` and commit it")


def test_the_cli_reference_lists_every_command_and_option():
    from pifi_fast.cli import build_parser

    text = (ROOT / "docs" / "cli.md").read_text()
    parser = build_parser()
    for name, _, sub in _generator()._subcommands(parser):
        assert f"## pifi-fast {name}" in text
        for action in sub._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"`{flag}" in text or f", {flag}" in text, (name, flag)


def test_the_readme_is_read_in_five_minutes():
    lines = README.read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; the limit is 250"


def test_the_readme_links_resolve():
    text = README.read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target) or target.startswith("#"):
            continue
        path = target.split("#")[0]
        assert (ROOT / path).exists(), f"README.md links to {path}, which does not exist"


def test_the_readme_figures_are_the_current_ones():
    """The README's performance table repeats rows of benchmarks/RESULTS.md verbatim, and every
    speed-up it states elsewhere is one RESULTS.md states."""
    readme, results = README.read_text(), RESULTS.read_text()
    result_lines = set(results.splitlines())
    rows = [line for line in readme.splitlines()
            if line.startswith("|") and re.search(r"\bx\d+\.\d+", line)]
    assert rows, "the README has no performance table"
    for row in rows:
        assert row in result_lines, f"README row not in benchmarks/RESULTS.md: {row}"
    for ratio in set(re.findall(r"\bx\d+\.\d+\b", readme)):
        assert ratio in results, f"README figure {ratio} is not in benchmarks/RESULTS.md"


def test_every_documentation_page_is_in_the_site():
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    listed = set(re.findall(r":\s*([\w.-]+\.md)\s*$", nav, flags=re.M))
    assert pages == listed, (f"not in mkdocs.yml's nav: {sorted(pages - listed)}; "
                             f"in the nav but missing: {sorted(listed - pages)}")
