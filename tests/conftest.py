"""Shared by both suites: the contract module (tests/contract.py) is importable by every test file."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def pytest_terminal_summary(terminalreporter):
    """The cut contract's share of the suite's time (it runs every tail of every cut point)."""
    contract = sys.modules.get("contract")
    checks = getattr(contract, "CUT_CHECKS", [])
    if checks:
        seconds = sum(c.seconds for c in checks)
        tails = sum(c.tails + c.shallow for c in checks)
        terminalreporter.write_line(
            f"cut contract: {len(checks)} checks, {tails} tails and shallow paths, {seconds:.1f} s")
