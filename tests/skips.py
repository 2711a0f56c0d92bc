"""One suite's result line for scripts/dev.sh's summary, from pytest's JUnit XML report and exit status.

    python tests/skips.py REPORT.xml PYTEST_EXIT_STATUS [--ci]

prints ``passed (N tests, M skipped ...)``, ``skipped (why)`` or ``FAILED (why)``, and exits 1 on FAILED.
With ``--ci`` (scripts/dev.sh passes it when ``CI=true``) a suite that ran no test fails, and so does one
in which a test skipped that ``tests/allowed_skips.txt`` does not list; outside CI those say "skipped".

The report must be written with ``-o junit_family=xunit1`` (each test case then names its file, so its
pytest node id can be rebuilt and matched against the allow-list).

Standard library only.
"""

from __future__ import annotations

import ast
import re
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

ALLOWED = Path(__file__).with_name("allowed_skips.txt")


@dataclass
class Allowed:
    pattern: str
    reason: str

    def matches(self, node: str) -> bool:
        return re.fullmatch(".*".join(re.escape(part) for part in self.pattern.split("*")), node) is not None


def allowed_skips(path: Path = ALLOWED) -> list[Allowed]:
    """The allow-list: one ``<node id pattern> <why it may skip>`` a line (``*`` matches anything, every other
    character itself, brackets of parametrized ids included; ``#`` starts a comment line).

    A line without a reason is refused: every test listed says why it may skip.
    """
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        pattern, _, reason = line.partition(" ")
        if not reason.strip():
            raise ValueError(f"{path}:{number}: {pattern} gives no reason why it may skip")
        entries.append(Allowed(pattern, reason.strip()))
    return entries


def node_id(case: ET.Element) -> str:
    """The pytest node id of a JUnit (xunit1) test case: ``tests/host/test_x.py::TestY::test_z[id]``."""
    file, classname, name = case.get("file"), case.get("classname") or "", case.get("name") or ""
    if file and not classname and name == file.removesuffix(".py").replace("/", "."):
        return file  # a module skipped as it was collected
    if not file:  # a report without file attributes (xunit2): the module's dotted name stands for its path
        parts = classname.split(".")
        return "/".join(parts) + ".py::" + name if classname else name
    module = file.removesuffix(".py").replace("/", ".")
    inner = classname[len(module):].lstrip(".") if classname.startswith(module) else ""
    return "::".join([file] + ([inner.replace(".", "::")] if inner else []) + [name])


def skip_reason(element: ET.Element) -> str:
    message = (element.get("message") or "").strip()
    if message == "collection skipped":  # the text is (file, line, reason)
        try:
            message = str(ast.literal_eval(element.text or "")[2])
        except (ValueError, SyntaxError, IndexError, TypeError):
            pass
    return (message or (element.text or "").strip()).removeprefix("Skipped: ")


def result(report: Path, code: int, ci: bool, allowed: list[Allowed] | None = None) -> tuple[bool, str]:
    """(failed, the result line)."""
    try:
        cases = list(ET.parse(report).getroot().iter("testcase"))
    except (OSError, ET.ParseError) as exc:
        return True, f"FAILED (no test report: {exc})"
    failed = [c for c in cases if c.find("failure") is not None or c.find("error") is not None]
    skipped = [(node_id(c), skip_reason(c.find("skipped"))) for c in cases if c.find("skipped") is not None]
    ran = len(cases) - len(skipped)
    if failed or code not in (0, 5):
        return True, f"FAILED ({len(failed)} of {len(cases)} tests failed, pytest exit status {code})"
    if not ran:
        why = skipped[0][1] if skipped else "no tests collected"
        if len({r for _, r in skipped}) > 1:
            why += f"; {len(skipped)} tests skipped"
        return (True, f"FAILED (no test ran: {why})") if ci else (False, f"skipped ({why})")
    allowed = allowed_skips() if allowed is None else allowed
    unlisted = [(n, r) for n, r in skipped if not any(a.matches(n) for a in allowed)]
    line = f"{ran} tests"
    if skipped:
        line += f", {len(skipped)} skipped"
        if len(unlisted) < len(skipped):
            line += f" ({len(skipped) - len(unlisted)} in {ALLOWED.name})"
    if unlisted:
        named = "; ".join(f"{n} ({r})" for n, r in unlisted)
        if ci:
            return True, f"FAILED ({line}; skipped, not in tests/{ALLOWED.name}: {named})"
        line += f"; skipped: {named}"
    return False, f"passed ({line})"


def main(argv: list[str]) -> int:
    args = [a for a in argv if a != "--ci"]
    if len(args) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    failed, line = result(Path(args[0]), int(args[1]), "--ci" in argv)
    print(line)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
