"""The package's shape, checked from its source: no import cycle among pifi_fast's modules
(function-level imports counted too), every function-level import says why it is deferred, every
package says in its docstring what lives there, and docs/layout.md names every module."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# the import name of each source folder (pifi_fast.kernels lives in ./kernels: pyproject.toml)
SOURCES = {"pifi_fast": ROOT / "pifi_fast", "pifi_fast.kernels": ROOT / "kernels"}
# compiled modules (setup.py builds them): leaves of the graph, not the package they sit in
COMPILED = {"pifi_fast._C"}
# how far above a function-level import its "deferred:" reason may sit (a two-line comment)
REASON_LINES = 3


def _modules() -> dict[str, Path]:
    """module name -> file, for every module of the package (kernels included)."""
    found = {}
    for package, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if package == "pifi_fast" and parts[0] == "kernels":
                continue  # (a stray folder: the real one is ./kernels)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _imports(name: str, path: Path):
    """(imported pifi_fast module, line, inside a function) for each import statement."""
    tree = ast.parse(path.read_text(), str(path))
    in_function = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            in_function.update(id(sub) for sub in ast.walk(node) if sub is not node)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importing module's package
                package = _package_of(name, path).split(".")
                package = package[:len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            # `from pifi_fast import data` imports the module pifi_fast.data; `from pifi_fast
            # import PiFiModel` imports the package itself
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in set(MODULES) | COMPILED
                       else base for a in node.names]
        else:
            continue
        for target in targets:
            yield target, node.lineno, id(node) in in_function


def _resolve(target: str) -> str | None:
    """The pifi_fast module an import name lands in (pifi_fast.ops.x -> pifi_fast.ops)."""
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target or None


def import_graph() -> dict[str, set[str]]:
    graph = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for target, _, _ in _imports(name, path):
            module = (_resolve(target) if target.startswith("pifi_fast")
                      and target not in COMPILED else None)
            if module and module != name:
                graph[name].add(module)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (a list of modules, first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_checker_finds_a_cycle_and_resolves_names():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    assert _resolve("pifi_fast.kernels.gemm.gemm") == "pifi_fast.kernels.gemm"
    assert "pifi_fast.training.loop" in MODULES and "pifi_fast.kernels.quant" in MODULES


def test_no_import_cycle_among_the_package_modules():
    graph = import_graph()
    assert graph["pifi_fast.model"] >= {"pifi_fast.pifi_base", "pifi_fast.frozen.module"}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_data_flows_one_way():
    """Lower layers never import upper ones: kernels -> frozen -> model -> training -> cli (the
    benchmarks sit beside the CLI; pifi_fast.ops and pifi_fast.layer, the old names' re-exports,
    rank with the frozen package)."""
    graph = import_graph()
    order = ["pifi_fast.kernels", ("pifi_fast.frozen", "pifi_fast.ops", "pifi_fast.layer"),
             "pifi_fast.model", "pifi_fast.training", "pifi_fast.cli"]

    def rank(module):
        for i, prefixes in reversed(list(enumerate(order))):
            for prefix in (prefixes,) if isinstance(prefixes, str) else prefixes:
                if module == prefix or module.startswith(prefix + "."):
                    return i
        return None

    upward = [(a, b) for a, targets in graph.items() for b in targets
              if rank(a) is not None and rank(b) is not None and rank(b) > rank(a)]
    assert not upward, f"imports against the flow: {upward}"
    below_training = [m for m in MODULES if not m.startswith(("pifi_fast.training",
                                                              "pifi_fast.cli",
                                                              "pifi_fast.bench"))
                      and m not in ("pifi_fast.train", "pifi_fast.trainer", "pifi_fast.demo",
                                    "pifi_fast.batch_predict", "pifi_fast.environment")]
    for module in below_training:
        reach = graph[module]
        assert not {m for m in reach if m.startswith(("pifi_fast.training", "pifi_fast.cli",
                                                      "pifi_fast.bench"))}, module


def test_every_function_level_import_says_why_it_is_deferred():
    missing = []
    for name, path in MODULES.items():
        lines = path.read_text().splitlines()
        seen = set()
        for _, lineno, in_function in _imports(name, path):
            if not in_function or lineno in seen:
                continue
            seen.add(lineno)
            window = lines[max(0, lineno - 1 - REASON_LINES):lineno]
            if not any("deferred:" in line for line in window):
                missing.append(f"{path.relative_to(ROOT)}:{lineno}: {lines[lineno - 1].strip()}")
    assert not missing, ("function-level imports without a '# deferred: reason' comment:\n"
                         + "\n".join(missing))


def test_every_package_docstring_says_what_lives_there():
    for name, path in MODULES.items():
        if path.name != "__init__.py":
            continue
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        assert len(doc.split()) >= 20, f"{name}: its __init__ docstring is missing or too short"


def test_the_layout_page_names_every_module():
    page = (ROOT / "docs" / "layout.md").read_text()
    named = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*(?:/[A-Za-z_][A-Za-z0-9_]*)*\.py", page))
    missing = []
    for name, path in MODULES.items():
        rel = path.relative_to(ROOT).as_posix()
        if path.name == "__init__.py" or path.name.startswith("_"):
            continue  # packages are named by their folder; private helpers by their users
        source = "pifi_fast.kernels" if name.startswith("pifi_fast.kernels") else "pifi_fast"
        inside = path.relative_to(SOURCES[source]).as_posix()  # bench/common.py, gemm.py
        if not {rel, inside} & named:
            missing.append(rel)
    assert not missing, f"docs/layout.md does not name: {missing}"


def test_the_frozen_package_never_reaches_the_model():
    """Neither in its source (every module it reaches is below the model) nor at import time:
    importing the frozen layer or the kernels, in a fresh process, loads no pifi_fast.model,
    training or CLI module (the package's face exports its names lazily)."""
    graph = import_graph()
    reach, todo = set(), [m for m in MODULES if m.startswith("pifi_fast.frozen")]
    while todo:
        module = todo.pop()
        # (the package's face imports its names only for type checkers: not followed here;
        # the subprocess below checks what importing it loads)
        for nxt in graph[module] - reach - {"pifi_fast"}:
            reach.add(nxt)
            todo.append(nxt)
    upper = ("pifi_fast.model", "pifi_fast.pifi_base", "pifi_fast.training", "pifi_fast.cli",
             "pifi_fast.loading", "pifi_fast.hf_layer")
    assert not {m for m in reach if m.startswith(upper)}, sorted(reach)
    for target in ("pifi_fast.frozen.module", "pifi_fast.kernels.gemm", "pifi_fast.frozen"):
        code = (f"import sys, {target}; "
                "print(sorted(m for m in sys.modules if m.startswith(('pifi_fast.model', "
                "'pifi_fast.training', 'pifi_fast.cli', 'pifi_fast.pifi_base'))))")
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        assert out == "[]", f"importing {target} loaded {out}"


# namedtuple's own API, public despite the underscore
NAMEDTUPLE_API = {"_fields", "_asdict", "_replace", "_make", "_field_defaults"}


def private_uses(path: Path) -> list[str]:
    """`module._name` and `from module import _name` in path where module is a pifi_fast module
    other than path's own and _name is not itself a module (a private module may be imported;
    its functions are its own business)."""
    tree = ast.parse(path.read_text(), str(path))
    own = {name for name, p in MODULES.items() if p == path}
    modules = {}  # local name -> pifi_fast module it is bound to
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in MODULES and a.asname:
                    modules[a.asname] = a.name
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pifi_fast"):
            for a in node.names:
                full = f"{node.module}.{a.name}"
                if full in MODULES or full in COMPILED:
                    modules[a.asname or a.name] = full
                elif (a.name.startswith("_") and not a.name.startswith("__")
                      and node.module not in own):
                    found.append(f"{node.lineno}: from {node.module} import {a.name}")
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in modules and node.attr.startswith("_")
                and not node.attr.startswith("__") and node.attr not in NAMEDTUPLE_API
                and f"{modules[node.value.id]}.{node.attr}" not in MODULES
                and modules[node.value.id] not in own):
            found.append(f"{node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_the_checker_finds_private_uses(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from pifi_fast import loading, _ext\nfrom pifi_fast.bench.common import "
                     "_private, Case\nimport pifi_fast.frozen.options as O\n"
                     "loading._hidden(); _ext.HAS_EXTENSION; O._member; loading.__name__\n")
    assert sorted(private_uses(probe)) == sorted([
        "2: from pifi_fast.bench.common import _private", "4: loading._hidden", "4: O._member"])


def test_no_test_or_benchmark_uses_another_modules_private_names():
    files = [*(ROOT / "tests").glob("*.py"), *(ROOT / "benchmarks").rglob("*.py"),
             *(ROOT / "pifi_fast" / "bench").glob("*.py"), ROOT / "conftest.py"]
    found = [f"{path.relative_to(ROOT)}:{use}" for path in sorted(files)
             for use in private_uses(path)]
    assert not found, "private names of another module:\n" + "\n".join(found)


def test_module_sizes():
    """No module of the frozen-layer package over 400 lines, none of the package over 600."""
    over = [f"{path.relative_to(ROOT)}: {n}" for name, path in MODULES.items()
            for n in [len(path.read_text().splitlines())]
            if n > (400 if name.startswith("pifi_fast.frozen") else 600)]
    assert not over, over


def test_every_subpackage_is_in_the_wheel():
    """pyproject.toml lists the packages a wheel holds by name: a new subpackage of pifi_fast
    left out of it imports from the source tree and fails only once installed."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    found = {"pifi_fast." + p.parent.name for p in (ROOT / "pifi_fast").glob("*/__init__.py")}
    found |= {"pifi_fast", "pifi_fast.kernels"}  # the kernels: a namespace link to ./kernels
    assert found == listed, f"in the tree, not listed: {sorted(found - listed)}; " \
                            f"listed, not in the tree: {sorted(listed - found)}"
