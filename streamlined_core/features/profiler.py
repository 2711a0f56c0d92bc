"""The VRAM profiler's recorder: where inside a run the memory peak happens, step by step and group by group.

A :class:`Recorder` is entered around one sampling run (ComfyUI's VRAM Profiler node enters it in an
OUTER_SAMPLE wrapper; diffusers users use :func:`profile`). The host tells it when a model call
begins (:meth:`Recorder.call`, with the step index, sigma and which conds ran) and, at group
granularity, when a group ends (:meth:`Recorder.group`). Each event records the time, the memory
allocated and reserved now, and the **peak since the previous event**, so the peak of every step and
of every group is known and the run's peak is the maximum of them.

Where memory is read:

- **CUDA**: the caching allocator's statistics (``memory_allocated``, ``memory_reserved``,
  ``max_memory_allocated``). The peak since the previous event needs the peak counter reset at each
  event, and ``torch.cuda.reset_peak_memory_stats`` resets torch's one global counter for everyone:
  while a recorder runs, ``max_memory_allocated`` read by other code covers only the time since the
  recorder's last event. Device memory in use by every process comes from ``torch.cuda.mem_get_info``
  at step boundaries (from NVML instead where ``nvidia-ml-py`` happens to be installed). Times come
  from a synchronisation at each step boundary and from CUDA events at group boundaries, resolved
  when the run ends; never from launch times.
- **CPU and meta**: the project's tracker (:class:`~streamlined_core.engine.memory.MemoryTracker`) at its
  ``"call"`` level: a function mode counting the live tensor storage each torch call returns, as a
  GPU allocator would hold it. It misses only temporaries made and freed inside one call (the op
  level the planner uses sees those), for a fraction of the op level's cost per op. A mode is per
  thread: the recorder must be entered on the thread that runs the model.

``allocated`` on CUDA includes the weights and everything else resident; the tracker counts only
storage created inside the run. ``baseline_bytes`` (allocated when the first step started, after the
host loaded the weights) tells the two apart: activations are ``allocated - baseline_bytes``. The
weights resident on the device, and whether the host loaded the model only partly (ComfyUI's
low-VRAM mode), are recorded when the model is first called.

Long runs stay bounded: at most ``max_events`` events are kept. When more arrive, the group events
of the oldest steps are dropped first (their step events, which carry the step's peak, stay), and
``dropped_events`` counts them. The run's peak and where it happened are kept apart from the list.

The JSON document (:meth:`Timeline.to_json`, schema ``streamline.timeline/1``) is described in
``docs/timeline-schema.md``.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterator, Literal, Sequence

import torch

from ..engine.memory import MemoryTracker

SCHEMA = "streamline.timeline/1"
Granularity = Literal["step", "group"]
GRANULARITIES: tuple[str, ...] = ("step", "group")
DEFAULT_MAX_EVENTS = 20_000
TRACKER_LEVEL = "call"  # the tracker's level off CUDA (memory.MemoryTracker): a fraction of "op"'s cost per op


@dataclass
class Event:
    """One point of the timeline.

    ``kind``: ``run_start``, ``step_start``, ``call`` (a model call begins), ``group`` (a group ended),
    ``step_end`` (the step's last call ended), ``run_end``. ``peak`` is the most memory allocated
    since the previous event (including it), so a ``group`` event's peak is that group's peak and a
    ``step_end`` event's the peak of the step's tail after its last group event.
    """

    t: float  # seconds since the run started
    kind: str
    name: str
    step: int | None
    sigma: float | None
    conds: list[str] | None
    allocated: int
    reserved: int
    peak: int
    predicted: int | None = None  # the plan's predicted peak for this group (Streamline), activations only
    device_used: int | None = None  # device memory in use by every process (CUDA, step boundaries)


@dataclass
class StepSummary:
    """One denoising step: when it ran, its sigma, its peak and how many model calls it took."""

    step: int
    sigma: float | None
    t_start: float
    t_end: float | None
    peak: int
    calls: int
    conds: list[str]
    rehash: str | None = None  # Step Rehash: "key" (the whole U-Net ran) or "reuse" (a cached feature's tail)


@dataclass
class Timeline:
    """A recorded run (see the module's docstring for what each figure means)."""

    label: str
    device: str
    source: str  # "cuda-allocator" or "tracker"
    granularity: str
    started_at: str
    seconds: float = 0.0
    weights_bytes: int = 0  # the model's parameters and buffers
    weights_on_device_bytes: int = 0  # of which resident on the device when the run started
    partial_load: bool = False  # the host kept part of the weights off the device
    baseline_bytes: int = 0  # allocated when the first step started (CUDA: weights and inputs; tracker: 0)
    peak_bytes: int = 0  # the most allocated at any time of the run
    peak_step: int | None = None
    peak_name: str = ""  # the event whose interval held the peak (a group name, or "step")
    peak_t: float = 0.0
    predicted_peak_bytes: int | None = None  # the plan's predicted activation peak (Streamline)
    device_total_bytes: int | None = None
    steps: list[StepSummary] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    dropped_events: int = 0
    snapshot: dict[str, Any] = field(default_factory=dict)  # {"path": ...} or {"why_not": ...}
    streamline: dict[str, Any] | None = None  # what Streamline planned, when it ran
    prompt_id: str | None = None

    @property
    def activation_peak_bytes(self) -> int:
        """The peak above what was allocated when the run started."""
        return max(0, self.peak_bytes - self.baseline_bytes)

    def group_peaks(self) -> dict[str, dict[str, int | None]]:
        """Per group name: the highest measured peak (activations: minus the baseline) and the plan's
        predicted peak, over every recorded group event."""
        out: dict[str, dict[str, int | None]] = {}
        for e in self.events:
            if e.kind != "group":
                continue
            row = out.setdefault(e.name, {"measured": 0, "predicted": None})
            row["measured"] = max(int(row["measured"] or 0), e.peak - self.baseline_bytes)
            if e.predicted is not None:
                row["predicted"] = max(int(row["predicted"] or 0), e.predicted)
        return out

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["schema"] = SCHEMA
        doc["activation_peak_bytes"] = self.activation_peak_bytes
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Timeline:
        if doc.get("schema") != SCHEMA:
            raise ValueError(f"timeline: expected schema {SCHEMA!r}, got {doc.get('schema')!r}")
        fields = {k: v for k, v in doc.items() if k in cls.__dataclass_fields__}
        fields["events"] = [Event(**e) for e in doc.get("events", [])]
        fields["steps"] = [StepSummary(**s) for s in doc.get("steps", [])]
        return cls(**fields)

    def summary(self) -> str:
        """One line: the peak, where it happened, and the activation share."""
        where = f"step {self.peak_step}" if self.peak_step is not None else "outside the steps"
        if self.peak_name and self.peak_name != "step":
            where += f", {self.peak_name}"
        text = (f"peak {format_bytes(self.peak_bytes)} at {where} ({format_bytes(self.activation_peak_bytes)} above the "
                f"{format_bytes(self.baseline_bytes)} resident at the start)")
        if self.predicted_peak_bytes is not None:
            text += f"; Streamline predicted {format_bytes(self.predicted_peak_bytes)} of activations"
        return text


def format_bytes(n: int) -> str:
    """Bytes in GiB from 1 GiB up, else in MiB."""
    return f"{n / 1024**3:.2f} GiB" if n >= 1024**3 else f"{n / 1024**2:.1f} MiB"


class _Source:
    """Where memory figures come from."""

    name = ""

    def start(self) -> None: ...

    def read(self, boundary: bool) -> tuple[int, int, int, int | None]:
        """(allocated, reserved, peak since the previous read, device memory in use or None)."""
        raise NotImplementedError

    def clock(self, boundary: bool) -> Any:
        """A time mark: a float on the host, or a CUDA event resolved at :meth:`resolve`."""
        return time.perf_counter()

    def resolve(self, marks: Sequence[Any], origin: Any) -> list[float]:
        return [float(m - origin) for m in marks]

    def stop(self) -> None: ...


class _CudaSource(_Source):
    name = "cuda-allocator"

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._nvml: Any = None

    def start(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self._nvml = _nvml_handle(self.device)

    def read(self, boundary: bool) -> tuple[int, int, int, int | None]:
        if boundary:
            torch.cuda.synchronize(self.device)
        d = self.device
        allocated, reserved, peak = (torch.cuda.memory_allocated(d), torch.cuda.memory_reserved(d),
                                     torch.cuda.max_memory_allocated(d))
        torch.cuda.reset_peak_memory_stats(d)
        used = None
        if boundary:
            if self._nvml is not None:
                import pynvml

                used = int(pynvml.nvmlDeviceGetMemoryInfo(self._nvml).used)
            else:
                free, total = torch.cuda.mem_get_info(d)
                used = total - free
        return allocated, reserved, peak, used

    def clock(self, boundary: bool) -> Any:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def resolve(self, marks: Sequence[Any], origin: Any) -> list[float]:
        torch.cuda.synchronize(self.device)
        return [origin.elapsed_time(m) / 1000 for m in marks]


def _nvml_handle(device: torch.device) -> Any:
    """NVML's handle of ``device`` where nvidia-ml-py is installed (it is no requirement), else None."""
    try:
        import pynvml

        pynvml.nvmlInit()
        uuid = str(torch.cuda.get_device_properties(device).uuid)
        return pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
    except Exception:  # noqa: BLE001 - not installed, no driver library, an unknown UUID: mem_get_info instead
        return None


class _TrackerSource(_Source):
    name = "tracker"

    def __init__(self, device: torch.device, level: str) -> None:
        self.tracker = MemoryTracker(devices={device.type}, level=level)

    def start(self) -> None:
        self.tracker.__enter__()

    def read(self, boundary: bool) -> tuple[int, int, int, int | None]:
        event = self.tracker.mark("")
        self.tracker.events.clear()  # the recorder keeps its own, bounded
        return event.live_bytes, event.live_bytes, max(event.peak_bytes, event.live_bytes), None

    def stop(self) -> None:
        self.tracker.__exit__(None, None, None)


def _source(device: torch.device, tracker_level: str) -> _Source:
    return _CudaSource(device) if device.type == "cuda" else _TrackerSource(device, tracker_level)


class Recorder:
    """Record one run's memory timeline; use as a context manager around the run.

    ``granularity``: ``"step"`` records step boundaries and model calls; ``"group"`` adds one event per
    group (Streamline's groups, or the host's blocks). ``predicted``: the plan's predicted peak per
    group name, where Streamline planned the run. ``tracker_level``: off CUDA, the tracker's counting
    level (:class:`~streamlined_core.engine.memory.MemoryTracker`); ``"op"`` sees temporaries inside one call too.
    """

    def __init__(
        self,
        device: torch.device | str,
        granularity: str = "step",
        label: str = "",
        max_events: int = DEFAULT_MAX_EVENTS,
        weights: torch.nn.Module | None = None,
        partial_load: bool = False,
        tracker_level: str = TRACKER_LEVEL,
    ) -> None:
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity={granularity!r}: expected one of {', '.join(GRANULARITIES)}")
        if max_events < 16:
            raise ValueError(f"max_events={max_events}: expected at least 16")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.granularity = granularity
        self.max_events = max_events
        self.source = _source(self.device, tracker_level)
        self.timeline = Timeline(label=label, device=str(self.device), source=self.source.name,
                                 granularity=granularity, started_at="")
        self._weights = weights
        self.timeline.partial_load = partial_load
        self._marks: list[Any] = []  # one time mark per event, resolved at the end
        self._origin: Any = None
        self._step: int | None = None
        self._sigma: float | None = None
        self._conds: list[str] | None = None
        self._step_summary: StepSummary | None = None
        self._step_peak = 0
        self._open = False
        self._t0 = 0.0

    # -- the run --------------------------------------------------------------------------------

    def __enter__(self) -> Recorder:
        tl = self.timeline
        tl.started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        if self._weights is not None:
            self.set_weights(self._weights, self.timeline.partial_load)
        if self.device.type == "cuda":
            tl.device_total_bytes = torch.cuda.get_device_properties(self.device).total_memory
        self.source.start()
        self._open = True
        self._t0 = time.perf_counter()
        self._origin = self.source.clock(True)
        allocated, reserved, _, used = self.source.read(True)
        tl.baseline_bytes = allocated
        self._add(Event(0.0, "run_start", "run", None, None, None, allocated, reserved, allocated, None, used),
                  self._origin)
        return self

    def set_weights(self, model: torch.nn.Module, partial_load: bool = False) -> None:
        """Record the model's weights and how much of them is resident on the device now (a host that
        loads weights after the run starts calls this at its first model call)."""
        seen: dict[int, tuple[int, bool]] = {}
        for p in list(model.parameters()) + list(model.buffers()):
            storage = p.untyped_storage()
            seen[storage._cdata] = (storage.nbytes(), p.device.type == self.device.type)
        self.timeline.weights_bytes = sum(n for n, _ in seen.values())
        self.timeline.weights_on_device_bytes = sum(n for n, on in seen.values() if on)
        self.timeline.partial_load = partial_load

    def __exit__(self, *exc: Any) -> None:
        try:
            if self._open:
                self._close_step()
                self._event("run_end", "run", boundary=True)
        finally:
            self._open = False
            self.source.stop()
            self._resolve_times()
            self.timeline.seconds = time.perf_counter() - self._t0

    # -- what the host reports -----------------------------------------------------------------

    def call(self, step: int | None, sigma: float | None = None, conds: Sequence[str] | None = None) -> None:
        """A model call begins: a new step when ``step`` differs from the current one."""
        if not self._open:
            return
        conds = list(conds) if conds is not None else None
        if step != self._step or self._step_summary is None:
            self._close_step()
            self._step, self._sigma = step, sigma
            e = self._event("step_start", "step", boundary=True)
            if not self.timeline.steps:  # what the run holds before its first step: weights loaded, inputs made
                self.timeline.baseline_bytes = e.allocated
            self._step_summary = StepSummary(step if step is not None else -1, sigma, e.t, None, e.peak, 0, [])
            self._step_peak = e.peak
        self._conds = conds
        e = self._event("call", "call", boundary=False)
        s = self._step_summary
        s.calls += 1
        for c in conds or ():
            if c not in s.conds:
                s.conds.append(c)
        self._step_peak = max(self._step_peak, e.peak)

    def group(self, name: str, predicted: int | None = None) -> None:
        """A group (Streamline's, or a host block) ended: its peak is the peak since the previous event."""
        if not self._open or self.granularity != "group":
            return
        e = self._event("group", name, boundary=False, predicted=predicted)
        self._step_peak = max(self._step_peak, e.peak)

    def rehash(self, kind: str) -> None:
        """Step Rehash ran the current step as ``kind`` ("key" or "reuse")."""
        if self._open and self._step_summary is not None:
            self._step_summary.rehash = kind

    def set_streamline(self, info: dict[str, Any]) -> None:
        """What Streamline planned for this run (its predicted activation peak, groups sliced)."""
        self.timeline.streamline = info
        if info.get("predicted_peak_bytes") is not None:
            self.timeline.predicted_peak_bytes = int(info["predicted_peak_bytes"])

    # -- internals ------------------------------------------------------------------------------

    def _close_step(self) -> None:
        if self._step_summary is None:
            return
        e = self._event("step_end", "step", boundary=True)
        s = self._step_summary
        s.t_end = e.t
        s.peak = max(self._step_peak, e.peak)
        self.timeline.steps.append(s)
        self._step_summary = None

    def _event(self, kind: str, name: str, boundary: bool, predicted: int | None = None) -> Event:
        allocated, reserved, peak, used = self.source.read(boundary)
        mark = self.source.clock(boundary)
        t = time.perf_counter() - self._t0  # provisional; replaced by the source's clock at the end
        e = Event(t, kind, name, self._step, self._sigma, self._conds, allocated, reserved, max(peak, allocated),
                  predicted, used)
        self._add(e, mark)
        return e

    def _add(self, e: Event, mark: Any) -> None:
        tl = self.timeline
        if e.peak > tl.peak_bytes or not tl.events and not tl.dropped_events:
            tl.peak_bytes, tl.peak_step, tl.peak_t = e.peak, e.step, e.t
            tl.peak_name = e.name if e.kind == "group" else "step" if e.step is not None else e.kind
        tl.events.append(e)
        self._marks.append(mark)
        if len(tl.events) > self.max_events:
            self._shrink()

    def _shrink(self) -> None:
        """Drop the group and call events of the oldest step that still has any; if none is left,
        the oldest events after the run's start."""
        events = self.timeline.events
        first_step = next((e.step for e in events if e.kind in ("group", "call")), None)
        if first_step is not None and first_step != self._step:
            keep = [i for i, e in enumerate(events) if not (e.kind in ("group", "call") and e.step == first_step)]
        else:
            keep = [0] + list(range(2, len(events)))
        dropped = len(events) - len(keep)
        self.timeline.events = [events[i] for i in keep]
        self._marks = [self._marks[i] for i in keep]
        self.timeline.dropped_events += dropped

    def _resolve_times(self) -> None:
        if self._origin is None:
            return
        try:
            times = self.source.resolve(self._marks, self._origin)
        except Exception:  # noqa: BLE001 - a failed sync leaves the host-side times
            return
        for e, t in zip(self.timeline.events, times):
            e.t = t
        self.timeline.peak_t = next((e.t for e in self.timeline.events if e.peak == self.timeline.peak_bytes),
                                    self.timeline.peak_t)
        # step summaries take their times from their boundary events
        starts = [e.t for e in self.timeline.events if e.kind == "step_start"]
        ends = [e.t for e in self.timeline.events if e.kind == "step_end"]
        if len(starts) == len(ends) == len(self.timeline.steps):
            for s, a, b in zip(self.timeline.steps, starts, ends):
                s.t_start, s.t_end = a, b


def predicted_bytes(ctx: Any, name: str) -> int | None:
    """The predicted peak of group ``name`` in the plan of the run's latest planned call, if any."""
    plans = getattr(ctx, "plans", None)
    if not plans or plans[-1] is None:
        return None
    g = plans[-1]._by_name.get(name)
    return g.predicted_bytes if g is not None else None


def step_index(sigma: float, schedule: Sequence[float]) -> int | None:
    """The index of ``sigma`` in a sampling schedule: exact where it is one of its values, else the
    step whose interval holds it (multi-evaluation samplers call between scheduled sigmas)."""
    if not schedule or sigma is None or math.isnan(sigma):
        return None
    best, best_d = None, math.inf
    for i, s in enumerate(schedule[:-1] if len(schedule) > 1 else schedule):
        if s == sigma:
            return i
        d = abs(math.log(max(s, 1e-12)) - math.log(max(sigma, 1e-12)))
        if d < best_d:
            best, best_d = i, d
    for i in range(len(schedule) - 1):  # between two scheduled sigmas: the step that started above it
        hi, lo = schedule[i], schedule[i + 1]
        if hi > sigma > lo:
            return i
    return best


@contextmanager
def profile(model: torch.nn.Module, granularity: str = "step", label: str = "",
            device: torch.device | str | None = None, max_events: int = DEFAULT_MAX_EVENTS,
            tracker_level: str = TRACKER_LEVEL) -> Iterator[Recorder]:
    """Record the memory timeline of every call of ``model`` (a diffusers U-Net) inside the block; each
    call is one step (its sigma recorded for SVD's U-Net, whose timestep is ln(sigma) / 4). Group events
    come from Streamline's groups when the U-Net is streamlined, else from its own blocks.

        with profile(pipe.unet, granularity="group") as rec:
            pipe(image, num_inference_steps=25)
        rec.timeline.summary(); json.dump(rec.timeline.to_json(), f)

    ``model`` may be a pipeline's VAE (SVD's ``AutoencoderKLTemporalDecoder``, the SD VAE's
    ``AutoencoderKL``): each decoder call is then one step whose conds read ``["decode"]``, with the
    decoder's groups (Streamline's, where ``streamline(pipe.vae)`` runs it) as group events.
    """
    from ..engine.context import current, listen
    from ..engine.slicing import GroupEvent
    from .rehash import RehashEvent

    vae = type(model).__name__ in ("AutoencoderKLTemporalDecoder", "AutoencoderKL")
    if vae:
        model = model.decoder
        label = label or "decode"
    device = torch.device(device) if device is not None else next(model.parameters()).device
    recorder = Recorder(device, granularity, label, max_events, weights=model, tracker_level=tracker_level)
    calls = [0]

    # SVD's U-Net takes EDM's c_noise = ln(sigma) / 4 as its timestep; other U-Nets' timesteps are no sigma.
    edm = type(model).__name__ == "UNetSpatioTemporalConditionModel"

    def pre_hook(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if vae:
            recorder.call(calls[0], None, ["decode"])
            calls[0] += 1
            return
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        sigma = None
        if edm and timestep is not None:
            t = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
            sigma = math.exp(4 * t)
        recorder.call(calls[0], sigma, None)
        calls[0] += 1

    def on_event(event: Any) -> None:
        if isinstance(event, GroupEvent) and event.kind == "end":
            recorder.group(event.name, predicted_bytes(current(), event.name))
        elif isinstance(event, RehashEvent):
            recorder.rehash(event.kind)

    handles = [model.register_forward_pre_hook(pre_hook, with_kwargs=True)]
    if granularity == "group" and getattr(getattr(model, "_streamline_handle", None), "passthrough", True):
        # Not streamlined: the U-Net's own blocks are the groups (forward hooks change nothing they observe).
        for name in ("down_blocks", "mid_block", "up_blocks", "conv_out"):
            blocks = getattr(model, name, None)
            if blocks is None:
                continue
            items = [(f"{name}.{i}", b) for i, b in enumerate(blocks)] if isinstance(blocks, torch.nn.ModuleList) \
                else [(name, blocks)]
            for block_name, block in items:
                handles.append(block.register_forward_hook(lambda *_a, _n=block_name: recorder.group(_n)))
    try:
        with listen(on_event) as ctx, recorder:
            yield recorder
            plans = [p for p in ctx.plans if p is not None]
            if plans:
                recorder.set_streamline({"predicted_peak_bytes": max(p.predicted_peak_bytes for p in plans)})
    finally:
        for h in handles:
            h.remove()


__all__ = ["Event", "GRANULARITIES", "Recorder", "SCHEMA", "StepSummary", "Timeline", "format_bytes", "profile", "step_index"]
