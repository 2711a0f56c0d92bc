"""The generated blocks of README.md and docs/*.md, found as ``scripts/readme_tables.py`` finds and writes them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_spec = importlib.util.spec_from_file_location("readme_tables", ROOT / "scripts" / "readme_tables.py")
tables = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tables)

README = tables.README
DOCS = tables.DOCS


def pages() -> list[Path]:
    """README.md and docs/*.md: the pages a generated block may live on."""
    return tables.pages()


def generated_block(name: str) -> str:
    """The text between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->``, on whichever page holds them."""
    try:
        return tables.block(name)
    except LookupError as e:
        raise AssertionError(f"the generated {name} block: {e}") from None
