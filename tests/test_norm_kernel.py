"""kernels/norm.py: the one row-norm kernel, each mode against its plain PyTorch twin (the 2x
rule of tests/test_kernels.py), its backward against autograd, the looped path for wide rows,
and the names the layer calls (rms_norm, family_ops) as the same kernel.

On CPU the kernel runs under Triton's interpreter (the root conftest sets TRITON_INTERPRET=1),
so shapes stay small: awkward widths (72, 576, 1000, 4544), one row and many.
"""
import pytest
import torch
from helpers import KERNEL_DEVICE, check_2x, f64, randn, rel

from pifi_fast.kernels import common as kernels
from pifi_fast.kernels import family_ops as F
from pifi_fast.kernels import norm as N
from pifi_fast.kernels import rms_norm as R
from pifi_fast.kernels.modes import Norm

pytestmark = [pytest.mark.kernels, pytest.mark.usefixtures("seeded_by_test_id"),
              pytest.mark.skipif(not kernels.HAS_TRITON, reason="triton is not installed")]
DEVICE = KERNEL_DEVICE
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MODES = list(Norm)


def inputs(mode, rows, hidden, dtype):
    """x with a mean far from 0 and a spread of scales (LayerNorm's centring has work to do),
    a residual, a weight near 1 for "rms" and near 0 for "rms_1p" (Gemma stores w, uses 1 + w),
    and a bias for "layer"."""
    x = randn(rows, hidden, dtype=dtype, scale=3.0) + 2
    res = randn(rows, hidden, dtype=dtype)
    w = randn(hidden, dtype=dtype, scale=0.5) + (1 if mode == Norm.RMS else 0)
    b = randn(hidden, dtype=dtype) if mode == Norm.LAYER else None
    return x, res, w, b


def check_mode(mode, dtype, rows, hidden, with_residual, with_dres):
    x, res, w, b = inputs(mode, rows, hidden, dtype)
    res = res if with_residual else None
    eps = 1e-5
    y, s, rstd = N.norm_fwd(x, w, eps, mode, b, res)
    y_t, s_t, rstd_t = N.norm_fwd_ref(x, w, eps, mode, b, res)
    y_64, _, rstd_64 = N.norm_fwd_ref(*f64(x, w), eps, mode, *f64(b, res))
    assert torch.equal(s, s_t)  # the residual add rounds exactly like x + residual
    assert y.shape == x.shape and rstd.shape == x.shape[:-1] and rstd.dtype == torch.float32
    check_2x(y, y_t, y_64, f"{mode.label} fwd")
    check_2x(rstd, rstd_t, rstd_64, f"{mode.label} rstd")
    dy = randn(rows, hidden, dtype=dtype)
    dres = randn(rows, hidden, dtype=dtype) if with_dres else None
    ds = N.norm_bwd(dy, s, w, rstd, mode, dres)
    check_2x(ds, N.norm_bwd_ref(dy, s_t, w, rstd_t, mode, dres),
             N.norm_bwd_ref(*f64(dy, s_t, w, rstd_64), mode, *f64(dres)), f"{mode.label} bwd")


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.label)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", [(1, 576), (7, 1000), (33, 72), (3, 4544)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_each_mode_forward_and_backward(mode, dtype, rows, hidden, with_residual):
    check_mode(mode, dtype, rows, hidden, with_residual, with_dres=rows % 2 == 1)


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.label)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_looped_path_for_wide_rows(mode, dtype, monkeypatch):
    """Rows wider than the one-pass limit (16384+ fp32 or 32768+ 16-bit columns) loop over
    column blocks, one pass per statistic; shrunk limits send hidden 1000 through the loop."""
    monkeypatch.setattr(N, "MAX_BLOCK_BYTES", 256)
    monkeypatch.setattr(N, "LOOP_BLOCK", 64)
    assert N.launch_params(1000, 2, mode) == (64, 16, False)
    check_mode(mode, dtype, 5, 1000, with_residual=True, with_dres=True)
    check_mode(mode, dtype, 2, 130, with_residual=False, with_dres=False)


def test_launch_params_per_mode():
    """One pass up to MAX_BLOCK_BYTES per row; "rms" takes a warp per 512 columns (at most 16),
    the others a warp per 1024 (at most 8); looped rows take LOOP_BLOCK and 16 warps."""
    assert N.launch_params(16384, 2, "rms") == (16384, 16, True)
    assert N.launch_params(16384, 2, "layer") == (16384, 8, True)
    assert N.launch_params(1000, 2, "rms") == (1024, 2, True)
    assert N.launch_params(1000, 2, "rms_1p") == (1024, 1, True)
    assert N.launch_params(72, 4, "layer") == (128, 1, True)
    for mode in MODES:
        assert N.launch_params(16384, 2, mode)[2] and not N.launch_params(16385, 2, mode)[2]
        assert N.launch_params(8192, 4, mode)[2] and not N.launch_params(8193, 4, mode)[2]
        assert N.launch_params(N.MAX_HIDDEN, 2, mode) == (N.LOOP_BLOCK, 16, False)
    # the widths compile_launches compiles are the ones the launchers pick for rows of 64
    # columns and more (narrower rows, in tests only, take narrower blocks, not compiled)
    for dtype, size in (("bf16", 2), ("fp32", 4)):
        compiled = {(launch.constexprs["NORM"], launch.constexprs["BLOCK_N"])
                    for launch in N.compile_launches(90, dtype)}
        for mode in MODES:
            for n in (64, 65, 100, 576, 4544, 8192, 8193, 16384, 20000, N.MAX_HIDDEN):
                assert (int(mode), N.launch_params(n, size, mode)[0]) in compiled, (mode, n)


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.label)
def test_backward_is_the_autograd_gradient(mode):
    """The backward formulas, in the twin (float64) and in the kernel (fp32), are autograd's
    gradient of the twin's forward, with and without the residual (whose gradient is ds)."""
    x = randn(5, 100, dtype=torch.float64, scale=2.0).requires_grad_()
    res = randn(5, 100, dtype=torch.float64).requires_grad_()
    w, b = randn(100, dtype=torch.float64), randn(100, dtype=torch.float64)
    b = b if mode == Norm.LAYER else None
    for r in (None, res):
        y, s, rstd = N.norm_fwd_ref(x, w, 1e-6, mode, b, r)
        dy = randn(5, 100, dtype=torch.float64)
        grads = torch.autograd.grad(y, [x] if r is None else [x, r], dy)
        ds = N.norm_bwd_ref(dy, s.detach(), w, rstd, mode)
        for g in grads:
            assert rel(ds, g) < 1e-12
        ds32 = N.norm_bwd(dy.float(), s.detach().float(), w.float(), rstd.float(), mode)
        assert rel(ds32, grads[0]) < 1e-5


def test_layer_norm_twin_is_torch_layer_norm():
    x, _, w, b = inputs(Norm.LAYER, 4, 72, torch.bfloat16)
    y = N.norm_fwd_ref(x, w, 1e-5, "layer", b)[0]
    assert torch.equal(y, torch.nn.functional.layer_norm(x, (72,), w, b, 1e-5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_layers_names_are_the_same_kernel(dtype):
    """rms_norm.* is the "rms" mode and family_ops.norm_* the "rms_1p" and "layer" modes, to
    the bit."""
    x, res, w, _ = inputs(Norm.RMS, 3, 1000, dtype)
    dy, dres = randn(3, 1000, dtype=dtype), randn(3, 1000, dtype=dtype)
    y, s, rstd = R.rms_norm_fwd(x, w, 1e-5, res)
    for a, c in zip((y, s, rstd), N.norm_fwd(x, w, 1e-5, Norm.RMS, residual=res)):
        assert torch.equal(a, c)
    assert torch.equal(R.rms_norm_bwd(dy, s, w, rstd, dres),
                       N.norm_bwd(dy, s, w, rstd, "rms", dres))
    for a, c in zip(R.rms_norm_fwd_ref(x, w, 1e-5, res), N.norm_fwd_ref(x, w, 1e-5, "rms",
                                                                         residual=res)):
        assert torch.equal(a, c)
    for kind in ("rms_1p", "layer"):
        bias = randn(1000, dtype=dtype) if kind == "layer" else None
        y, rstd = F.norm_fwd(x, w, 1e-5, kind, bias)
        y_n, s_n, rstd_n = N.norm_fwd(x, w, 1e-5, kind, bias)
        assert torch.equal(y, y_n) and torch.equal(rstd, rstd_n) and s_n is not None
        assert torch.equal(F.norm_bwd(dy, x, w, rstd, kind, dres),
                           N.norm_bwd(dy, x, w, rstd, kind, dres))


def test_rejects_bad_arguments():
    x, w = torch.ones(2, 8, device=DEVICE), torch.ones(8, device=DEVICE)
    with pytest.raises(ValueError, match="hidden sizes up to"):
        N.norm_fwd(torch.ones(1, N.MAX_HIDDEN + 1, device=DEVICE),
                   torch.ones(N.MAX_HIDDEN + 1, device=DEVICE), 1e-5, "rms")
    with pytest.raises(ValueError, match="norm must be one of"):
        N.norm_fwd(x, w, 1e-5, "batch")
    with pytest.raises(ValueError, match="takes a bias"):
        N.norm_fwd(x, w, 1e-5, "layer")
    with pytest.raises(ValueError, match="takes no bias"):
        N.norm_fwd(x, w, 1e-5, "rms_1p", bias=w)


def test_zero_rows():
    x, w = torch.ones(0, 8, device=DEVICE), torch.ones(8, device=DEVICE)
    y, s, rstd = N.norm_fwd(x, w, 1e-5, "rms_1p")
    assert y.shape == (0, 8) and rstd.shape == (0,)
    assert N.norm_bwd(x, s, w, rstd, "rms_1p").shape == (0, 8)
