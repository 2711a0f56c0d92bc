"""Per-run state: listeners, the plans a run used, and what its U-Net calls should capture or skip.

The engine object that ComfyUI's ``clone()`` shares between every clone of a patched MODEL holds
configuration and plan caches only. Everything that belongs to one run lives in a
:class:`RunContext`, entered by the run's wrapper (a node's OUTER_SAMPLE wrapper, a diffusers-side
``with`` block) and left in ``finally``. Contexts are ``contextvars``: a run sees only its own.

    from streamlined_core import listen, stage_request

    with listen(print):                                # group and stage events of these calls
        with stage_request(capture={"up0.0.attn"}) as request:
            pipe(image, num_inference_steps=2)
    state = request.captures[0]["up0.0.attn"]         # the first U-Net call's state at that cut
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from .stages import StageRequest

_CURRENT: contextvars.ContextVar["RunContext | None"] = contextvars.ContextVar("streamline_run", default=None)


@dataclass
class RunContext:
    """The state of one run: who listens, which plans ran, what the U-Net calls should do."""

    listeners: list[Callable[[Any], None]] = field(default_factory=list)
    plans: list[Any] = field(default_factory=list)  # the Plan of every planned call, in order
    request: StageRequest | None = None
    recorder: Any = None  # the VRAM profiler's recording of this run, when one is profiled
    rehash: Any = None  # a host's Step Rehash controller for this run (``rehash.py``), when one runs
    warned: set[str] = field(default_factory=set)  # what this run was already warned about (once per run)


def current() -> RunContext | None:
    """The run context this code runs in, or None outside every run."""
    return _CURRENT.get()


@contextmanager
def run_context() -> Iterator[RunContext]:
    """Enter a run: a new context, or the enclosing one when a wrapper further out already made it."""
    existing = _CURRENT.get()
    if existing is not None:
        yield existing
        return
    ctx = RunContext()
    token = _CURRENT.set(ctx)
    try:
        yield ctx
    finally:
        _CURRENT.reset(token)


@contextmanager
def listen(listener: Callable[[Any], None]) -> Iterator[RunContext]:
    """Send this run's group events (:class:`~streamlined_core.engine.slicing.GroupEvent`) and stage events
    (:class:`~streamlined_core.engine.stages.StageEvent`) to ``listener`` while the block runs."""
    with run_context() as ctx:
        ctx.listeners.append(listener)
        try:
            yield ctx
        finally:
            ctx.listeners.remove(listener)


@contextmanager
def stage_request(**options: Any) -> Iterator[StageRequest]:
    """Ask the streamlined U-Net calls in the block to capture at, start from or stop at cut points
    (the options of :class:`~streamlined_core.engine.stages.StageRequest`)."""
    with run_context() as ctx:
        previous = ctx.request
        ctx.request = request = StageRequest(**options)
        try:
            yield request
        finally:
            ctx.request = previous


__all__ = ["RunContext", "current", "listen", "run_context", "stage_request"]
