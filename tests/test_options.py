"""pifi_fast.frozen.options: LayerOptions validated once, strings taken as enums, and the layer's
PIFI_FAST_* variables read in that module only."""
import re
from pathlib import Path

import pytest

from pifi_fast import attention
from pifi_fast.frozen import options as O
from pifi_fast.frozen.options import Gemm, Kernels, LayerOptions, Recompute, Weights

ROOT = Path(__file__).resolve().parent.parent


def test_strings_become_enums_equal_to_them():
    opts = LayerOptions(kernels="torch", recompute="mlp", gemm="triton", weights="int8-channel",
                        chunk_tokens=64, causal=1, attention="sdpa")
    assert opts.kernels is Kernels.TORCH and opts.recompute is Recompute.MLP
    assert opts.gemm is Gemm.TRITON and opts.weights is Weights.INT8_CHANNEL
    assert opts.recompute == "mlp" and f"{opts.weights}" == "int8-channel"
    assert opts.causal is True
    assert opts.as_dict() == {"kernels": "torch", "recompute": "mlp", "attention": "sdpa",
                              "gemm": "triton", "chunk_tokens": 64, "causal": True,
                              "weights": "int8-channel"}
    assert LayerOptions(**opts.as_dict()) == opts
    assert LayerOptions.of(opts, recompute="none").recompute is Recompute.NONE


@pytest.mark.parametrize("field,value", [("kernels", "cuda"), ("recompute", "all"),
                                         ("gemm", "cutlass"), ("weights", "int4"),
                                         ("attention", "flash"), ("chunk_tokens", 0),
                                         ("chunk_tokens", "all"), ("chunk_tokens", True)])
def test_an_unknown_value_is_refused_with_the_choices(field, value):
    with pytest.raises(ValueError, match=field):
        LayerOptions(**{field: value})


def test_attention_choices_are_the_backends():
    for backend in attention.BACKENDS:
        assert LayerOptions(attention=backend).attention == backend


def test_the_environment_overrides_only_the_automatic_choice(monkeypatch):
    monkeypatch.delenv("PIFI_FAST_KERNELS", raising=False)
    monkeypatch.delenv("PIFI_FAST_ATTENTION", raising=False)
    assert O.effective_kernels("auto") is Kernels.AUTO
    assert O.effective_attention(None) is None
    monkeypatch.setenv("PIFI_FAST_KERNELS", "torch")
    monkeypatch.setenv("PIFI_FAST_ATTENTION", "sdpa")
    assert O.effective_kernels("auto") is Kernels.TORCH
    assert O.effective_kernels("triton") is Kernels.TRITON  # a named choice wins
    assert O.effective_attention(None) == "sdpa"
    assert O.effective_attention("flash_attn") == "flash_attn"
    monkeypatch.setenv("PIFI_FAST_KERNELS", "gpu")
    with pytest.raises(ValueError, match="kernels must be one of"):
        O.effective_kernels("auto")


def test_only_the_options_module_reads_the_layers_variables():
    """No other module of the package reads a variable of ENVIRONMENT, and none sets one for
    the process."""
    readers = []
    for path in sorted((ROOT / "pifi_fast").rglob("*.py")) + sorted((ROOT / "kernels").glob("*.py")):
        if path.name == "options.py" and path.parent.name == "frozen":
            continue
        text = path.read_text()
        for var in O.ENVIRONMENT:
            if re.search(rf"environ[^\n]*{var}|getenv\([^\n]*{var}", text):
                readers.append(f"{path.relative_to(ROOT)}: {var}")
    assert not readers, readers


def test_no_library_module_sets_a_variable_for_the_process():
    """The package and the kernels only read PIFI_FAST_* variables: none is assigned, set by
    default, updated, popped or put (a deterministic run asks torch instead; see
    kernels/_tiles.py: launch)."""
    setting = re.compile(r"environ\[[^\]]*PIFI_FAST_[A-Z_]+[^\]]*\]\s*=(?!=)"
                         r"|environ\.(?:setdefault|pop|update)\([^\n]*PIFI_FAST_"
                         r"|putenv\([^\n]*PIFI_FAST_")
    name = "PIFI_" + "FAST_X"  # (spelled out, the docs-table test would count it as read)
    assert setting.search(f'os.environ["{name}"] = "0"')  # the pattern can match
    assert setting.search(f"os.environ.setdefault('{name}', '1')")
    setters = [f"{path.relative_to(ROOT)}: {m.group(0)}"
               for path in [*(ROOT / "pifi_fast").rglob("*.py"), *(ROOT / "kernels").glob("*.py")]
               for m in setting.finditer(path.read_text())]
    assert not setters, setters


def test_the_docs_table_lists_every_variable():
    page = (ROOT / "docs" / "development.md").read_text()
    for var in O.ENVIRONMENT:
        assert f"`{var}`" in page, var


def test_the_docs_table_lists_every_variable_the_repository_reads():
    """Every PIFI_FAST_* variable some Python file reads from the environment (the package,
    the kernels, the tests, setup.py) has its row in docs/development.md."""
    page = (ROOT / "docs" / "development.md").read_text()
    rows = set(re.findall(r"^\| `(PIFI_FAST_[A-Z_]+)` \|", page, re.M))
    read = set()
    for path in [ROOT / "setup.py", ROOT / "conftest.py", *(ROOT / "pifi_fast").rglob("*.py"),
                 *(ROOT / "kernels").glob("*.py"), *(ROOT / "tests").glob("*.py")]:
        text = path.read_text()
        read.update(re.findall(r"(?:environ\.get\(|getenv\(|environ\[)\s*[\"'](PIFI_FAST_[A-Z_]+)",
                               text))
    assert read >= set(O.ENVIRONMENT)
    assert not read - rows, f"not in docs/development.md's table: {sorted(read - rows)}"
