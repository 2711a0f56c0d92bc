"""Regenerate the README's generated tables from the commands that print them.

    .venv/bin/python scripts/readme_tables.py

Each table sits between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` markers.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from streamlined_core.simulate import format_markdown, simulate

README = Path(__file__).resolve().parents[1] / "README.md"


def replace(text: str, name: str, body: str) -> str:
    """``text`` with the block between NAME's markers replaced by ``body``."""
    pattern = re.compile(rf"(<!-- {name}:begin -->\n).*?(<!-- {name}:end -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"README.md has no <!-- {name}:begin --> ... <!-- {name}:end --> markers")
    return pattern.sub(lambda m: m.group(1) + body + m.group(2), text)


def main() -> None:
    rows = simulate(progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    README.write_text(replace(README.read_text(), "simulate", format_markdown(rows)))
    print(f"updated {README}")


if __name__ == "__main__":
    main()
