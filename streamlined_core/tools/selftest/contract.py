"""The comparison every exactness check makes: one model call run by the engine with chosen slicing
against the host's own forward of the same model.

* fp32: the max abs difference is at most ``TOL`` of the reference's max magnitude (docs/benchmarks.md);
* bf16 against the fp32 reference: the sliced run's max error is at most 1.5x the unsliced bf16 run's,
  plus 1e-3 of the reference's max magnitude;
* :class:`Coverage` records which groups ran with two or more slices, so a count of examples says
  what they exercised; per-slice norm statistics (:func:`per_slice_statistics`, the approximation the
  paper's released code makes) fail the fp32 comparison.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from ...engine import slicing
from ...engine.slicing import GroupEvent, Runner
from ...engine.stages import CutPoint, StageRequest

TOL = 1e-5
LOW_PRECISION_RATIO, LOW_PRECISION_TOL = 1.5, 1e-3


def rel(out: torch.Tensor, reference: torch.Tensor) -> float:
    """Max abs difference relative to the reference's max magnitude."""
    return ((out.float() - reference.float()).abs().max() / reference.float().abs().max()).item()


@dataclass
class Coverage:
    """Which groups with an axis of two or more ran, and which of them ran with two or more slices."""

    seen: set[str] = field(default_factory=set)
    sliced: dict[str, int] = field(default_factory=dict)

    def record(self, event: Any) -> None:
        # by name: under ComfyUI the events may come from the pack's own copy of the core
        if type(event).__name__ == GroupEvent.__name__ and event.kind == "end" and event.length >= 2:
            self.seen.add(event.name)
            if event.slices >= 2:
                self.sliced[event.name] = max(self.sliced.get(event.name, 0), event.slices)

    def merge(self, other: "Coverage") -> None:
        self.seen |= other.seen
        for name, k in other.sliced.items():
            self.sliced[name] = max(self.sliced.get(name, 0), k)

    def never_sliced(self) -> list[str]:
        return sorted(self.seen - set(self.sliced))

    def kinds(self) -> set[str]:
        return {part for name in self.sliced for part in name.split(".")}


@dataclass
class Subject:
    """One model call under the contract. Both callables build fresh containers per call (hosts pop
    control lists and write options in place)."""

    reference: Callable[[], torch.Tensor]  # the host's own forward
    engine: Callable[[Runner], Any]  # the engine's forward: a tensor, or a CutState when asked to stop
    cuts: list[CutPoint] = field(default_factory=list)


def forced(slices: int, mode: str = "keep", listeners=(), request: StageRequest | None = None) -> Runner:
    """A runner that gives every group ``slices`` slices (clamped to its axis)."""
    return Runner(lambda _n, _a, _l: (slices, mode), listeners, request)


def drawn(slices: Sequence[int], modes: Sequence[str], listeners=()) -> Runner:
    """A runner that gives the groups, in the order they run, ``slices`` and ``modes`` in turn (each
    clamped to its group's axis): different groups of one call run with different slicing."""
    count = [0]

    def decide(_name, _axis, _length):
        i = count[0]
        count[0] += 1
        return slices[i % len(slices)], modes[i % len(modes)]

    return Runner(decide, listeners)


def check_sliced(subject: Subject, slices: int, coverage: Coverage | None = None, mode: str = "keep") -> float:
    """The engine with every group at ``slices`` slices against the host's own forward: the error."""
    with torch.no_grad():
        reference = subject.reference()
        out = subject.engine(forced(slices, mode, [coverage.record] if coverage else []))
    assert torch.isfinite(reference).all() and reference.std() > 0, "the comparison would prove nothing"
    assert out.shape == reference.shape
    return rel(out, reference)


def per_slice_group_norm(x, stats, eps, affine):
    """The wrong variant: each slice normalised by its own statistics."""
    return F.group_norm(x, stats.num_groups, affine[0], affine[1], eps)


@contextmanager
def per_slice_statistics() -> Iterator[None]:
    """Statistics per slice instead of over the whole axis, for the block (it must fail the checks): norm
    statistics per slice, and Wan's per-frame modulation mapped to tokens by each slice's own length."""
    from ...engine.arch import comfy_wan

    original, modulation = slicing.group_norm, comfy_wan.modulation_of
    slicing.group_norm = per_slice_group_norm
    comfy_wan.modulation_of = comfy_wan.modulation_of_the_slice
    try:
        yield
    finally:
        slicing.group_norm, comfy_wan.modulation_of = original, modulation
