"""kernels/_tiles.py and kernels/modes.py: what the two GEMMs share (a tile and its config, the
autotuner's pool, pruning to the device's list) and the modes' names."""
import pytest
import torch

from pifi_fast.kernels import _tiles as T
from pifi_fast.kernels import common as kernels
from pifi_fast.kernels import gemm, quant
from pifi_fast.kernels.modes import Activation, Epilogue, Norm

needs_triton = pytest.mark.skipif(not kernels.HAS_TRITON, reason="triton is not installed")


@needs_triton
def test_tile_and_config_round_trip():
    for tile in [(128, 256, 64, 3, 8), (16, 64, 32, 2, 2)]:
        assert T.tile_of(T.config_of(tile)) == tile


@needs_triton
def test_pool_holds_each_tile_once_and_the_interpreter_one():
    lists = [[(64, 64, 32, 3, 4), (32, 64, 32, 2, 4)], [(32, 64, 32, 2, 4), (16, 32, 32, 2, 2)]]
    got = [T.tile_of(c) for c in T.pool(lists, interpreting=False)]
    assert got == [(64, 64, 32, 3, 4), (32, 64, 32, 2, 4), (16, 32, 32, 2, 2)]
    assert len(T.pool(lists, interpreting=True)) == 1
    assert len(T.pool([], interpreting=False)) == 1  # never an empty autotuner


@needs_triton
def test_prune_keeps_the_wanted_tiles_in_their_order(monkeypatch):
    every = T.pool([[(64, 64, 32, 3, 4), (32, 64, 32, 2, 4), (16, 32, 32, 2, 2)]], False)
    wanted = [(16, 32, 32, 2, 2), (64, 64, 32, 3, 4), (8, 8, 8, 1, 1)]  # one not in the pool
    monkeypatch.setenv("PIFI_FAST_GEMM_TUNE", "0")  # launch's business, not prune's
    assert [T.tile_of(c) for c in T.prune(every, wanted)] == wanted[:2]


class _Config:
    def __init__(self, name):
        self.name = name

    def all_kwargs(self):
        return {"BLOCK_M": self.name, "num_warps": 4}


class _Launcher:
    """A stand-in for a Triton kernel (kernel[grid](...)) that records its launches."""

    def __init__(self, calls, who):
        self.calls, self.who = calls, who

    def __getitem__(self, grid):
        return lambda *args, **kw: self.calls.append((self.who, grid, args, kw))


class _Autotuned(_Launcher):
    def __init__(self, calls, configs):
        super().__init__(calls, "tuner")
        self.configs, self.fn = configs, _Launcher(calls, "jit")


@pytest.mark.parametrize("switch", ["tuned", "deterministic", "env"])
def test_launch_tunes_unless_determinism_is_asked_for(switch, monkeypatch):
    """The autotuner runs by default; under torch.use_deterministic_algorithms(True) or
    PIFI_FAST_GEMM_TUNE=0 the plain kernel runs with the first tile the prune hook keeps for
    the device (the tuner, and its cache, are never asked)."""
    calls, pruned = [], []
    kernel = _Autotuned(calls, [_Config("a"), _Config("b"), _Config("c")])

    def prune_hook(configs, named_args, **constexprs):
        pruned.append((named_args, constexprs))
        return [configs[2], configs[0]]  # the device's list, in its order

    monkeypatch.delenv("PIFI_FAST_GEMM_TUNE", raising=False)
    if switch == "env":
        monkeypatch.setenv("PIFI_FAST_GEMM_TUNE", "0")
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(switch == "deterministic")
    try:
        T.launch(kernel, "grid", prune_hook, {"A": "a"}, (1, 2), {"EPILOGUE": 0})
    finally:
        torch.use_deterministic_algorithms(was)
    if switch == "tuned":
        assert calls == [("tuner", "grid", (1, 2), {"EPILOGUE": 0})] and not pruned
    else:
        assert pruned == [({"A": "a"}, {"EPILOGUE": 0})]
        assert calls == [("jit", "grid", (1, 2), {"EPILOGUE": 0, "BLOCK_M": "c",
                                                  "num_warps": 4})]


def test_launch_with_one_config_takes_it_unpruned(monkeypatch):
    """Triton's autotuner prunes only when it holds several configs (the interpreter's pool is
    one small tile): launch does the same."""
    calls = []
    kernel = _Autotuned(calls, [_Config("only")])
    monkeypatch.setenv("PIFI_FAST_GEMM_TUNE", "0")
    T.launch(kernel, "g", lambda *a, **k: pytest.fail("pruned"), {}, (), {})
    assert calls == [("jit", "g", (), {"BLOCK_M": "only", "num_warps": 4})]


def test_both_gemms_read_the_shared_tables():
    assert gemm.TILES is T.GEMM_TILES and quant.TILES is T.DQ_TILES
    assert gemm.GPU_ARCHS == quant.GPU_ARCHS == T.GPU_ARCHS
    for arch in (80, 86, 89):  # the forward with fine groups: the spill-free subset
        fine = quant.tiles(arch, "int8", "bf16", fine=True)
        assert not set(fine) & T.DQ_FINE_SPILLS.get(arch, set())
        assert set(T.DQ_FINE_ONLY.get(arch, [])) <= set(fine)


def test_epilogue_tiles_follow_their_accumulators():
    """An epilogue takes the tiles of the one with the same accumulators and loads: gated as
    "swiglu", any backward as "swiglu_bwd", a plain activation the plain tiles up to 128x128."""
    for arch in (80, 86, 89, 90):
        assert gemm.tiles(arch, "geglu_tanh", "bf16") == gemm.tiles(arch, "swiglu", "bf16")
        for name in ("geglu_tanh_bwd", "gelu_bwd", "silu_bwd"):
            assert gemm.tiles(arch, name, "fp16") == gemm.tiles(arch, "swiglu_bwd", "fp16")
        plain = gemm.tiles(arch, "none", "bf16")
        assert gemm.tiles(arch, "gelu", "bf16") == [t for t in plain if t[0] * t[1] <= 128 * 128]
        assert (128, 256, 32, 3, 8) in plain or (128, 256, 64, 3, 8) in plain


def test_epilogues_are_named_from_the_activations():
    """Every activation gives four epilogues (gated and plain, each with its backward), chosen
    by name; the kernel's constants come from the name, never from a position in a tuple."""
    assert gemm.EPILOGUES[0] == "none"
    assert len(gemm.EPILOGUES) == 1 + 4 * len(Activation)
    for act in Activation:
        assert gemm.SPECS[act.glu] == (Epilogue.ACT, act, True)
        assert gemm.SPECS[act.label + "_bwd"] == (Epilogue.ACT_GRAD, act, False)
    assert gemm.SPECS["swiglu"].constexprs == dict(EPILOGUE=int(Epilogue.ACT),
                                                   ACT=int(Activation.SILU),
                                                   GATED=True)
    assert set(gemm.GATED) == {a.glu for a in Activation}


def test_modes_by_name():
    assert Norm.named("rms_1p") is Norm.RMS_1P and Norm.named(Norm.LAYER) is Norm.LAYER
    assert Activation.named("GELU_TANH") is Activation.GELU_TANH
    assert Activation.SILU.label == "silu" and Activation.SILU.glu == "swiglu"
    assert len({int(m) for m in Norm}) == len(Norm)
    with pytest.raises(ValueError, match="norm must be one of 'rms', 'rms_1p', 'layer'"):
        Norm.named("rms1p")


def test_gemm_rejects_an_unknown_epilogue():
    with pytest.raises(ValueError, match="epilogue must be one of"):
        gemm.tiles(90, "relu", "bf16")
    with pytest.raises(ValueError, match="epilogue must be one of"):
        gemm.gemm_ref(torch.ones(2, 2), torch.ones(2, 2), "relu")
