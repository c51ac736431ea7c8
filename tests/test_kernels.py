"""Each Triton kernel against its plain PyTorch twin (GUIDE §3: the 2x rule).

On CPU the kernels run under Triton's interpreter (the root conftest sets TRITON_INTERPRET=1),
so shapes stay small. The reference truth is the twin run in float64; a kernel passes when its
error is at most twice the error of the twin run in the same low precision, plus a floor of two
fp32 epsilons (the kernels compute in fp32; in fp32 the twin is sometimes exact by luck).
"""
import pytest
import torch

from pifi_fast.kernels import common as kernels
from pifi_fast.kernels import family_ops as F
from pifi_fast.kernels import gemm as G
from pifi_fast.kernels import rms_norm as R
from pifi_fast.kernels import rope as P
from pifi_fast.kernels import swiglu as S

pytestmark = [pytest.mark.kernels,
              pytest.mark.skipif(not kernels.HAS_TRITON, reason="triton is not installed")]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def check_2x(kernel_out, twin_out, truth, dtype, what=""):
    e_kernel, e_twin = rel(kernel_out, truth), rel(twin_out, truth)
    bound = 2 * e_twin + 2 * torch.finfo(torch.float32).eps
    assert e_kernel <= bound, f"{what}: kernel error {e_kernel:.3e} > 2 x twin {e_twin:.3e}"


def randn(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(device=DEVICE, dtype=dtype)


def f64(*ts):
    return [None if t is None else t.double() for t in ts]


# -- RMSNorm ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", [(1, 576), (7, 1000), (33, 72), (3, 4096)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_forward_and_backward(dtype, rows, hidden, with_residual):
    x = randn(rows, hidden, dtype=dtype)
    res = randn(rows, hidden, dtype=dtype) if with_residual else None
    w = randn(hidden, dtype=dtype, scale=0.5) + 1
    eps = 1e-5
    y, s, rstd = R.rms_norm_fwd(x, w, eps, res)
    y_t, s_t, rstd_t = R.rms_norm_fwd_ref(x, w, eps, res)
    y_64, s_64, rstd_64 = R.rms_norm_fwd_ref(*f64(x, w), eps, *f64(res))
    assert torch.equal(s, s_t)  # the residual add rounds exactly like x + residual
    check_2x(y, y_t, y_64, dtype, "rms fwd")
    check_2x(rstd, rstd_t, rstd_64, torch.float32, "rstd")
    dy = randn(rows, hidden, dtype=dtype)
    dres = randn(rows, hidden, dtype=dtype) if with_residual else None
    ds = R.rms_norm_bwd(dy, s, w, rstd, dres)
    ds_t = R.rms_norm_bwd_ref(dy, s_t, w, rstd_t, dres)
    ds_64 = R.rms_norm_bwd_ref(*f64(dy, s_t, w, rstd_64, dres))
    check_2x(ds, ds_t, ds_64, dtype, "rms bwd")


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_looped_path_for_wide_rows(dtype, monkeypatch):
    """Rows wider than the one-pass limit (hidden 16384+ in fp32, 32768+ in 16-bit) take the
    two-pass loop; shrunk limits send hidden 1000 through it here."""
    monkeypatch.setattr(R, "MAX_BLOCK_BYTES", 256)
    monkeypatch.setattr(R, "LOOP_BLOCK", 64)
    assert R.launch_params(1000, 2) == (64, 1, False)
    rows, hidden = 5, 1000
    x, res, dy, dres = (randn(rows, hidden, dtype=dtype) for _ in range(4))
    w = randn(hidden, dtype=dtype, scale=0.5) + 1
    y, s, rstd = R.rms_norm_fwd(x, w, 1e-5, res)
    y_t, s_t, rstd_t = R.rms_norm_fwd_ref(x, w, 1e-5, res)
    y_64, _, rstd_64 = R.rms_norm_fwd_ref(*f64(x, w), 1e-5, *f64(res))
    assert torch.equal(s, s_t)
    check_2x(y, y_t, y_64, dtype, "looped rms fwd")
    check_2x(rstd, rstd_t, rstd_64, torch.float32, "looped rstd")
    ds = R.rms_norm_bwd(dy, s, w, rstd, dres)
    check_2x(ds, R.rms_norm_bwd_ref(dy, s_t, w, rstd_t, dres),
             R.rms_norm_bwd_ref(*f64(dy, s_t, w, rstd_64, dres)), dtype, "looped rms bwd")


def test_rms_norm_launch_params_stay_within_the_compiled_configurations():
    """The one-pass limit is per row in bytes: 16384 16-bit or 8192 fp32 columns."""
    assert R.launch_params(16384, 2)[2] and not R.launch_params(16385, 2)[2]
    assert R.launch_params(8192, 4)[2] and not R.launch_params(8193, 4)[2]
    assert R.launch_params(65536, 2) == (R.LOOP_BLOCK, 16, False)


def test_rms_norm_backward_is_the_autograd_gradient():
    x = randn(5, 100, dtype=torch.float64).requires_grad_()
    w = randn(100, dtype=torch.float64)
    y, _, rstd = R.rms_norm_fwd_ref(x, w, 1e-6)
    dy = randn(5, 100, dtype=torch.float64)
    (gx,) = torch.autograd.grad(y, x, dy)
    assert rel(R.rms_norm_bwd_ref(dy, x.detach(), w, rstd), gx) < 1e-12
    assert rel(R.rms_norm_bwd(dy.float(), x.detach().float(), w.float(), rstd.float()), gx) < 1e-5


def test_rms_norm_rejects_too_wide_rows():
    with pytest.raises(ValueError, match="hidden sizes up to"):
        R.rms_norm_fwd(torch.ones(1, R.MAX_HIDDEN + 1, device=DEVICE), torch.ones(
            R.MAX_HIDDEN + 1, device=DEVICE), 1e-5)


# -- SwiGLU ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,inter", [(1, 100), (7, 300), (5, 1500)])
def test_swiglu_forward_and_backward(dtype, rows, inter):
    gu = randn(rows, 2 * inter, dtype=dtype, scale=2.0)
    dm = randn(rows, inter, dtype=dtype)
    check_2x(S.swiglu_fwd(gu), S.swiglu_fwd_ref(gu), S.swiglu_fwd_ref(gu.double()), dtype, "fwd")
    check_2x(S.swiglu_bwd(gu, dm), S.swiglu_bwd_ref(gu, dm),
             S.swiglu_bwd_ref(gu.double(), dm.double()), dtype, "bwd")


def test_swiglu_backward_is_the_autograd_gradient():
    gu = randn(4, 2 * 50, dtype=torch.float64, scale=2.0).requires_grad_()
    dm = randn(4, 50, dtype=torch.float64)
    (g,) = torch.autograd.grad(S.swiglu_fwd_ref(gu), gu, dm)
    assert rel(S.swiglu_bwd_ref(gu.detach(), dm), g) < 1e-12
    assert rel(S.swiglu_bwd(gu.detach().float(), dm.float()), g) < 1e-6


# -- Gemma's (1 + w) RMSNorm and Falcon's LayerNorm -----------------------------------------------
NORM_TWINS = {"rms_1p": (F.rms_norm_1p_fwd_ref, F.rms_norm_1p_bwd_ref),
              "layer": (F.layer_norm_fwd_ref, F.layer_norm_bwd_ref)}


def check_family_norm(kind, dtype, rows, hidden, with_dres):
    # a mean far from 0 and a spread of scales: LayerNorm's centring has work to do
    x = randn(rows, hidden, dtype=dtype, scale=3.0) + 2
    w = randn(hidden, dtype=dtype, scale=0.5)
    b = randn(hidden, dtype=dtype) if kind == "layer" else None
    fwd_ref, bwd_ref = NORM_TWINS[kind]
    eps = 1e-6
    args = (x, w, b) if kind == "layer" else (x, w)
    y, rstd = F.norm_fwd(x, w, eps, kind, b)
    y_t, rstd_t = fwd_ref(*args, eps)
    y_64, rstd_64 = fwd_ref(*f64(*args), eps)
    check_2x(y, y_t, y_64, dtype, f"{kind} fwd")
    check_2x(rstd, rstd_t, rstd_64, torch.float32, f"{kind} rstd")
    dy = randn(rows, hidden, dtype=dtype)
    dres = randn(rows, hidden, dtype=dtype) if with_dres else None
    check_2x(F.norm_bwd(dy, x, w, rstd, kind, dres), bwd_ref(dy, x, w, rstd_t, dres),
             bwd_ref(*f64(dy, x, w, rstd_64, dres)), dtype, f"{kind} bwd")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", [(1, 576), (7, 1000), (33, 72), (3, 4544)])
@pytest.mark.parametrize("kind", ["rms_1p", "layer"])
def test_family_norms_forward_and_backward(dtype, rows, hidden, kind):
    check_family_norm(kind, dtype, rows, hidden, with_dres=rows % 2 == 1)


@pytest.mark.parametrize("kind", ["rms_1p", "layer"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_family_norms_looped_path_for_wide_rows(kind, dtype, monkeypatch):
    """rms_norm's block rule, shrunk so hidden 1000 takes the loop (one pass per statistic)."""
    monkeypatch.setattr(R, "MAX_BLOCK_BYTES", 256)
    monkeypatch.setattr(R, "LOOP_BLOCK", 64)
    check_family_norm(kind, dtype, 5, 1000, with_dres=True)


@pytest.mark.parametrize("kind", ["rms_1p", "layer"])
def test_family_norm_backward_is_the_autograd_gradient(kind):
    x = randn(5, 100, dtype=torch.float64, scale=2.0).requires_grad_()
    w, b = randn(100, dtype=torch.float64), randn(100, dtype=torch.float64)
    fwd_ref, bwd_ref = NORM_TWINS[kind]
    y, rstd = fwd_ref(x, w, b, 1e-6) if kind == "layer" else fwd_ref(x, w, 1e-6)
    dy = randn(5, 100, dtype=torch.float64)
    (gx,) = torch.autograd.grad(y, x, dy)
    assert rel(bwd_ref(dy, x.detach(), w, rstd), gx) < 1e-12
    assert rel(F.norm_bwd(dy.float(), x.detach().float(), w.float(), rstd.float(), kind), gx) < 1e-5


# -- GeGLU (tanh GELU) and GELU --------------------------------------------------------------------
ACT_TWINS = {"gelu_tanh": (F.geglu_tanh_fwd_ref, F.geglu_tanh_bwd_ref),
             "gelu": (F.gelu_fwd_ref, F.gelu_bwd_ref)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,inter", [(1, 100), (7, 300), (5, 1500)])
@pytest.mark.parametrize("act", ["gelu_tanh", "gelu"])
def test_family_activations_forward_and_backward(dtype, rows, inter, act):
    width = 2 * inter if act == "gelu_tanh" else inter
    gu = randn(rows, width, dtype=dtype, scale=2.0)
    dm = randn(rows, inter, dtype=dtype)
    fwd_ref, bwd_ref = ACT_TWINS[act]
    check_2x(F.act_fwd(gu, act), fwd_ref(gu), fwd_ref(gu.double()), dtype, f"{act} fwd")
    check_2x(F.act_bwd(gu, dm, act), bwd_ref(gu, dm), bwd_ref(gu.double(), dm.double()), dtype,
             f"{act} bwd")


@pytest.mark.parametrize("act", ["gelu_tanh", "gelu"])
def test_family_activation_backward_is_the_autograd_gradient(act):
    fwd_ref, bwd_ref = ACT_TWINS[act]
    gu = randn(4, 100 if act == "gelu_tanh" else 50, dtype=torch.float64, scale=2.0)
    gu.requires_grad_()
    dm = randn(4, 50, dtype=torch.float64)
    (g,) = torch.autograd.grad(fwd_ref(gu), gu, dm)
    assert rel(bwd_ref(gu.detach(), dm), g) < 1e-12
    assert rel(F.act_bwd(gu.detach().float(), dm.float(), act), g) < 1e-6


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
    check_2x(out[:, :rotated], twin[:, :rotated], truth[:, :rotated], dtype, "rope")
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
    check_2x(out, twin, truth, dtype, f"gemm {epilogue} {orientation}")


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
