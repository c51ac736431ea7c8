"""pifi_fast.frozen.linear: the projections against a float64 truth, the activation epilogue's
fallback, and the FP8 path's contract."""
import pytest
import torch

from pifi_fast.frozen.linear import (LinearPath, QuantWeight, fp8_linear, project,
                                     project_input_grad, quant_linear, triton_gemm_applies)
from pifi_fast.kernels import quant as Q


def _dense(m=7, k=48, n=40, dtype=torch.float64):
    g = torch.Generator().manual_seed(5)
    return (torch.randn(m, k, generator=g, dtype=dtype), torch.randn(n, k, generator=g,
                                                                     dtype=dtype),
            torch.randn(n, generator=g, dtype=dtype), torch.randn(m, n, generator=g, dtype=dtype))


def test_project_and_its_input_grad_against_float64():
    x, w, b, r = _dense()
    path = LinearPath()
    torch.testing.assert_close(project(path, x, w, b, r), x @ w.t() + b + r)
    dy = torch.randn(7, 40, dtype=torch.float64)
    torch.testing.assert_close(project_input_grad(path, dy, w), dy @ w)


def test_an_epilogue_the_gemm_does_not_fuse_runs_after_the_product():
    x, w, _, _ = _dense()
    calls = []
    y = project(LinearPath(), x, w, epilogue="swiglu",
                act=lambda t: calls.append(t.shape) or 2 * t)
    assert calls == [(7, 40)]
    torch.testing.assert_close(y, 2 * (x @ w.t()))
    dy, aux = torch.randn(7, 40, dtype=torch.float64), torch.randn(7, 48, dtype=torch.float64)
    dx = project_input_grad(LinearPath(), dy, w, "swiglu_bwd", aux,
                            act_bwd=lambda a, dm: a * dm)
    torch.testing.assert_close(dx, aux * (dy @ w))


def test_cublas_is_never_the_triton_gemm():
    x, *_ = _dense(dtype=torch.float32)
    assert not triton_gemm_applies(LinearPath(gemm="cublas"), x)


def test_quant_linear_twin_is_the_dequantized_product():
    x, w, b, _ = _dense(dtype=torch.float32)
    q, scale = Q.quantize(w, "int8", 16)
    out = quant_linear(x, QuantWeight(q, scale), b, triton=False, cpu_int8=False)
    want = x.double() @ (q.double() * scale.double().repeat_interleave(16, 1)).t() + b.double()
    assert (out.double() - want).abs().max() <= 1e-4 * want.abs().max()


def test_fp8_linear_refuses_shapes_cublaslt_cannot_take():
    x = torch.randn(3, 24)
    q = torch.zeros(16, 24).to(Q.FP8)
    with pytest.raises(ValueError, match="multiples of 16"):
        fp8_linear(x, QuantWeight(q, torch.ones(16, 1)))
