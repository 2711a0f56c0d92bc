"""Groups replayed in a planner's measuring runs: a group measured before with the same decision is not run again.

A planner (``plan.py``) runs the streamlined forward on ``meta`` several times, each time with other slice
counts for some groups. A group's memory is its own (the bytes alive at its start plus a trajectory set by
its input shapes and its decision), so a group that ran cleanly once need not run again for the same
decision: :class:`GroupReplay` records it and, in a later run, makes its output and raises the tracker to
its peak instead. ``Runner.replay`` (``slicing.py``) is where a group asks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .memory import MemoryTracker


@dataclass(frozen=True)
class GroupRecord:
    """What one group did in a measuring run, enough to replay it: its peak over the live bytes at its
    start, and its output's (shape, stride, dtype) on ``meta`` (None: it wrote into its input)."""

    peak_above_start: int
    output: tuple | None


class GroupReplay:
    """Replays groups a planner measured before with the same decision (``Runner.replay``).

    A group's memory is its own: the bytes alive at its start plus a trajectory set by its inputs' shapes
    and its decision. A group that allocated nothing but its output and freed nothing alive before it
    (checked, storage by storage, at its end) is recorded by its peak above its start and its output;
    met again in a later run with the same decision (same name, the same how-many-th group of that name,
    length, slices, mode), it is not run: its output is made on ``meta`` and the tracker raised to the
    recorded peak, so every group's measured peak, and the peak outside groups, are what running it gives.
    Groups with groups inside are run."""

    def __init__(self, tracker: MemoryTracker, records: dict) -> None:
        self.tracker, self.records = tracker, records
        self._pending: tuple | None = None  # the key play() found no record for: begin() records under it
        self._open: list[dict] = []
        self._seen: dict[str, int] = {}

    def _key(self, key: tuple) -> tuple:
        name = key[0]
        self._seen[name] = self._seen.get(name, 0) + 1
        return (name, self._seen[name], *key[1:])

    def play(self, key: tuple, merge: Any) -> Any:
        key = self._key(key)
        record = self.records.get(key)
        if record is None:
            self._pending = key
            return None
        for token in self._open:
            token["nested"] = True
        t = self.tracker
        t._sweep()
        live = t._current
        if record.output is None:
            out = merge.target
        else:
            shape, stride, dtype = record.output
            out = torch.empty_strided(shape, stride, dtype=dtype, device="meta")
            if out.untyped_storage()._cdata not in t._live:  # counted once, whether or not the tracker's mode saw it
                t._record_outputs(out, ((), {}))
        t._bump(max(0, record.peak_above_start - (t._current - live)), "meta")
        return out

    def begin(self) -> dict:
        t = self.tracker
        t._sweep()
        for token in self._open:
            token["nested"] = True
        token = {"key": self._pending, "live": t._current, "keys": set(t._live), "nested": False,
                 "marked": t._mark_peak == t._current}  # the listener marked the group's start
        self._open.append(token)
        return token

    def end(self, _key: tuple, token: dict, out: Any, merge: Any) -> None:
        self._open.remove(token)
        if token["nested"] or not token["marked"]:
            return
        t = self.tracker
        t._sweep()
        keys = set(t._live)
        target = getattr(merge, "target", None)
        if target is not None and out is target:
            if keys != token["keys"]:
                return
            output = None
        else:
            if type(out) is not torch.Tensor or out.device.type != "meta" or out.storage_offset() != 0:
                return
            storage = out.untyped_storage()
            if storage._cdata in token["keys"] or keys != token["keys"] | {storage._cdata}:
                return
            if storage.nbytes() != _strided_nbytes(out):
                return  # an output inside a larger storage: made alone it would be smaller
            output = (tuple(out.shape), out.stride(), out.dtype)
        self.records[token["key"]] = GroupRecord(t._mark_peak - token["live"], output)


def _strided_nbytes(t: torch.Tensor) -> int:
    """Bytes ``torch.empty_strided`` allocates for ``t``'s shape and strides."""
    if t.numel() == 0:
        return 0
    return (1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))) * t.element_size()
