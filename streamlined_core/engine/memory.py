"""Peak live-tensor memory, counted the way a GPU allocator would hold it.

The rules (docs/benchmarks.md, "Peak memory"):

* a storage counts from the op that creates it until it is freed;
* storages that exist before the measured region (weights, buffers, inputs) never count, even
  when an op hands out a view of them (``F.linear`` exposes every weight through a transposed
  view); views and in-place ops add nothing;
* the region runs under ``torch.no_grad()`` and its output counts until the region ends;
* attention is modelled as a memory-efficient GPU kernel: it allocates its output and an fp32
  log-sum-exp, never the attention matrix.

The same tracker runs on ``cpu``, ``cuda`` and ``meta`` tensors, so a full-size model built on the
``meta`` device (no weights, no GPU) is measured by exactly the rules a real run is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from . import meta_kernels
from .meta_kernels import META_KERNELS, MetaKernelCache, input_keys, storage_of, tensors_in  # noqa: F401 (their home was here)

GIB = 1024**3


def size_text(nbytes: float) -> str:
    """Bytes for a log line: GiB to two decimals from 0.1 GiB up, else MiB to three."""
    return f"{nbytes / GIB:.2f} GiB" if abs(nbytes) >= 0.1 * GIB else f"{nbytes / 1024**2:.3f} MiB"
LEVELS = ("op", "call")

_ACTIVE: list["MemoryTracker"] = []  # trackers whose regions are open, outermost first

_SDPA_FUNCTIONS = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
_storage_expired = torch.UntypedStorage._expired  # what StorageWeakRef.expired() calls, without its frame


@dataclass(frozen=True)
class MemoryEvent:
    """One mark on the timeline: live bytes now, and the peak since the previous mark."""

    label: str
    live_bytes: int
    peak_bytes: int


@dataclass
class _Live:
    ref: StorageWeakRef
    nbytes: int
    device: str


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and shared weights count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[s._cdata] = s.nbytes()
    return sum(seen.values())


def weights_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters and buffers."""
    return storage_bytes(list(model.parameters()) + list(model.buffers()))


def attention_lse_bytes(query: torch.Tensor) -> int:
    """Bytes of the fp32 log-sum-exp an efficient attention kernel keeps: one per query row."""
    return math.prod(query.shape[:-1]) * 4


class MemoryTracker:
    """Track the peak bytes of tensor storage created inside a ``with`` region.

    ``devices`` limits counting to device types (``{"cuda"}``, ``{"meta"}``...); by default every
    device counts: ``peak_bytes`` is the peak of their sum, ``peak_bytes_by_device`` each device's own peak.
    ``mark(label)`` records a timeline event; ``on_event`` is called with each one.

    ``level`` is where storage is counted. ``"op"`` (the default, and what the planner and
    ``streamline simulate`` use) sees every aten op, including the temporaries a composite function
    makes and frees inside itself. ``"call"`` sees each torch function and tensor method called from
    Python (a function mode) and counts what it returns: several times cheaper per op, it misses only
    temporaries that live and die inside one call (a norm's per-group statistics, for one), and it
    sees what op level does not: a tensor made from Python data (``torch.tensor(0.5)``), whose storage
    exists before its first op. The profiler uses it on the CPU.
    """

    def __init__(
        self,
        devices: Iterable[str] | None = None,
        on_event: Callable[[MemoryEvent], None] | None = None,
        level: str = "op",
    ) -> None:
        if level not in LEVELS:
            raise ValueError(f"level={level!r}: expected one of {', '.join(LEVELS)}")
        self.level = level
        self.devices = set(devices) if devices is not None else None
        self.on_event = on_event
        self._paused = False
        self._live: dict[int, _Live] = {}
        self._swept_size = 0
        self.reset()

    # -- state -----------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget everything counted so far (storages already tracked stay tracked)."""
        for key in [k for k, v in self._live.items() if v.ref.expired()]:
            del self._live[key]
        self._current = sum(v.nbytes for v in self._live.values())
        self.peak_bytes = self._current
        self._mark_peak = self._current
        self.current_by_device: dict[str, int] = {}
        self.peak_bytes_by_device: dict[str, int] = {}
        for v in self._live.values():
            self.current_by_device[v.device] = self.current_by_device.get(v.device, 0) + v.nbytes
        self.peak_bytes_by_device = dict(self.current_by_device)
        self.events = []

    @property
    def current_bytes(self) -> int:
        """Bytes of the storages counted and still alive now."""
        self._sweep()
        return self._current

    def mark(self, label: str) -> MemoryEvent:
        """Record an event: live bytes now and the peak since the previous mark."""
        self._sweep()
        event = MemoryEvent(label, self._current, self._mark_peak)
        self._mark_peak = self._current
        self.events.append(event)
        if self.on_event is not None:
            self.on_event(event)
        return event

    # -- counting --------------------------------------------------------------------------
    def _sweep(self) -> None:
        expired = _storage_expired
        dead = [k for k, v in self._live.items() if expired(v.ref.cdata)]
        for k in dead:
            v = self._live.pop(k)
            self._current -= v.nbytes
            self.current_by_device[v.device] -= v.nbytes
        self._swept_size = len(self._live)

    # Sweeping (asking every tracked storage whether it is still alive) is put off until it matters.
    # Between sweeps ``current_bytes`` still counts storages freed since the last one, so it is at
    # least the live bytes: while it stays at or below the peaks nothing can raise them, and when it
    # goes above, a sweep gives the exact figure before any peak moves. Expired entries cannot alias a
    # new storage: the weak reference keeps the storage's address taken until the entry is dropped.
    def _raises_peak(self, transient: int, transient_device: str | None) -> bool:
        if self._current + transient > self._mark_peak:
            return True
        peaks = self.peak_bytes_by_device
        for dev, b in self.current_by_device.items():
            if b + (transient if dev == transient_device else 0) > peaks.get(dev, 0):
                return True
        return bool(transient) and transient_device not in self.current_by_device

    def _counts(self, device: torch.device) -> bool:
        return self.devices is None or device.type in self.devices

    def _record_outputs(self, out: Any, inputs: Any, transient: int = 0,
                        transient_device: str | None = None, fresh: bool = False) -> None:
        if fresh and type(out) is torch.Tensor and not transient:
            self._record_fresh(out)
            return
        # built only when an output's storage is not tracked yet; ``fresh`` ones (cache-made) are no input's
        input_keys: set[int] | None = set() if fresh else None
        for t in tensors_in(out):
            if not self._counts(t.device):
                continue
            s = storage_of(t)
            if s is None:
                continue
            key = s._cdata
            live = self._live.get(key)
            if live is not None:
                grown = s.nbytes() - live.nbytes  # an out= op may resize its storage
                if grown > 0:
                    live.nbytes += grown
                    self._current += grown
                    self.current_by_device[live.device] += grown
                continue
            if input_keys is None:
                input_keys = self._input_keys(inputs)
            if key in input_keys:
                continue  # a view of, or an in-place op on, a storage older than the region
            nbytes = s.nbytes()
            dev = t.device.type
            self._live[key] = _Live(StorageWeakRef(s), nbytes, dev)
            self._current += nbytes
            self.current_by_device[dev] = self.current_by_device.get(dev, 0) + nbytes
        if self._raises_peak(transient, transient_device):
            self._sweep()
            self._bump(transient, transient_device)
        elif len(self._live) > 2 * self._swept_size + 256:
            self._sweep()  # keeps the table of tracked storages from growing with freed ones

    def _record_fresh(self, out: torch.Tensor) -> None:
        """:meth:`_record_outputs` of one tensor the meta kernel cache just made (a storage no one else holds):
        the same bookkeeping, without looking for it among the tracked storages or the op's inputs."""
        dev = out.device.type
        if self.devices is not None and dev not in self.devices:
            return
        s = out.untyped_storage()
        nbytes = s.nbytes()
        self._live[s._cdata] = _Live(StorageWeakRef(s), nbytes, dev)
        self._current += nbytes
        by_device = self.current_by_device
        by_device[dev] = by_device.get(dev, 0) + nbytes
        if self._raises_peak(0, None):
            self._sweep()
            self._bump()
        elif len(self._live) > 2 * self._swept_size + 256:
            self._sweep()

    def _bump(self, transient: int = 0, transient_device: str | None = None) -> None:
        """Raise the peaks to the live bytes plus ``transient`` bytes held now on ``transient_device``."""
        now = self._current + transient
        if now > self.peak_bytes:
            self.peak_bytes = now
        if now > self._mark_peak:
            self._mark_peak = now
        for dev in self.current_by_device.keys() | ({transient_device} if transient else set()):
            b = self.current_by_device.get(dev, 0) + (transient if dev == transient_device else 0)
            if b > self.peak_bytes_by_device.get(dev, 0):
                self.peak_bytes_by_device[dev] = b

    _input_keys = staticmethod(input_keys)

    def _attention(self, func: Callable, args: tuple, kwargs: dict) -> torch.Tensor:
        query = args[0] if args else kwargs["query"]
        value = args[2] if len(args) > 2 else kwargs["value"]
        self._sweep()
        self._paused = True
        try:
            if query.device.type == "meta":
                out = query.new_empty((*query.shape[:-1], value.shape[-1]))
            else:
                out = func(*args, **kwargs)
        finally:
            self._paused = False
        lse = attention_lse_bytes(query) if self._counts(query.device) else 0
        self._record_outputs(out, (args, kwargs), transient=lse, transient_device=query.device.type)
        return out

    # -- region ----------------------------------------------------------------------------
    def __enter__(self) -> "MemoryTracker":
        self._paused = False
        _ACTIVE.append(self)
        self._no_grad = torch.no_grad()
        self._no_grad.__enter__()
        if self.level == "call":
            self._function_mode = _CallCountingMode(self)
            self._dispatch_mode = None
        else:
            self._function_mode = _AttentionMode(self)
            self._dispatch_mode = _CountingMode(self)
        self._function_mode.__enter__()
        if self._dispatch_mode is not None:
            self._dispatch_mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._dispatch_mode is not None:
            self._dispatch_mode.__exit__(*exc)
        self._function_mode.__exit__(*exc)
        self._no_grad.__exit__(*exc)
        _ACTIVE.remove(self)
        self._sweep()


class suspend_tracking:
    """Open trackers ignore what runs inside (the planner's own measurements, for one)."""

    def __enter__(self) -> None:
        self._paused = [(t, t._paused) for t in _ACTIVE]
        for t, _ in self._paused:
            t._paused = True

    def __exit__(self, *exc: Any) -> None:
        for t, was in self._paused:
            t._paused = was


class _CountingMode(TorchDispatchMode):
    def __init__(self, tracker: MemoryTracker) -> None:
        super().__init__()
        self.tracker = tracker

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        t = self.tracker
        if t._paused:
            return func(*args, **kwargs)
        fresh = [False]
        out = META_KERNELS.call(func, args, kwargs, fresh)
        t._record_outputs(out, (args, kwargs), fresh=fresh[0])
        return out


meta_kernels.TRACKER_MODES = (_CountingMode,)


class _AttentionMode(TorchFunctionMode):
    def __init__(self, tracker: MemoryTracker) -> None:
        super().__init__()
        self.tracker = tracker

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SDPA_FUNCTIONS and not self.tracker._paused:
            return self.tracker._attention(func, args, kwargs)
        return func(*args, **kwargs)


class _CallCountingMode(TorchFunctionMode):
    """``level="call"``: count what each torch function or tensor method called from Python returns."""

    def __init__(self, tracker: MemoryTracker) -> None:
        super().__init__()
        self.tracker = tracker

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        t = self.tracker
        if t._paused:
            return func(*args, **kwargs)
        if func in _SDPA_FUNCTIONS:
            return t._attention(func, args, kwargs)
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            # An op that returns one of its arguments (in place, or a no-op ``.to``) made nothing. (A view
            # is not skipped: ``F.linear`` on 3-d input returns a view of a storage it just made.)
            if not any(out is a for a in args):
                t._record_outputs(out, (args, kwargs))
        elif isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
            t._record_outputs(out, (args, kwargs))
        return out
