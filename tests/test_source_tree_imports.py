"""The source tree never shadows an installed package (issue: Transformers 5.25 imports Hugging
Face's `kernels`, which our top-level ./kernels folder used to shadow whenever the repository root
was on sys.path: pytest's rootdir conftest, `python -m`, `python -c`, a notebook in the clone).

Every check runs in a subprocess started in the repository root, where the root is sys.path[0],
as it is for a user working in a clone."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from helpers import FAMILIES

ROOT = Path(__file__).resolve().parent.parent
# Importable names at the root that are ours to own: the package, and two files tools look for
# by name (pytest's conftest, setuptools' setup.py) that no distribution installs.
ROOT_IMPORTABLE = {"pifi_fast", "conftest", "setup"}
# the SLMs the tests build, besides the decoder families of helpers.FAMILIES
SLM_TYPES = ("bert", "roberta", "xlm-roberta", "electra", "deberta-v2", "t5", "bart")


def _run_in_root(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_only_the_package_is_importable_from_the_root():
    """A folder with an __init__.py, or a .py file, at the root is a regular top-level package
    or module for anyone whose sys.path starts there, and wins over site-packages: only ours."""
    regular = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    modules = {p.stem for p in ROOT.glob("*.py")}
    assert regular | modules <= ROOT_IMPORTABLE, (
        f"importable from the repository root: {sorted((regular | modules) - ROOT_IMPORTABLE)}")
    assert not (ROOT / "kernels" / "__init__.py").exists()


def test_import_kernels_from_the_root_never_finds_the_repository():
    """`import kernels` in the root: Hugging Face's package where it is installed, else not
    found, or at most the namespace portion that any folder is (PEP 420: no code runs, and an
    installed regular package of that name always wins, checked in the next test)."""
    proc = _run_in_root("""
        import json
        try:
            import kernels
        except ModuleNotFoundError:
            print(json.dumps({"found": False}))
        else:
            print(json.dumps({"found": True, "file": getattr(kernels, "__file__", None),
                              "path": [str(p) for p in getattr(kernels, "__path__", [])]}))
        """)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.splitlines()[-1])
    if not got["found"]:
        return
    if got["file"] is not None:  # a regular package or module: an installed one (the venv
        # may sit inside the clone: .venv/lib/.../site-packages)
        found = Path(got["file"]).resolve()
        assert "site-packages" in found.parts or not found.is_relative_to(ROOT), got
    else:  # a bare namespace: only our code-free folder, nothing to run
        assert [Path(p).resolve() for p in got["path"]] == [ROOT / "kernels"], got


def test_an_installed_kernels_package_wins_over_the_folder(tmp_path):
    """However the environment looks, a regular `kernels` package installed anywhere on sys.path
    (here a folder appended after site-packages) is the one `import kernels` finds in the root."""
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("MARK = 'installed'\n")
    proc = _run_in_root("""
        import sys
        sys.path = [p for p in sys.path if 'site-packages' not in p] + [sys.argv[1]]
        import kernels
        print(kernels.MARK, kernels.__file__)
        """, str(site))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] == "installed"


def test_the_cli_and_every_model_module_the_tests_use_import_from_the_root():
    """`python -m pifi_fast.cli info` and the Transformers modelling modules of every model the
    tests build (transformers.activations imports `kernels` on the way) work from the root."""
    info = subprocess.run([sys.executable, "-m", "pifi_fast.cli", "info"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert info.returncode == 0, info.stderr[-2000:]
    assert "fused frozen-layer families" in info.stdout
    types = sorted({options.get("model_type", name) for name, options in FAMILIES.items()}
                   | set(SLM_TYPES))
    proc = _run_in_root("""
        import sys, transformers
        from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES
        for model_type in sys.argv[1:]:
            model_class = MODEL_MAPPING_NAMES[model_type]
            getattr(transformers, model_class)  # imports the modelling module
        import transformers.activations
        print("imported", len(sys.argv) - 1)
        """, *types)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["imported", str(len(types))]
