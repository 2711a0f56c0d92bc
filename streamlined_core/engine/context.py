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
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence, runtime_checkable

from .plan import Plan
from .stages import CutPoint, StageRequest

_CURRENT: contextvars.ContextVar["RunContext | None"] = contextvars.ContextVar("streamline_run", default=None)


@dataclass(frozen=True)
class ControllerCall:
    """One streamlined U-Net call as a :class:`Controller` sees it, before it runs."""

    cuts: Sequence[CutPoint]  # the U-Net's cut points, in forward order
    emit: Callable[[Any], None]  # sends an event to the run's listeners
    rows: int  # samples in the call (the frames of one video are one sample)
    unet: Any  # the U-Net module
    arguments: Mapping[str, Any]  # the call's arguments by name (ComfyUI's transformer_options among them)


@runtime_checkable
class Controller(Protocol):
    """What decides, across a run's U-Net calls, what each call captures or starts from: Step Rehash and
    its calibration. The streamlined forward consults it at one point: :meth:`before` a call (its stage
    request and a token) and :meth:`after` it (``ok`` False when it raised)."""

    @property
    def cut(self) -> str | None:
        """The cut whose state it keeps on the device across calls (its bytes come off the budget)."""

    def before(self, call: ControllerCall) -> tuple[StageRequest, Any]: ...

    def after(self, request: StageRequest, token: Any, ok: bool) -> None: ...


@runtime_checkable
class StepClock(Protocol):
    """A run's step index as its host counts it (Step Rehash in ComfyUI counts the sampler's callbacks)."""

    def branches_of(self, options: dict) -> tuple:
        """A U-Net call's branches (guidance branch, context window), in row order, from its options."""

    def step_of(self, sigma: float | None, branches: tuple = (), commit: bool = True) -> int:
        """The step of a call at ``sigma`` carrying ``branches``; ``commit=False`` only looks."""


class Profiled(Protocol):
    """A profiler's recording of a run (the VRAM Profiler node keeps its recorder here)."""

    recorder: Any


@dataclass
class RunContext:
    """The state of one run: who listens, which plans ran, what the U-Net calls should do."""

    listeners: list[Callable[[Any], None]] = field(default_factory=list)
    plans: list[Plan] = field(default_factory=list)  # the plan of every planned call, in order
    request: StageRequest | None = None
    recorder: Profiled | None = None  # the VRAM profiler's recording of this run, when one is profiled
    rehash: Controller | None = None  # a host's Step Rehash for this run, when one runs
    warned: set[str] = field(default_factory=set)  # what this run was already warned about (once per run)
    said: set = field(default_factory=set)  # log lines this run already wrote, by what they said (once per run)
    recovered: list[str] = field(default_factory=list)  # calls retried at the least-memory plan after running out


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


__all__ = ["Controller", "ControllerCall", "Profiled", "RunContext", "StepClock", "current", "listen", "run_context",
           "stage_request"]
