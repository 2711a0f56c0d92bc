"""A U-Net forward as an ordered list of layer stages, run by one loop: skips, upsamplers, cut points.

Every adapter describes its U-Net as stages: the prologue (embeddings), each down-path layer, each
layer of the middle, each up-path layer (the first of each up unit pops a skip tensor; the
concatenation and the previous unit's upsampler fuse into it), and the output head. The loop below
is the only code that owns the skip stack and the pending upsampler, for every adapter.

Every boundary after a layer stage is a **cut point** with a canonical id that does not depend on
the host: ``{section}{level}.{unit}.{kind}``, where ``level`` is the resolution level (0: full
resolution), ``unit`` counts ResBlocks within the level, and ``kind`` is ``conv_in``, ``res``,
``attn``, ``motion``, ``down`` or ``layer``. diffusers ``up_blocks.3.attentions.0`` and ComfyUI
``output_blocks.9.1`` are both ``up0.0.attn``.

At a cut the loop can capture the state the rest of the forward needs (the feature, the skip tensors
still to be consumed, a pending upsampler), cloned because host hooks write in place; run from a
captured state to the end; or, for a cut in the middle or up path, recompute only the shortest part
of the down path that yields the skips the tail consumes and run the tail on a cached deep feature
(what Step Rehash does on a reuse step). A :class:`StageRequest` on the call's runner says which.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import torch

Section = Literal["prologue", "down", "mid", "up", "head"]
Kind = Literal["prologue", "conv_in", "res", "attn", "motion", "down", "layer", "head"]


@dataclass(frozen=True)
class StageSpec:
    """What the loop and the cut points need to know of one stage (no tensors, no closures)."""

    name: str  # the host's layer name: "up_blocks.3.attentions.0", "output_blocks.9.1"
    section: Section
    kind: Kind
    push: bool = False  # its output is also pushed as a skip tensor
    consumes: bool = False  # pops a skip tensor; the pending upsampler and the concatenation fuse in
    upsamples: bool = False  # leaves an upsampler pending, fused into the next consuming stage
    uses_emb: bool = False  # reads the timestep embedding or other per-step state (a fresh input on every step)
    takes_feature: bool = False  # the body takes its input from ``StageIO.take_feature()``


@dataclass(frozen=True)
class Pending:
    """An upsampler left pending by an up unit, with the shape (N, C, H, W) of the skip it meets."""

    module: Any
    skip_shape: tuple[int, ...] | None


class StageIO:
    """What a stage's body gets besides the feature: the popped skip (``take_skip()``, so the body
    can let it go as soon as it is consumed), the pending upsampler, and the shape of the skip on top
    of the stack afterwards (ComfyUI's ``output_shape``). A stage whose spec says ``takes_feature``
    gets its feature here too (``take_feature()``) and None as its first argument, so nothing but
    its own code holds the input (an up ResBlock frees it between its spatial and temporal halves)."""

    def __init__(self, skip: torch.Tensor | None = None, pending: Pending | None = None,
                 next_skip_shape: tuple[int, ...] | None = None, feature: list[torch.Tensor] | None = None) -> None:
        self._skip, self.pending, self.next_skip_shape = skip, pending, next_skip_shape
        self._feature = feature if feature is not None else []

    def take_feature(self) -> torch.Tensor:
        """The stage's input feature; the loop keeps no reference to it afterwards."""
        return self._feature.pop()

    def take_skip(self) -> torch.Tensor | None:
        """The popped skip tensor; the loop keeps no reference to it afterwards."""
        skip, self._skip = self._skip, None
        return skip


Body = Callable[[torch.Tensor, StageIO], torch.Tensor]


@dataclass(frozen=True)
class Stage:
    """A stage: its spec, its body, and the host bookkeeping to do when a partial run skips it."""

    spec: StageSpec
    body: Body
    upsampler: Any = None  # with ``spec.upsamples``: the module left pending (the flush and fused bodies run it)
    skip_of: Callable[[torch.Tensor], torch.Tensor] | None = None  # with ``spec.push``: the tensor pushed (default: the output)
    after_push: Callable[[torch.Tensor], torch.Tensor] | None = None  # runs on the feature after the push
    bypass: Callable[[], None] | None = None  # host bookkeeping of a skipped stage (control, block indices)


@dataclass
class UNetStages:
    """One call's stages, with how to run a pending upsampler on its own."""

    stages: list[Stage]
    flush: Callable[[torch.Tensor, Pending], torch.Tensor]

    def __post_init__(self) -> None:
        self.cuts = cut_points([s.spec for s in self.stages])
        self._index = {c.id: c for c in self.cuts} | {c.after: c for c in self.cuts}


@dataclass(frozen=True)
class CutPoint:
    """The boundary after one layer stage."""

    id: str  # canonical, host-independent: "up0.0.attn"
    after: str  # the host's layer name of the stage it follows
    index: int  # position of that stage in the stage list
    section: Section
    level: int
    fresh: bool  # the tail still uses a fresh input (a skip tensor or the timestep embedding)
    skips: int  # skip tensors on the stack here: a captured state holds them, the tail consumes them
    shallow: tuple[str, ...]  # for middle and up cuts: the down-path stages that recompute those skips

    @property
    def label(self) -> str:
        """How a tail from this cut relates to the step it runs in."""
        if not self.fresh:
            return "replays the last full step's output (its tail uses no fresh input)"
        return f"tail consumes {self.skips} skip tensor(s)" if self.skips else "tail uses the timestep embedding"


def cut_points(specs: Sequence[StageSpec]) -> list[CutPoint]:
    """Every boundary after a layer stage, with its canonical id (see the module docstring)."""
    down_levels = sum(s.kind == "down" for s in specs)
    level, unit, section = 0, -1, None
    ids: list[tuple[str, int]] = []
    seen: dict[str, int] = {}
    for s in specs:
        if s.section != section:
            section, unit = s.section, -1
            level = 0 if section == "down" else down_levels if section == "up" else level
        if s.kind == "res":
            unit += 1
        prefix = "mid" if section == "mid" else f"{section}{level}"
        if s.kind in ("conv_in", "down"):
            cid = f"{prefix}.{s.kind}"
        else:
            cid = f"{prefix}.{max(unit, 0)}.{s.kind}"
        n = seen.get(cid, 0)
        seen[cid] = n + 1
        ids.append((cid if n == 0 else f"{cid}.{n}", level))
        if s.kind == "down":
            level, unit = level + 1, -1
        if s.upsamples:
            level, unit = level - 1, -1

    cuts, depth = [], 0
    for i, s in enumerate(specs):
        depth += s.push - s.consumes
        if s.section in ("prologue", "head"):
            continue
        fresh = any(t.consumes or t.uses_emb for t in specs[i + 1:])
        shallow: tuple[str, ...] = ()
        if s.section in ("mid", "up"):
            pushed, names = 0, []
            for t in specs:
                if pushed >= depth:
                    break
                if t.section == "down":
                    names.append(t.name)
                    pushed += t.push
            shallow = tuple(names)
        cid, lvl = ids[i]
        cuts.append(CutPoint(cid, s.name, i, s.section, lvl, fresh, depth, shallow))
    return cuts


@dataclass
class CutState:
    """What the rest of a forward needs at a cut: the feature, the skips still to be consumed
    (bottom of the stack first), and a pending upsampler."""

    cut: str
    h: torch.Tensor
    skips: list[torch.Tensor]
    pending: Pending | None

    def clone(self) -> "CutState":
        return CutState(self.cut, self.h.clone(), [s.clone() for s in self.skips], self.pending)


@dataclass
class StageRequest:
    """What a U-Net call should do beyond a plain full forward.

    ``capture``: cut ids (canonical or the host's layer names) at which a full forward records its
    :class:`CutState` into ``captures`` (one dict per call, keyed by canonical id). ``start``: run
    from that captured state to the end (its tensors are cloned first: tails may write in place).
    ``recompute_skips``: with ``start`` at a middle or up cut, recompute the skips the tail consumes
    with the shortest part of the down path instead of taking the captured ones (so ``start`` only
    supplies the deep feature). ``stop``: end the forward at that cut and return its
    :class:`CutState` instead of the output (direct engine calls only: a host expects a tensor).

    What a capture keeps: with ``keep_skips=False`` only the feature and the pending upsampler (all a
    tail with ``recompute_skips`` needs: Step Rehash's cache); with ``reduce``, whatever
    ``reduce(cut_id, feature)`` returns, and nothing is cloned (the feature is the live tensor: the
    function must copy what it keeps; calibration keeps a few positions of it on the CPU).
    """

    capture: frozenset[str] = frozenset()
    start: CutState | None = None
    recompute_skips: bool = False
    stop: str | None = None
    keep_skips: bool = True
    reduce: Callable[[str, torch.Tensor], Any] | None = None
    captures: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.capture = frozenset([self.capture] if isinstance(self.capture, str) else self.capture)

    def keep(self, cut: str, h: torch.Tensor, skips: list[torch.Tensor], pending: Pending | None) -> Any:
        """What a capture at ``cut`` stores (see the class docstring); never a reference to a live tensor
        unless ``reduce`` returns one."""
        if self.reduce is not None:
            return self.reduce(cut, h)
        return CutState(cut, h, list(skips) if self.keep_skips else [], pending).clone()


@dataclass(frozen=True)
class StageEvent:
    """A stage starting or ending (listeners get these beside the groups' events)."""

    kind: Literal["start", "end", "skipped"]
    name: str  # the host's layer name


def find_cut(unet_stages: UNetStages, cut: str) -> CutPoint:
    """The cut point named ``cut`` (canonical id or host layer name), or a ``KeyError`` listing them."""
    found = unet_stages._index.get(cut)
    if found is None:
        raise KeyError(f"no cut point {cut!r} in this U-Net; cut points: {', '.join(c.id for c in unet_stages.cuts)}")
    return found


def run(unet_stages: UNetStages, x: torch.Tensor, request: StageRequest | None = None,
        emit: Callable[[Any], None] = lambda event: None) -> torch.Tensor | CutState:
    """Run the stages on ``x`` as ``request`` asks (a full forward without one)."""
    stages = unet_stages.stages
    cut_at = {c.index: c for c in unet_stages.cuts}
    request = request or StageRequest()
    capture = {find_cut(unet_stages, c).index for c in request.capture}
    stop = find_cut(unet_stages, request.stop).index if request.stop is not None else None
    captured: dict[str, CutState] = {}
    if request.capture:
        request.captures.append(captured)

    h, skips, pending = x, [], None
    first = 0
    while stages[first].spec.section == "prologue":
        h = _run_stage(stages[first], [h], skips, pending, emit)
        first += 1
    if request.start is not None:
        cut = find_cut(unet_stages, request.start.cut)
        begin = first
        if request.recompute_skips:
            if cut.section not in ("mid", "up"):
                raise ValueError(f"recompute_skips needs a cut in the middle or up path; {cut.id} is in the {cut.section} path")
            while len(skips) < cut.skips:
                h = _run_stage(stages[begin], [h], skips, None, emit)
                begin += 1
        for s in stages[begin:cut.index + 1]:
            if s.bypass is not None:
                s.bypass()
            emit(StageEvent("skipped", s.spec.name))
        h, pending = request.start.h.clone(), request.start.pending  # tails may write into their input
        if not request.recompute_skips:
            skips = [s.clone() for s in request.start.skips]
        if len(skips) != cut.skips:
            raise ValueError(f"a state at {cut.id} holds {len(skips)} skip tensors; the stack there holds {cut.skips}")
        first = cut.index + 1

    for i in range(first, len(stages)):
        s = stages[i]
        if pending is not None and not s.spec.consumes:
            h = unet_stages.flush(h, pending)
            pending = None
        feature, h = [h], None  # the stage alone holds its input
        h = _run_stage(s, feature, skips, pending, emit)
        if s.spec.consumes:
            pending = None
        if s.spec.upsamples:
            pending = Pending(s.upsampler, tuple(skips[-1].shape) if skips else None)
        if i in capture:
            captured[cut_at[i].id] = request.keep(cut_at[i].id, h, skips, pending)
        if i == stop:
            return CutState(cut_at[i].id, h, list(skips), pending).clone()
    if pending is not None:
        h = unet_stages.flush(h, pending)
    return h


def _run_stage(stage: Stage, feature: list[torch.Tensor], skips: list[torch.Tensor], pending: Pending | None,
               emit: Callable[[Any], None]) -> torch.Tensor:
    spec = stage.spec
    emit(StageEvent("start", spec.name))
    io = StageIO(skips.pop() if spec.consumes else None, pending if spec.consumes else None,
                 tuple(skips[-1].shape) if skips else None, feature)
    h = stage.body(None, io) if spec.takes_feature else stage.body(feature.pop(), io)
    del io
    if spec.push:
        skips.append(h if stage.skip_of is None else stage.skip_of(h))
        if stage.after_push is not None:
            h = stage.after_push(h)
    emit(StageEvent("end", spec.name))
    return h


__all__ = [
    "CutPoint", "CutState", "Pending", "Stage", "StageEvent", "StageIO", "StageRequest", "StageSpec", "UNetStages",
    "cut_points", "find_cut", "run",
]
