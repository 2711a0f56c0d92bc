"""Regenerate the README's generated tables from the commands that print them.

    .venv/bin/python scripts/readme_tables.py            # streamline simulate --markdown
    .venv/bin/python scripts/readme_tables.py --bench    # also streamline bench --latency --markdown
    .venv/bin/python scripts/readme_tables.py --cuts     # also streamline bench --cuts --markdown

``--no-simulate`` leaves the simulate table as it is. Each table sits between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` markers.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from streamlined_core.bench import cuts, format_cuts, format_latency, latency
from streamlined_core.simulate import format_markdown, simulate

README = Path(__file__).resolve().parents[1] / "README.md"


def replace(text: str, name: str, body: str) -> str:
    """``text`` with the block between NAME's markers replaced by ``body``."""
    pattern = re.compile(rf"(<!-- {name}:begin -->\n).*?(<!-- {name}:end -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"README.md has no <!-- {name}:begin --> ... <!-- {name}:end --> markers")
    return pattern.sub(lambda m: m.group(1) + body + m.group(2), text)


def main() -> None:
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    text = README.read_text()
    if "--bench" in sys.argv[1:]:
        text = replace(text, "bench", format_latency(latency(progress=say), markdown=True))
    if "--cuts" in sys.argv[1:]:
        text = replace(text, "cuts", format_cuts(cuts(progress=say), markdown=True))
    if "--no-simulate" not in sys.argv[1:]:
        text = replace(text, "simulate", format_markdown(simulate(progress=say)))
    README.write_text(text)
    print(f"updated {README}")


if __name__ == "__main__":
    main()
