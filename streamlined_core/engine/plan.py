"""Decide by budget: how many slices each group gets, from memory measured on a meta replica.

The planner runs the streamlined forward on a weightless ``meta`` replica of the model with the
call's shapes, under the tracker, and records each group's peak: first with every group whole, then,
for the groups a plan needs sliced (those whose whole peak is over its budget), with two slices, four
slices and two slices recomputing instead of keeping (``FIT_RUNS``; every other group runs whole). A
group's peak with ``k`` slices is the memory alive around it plus what one slice needs, linear in the
slice's length: ``base + per_item * length of the slice that sets the peak``. Each group then gets the
least slicing (keeping before recomputing) whose predicted peak fits the activation budget. The chosen
plan is then measured once more, and each group's prediction is its measured peak; a group over
the target is sliced further and the plan measured again (``VERIFY_ROUNDS``).

A group's memory does not depend on the other groups' decisions, so measuring some groups sliced while
the rest run whole gives each the figures an all-sliced run would, and a group measured before with the
same decision is replayed, not run (``replay.py``). Every run is a function of the slice count and mode
it gives each group, so a planner keeps each run's measurement by those decisions (``Measurements``)
and never runs the same decisions twice: a chosen plan whose decisions an earlier run made is not
measured again, and a new budget for a known shape runs only decisions no earlier plan made.
``plan_store.PLANS`` keeps these measurements (data only, no model) by the model's structure and the
call's shapes, so a second engine on the same model, or on a model built alike, plans a known shape
without a run.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, ContextManager, Iterable

import torch
from torch import nn

from .memory import GIB, MemoryTracker
from .replay import GroupRecord, GroupReplay  # noqa: F401 (GroupRecord: measurements hold them)
from .slicing import Axis, GroupEvent, Mode, Runner, ceil_div, governing_slice

# The default memory target where no device budget exists (CPU, meta): 1.5x the skip floor.
TARGET_X_FLOOR = 1.5
# Where a budget is below the least reachable peak: how close to that peak the plan goes.
UNREACHABLE_SLACK = 0.02
# How many times a plan whose measurement exceeds its target is sliced further and measured again.
VERIFY_ROUNDS = 3
# The runs a group's linear model is fitted on, besides running it whole: two slices, four, and two recomputing.
FIT_RUNS = ((2, "keep"), (4, "keep"), (2, "recompute"))


@dataclass(frozen=True)
class GroupPlan:
    """One group's decision: the axis it is sliced along, how many slices, and its predicted peak."""

    name: str
    axis: Axis
    length: int
    slices: int
    mode: Mode
    predicted_bytes: int
    rows: int = 0  # a "tiles" group: rows per frame (slices beyond its frame count are row bands)

    @property
    def bands(self) -> int:
        """Row bands per frame of a tiles group (1 when it is sliced by whole frames)."""
        if not self.rows or self.slices <= self.length // self.rows:
            return 1
        return min(self.rows, ceil_div(self.slices, self.length // self.rows))


@dataclass
class Plan:
    """Slice counts for one call shape, with the peak each group is predicted to reach."""

    groups: list[GroupPlan]
    predicted_peak_bytes: int
    weights_bytes: int
    skip_floor_bytes: int
    fits: bool = True
    floor_name: str = "skip floor"  # a U-Net's skip floor; a VAE decoder's output-level floor
    _by_name: dict[str, GroupPlan] = field(default_factory=dict, repr=False)
    # Seconds the engine spent making this plan for its call (near 0 where a cached planner had it all).
    seconds: float = field(default=0.0, compare=False)

    def __post_init__(self) -> None:
        self._by_name = {g.name: g for g in self.groups}

    def decide(self, name: str, axis: Axis, length: int) -> tuple[int, Mode]:
        """The slice count and mode for group ``name`` (what the :class:`Runner` asks)."""
        g = self._by_name.get(name)
        if g is None or g.length != length:
            return 1, "keep"
        return g.slices, g.mode

    @property
    def predicted_total_bytes(self) -> int:
        """Weights plus the predicted activation peak."""
        return self.weights_bytes + self.predicted_peak_bytes

    @property
    def sliced_groups(self) -> list[GroupPlan]:
        return [g for g in self.groups if g.slices > 1]

    def describe(self) -> str:
        """A short name for tables: ``k<=28 frames, k<=64 pixels, <=8 bands per frame``."""
        parts = []
        frames = [g.slices for g in self.groups if g.axis == "frames" and g.slices > 1]
        frames += [min(g.slices, g.length // g.rows) for g in self.groups if g.axis == "tiles" and g.slices > 1]
        pixels = [g.slices for g in self.groups if g.axis == "pixels" and g.slices > 1]
        tokens = [g.slices for g in self.groups if g.axis == "tokens" and g.slices > 1]
        bands = [g.bands for g in self.groups if g.axis == "tiles" and g.bands > 1]
        if frames:
            parts.append(f"k<={max(frames)} frames")
        if pixels:
            parts.append(f"k<={max(pixels)} pixels")
        if bands:
            parts.append(f"<={max(bands)} bands per frame")
        if tokens:
            parts.append(f"k<={max(tokens)} tokens")
        return ", ".join(parts) or "unsliced"

    def table(self) -> str:
        """Every group: axis, length, slices, mode, predicted bytes."""
        width = max((len(g.name) for g in self.groups), default=5)
        lines = [f"{'group':<{width}}  axis    length  slices  mode       predicted GiB"]
        for g in self.groups:
            lines.append(
                f"{g.name:<{width}}  {g.axis:<6}  {g.length:>6}  {g.slices:>6}  {g.mode:<9}  {g.predicted_bytes / GIB:>13.3f}"
            )
        lines.append(
            f"predicted activation peak {self.predicted_peak_bytes / GIB:.3f} GiB "
            f"({self.predicted_peak_bytes / self.skip_floor_bytes:.2f}x the {self.floor_name}), "
            f"weights {self.weights_bytes / GIB:.3f} GiB"
        )
        return "\n".join(lines)


@dataclass
class _Measured:
    axis: Axis
    length: int
    modes: tuple[Mode, ...]
    in_place: bool = False
    rows: int = 0
    peaks: dict[tuple[int, Mode], int] = field(default_factory=dict)


def allowed(axis: Axis, axes: Iterable[str]) -> bool:
    """Whether a group on ``axis`` may be sliced when ``axes`` are: tiles are frames, then bands inside one."""
    return axis in axes or (axis == "tiles" and "frames" in axes)


def measure_groups(run: Callable[[Runner], Any], decide,
                   records: dict | None = None) -> tuple[dict[str, _Measured], int, int]:
    """Run ``run(runner)`` under the tracker: each group's peak, the peak outside groups, and the total.
    With ``records`` (a planner's), groups recorded before are replayed and new ones recorded."""
    tracker = MemoryTracker()
    measured: dict[str, _Measured] = {}
    outside = 0

    def listen(event: object) -> None:
        nonlocal outside
        if not isinstance(event, GroupEvent):
            return  # stage events: the groups inside them are what is planned
        mark = tracker.mark(f"{event.name}:{event.kind}")
        if event.kind == "start":
            outside = max(outside, mark.peak_bytes)
            return
        m = measured.setdefault(event.name, _Measured(event.axis, event.length, event.modes, event.in_place, event.rows))
        key = (event.slices, event.mode)
        m.peaks[key] = max(m.peaks.get(key, 0), mark.peak_bytes)

    with tracker:
        run(Runner(decide, [listen], replay=GroupReplay(tracker, records) if records is not None else None))
        outside = max(outside, tracker.mark("end").peak_bytes)
    return measured, outside, tracker.peak_bytes


Decisions = frozenset  # of (group, length, slices, mode): what one run gave every group


@dataclass
class Measurements:
    """What planning one call shape measured: the measurement runs, folded per group (``groups``,
    ``outside``), every run by its decisions, and every plan by its arguments. Data only (no model, no
    closure), so it may outlive the engine that made it (``plan_store.PLANS``)."""

    weights_bytes: int
    skip_floor_bytes: int
    floor_name: str = "skip floor"
    groups: dict[str, _Measured] = field(default_factory=dict)
    outside: int = 0
    runs: dict[Decisions, tuple[dict[str, _Measured], int]] = field(default_factory=dict)
    plans: dict[tuple, Plan] = field(default_factory=dict)
    replays: dict[tuple, GroupRecord] = field(default_factory=dict)  # groups a later run replays (GroupReplay)


class Planner:
    """Plans one call shape from measurements of ``run(runner)`` on a meta replica.

    ``session()``, when given, is entered once around the runs one call makes (ComfyUI's attention
    swapped for SDPA on the replica, for one). ``measurements`` from an earlier planner of the same
    model and call shape replaces the runs they made; ``runs`` counts the runs this one made. With
    ``replay`` false every group runs in every run (a host whose patches carry state from group to group).
    """

    def __init__(self, run: Callable[[Runner], Any], weights_bytes: int, skip_floor_bytes: int,
                 floor_name: str = "skip floor", session: Callable[[], ContextManager] | None = None,
                 measurements: Measurements | None = None, replay: bool = True) -> None:
        self.run = run
        self.session = session
        self.replay = replay
        self.runs = 0
        self._stack: contextlib.ExitStack | None = None
        self._in_session = False
        fresh = measurements is None
        self._adopt(measurements or Measurements(weights_bytes, skip_floor_bytes, floor_name))
        if fresh:
            with self._batch():
                self._fold(*self.measure(lambda _n, _a, _l: (1, "keep")))

    def _adopt(self, measurements: Measurements) -> None:
        self.measurements = measurements
        self.weights_bytes = measurements.weights_bytes
        self.skip_floor_bytes = measurements.skip_floor_bytes
        self.floor_name = measurements.floor_name
        self.groups = measurements.groups
        self.outside = measurements.outside

    def _fold(self, measured: dict[str, _Measured], outside: int) -> None:
        """Add one run's measurements to every group's and the peak outside groups."""
        self.measurements.outside = self.outside = max(self.measurements.outside, outside)
        for name, m in measured.items():
            self.groups.setdefault(name, _Measured(m.axis, m.length, m.modes, m.in_place, m.rows)).peaks.update(m.peaks)

    def _fitted(self, name: str) -> bool:
        m = self.groups[name]
        needed = {_normalized(m, k, mode) for k, mode in FIT_RUNS}
        return needed <= m.peaks.keys()

    def _ensure(self, names: Iterable[str]) -> None:
        """Measure the named groups that lack their linear model's runs (``FIT_RUNS``), all in the same runs:
        they at the run's decision, every other group whole (replayed where it can be)."""
        names = {name for name in names if not self._fitted(name)}
        if not names:
            return
        with self._batch():
            for k, mode in FIT_RUNS:
                self._fold(*self.measure(lambda name, _a, _l, k=k, mode=mode: (k, mode) if name in names else (1, "keep")))

    def _sliceable(self, max_slices: int | None, axes: Iterable[str]) -> list[str]:
        """Groups that may run more than one slice."""
        axes = set(axes)
        return [name for name, m in self.groups.items()
                if allowed(m.axis, axes) and m.length > 1 and (max_slices is None or max_slices > 1)]

    @contextlib.contextmanager
    def _batch(self):
        """The runs inside share one ``session``, entered at the first of them that actually runs."""
        if self._stack is not None:
            yield
            return
        self._stack, self._in_session = contextlib.ExitStack(), False
        try:
            with self._stack:
                yield
        finally:
            self._stack = None

    def _run(self, decide) -> tuple[dict[str, _Measured], int]:
        if self._stack is not None and self.session is not None and not self._in_session:
            self._stack.enter_context(self.session())
            self._in_session = True
        self.runs += 1
        measured, outside, _ = measure_groups(self.run, decide, self.measurements.replays if self.replay else None)
        return measured, outside

    def measure(self, decide) -> tuple[dict[str, _Measured], int]:
        """Each group's measured peak and the peak outside groups of a run by ``decide``; a run whose
        decisions an earlier one made (for every group, as the runner clamps them) is not run again."""
        decisions = frozenset((name, m.length, *_normalized(m, *decide(name, m.axis, m.length)))
                              for name, m in self.groups.items())
        known = self.measurements.runs.get(decisions) if self.groups else None
        if known is not None:
            return known
        measured, outside = self._run(decide)
        made = _decisions_of(measured)
        if made is not None and (made == decisions or not self.groups):
            # the first run sees the groups: until then no decisions are known to compare
            self.measurements.runs.setdefault(made, (measured, outside))
        return measured, outside

    def predict(self, name: str, slices: int, mode: Mode) -> int:
        """Predicted peak of group ``name`` with ``slices`` slices in ``mode``."""
        m = self.groups[name]
        slices = max(1, min(slices, m.length))
        mode = mode if mode in m.modes else m.modes[0]
        if slices == 1:
            return m.peaks[(1, m.modes[0])]
        self._ensure([name])  # callers measure every group they ask about at once; this is the fallback
        per_item, bases = self._fit(m)
        return int(bases[mode] + per_item * governing_slice(m.length, slices, m.in_place, m.rows))

    @staticmethod
    def _fit(m: _Measured) -> tuple[float, dict[Mode, float]]:
        s2 = governing_slice(m.length, min(2, m.length), m.in_place, m.rows)
        s4 = governing_slice(m.length, min(4, m.length), m.in_place, m.rows)
        p2, p4 = m.peaks[(min(2, m.length), "keep")], m.peaks[(min(4, m.length), "keep")]
        per_item = max(0.0, (p2 - p4) / (s2 - s4)) if s2 != s4 else 0.0
        bases = {mode: m.peaks[(min(2, m.length), mode)] - per_item * s2 for mode in m.modes}
        return per_item, bases

    def unsliced_peak(self) -> int:
        """The activation peak with every group whole."""
        return max([self.outside] + [self.predict(name, 1, "keep") for name in self.groups])

    def _least(self, name: str, max_slices: int | None, axes: Iterable[str]) -> int:
        """Group ``name``'s least predicted peak (at its most slicing, or whole)."""
        m = self.groups[name]
        k = m.length if max_slices is None else min(max_slices, m.length)
        k = k if allowed(m.axis, axes) else 1
        return min(self.predict(name, kk, mode) for kk in {1, k} for mode in m.modes)

    def least_peak(self, max_slices: int | None = None, axes: Iterable[str] = ("frames", "pixels", "tokens")) -> int:
        """The least activation peak any plan reaches (every group at its most slicing)."""
        self._ensure(self._sliceable(max_slices, axes))
        return max([self.outside] + [self._least(name, max_slices, axes) for name in self.groups])

    def plan(self, activation_budget: int | None, max_slices: int | None = None,
             axes: Iterable[str] = ("frames", "pixels", "tokens")) -> Plan:
        """The least slicing per group whose predicted peak fits ``activation_budget``.

        Without a budget every group runs ``max_slices`` slices (clamped to its axis). Groups that
        cannot fit get their least-peak option; ``Plan.fits`` says whether all fit.
        """
        key = (activation_budget, max_slices, tuple(sorted(axes)))
        known = self.measurements.plans.get(key)
        if known is not None:
            return known
        with self._batch():
            plan = self._plan(activation_budget, max_slices, axes)
        self.measurements.plans[key] = plan
        return plan

    def _plan(self, activation_budget: int | None, max_slices: int | None, axes: Iterable[str]) -> Plan:
        chosen, fits = [], True
        target = activation_budget
        if activation_budget is None:
            self._ensure(self._sliceable(max_slices, axes))
        else:
            # Only groups whose whole peak is over the budget are sliced, so only they are measured sliced.
            # Below the least reachable peak no plan fits; then slice each group only as far as within 2% of
            # that peak, not to its most slicing (thousands of slices for a last 0.1%). A group under the
            # budget whole has a least peak under it too, so where the outside peak or an over-budget group's
            # least peak is over the budget, the greatest of them is the least reachable peak; otherwise every
            # group fits.
            over = [name for name, m in self.groups.items() if m.peaks[(1, m.modes[0])] > activation_budget]
            self._ensure(set(over) & set(self._sliceable(max_slices, axes)))
            reachable = max([self.outside] + [self._least(name, max_slices, axes) for name in over])
            fits = activation_budget >= reachable
            if not fits:
                target = max(activation_budget, int(reachable * (1 + UNREACHABLE_SLACK)))
        for name, m in self.groups.items():
            kmax = m.length if max_slices is None else max(1, min(max_slices, m.length))
            kmax = kmax if allowed(m.axis, axes) else 1
            if target is None:
                options = iter([(kmax, m.modes[0])])
            else:
                options = self._options(name, m, target, kmax)  # lazily: the first that fits is taken
            best = next(((k, mode) for k, mode in options if self.predict(name, k, mode) <= (target or math.inf)), None)
            if best is None:
                fits = False
                best = min(((kk, mode) for kk in {1, kmax} for mode in m.modes), key=lambda o: (self.predict(name, *o), o[0]))
            chosen.append(GroupPlan(name, m.axis, m.length, best[0], best[1], self.predict(name, *best), m.rows))
        chosen, outside = self._verified(chosen, target, max_slices, axes)
        peak = max([outside] + [g.predicted_bytes for g in chosen])
        if activation_budget is not None:
            fits = fits and peak <= max(activation_budget, target or 0)
        return Plan(chosen, peak, self.weights_bytes, self.skip_floor_bytes, fits=fits, floor_name=self.floor_name)

    def _verified(self, chosen: list[GroupPlan], target: int | None, max_slices: int | None,
                  axes: Iterable[str], rounds: int = VERIFY_ROUNDS) -> tuple[list[GroupPlan], int]:
        """Measure the chosen plan once more and give every group its measured peak. A group's peak is
        linear in its slice length only piecewise (the statistics pass or the body may hold the most),
        so a group measured above ``target`` gets more slices (recomputing before keeping more) and the
        plan is measured again, at most ``rounds`` times."""
        axes = set(axes)
        outside = self.outside
        for round_ in range(rounds + 1):
            plan = Plan(chosen, 0, self.weights_bytes, self.skip_floor_bytes)
            measured, outside = self.measure(plan.decide)
            chosen = [replace(g, predicted_bytes=max(measured[g.name].peaks.values())) if g.name in measured else g
                      for g in chosen]
            if target is None or round_ == rounds:
                break
            bumped = False
            for i, g in enumerate(chosen):
                if g.predicted_bytes <= target:
                    continue
                m = self.groups[g.name]
                kmax = m.length if max_slices is None else max(1, min(max_slices, m.length))
                kmax = kmax if allowed(m.axis, axes) else 1
                if g.mode == "keep" and "recompute" in m.modes and g.slices > 1:
                    chosen[i] = replace(g, mode="recompute")
                elif g.slices < kmax:
                    chosen[i] = replace(g, slices=min(kmax, max(g.slices + 1, math.ceil(g.slices * 1.25))))
                else:
                    continue
                bumped = True
            if not bumped:
                break
        return chosen, outside

    def _options(self, name: str, m: _Measured, budget: int, kmax: int) -> Iterable[tuple[int, Mode]]:
        yield 1, m.modes[0]
        if kmax < 2:
            return
        self._ensure([name])
        per_item, bases = self._fit(m)
        for mode in m.modes:
            room = budget - bases[mode]
            if per_item <= 0:
                yield 2, mode
                continue
            longest = math.floor(room / per_item)
            if longest >= 1:
                k = max(2, _least_slices(m, longest))
                if k <= kmax:
                    yield k, mode
            yield kmax, mode


def _normalized(m: _Measured, slices: int, mode: Mode) -> tuple[int, Mode]:
    """A decision as the runner applies it to group ``m``: slices clamped to its axis, a mode it has."""
    return max(1, min(int(slices), m.length)), (mode if mode in m.modes else m.modes[0])


def _decisions_of(measured: dict[str, _Measured]) -> Decisions | None:
    """The decisions one run made, from what it measured (None where a group ran two ways)."""
    if any(len(m.peaks) != 1 for m in measured.values()):
        return None
    return frozenset((name, m.length, *next(iter(m.peaks))) for name, m in measured.items())


def _least_slices(m: _Measured, longest: int) -> int:
    """The fewest slices whose longest slice is at most ``longest`` items (on tiles: rows; whole frames
    while one fits, else row bands)."""
    if not m.rows:
        return ceil_div(m.length, longest)
    frames = m.length // m.rows
    if longest >= m.rows:
        return ceil_div(frames, longest // m.rows)
    return frames * ceil_div(m.rows, longest)


def meta_replica(model: nn.Module) -> nn.Module:
    """A structural copy of ``model`` whose parameters and buffers live on ``meta`` (no memory)."""
    tensors = list(model.parameters()) + list(model.buffers())
    if all(t.device.type == "meta" for t in tensors):
        return model
    memo: dict[int, Any] = {}
    for t in tensors:
        empty = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(empty, requires_grad=False) if isinstance(t, nn.Parameter) else empty
    for name in ("_hf_hook", "_old_forward", "forward"):  # offload hooks hold other models
        if name in model.__dict__:
            memo[id(model.__dict__[name])] = None
    for module in model.modules():  # other libraries' hooks are shared, as plain functions are, not copied: a
        for attr, hooks in vars(module).items():  # copied method would copy its object (locks, modules, models)
            if attr.endswith("hooks") and isinstance(hooks, dict):
                memo.update((id(hook), hook) for hook in hooks.values() if callable(hook))
    replica = copy.deepcopy(model, memo)
    for name in ("_hf_hook", "_old_forward", "forward"):
        replica.__dict__.pop(name, None)
    return replica


def to_meta(value: Any) -> Any:
    """Tensors (also inside tuples, lists, dicts) as empty ``meta`` tensors of the same shape."""
    if isinstance(value, torch.Tensor):
        return torch.empty_like(value, device="meta")
    if isinstance(value, (tuple, list)):
        return type(value)(to_meta(v) for v in value)
    if isinstance(value, dict):
        return {k: to_meta(v) for k, v in value.items()}
    return value


def fresh_containers(value: Any) -> Any:
    """New dicts and lists around the same tensors: a host's forward may mutate its options."""
    if isinstance(value, dict):
        return {k: fresh_containers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [fresh_containers(v) for v in value]
    if isinstance(value, tuple):
        return tuple(fresh_containers(v) for v in value)
    return value
