"""The benchmark cases as pytest parameters, and a speed-up summary at the end of the run."""
import pytest
import torch

from pifi_fast.bench import report, workloads

_RESULTS: list[dict] = []


def _device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        device = _device()
        level = metafunc.config.getoption("--bench-sizes")
        cases = workloads.all_cases(level, device, workloads.default_dtype(device))
        ids = [c.key.replace(" | ", "-").replace(" ", "_") for c in cases]
        metafunc.parametrize("case", cases, ids=ids)


@pytest.fixture(scope="session")
def device():
    return _device()


@pytest.fixture(scope="session")
def ceilings(device):
    return report.ceilings(device, workloads.default_dtype(device))


@pytest.fixture(scope="session")
def reps(request, device):
    return workloads.size_lists(request.config.getoption("--bench-sizes"), device)["reps"]


@pytest.fixture(scope="session")
def results():
    return _RESULTS


def pytest_terminal_summary(terminalreporter, config):
    if not _RESULTS:
        return
    report.add_speedups(_RESULTS)
    terminalreporter.section("pifi_fast speed-up (baseline median / pifi_fast median, one run)")
    if _device().type == "cpu":
        terminalreporter.write_line("CPU run: ratios of the CPU code paths, not GPU figures")
    for r in _RESULTS:
        if r["impl"] == "pifi_fast" and r.get("speedup_vs"):
            ups = ", ".join(f"{b} x{v:.2f}" for b, v in r["speedup_vs"].items())
            terminalreporter.write_line(f"{r['group']}: {ups}")
