"""Each Triton kernel against its plain PyTorch twin (the 2x rule below): RoPE and the projection
GEMM here; the norms in test_norm_kernel.py, the activations in test_activations.py.

On CPU the kernels run under Triton's interpreter (the root conftest sets TRITON_INTERPRET=1),
so shapes stay small. The reference truth is the twin run in float64; a kernel passes when its
error is at most twice the error of the twin run in the same low precision, plus a floor of two
fp32 epsilons (the kernels compute in fp32; in fp32 the twin is sometimes exact by luck).
"""
import pytest
import torch
from helpers import KERNEL_DEVICE, check_2x, f64, randn, rel

from pifi_fast.kernels import common as kernels
from pifi_fast.kernels import gemm as G
from pifi_fast.kernels import rms_norm as R
from pifi_fast.kernels import rope as P
from pifi_fast.kernels import swiglu as S

pytestmark = [pytest.mark.kernels, pytest.mark.usefixtures("seeded_by_test_id"),
              pytest.mark.skipif(not kernels.HAS_TRITON, reason="triton is not installed")]
DEVICE = KERNEL_DEVICE
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# -- RoPE ------------------------------------------------------------------------------------------
def rope_tables(n_pos, head_dim, dtype=torch.float32):
    """cos/sin tables shaped like a Hugging Face rotary module's output (halves repeated)."""
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    ang = torch.arange(n_pos, dtype=torch.float64)[:, None] * inv[None]
    ang = torch.cat((ang, ang), -1)
    return ang.cos().to(DEVICE, dtype), ang.sin().to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,nq,nkv,head_dim", [(7, 6, 2, 12), (1, 4, 4, 64),
                                                    (100, 12, 4, 128), (9, 3, 1, 64),
                                                    (3, 32, 8, 128)])  # 40 heads: 2 programs
@pytest.mark.parametrize("transpose", [False, True])
def test_rope_in_place(dtype, tokens, nq, nkv, head_dim, transpose):
    width = (nq + 2 * nkv) * head_dim
    qkv = randn(tokens, width, dtype=dtype)
    pos = torch.randint(0, 300, (tokens,), device=DEVICE)
    cos, sin = rope_tables(300, head_dim)
    out = qkv.clone()
    ret = P.rope_(out, pos, cos, sin, nq, nkv, head_dim, transpose)
    assert ret.data_ptr() == out.data_ptr()  # in place
    twin = P.rope_ref_(qkv.clone(), pos, cos, sin, nq, nkv, head_dim, transpose)
    truth = P.rope_ref_(qkv.double(), pos, cos.double(), sin.double(), nq, nkv, head_dim,
                        transpose)
    rotated = (nq + nkv) * head_dim
    check_2x(out[:, :rotated], twin[:, :rotated], truth[:, :rotated], "rope")
    assert torch.equal(out[:, rotated:], qkv[:, rotated:])  # v is untouched


def test_rope_transpose_is_the_adjoint_and_the_inverse():
    nq, nkv, d, t = 6, 2, 16, 11
    x, y = randn(t, (nq + 2 * nkv) * d, dtype=torch.float64), randn(t, (nq + 2 * nkv) * d,
                                                                     dtype=torch.float64)
    pos = torch.randint(0, 50, (t,), device=DEVICE)
    cos, sin = rope_tables(50, d, torch.float64)
    rx = P.rope_ref_(x.clone(), pos, cos, sin, nq, nkv, d)
    rty = P.rope_ref_(y.clone(), pos, cos, sin, nq, nkv, d, transpose=True)
    assert abs((rx * y).sum() - (x * rty).sum()) < 1e-9 * x.norm() * y.norm()
    back = P.rope_ref_(rx.clone(), pos, cos, sin, nq, nkv, d, transpose=True)
    assert rel(back, x) < 1e-12
    xf = x.float()
    k = P.rope_(P.rope_(xf.clone(), pos, cos.float(), sin.float(), nq, nkv, d), pos,
                cos.float(), sin.float(), nq, nkv, d, transpose=True)
    assert rel(k, x) < 1e-6


def test_rope_rejects_bad_shapes():
    cos, sin = rope_tables(8, 12)
    with pytest.raises(ValueError, match="positions"):
        P.rope_(torch.zeros(3, 60, device=DEVICE), torch.zeros(2, dtype=torch.long,
                                                               device=DEVICE), cos, sin, 2, 1, 12)
    with pytest.raises(ValueError, match="head_dim"):
        P.rope_(torch.zeros(3, 60, device=DEVICE), torch.zeros(3, dtype=torch.long,
                                                               device=DEVICE), cos, sin, 2, 1, 10)


# -- projection GEMM with epilogues ---------------------------------------------------------------
# The interpreter's tl.dot multiplies bf16 bit patterns (triton-lang/triton#11584): bf16 on GPU only.
GEMM_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("dtype", GEMM_DTYPES)
@pytest.mark.parametrize("m,k,n", [(1, 72, 50), (37, 100, 30), (64, 48, 96)])
@pytest.mark.parametrize("epilogue", G.EPILOGUES)
@pytest.mark.parametrize("orientation", ["forward", "input_grad"])
def test_gemm_epilogues(dtype, m, k, n, epilogue, orientation):
    width = 2 * n if epilogue in G.GATED else n
    if orientation == "forward":  # x @ W^T with W (width, k)
        w = randn(width, k, dtype=dtype, scale=k ** -0.5)
        b = w.t()
    else:  # dy @ W with W (k, width): b is W itself
        w = randn(k, width, dtype=dtype, scale=k ** -0.5)
        b = w
    a = randn(m, k, dtype=dtype)
    bias = randn(width, dtype=dtype) if not epilogue.endswith("_bwd") else None
    residual = randn(m, n, dtype=dtype) if epilogue == "none" else None
    aux = (randn(m, 2 * n if epilogue in G.GATED_BWD else n, dtype=dtype, scale=2.0)
           if epilogue.endswith("_bwd") else None)
    out = G.gemm(a, b, epilogue, bias=bias, residual=residual, aux=aux)
    twin = G.gemm_ref(a, b, epilogue, bias, residual, aux)
    truth = G.gemm_ref(*f64(a, b), epilogue, *f64(bias, residual, aux))
    assert out.shape == twin.shape
    check_2x(out, twin, truth, f"gemm {epilogue} {orientation}")


@pytest.mark.parametrize("dtype", GEMM_DTYPES)
def test_gemms_under_deterministic_algorithms_take_the_first_tile(dtype, monkeypatch):
    """With torch.use_deterministic_algorithms(True) both Triton GEMMs launch past their
    autotuners (kernels/_tiles.py: launch) and give, bit for bit, what the first tile of the
    device's list gives (PIFI_FAST_GEMM_TUNE=0), twice over; the results keep the 2x rule."""
    from pifi_fast.kernels import quant as Q

    a, w = randn(37, 72, dtype=dtype), randn(50, 72, dtype=dtype, scale=72 ** -0.5)
    res = randn(37, 50, dtype=dtype)
    q, scale = Q.quantize(w.float(), "int8", group=24)
    if not (G.supported(a) and Q.supported(a, "int8")):
        pytest.skip(f"no GEMM tiles for {dtype} here")

    def both():
        return (G.gemm(a, w.t(), residual=res),
                Q.dequant_gemm(a, q, scale, transposed=True, residual=res))

    monkeypatch.setenv("PIFI_FAST_GEMM_TUNE", "0")
    first_tile = both()
    monkeypatch.delenv("PIFI_FAST_GEMM_TUNE")
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [both(), both()]
    finally:
        torch.use_deterministic_algorithms(was)
    for run in runs:
        for got, expected in zip(run, first_tile):
            assert torch.equal(got, expected)
    check_2x(runs[0][0], G.gemm_ref(a, w.t(), residual=res),
             G.gemm_ref(*f64(a, w.t()), residual=res.double()), "gemm, deterministic")
    check_2x(runs[0][1], Q.dequant_gemm_ref(a, q, scale, True, residual=res),
             Q.dequant_gemm_ref(*f64(a), q, scale, True, residual=res.double()),
             "dequant_gemm, deterministic")


def test_gemm_rejects_bad_arguments():
    a, w = torch.ones(4, 8, device=DEVICE), torch.ones(8, 6, device=DEVICE)
    with pytest.raises(ValueError, match="epilogue"):
        G.gemm(a, w, "relu")
    with pytest.raises(ValueError, match="chain"):
        G.gemm(a, w.t())
    for epilogue in ("swiglu_bwd", "geglu_tanh_bwd", "gelu_bwd"):
        with pytest.raises(ValueError, match="aux"):
            G.gemm(a, w, epilogue)


# -- more than 2^31 elements (GPU only: 4+ GB tensors) --------------------------------------------
@pytest.mark.gpu
def test_rms_norm_beyond_2_to_31_elements():
    hidden = 4096
    rows = (1 << 31) // hidden + 3
    x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(hidden, device="cuda", dtype=torch.bfloat16)
    y, _, rstd = R.rms_norm_fwd(x, w, 1e-5)
    dy = torch.randn_like(x[-5:])
    ds_tail = R.rms_norm_bwd(torch.cat((torch.zeros_like(x[:-5]), dy)), x, w, rstd)[-5:]
    for sl in (slice(0, 5), slice(rows - 5, rows)):
        y_t, _, r_t = R.rms_norm_fwd_ref(x[sl], w, 1e-5)
        assert torch.equal(y[sl], y_t) or rel(y[sl], y_t) < 1e-2
        assert rel(rstd[sl], r_t) < 1e-6
    ds_t = R.rms_norm_bwd_ref(dy, x[-5:], w, rstd[-5:])
    assert rel(ds_tail, ds_t) < 1e-2


@pytest.mark.gpu
def test_swiglu_beyond_2_to_31_elements():
    inter = 14336
    rows = (1 << 31) // (2 * inter) + 3
    gu = torch.randn(rows, 2 * inter, device="cuda", dtype=torch.bfloat16)
    m = S.swiglu_fwd(gu)
    assert rel(m[-4:], S.swiglu_fwd_ref(gu[-4:])) < 1e-2
    dm = torch.randn(rows, inter, device="cuda", dtype=torch.bfloat16)
    dgu = S.swiglu_bwd(gu, dm)
    assert rel(dgu[-4:], S.swiglu_bwd_ref(gu[-4:], dm[-4:])) < 1e-2
