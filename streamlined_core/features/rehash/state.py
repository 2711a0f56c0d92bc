"""One run under Step Rehash: its state (:class:`RehashState`: the cache per branch, the key steps,
what each step did, ``reset()``) and the controllers a streamlined call consults: :class:`RehashDriver`
(a run's reuse decisions) and :class:`HostCalibration` (a calibration whose host counts the steps)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Sequence

import torch

from ...engine.stages import CutPoint, CutState, StageRequest
from .keysteps import DEFAULT_CALIBRATION_CAP, DEFAULT_POSITIONS, LAST_UP_BLOCK, FeatureSampler, step_ranges
from .schedule import Calibration, RehashConfig, check_cut

log = logging.getLogger(__name__)


@dataclass
class StepRecord:
    step: int
    kind: str  # "key" or "reuse"; "key (no cache)" when a reuse step found no cached feature for a branch
    calls: int = 0


@dataclass
class RehashEvent:
    """Sent to the run's listeners when a step starts as a key or a reuse step (the profiler marks it)."""

    step: int
    kind: str
    cut: str


class RehashState:
    """One sampling run's Step Rehash state: the key steps, the cache (one captured feature per branch:
    a guidance branch, a context window) and what each step did. A U-Net call may carry several
    branches batched along its rows (ComfyUI batches cond and uncond): a key call's feature is kept
    per branch, and a reuse call joins the features of the branches it carries, in its own order, so
    a step that batches them and one that runs them apart share the cache. ``reset()`` frees the
    cache; the run's owner calls it when the run ends or raises."""

    def __init__(self, cut: str, steps: int, key_steps: Sequence[int]) -> None:
        self.cut, self.steps, self.key_steps = cut, steps, list(key_steps)
        self._keys = set(self.key_steps)
        self.cache: dict[Hashable, CutState] = {}
        self.records: list[StepRecord] = []
        self.cache_peak_bytes = 0
        self.finished = False

    def is_key(self, step: int) -> bool:
        return step in self._keys or step >= self.steps

    def request(self, step: int, branches: Sequence[Hashable]) -> tuple[StageRequest, str]:
        """The stage request of one U-Net call of ``step`` carrying ``branches`` (in row order), and the
        step's kind."""
        if self.is_key(step) or any(b not in self.cache for b in branches):
            kind = "key" if self.is_key(step) else "key (no cache)"
            request = StageRequest(capture=frozenset({self.cut}), keep_skips=False)
        else:
            kind = "reuse"
            states = [self.cache[b] for b in branches]
            h = states[0].h if len(states) == 1 else torch.cat([st.h for st in states])
            request = StageRequest(start=CutState(self.cut, h, [], states[0].pending), recompute_skips=True)
        if not self.records or self.records[-1].step != step:
            self.records.append(StepRecord(step, kind))
        elif self.records[-1].kind == "reuse" and kind != "reuse":
            self.records[-1].kind = kind  # one branch of the step ran whole
        self.records[-1].calls += 1
        return request, kind

    def store(self, branches: Sequence[Hashable], request: StageRequest) -> None:
        """Keep what a key call captured, per branch it carried (equal shares of its rows)."""
        if not request.captures or self.cut not in request.captures[-1]:
            return
        state = request.captures[-1][self.cut]
        if len(branches) == 1:
            self.cache[branches[0]] = state
        else:
            if state.h.shape[0] % len(branches):
                raise ValueError(f"Step Rehash: a U-Net call of {state.h.shape[0]} rows carries {len(branches)} "
                                 "branches; expected equal shares")
            for b, h in zip(branches, state.h.chunk(len(branches))):  # copies: a view would keep all rows alive
                self.cache[b] = CutState(state.cut, h.clone(), [], state.pending)
        self.cache_peak_bytes = max(self.cache_peak_bytes, self.cache_bytes)

    @property
    def cache_bytes(self) -> int:
        return sum(st.h.numel() * st.h.element_size() for st in self.cache.values())

    def reset(self) -> None:
        """Free the cache (the records stay, for the report)."""
        self.cache.clear()

    def describe(self) -> str:
        full = [r.step for r in self.records if r.kind != "reuse"]
        reused = [r.step for r in self.records if r.kind == "reuse"]
        text = (f"Step Rehash at {self.cut}: {len(full)} of {len(self.records)} steps ran the whole U-Net "
                f"({step_ranges(full)}), {len(reused)} reused the cached feature ({step_ranges(reused) or 'none'}); "
                f"cache {self.cache_peak_bytes / 2**20:.1f} MiB")
        missing = [r.step for r in self.records if r.kind == "key (no cache)"]
        if missing:
            text += f"; steps {step_ranges(missing)} ran whole because a branch had no cached feature yet"
        return text


class RehashDriver:
    """A :class:`RehashState` bound to a run: the cut checked against the U-Net's once, and each step's
    kind sent to the run's listeners once."""

    def __init__(self, config: RehashConfig, steps: int, made_for: dict[str, Any]) -> None:
        keys = config.key_steps_for(steps, made_for)
        self.config = config
        self.state = RehashState(config.cut_id, steps, keys)
        self.checked = False
        self._announced: int | None = None  # the last step whose kind was sent to the listeners

    @property
    def cut(self) -> str:
        return self.state.cut

    def check(self, cuts: Sequence[CutPoint]) -> None:
        """On the first call: the cut is one of this U-Net's (named by its id or the layer it follows)."""
        if not self.checked:
            cut = next((c for c in cuts if c.id == self.state.cut or c.after == self.state.cut), None)
            check_cut(cut, self.state.cut, cuts, self.config.replay)
            self.state.cut = cut.id
            self.checked = True

    def announce(self, step: int, kind: str, emit: Callable[[Any], None]) -> None:
        """Tell the run's listeners (the profiler marks it) what a step is, on its first call."""
        if self._announced != step:
            self._announced = step
            emit(RehashEvent(step, "key" if kind != "reuse" else "reuse", self.state.cut))

    def request(self, cuts: Sequence[CutPoint], emit: Callable[[Any], None], step: int,
                branches: Sequence[Hashable]) -> StageRequest:
        self.check(cuts)
        request, kind = self.state.request(step, branches)
        self.announce(step, kind, emit)
        return request

    def finish(self, ok: bool) -> None:
        self.state.reset()
        self.state.finished = ok
        log.info("rehash: %s%s", self.state.describe(), "" if ok else " (the run ended early or raised; cache freed)")

    def reset(self) -> None:
        self.state.reset()


class HostCalibration:
    """A calibration run driven by a host that counts the steps (ComfyUI's sampler loop): every call runs
    whole and leaves a fixed sample of its features at ``cuts`` on the CPU; :meth:`calibration` turns
    them into maps."""

    cut = None  # keeps nothing on the device across calls

    def __init__(self, cuts: Sequence[str] = LAST_UP_BLOCK, positions: int = DEFAULT_POSITIONS, seed: int = 0,
                 cap_bytes: int = DEFAULT_CALIBRATION_CAP) -> None:
        self.sampler = FeatureSampler(cuts, positions, seed, cap_bytes)
        self._seen: set[tuple[Hashable, int]] = set()
        self.calls = 0
        self.overflow = False  # the sampled features reached the cap: the run goes on, nothing more is kept

    def request(self, cuts: Sequence[CutPoint], rows: int, step: int, branches: Sequence[Hashable]) -> StageRequest:
        """The stage request of a call of ``step`` carrying ``branches`` (in row order) in ``rows`` samples."""
        branches = tuple(branches)
        if self.overflow or any((b, step) in self._seen for b in branches):
            return StageRequest()  # a sampler's later evaluation within the step: one feature per step
        self._seen.update((b, step) for b in branches)
        if not self.calls:  # the candidates this U-Net has (a small U-Net's last up block has fewer layers)
            known = {c.id for c in cuts}
            self.sampler.cuts = tuple(c for c in self.sampler.cuts if c in known)
            if not self.sampler.cuts:
                raise ValueError(f"calibration: none of the cuts asked for is a cut point of this U-Net; its cut points: "
                                 f"{', '.join(c.id for c in cuts)}")
        # rows are samples (all frames of one); a call's branches take equal shares of them
        per = rows // len(branches) if rows % len(branches) == 0 else None
        if per is None:
            raise ValueError(f"calibration: a U-Net call of {rows} samples carries {len(branches)} branches")
        self.sampler.row_branches = [(b, r) for b in branches for r in range(per)]
        self.calls += 1
        return StageRequest(capture=frozenset(self.sampler.cuts), reduce=self._reduce)

    def _reduce(self, cut: str, h: torch.Tensor) -> None:
        if self.overflow:
            return
        try:
            self.sampler.reduce(cut, h)
        except MemoryError:
            self.overflow = True
            log.warning("calibration: the sampled features reached the cap of %.0f MiB; this run keeps no more",
                        self.sampler.cap_bytes / 2**20)

    def calibration(self, steps: int, made_for: dict[str, Any]) -> Calibration:
        return Calibration(self.sampler.maps(), steps, dict(made_for), 1, self.sampler.positions)
