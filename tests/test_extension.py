"""pifi_fast._C: the frozen_linear op (CPU, Meta, autograd) and the wheel that carries it."""
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import torch

import pifi_fast
from pifi_fast._ext import FrozenLinearPython

ROOT = Path(__file__).resolve().parents[1]
needs_ext = pytest.mark.skipif(not pifi_fast.HAS_EXTENSION, reason="built with PIFI_FAST_NO_EXT=1")


def _args(shape, n_out, bias, residual, dtype=torch.float64):
    x = torch.randn(*shape, dtype=dtype, requires_grad=True)
    w = torch.randn(n_out, shape[-1], dtype=dtype)
    b = torch.randn(n_out, dtype=dtype) if bias else None
    r = torch.randn(*shape[:-1], n_out, dtype=dtype, requires_grad=True) if residual else None
    return x, w, b, r


@needs_ext
@pytest.mark.parametrize("shape,n_out", [((7,), 5), ((3, 11, 13), 9), ((2, 1, 1, 64), 1)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_frozen_linear_matches_its_twin_forward_and_backward(shape, n_out, bias, residual):
    x, w, b, r = _args(shape, n_out, bias, residual)
    y = torch.ops.pifi_fast.frozen_linear(x, w, b, r)
    expected = x @ w.T + (0 if b is None else b) + (0 if r is None else r)
    assert torch.allclose(y, expected, rtol=1e-12, atol=1e-12)
    x2, r2 = x.detach().clone().requires_grad_(), None if r is None else r.detach().clone().requires_grad_()
    y2 = FrozenLinearPython.apply(x2, w, b, r2)
    dy = torch.randn_like(y)
    y.backward(dy)
    y2.backward(dy)
    assert torch.allclose(x.grad, dy @ w) and torch.allclose(x.grad, x2.grad)
    if r is not None:
        assert torch.equal(r.grad, dy) and torch.equal(r2.grad, dy)
    assert torch.autograd.gradcheck(
        lambda xx: torch.ops.pifi_fast.frozen_linear(xx, w, b, None), (x.detach().requires_grad_(),))


@needs_ext
def test_frozen_linear_saves_no_activation():
    x, w, _, r = _args((4, 6, 8), 5, False, True, dtype=torch.float32)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        torch.ops.pifi_fast.frozen_linear(x, w, None, r).sum().backward()
    assert len(saved) == 1 and saved[0].data_ptr() == w.data_ptr()  # the frozen weight only


@needs_ext
def test_frozen_linear_meta_and_errors():
    y = torch.ops.pifi_fast.frozen_linear(torch.empty(3, 4, 8, device="meta"),
                                          torch.empty(6, 8, device="meta"))
    assert y.shape == (3, 4, 6) and y.device.type == "meta"
    with pytest.raises(RuntimeError, match="in-features"):
        torch.ops.pifi_fast.frozen_linear(torch.randn(2, 7), torch.randn(3, 8))
    with pytest.raises(RuntimeError, match="weight requires grad"):
        torch.ops.pifi_fast.frozen_linear(torch.randn(2, 8, requires_grad=True),
                                          torch.randn(3, 8, requires_grad=True))
    with pytest.raises(RuntimeError, match="x is Double but weight is Float"):
        torch.ops.pifi_fast.frozen_linear(torch.randn(2, 8, dtype=torch.float64), torch.randn(3, 8))


@pytest.mark.gpu
@needs_ext
def test_frozen_linear_cuda_matches_cpu():
    x, w, b, r = _args((5, 33, 64), 48, True, True, dtype=torch.float32)
    y_cpu = torch.ops.pifi_fast.frozen_linear(x, w, b, r)
    y_gpu = torch.ops.pifi_fast.frozen_linear(*(t.detach().cuda() for t in (x, w, b, r)))
    assert torch.allclose(y_gpu.cpu(), y_cpu.detach(), rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # over 2 s on 2 cores: not in make check
def test_package_works_without_the_extension():
    code = ("import warnings, torch\n"
            "with warnings.catch_warnings(record=True) as rec:\n"
            "    warnings.simplefilter('always')\n"
            "    import pifi_fast\n"
            "    assert not pifi_fast.HAS_EXTENSION\n"
            "    x = torch.randn(3, 4, requires_grad=True); w = torch.randn(2, 4)\n"
            "    pifi_fast.frozen_linear(x, w).sum().backward()\n"
            "    pifi_fast.frozen_linear(x, w)\n"
            "assert sum('not available' in str(r.message) for r in rec) == 1, rec\n"
            "print('ok')\n")
    # Hide the built _C: a meta-path finder that refuses it stands in for a build without it.
    code = ("import sys\nclass Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'pifi_fast._C': raise ImportError('blocked for the test')\n"
            "sys.meta_path.insert(0, Block())\n") + code
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


@pytest.mark.slow
def test_wheel_knows_its_torch_and_runs_in_a_fresh_venv_without_a_compiler(tmp_path):
    """`make wheel`'s steps on a copy of the source: pip wheel, auditwheel repair to a manylinux
    tag (torch's and CUDA's libraries excluded); the wheel pins and names the torch it was
    compiled against; installed into a fresh venv whose PATH holds no compiler, it runs a tiny
    PiFi model through the compiled op; told it was built for another torch, it says so in one
    line and runs the plain path instead of failing on an undefined symbol."""
    import re
    import shutil
    import zipfile

    import torch as _torch

    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".venv", "build", "dist", "*.egg-info", "*.so", "__pycache__", ".git", ".pytest_cache",
        "_build_info.py", ".whl", "runs", "benchmarks"))
    env = dict(os.environ, MAX_JOBS="2", TORCH_CUDA_ARCH_LIST=os.environ.get(
        "PIFI_FAST_TEST_ARCHS", "8.0;9.0a"))
    raw, dist = tmp_path / "raw", tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-build-isolation",
                    "--no-deps", "-w", str(raw)], check=True, env=env, cwd=tmp_path,
                   capture_output=True)
    tools = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    subprocess.run([sys.executable, "-m", "auditwheel", "repair", "--exclude", "libtorch*",
                    "--exclude", "libc10*", "--exclude", "libcudart*", "-w", str(dist),
                    *map(str, raw.glob("*.whl"))], check=True, capture_output=True, env=tools)
    wheels = list(dist.glob("pifi_fast-*.whl"))
    assert len(wheels) == 1, wheels
    release = ".".join(_torch.__version__.split("+")[0].split(".")[:2])
    flavour = f"cu{_torch.version.cuda.replace('.', '')}" if _torch.version.cuda else "cpu"
    assert wheels[0].name.startswith(f"pifi_fast-0.1.0+torch{release}{flavour}-"), wheels[0].name
    assert re.search(r"manylinux_\d+_\d+_x86_64", wheels[0].name), wheels[0].name
    archive = zipfile.ZipFile(wheels[0])
    names = archive.namelist()
    assert any(n.startswith("pifi_fast/_C") and n.endswith(".so") for n in names), names
    # the kernels as real files (not the source tree's link), a namespace package: no __init__
    assert {"pifi_fast/kernels/common.py", "pifi_fast/kernels/gemm.py",
            "pifi_fast/_build_info.py"} <= set(names)
    assert not any(n.startswith("kernels/") for n in names)
    assert not any("libtorch" in n or "libc10" in n for n in names)  # torch's stay out
    metadata = archive.read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert f"Requires-Dist: torch=={release}.*" in metadata
    # A fresh venv; torch and the other dependencies come from this environment's site-packages
    # through a .pth file placed *after* the venv's own, so pifi_fast can only come from the wheel.
    fresh = tmp_path / "fresh"
    venv.EnvBuilder(with_pip=True).create(fresh)
    py = fresh / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import site; print(site.getsitepackages()[0])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    host_site = str(Path(_torch.__file__).parents[1])
    Path(site, "zz_host_site.pth").write_text(host_site + "\n")
    bare = {"PATH": str(fresh / "bin"), "HOME": str(tmp_path)}  # no gcc, nvcc, ninja here
    subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", str(wheels[0])],
                   check=True, capture_output=True, env=bare)
    run_model = ("import sys, torch, pifi_fast\n"
                 "from transformers import BertConfig, LlamaConfig\n"
                 "from pifi_fast import PiFiModel\n"
                 "assert pifi_fast.__file__.startswith(sys.prefix), pifi_fast.__file__\n"
                 "slm = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,"
                 " intermediate_size=48, vocab_size=100)\n"
                 "llm = LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4,"
                 " num_key_value_heads=2, num_hidden_layers=1)\n"
                 "m = PiFiModel.from_parts(slm, llm, seed=0)\n"
                 "out = m(input_ids=torch.randint(3, 100, (2, 5)))\n"
                 "assert torch.isfinite(out.logits).all()\n"
                 "print('extension', pifi_fast.HAS_EXTENSION)\n")
    out = subprocess.run([str(py), "-c", run_model], capture_output=True, text=True,
                         cwd=tmp_path, env=bare)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "extension True" in out.stdout
    # Built for another torch: one clear line, the plain path, no undefined-symbol error
    info = Path(site, "pifi_fast", "_build_info.py")
    info.write_text(info.read_text().replace(f"TORCH_VERSION = '{_torch.__version__}'",
                                             "TORCH_VERSION = '2.99.0+cu999'"))
    out = subprocess.run([str(py), "-W", "always", "-c", run_model], capture_output=True,
                         text=True, cwd=tmp_path, env=bare)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "extension False" in out.stdout
    warning = [line for line in out.stderr.splitlines() if "compiled against torch" in line]
    assert len(warning) == 1 and "2.99.0+cu999" in warning[0] and _torch.__version__ in warning[0]
    assert "undefined symbol" not in out.stderr


@pytest.mark.slow  # over 2 s on 2 cores: not in make check
def test_an_install_without_the_extension_says_it_was_not_built(tmp_path):
    """PIFI_FAST_NO_EXT=1 (or no compiler): `pifi-fast info` says the extension was not built and
    how to build it, not Python's "partially initialized module ... circular import"."""
    script = ("import importlib.util as u\n"
              "real = u.find_spec\n"
              "u.find_spec = lambda n, *a: None if n == 'pifi_fast._C' else real(n, *a)\n"
              "from pifi_fast.cli import main\n"
              "main(['info'])\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("compiled extension"))
    assert "compiled extension: False" in line and "it was not built" in line
    assert "circular" not in out.stdout + out.stderr
