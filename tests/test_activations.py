"""kernels/activations.py: each activation, plain and gated, through the elementwise kernels
against its plain PyTorch twin (the 2x rule of tests/test_kernels.py); the twins' derivatives
against autograd; the Triton derivative functions against autograd; the layer's names
(swiglu, family_ops) as the same kernels. Under Triton's interpreter on CPU: small shapes."""
import pytest
import torch
from helpers import KERNEL_DEVICE, check_2x, randn, rel

from pifi_fast.kernels import activations as A
from pifi_fast.kernels import common as kernels
from pifi_fast.kernels import family_ops as F
from pifi_fast.kernels import swiglu as S
from pifi_fast.kernels.modes import Activation

pytestmark = [pytest.mark.kernels, pytest.mark.usefixtures("seeded_by_test_id"),
              pytest.mark.skipif(not kernels.HAS_TRITON, reason="triton is not installed")]
DEVICE = KERNEL_DEVICE
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ACTS = list(Activation)


@pytest.mark.parametrize("act", ACTS, ids=lambda a: a.label)
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,inter", [(1, 100), (7, 300), (3, 1500)])
def test_forward_and_backward(act, gated, dtype, rows, inter):
    gu = randn(rows, 2 * inter if gated else inter, dtype=dtype, scale=3.0)
    dm = randn(rows, inter, dtype=dtype)
    m = A.act_fwd(gu, act, gated)
    assert m.shape == (rows, inter) and m.dtype == dtype
    check_2x(m, A.act_fwd_ref(gu, act, gated), A.act_fwd_ref(gu.double(), act, gated),
             f"{act.label} fwd")
    dgu = A.act_bwd(gu, dm, act, gated)
    assert dgu.shape == gu.shape
    check_2x(dgu, A.act_bwd_ref(gu, dm, act, gated),
             A.act_bwd_ref(gu.double(), dm.double(), act, gated), f"{act.label} bwd")


@pytest.mark.parametrize("act", ACTS, ids=lambda a: a.label)
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
def test_backward_is_the_autograd_gradient(act, gated):
    """The twin's derivative (float64) and the kernel's Triton derivative (fp32) are autograd's
    gradient of the twin's forward, over both tails and the middle (scale 4)."""
    gu = randn(4, 100 if gated else 50, dtype=torch.float64, scale=4.0).requires_grad_()
    dm = randn(4, 50, dtype=torch.float64)
    (g,) = torch.autograd.grad(A.act_fwd_ref(gu, act, gated), gu, dm)
    assert rel(A.act_bwd_ref(gu.detach(), dm, act, gated), g) < 1e-12
    assert rel(A.act_bwd(gu.detach().float(), dm.float(), act, gated), g) < 1e-6


def test_plain_is_gated_with_unit_up():
    """The plain form is the gated one with u = 1, to the bit (a product with 1 is exact)."""
    u = randn(3, 200, dtype=torch.float32, scale=3.0)
    dm = randn(3, 200, dtype=torch.float32)
    gu = torch.cat((u, torch.ones_like(u)), -1)
    for act in ACTS:
        assert torch.equal(A.act_fwd(u, act, False), A.act_fwd(gu, act, True))
        assert torch.equal(A.act_bwd(u, dm, act, False), A.act_bwd(gu, dm, act, True)[:, :200])


def test_the_layers_names_are_the_same_kernels():
    gu = randn(5, 2 * 300, dtype=torch.bfloat16, scale=3.0)
    dm = randn(5, 300, dtype=torch.bfloat16)
    u = gu[:, :300].contiguous()
    assert torch.equal(S.swiglu_fwd(gu), A.act_fwd(gu, "silu", True))
    assert torch.equal(S.swiglu_bwd(gu, dm), A.act_bwd(gu, dm, "silu", True))
    assert torch.equal(S.swiglu_bwd_ref(gu, dm), A.act_bwd_ref(gu, dm, "silu", True))
    assert torch.equal(F.act_fwd(gu, "gelu_tanh"), A.act_fwd(gu, "gelu_tanh", True))
    assert torch.equal(F.act_bwd(gu, dm, "gelu_tanh"), A.act_bwd(gu, dm, "gelu_tanh", True))
    assert torch.equal(F.act_fwd(u, "gelu"), A.act_fwd(u, "gelu", False))
    assert torch.equal(F.act_bwd(u, dm, "gelu"), A.act_bwd(u, dm, "gelu", False))
    assert torch.equal(F.gelu_bwd_ref(u, dm), A.act_bwd_ref(u, dm, "gelu", False))


def test_twins_are_pytorchs_activations():
    g = randn(4, 64, dtype=torch.bfloat16, scale=3.0)
    fn = torch.nn.functional
    assert torch.equal(A.act_fwd_ref(g, "silu", False), fn.silu(g))
    assert torch.equal(A.act_fwd_ref(g, "gelu_tanh", False), fn.gelu(g, approximate="tanh"))
    assert torch.equal(A.act_fwd_ref(g, "gelu", False), fn.gelu(g))


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="activation must be one of"):
        A.act_fwd(torch.ones(2, 8, device=DEVICE), "relu", False)
    with pytest.raises(ValueError, match="even last dim"):
        A.act_fwd(torch.ones(2, 7, device=DEVICE), "silu", True)


def test_every_activation_is_compiled_plain_and_gated():
    names = {launch.name for launch in A.compile_launches(90, "bf16")}
    for act in ACTS:
        for gated in (True, False):
            base = A.launch_name(act, gated)
            assert {base + "_fwd", base + "_bwd"} <= names
