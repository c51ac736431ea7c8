"""Every example in the README, the documentation pages and benchmarks/RESULTS.md either runs
here or says why not, so none of them can rot.

- A fenced ```python block runs (offline, on the CPU, with the small real models), in a fresh
  namespace and an empty working folder. A block whose fence follows the line
  `<!-- not run: REASON -->` is only compiled, and every pifi_fast name it imports or reaches
  by attribute must exist; `<!-- slow: REASON -->` runs it with the `slow` tests.
- A fenced ```bash / ```sh / ```shell block is checked line by line: a `pifi-fast` command (or
  `torchrun ... -m pifi_fast.cli`) must parse with the real parser, and the cheap ones
  (`pifi-fast info`, `--help`) run; `make X` must name a Makefile target; `python SCRIPT`,
  `bash SCRIPT` and `pytest PATH` must name existing files, `pytest -m EXPR` declared markers;
  `pip install ".[EXTRA]"` must name declared extras. Other commands are left alone.
"""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import importlib
import io
import re
import shlex
from pathlib import Path
from types import ModuleType

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
             ROOT / "benchmarks" / "RESULTS.md"]
PYTHON = {"python", "py"}
SHELL = {"bash", "sh", "shell"}
MARK = re.compile(r"^<!--\s*(not run|slow):\s*(\S.*?)\s*-->\s*$")


@dataclasses.dataclass
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    mark: str | None  # "not run", "slow" or None
    reason: str | None

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def _blocks(path: Path):
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        opening = re.match(r"^```\s*([\w+-]*)", lines[i])
        if not opening:
            i += 1
            continue
        end = i + 1
        while end < len(lines) and not lines[end].startswith("```"):
            end += 1
        mark = MARK.match(lines[i - 1]) if i else None
        yield Block(path, i + 1, opening.group(1).lower(), "\n".join(lines[i + 1:end]),
                    mark.group(1) if mark else None, mark.group(2) if mark else None)
        i = end + 1


ALL = [b for p in DOC_FILES for b in _blocks(p)]
PY_BLOCKS = [b for b in ALL if b.lang in PYTHON]
SH_BLOCKS = [b for b in ALL if b.lang in SHELL]


def _param(b: Block):
    marks = [pytest.mark.slow] if b.mark == "slow" else []
    return pytest.param(b, id=f"{b.where}-{b.mark or 'run'}".replace(" ", "_"), marks=marks)


def test_blocks_are_found_and_marks_have_reasons():
    assert PY_BLOCKS and SH_BLOCKS
    for path in DOC_FILES:
        lines = path.read_text().splitlines()
        for n, text in enumerate(lines):
            if text.lstrip().startswith("<!-- not run") or text.lstrip().startswith("<!-- slow"):
                assert MARK.match(text), f"{path.name}:{n + 1}: write <!-- not run: REASON -->"
                assert n + 1 < len(lines) and lines[n + 1].startswith("```"), (
                    f"{path.name}:{n + 1}: the mark must be on the line right before a fence")


# -- Python blocks ---------------------------------------------------------------------------
def _resolve(module: str, name: str, where: str):
    mod = importlib.import_module(module)
    if hasattr(mod, name):
        return getattr(mod, name)
    try:
        return importlib.import_module(f"{module}.{name}")
    except ImportError:
        pytest.fail(f"{where}: `from {module} import {name}`: {module} has no {name}")


def _check_pifi_fast_names(code: str, where: str):
    """Every pifi_fast module, name and attribute chain the code uses exists."""
    tree = ast.parse(code)
    bound: dict[str, object] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "pifi_fast":
            for alias in node.names:
                bound[alias.asname or alias.name] = _resolve(node.module, alias.name, where)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "pifi_fast":
                    mod = importlib.import_module(alias.name)
                    bound[alias.asname or "pifi_fast"] = (
                        mod if alias.asname else importlib.import_module("pifi_fast"))
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        chain, base = [], node
        while isinstance(base, ast.Attribute):
            chain.append(base.attr)
            base = base.value
        if not (isinstance(base, ast.Name) and base.id in bound):
            continue
        obj, path = bound[base.id], base.id
        for attr in reversed(chain):
            path += "." + attr
            if hasattr(obj, attr):
                obj = getattr(obj, attr)
            elif isinstance(obj, ModuleType):
                try:
                    obj = importlib.import_module(f"{obj.__name__}.{attr}")
                except ImportError:
                    pytest.fail(f"{where}: {path} does not exist")
            else:
                pytest.fail(f"{where}: {path} does not exist")


@pytest.mark.parametrize("block", [_param(b) for b in PY_BLOCKS])
def test_python_example(block: Block, tmp_path, monkeypatch):
    code = compile(block.code, block.where, "exec")
    _check_pifi_fast_names(block.code, block.where)
    if block.mark == "not run":
        return
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    exec(code, {"__name__": "__doc_example__"})


# -- shell blocks ----------------------------------------------------------------------------
def _commands(code: str):
    for line in code.replace("\\\n", " ").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        # leading VAR=value assignments (the value may be a $(...) substitution)
        line = re.sub(r"^(?:[A-Za-z_]\w*=(?:\$\([^)]*\)|\S+)\s+)+", "", line)
        yield line, shlex.split(line, comments=True)


def _make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", text, flags=re.M))


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _markers() -> set[str]:
    declared = _pyproject()["tool"]["pytest"]["ini_options"]["markers"]
    return {m.split(":")[0].strip() for m in declared}


_RAN: dict[tuple, str] = {}


def _run_cli(args: list[str], where: str) -> str:
    """Run a cheap pifi-fast command in this process (once per command line)."""
    from pifi_fast.cli import main

    key = tuple(args)
    if key not in _RAN:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            try:
                code = main(args)
            except SystemExit as exc:  # --help
                code = exc.code
        assert code in (0, None), f"{where}: pifi-fast {' '.join(args)} exited with {code}"
        _RAN[key] = out.getvalue()
    return _RAN[key]


def _check_pifi_fast(args: list[str], where: str):
    from pifi_fast.cli import build_parser

    if "-h" in args or "--help" in args or args == ["info"] or not args:
        assert _run_cli(args or ["--help"], where).strip(), f"{where}: no output"
        return
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            build_parser().parse_args(args)
        except SystemExit:
            pytest.fail(f"{where}: pifi-fast {shlex.join(args)}: {err.getvalue().strip()}")


def _check_paths(words: list[str], where: str):
    for w in words:
        if not w.startswith("-") and ("/" in w or w.endswith(".py") or w.endswith(".sh")):
            path = w.split("::")[0]
            assert (ROOT / path).exists(), f"{where}: {path} does not exist"


def _check_pytest(args: list[str], where: str):
    markers = _markers()
    for i, w in enumerate(args):
        if w == "-m" and i + 1 < len(args):
            names = set(re.findall(r"[A-Za-z_]\w*", args[i + 1])) - {"and", "or", "not"}
            assert names <= markers, f"{where}: undeclared markers {names - markers}"
    _check_paths([w for i, w in enumerate(args) if i == 0 or args[i - 1] != "-m"], where)


def _check_command(words: list[str], where: str):
    cmd, args = Path(words[0]).name, words[1:]
    if cmd == "pifi-fast":
        _check_pifi_fast(args, where)
    elif cmd == "torchrun" and "pifi_fast.cli" in args:
        _check_pifi_fast(args[args.index("pifi_fast.cli") + 1:], where)
    elif cmd == "make":
        targets = [w for w in args if not w.startswith("-") and "=" not in w]
        missing = set(targets) - _make_targets()
        assert not missing, f"{where}: make has no target {missing}"
    elif cmd in ("python", "python3"):
        if args[:2] == ["-m", "pytest"]:
            _check_pytest(args[2:], where)
        elif args and args[0].endswith(".py"):
            assert (ROOT / args[0]).is_file(), f"{where}: {args[0]} does not exist"
    elif cmd == "pytest":
        _check_pytest(args, where)
    elif cmd == "bash" and args:
        assert (ROOT / args[0]).is_file(), f"{where}: {args[0]} does not exist"
    elif cmd == "pip" and args[:1] == ["install"]:
        extras = set(_pyproject()["project"]["optional-dependencies"])
        for w in args:
            m = re.fullmatch(r"\.\[([\w,-]+)\]", w)
            if m:
                missing = set(m.group(1).split(",")) - extras
                assert not missing, f"{where}: pyproject.toml declares no extra {missing}"


@pytest.mark.parametrize("block", [_param(b) for b in SH_BLOCKS])
def test_shell_example(block: Block):
    for line, words in _commands(block.code):
        if words:
            _check_command(words, f"{block.where} ({line})")


def test_the_checks_catch_mistakes():
    """The shell checks fail on what they exist to catch."""
    for bad in (["pifi-fast", "train", "--no-such-option"], ["make", "no-such-target"],
                ["pip", "install", ".[no-such-extra]"], ["pytest", "-m", "no_such_marker"],
                ["python", "scripts/no_such_script.py"]):
        with pytest.raises((AssertionError, pytest.fail.Exception)):
            _check_command(bad, "self-test")
    with pytest.raises(pytest.fail.Exception):
        _check_pifi_fast_names("from pifi_fast import NoSuchName", "self-test")
    with pytest.raises(pytest.fail.Exception):
        _check_pifi_fast_names("import pifi_fast\npifi_fast.PiFiModel.no_such_method()",
                               "self-test")
