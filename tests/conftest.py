"""Shared by both suites: the contract module (tests/contract.py) is importable by every test file; the
one-thread fixture."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): its tests run
    small ops, where a second OpenMP thread only adds waiting, badly so when the other core is busy
    (PROBE.md: 2 threads ran 2-6x slower than 1 on a shared machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_terminal_summary(terminalreporter):
    """The cut contract's share of the suite's time (it runs every tail of every cut point)."""
    contract = sys.modules.get("contract")
    checks = getattr(contract, "CUT_CHECKS", [])
    if checks:
        seconds = sum(c.seconds for c in checks)
        tails = sum(c.tails + c.shallow for c in checks)
        terminalreporter.write_line(
            f"cut contract: {len(checks)} checks, {tails} tails and shallow paths, {seconds:.1f} s")
