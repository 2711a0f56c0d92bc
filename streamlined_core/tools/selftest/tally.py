"""The reliability categories' bookkeeping: each case tried is counted, each failure kept with the case's name and
what went wrong, and the deliberately broken variants the tests switch on (``$STREAMLINE_SELFTEST_BROKEN``)."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

BROKEN_ENV = "STREAMLINE_SELFTEST_BROKEN"
CASES_ENV = "STREAMLINE_SELFTEST_CASES"  # `streamline selftest --cases TEXT`: only the cases whose names contain it
# Each broken variant, the category it must fail, and what it does: switched on only by the tests.
BROKEN_VARIANTS = {
    "no-restore-after-interrupt": ("faults", "Streamline Model leaves its memory estimate on the model when "
                                             "ComfyUI's interrupt stops a run"),
    "no-retry-after-oom": ("recoveries", "an out-of-memory error in a streamlined call is raised at once, not retried"),
    "leak-per-run": ("repeats", "every run's context is kept alive in a list that is never emptied"),
    "unchecked-input": ("bad inputs", "the nodes' numeric inputs lose their limits and the nodes' own checks"),
    "shared-patch": ("compositions", "Streamline Model patches the MODEL it receives instead of a clone"),
}
CATEGORIES = ("faults", "recoveries", "repeats", "bad inputs", "compositions")


class Failed(Exception):
    """A case's check that did not hold."""


def check(condition: object, message: str) -> None:
    if not condition:
        raise Failed(message)


def broken_variant() -> str | None:
    """The broken variant the tests switched on, or None (the real pack)."""
    value = os.environ.get(BROKEN_ENV) or None
    if value is not None and value not in BROKEN_VARIANTS:
        raise ValueError(f"{BROKEN_ENV} must be one of {', '.join(BROKEN_VARIANTS)}; got {value!r}")
    return value


@dataclass
class Tally:
    """One category on one host: the cases tried and those that failed."""

    category: str
    host: str
    tried: int = 0
    failures: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    only: str = field(default_factory=lambda: os.environ.get(CASES_ENV, ""))
    _start: float = field(default_factory=time.perf_counter, repr=False)

    def wants(self, *names: str) -> bool:
        """Whether the case called ``name`` (any of ``names``) is to run (``--cases``)."""
        return any(self.only.lower() in name.lower() for name in names)

    @contextmanager
    def case(self, name: str) -> Iterator[None]:
        """Count one case; a check that fails or an exception inside it is a failure, named by ``name``."""
        self.tried += 1
        try:
            yield
        except Failed as e:
            self.failures.append({"case": name, "message": str(e)})
        except Exception as e:  # noqa: BLE001  an unexpected error is the case's failure, not the command's
            self.failures.append({"case": name, "message": f"{type(e).__name__}: {str(e)[:600]}"})

    def finish(self) -> "Tally":
        """The category ended: its time is kept."""
        self.seconds = time.perf_counter() - self._start
        return self

    def as_dict(self) -> dict:
        return {"category": self.category, "host": self.host, "tried": self.tried, "failed": len(self.failures),
                "failures": self.failures, "notes": self.notes,
                "seconds": self.seconds or time.perf_counter() - self._start}
