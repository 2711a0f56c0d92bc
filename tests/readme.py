"""The README's generated blocks, as ``scripts/readme_tables.py`` writes them."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def generated_block(name: str) -> str:
    """The text between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->``."""
    match = re.search(rf"<!-- {name}:begin -->\n(.*?)<!-- {name}:end -->", README.read_text(), re.S)
    assert match, f"README.md lost its generated {name} markers"
    return match.group(1)
