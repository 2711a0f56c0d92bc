"""Shared by both suites: the contract module (tests/contract.py) is importable by every test file."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
