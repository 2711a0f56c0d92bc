"""Step Rehash: full U-Net on key steps, the cached deep feature plus the layers after it on the others.

On a **key step** the U-Net runs whole and the feature at a cut point (``up0.0.attn``: after the last
up block's first attention) is kept. On a **reuse step** the stage loop (``stages.py``) recomputes
only the shallow part of the down path whose skips the tail consumes, then runs the tail from the
cut on the cached feature: the same sliced groups as a full step, fewer of them. Which steps are key
comes from a measured step-similarity map (the paper's Algorithm 1): step 0 is key; walk forward
while the feature's similarity to the last key step stays at or above ``gamma``; the first step
below becomes key; the last step is key.

    from streamlined_core import rehash, RehashConfig, calibrate

    cal = calibrate(pipe, lambda: pipe(image, num_inference_steps=25))   # full compute, maps per cut
    cal.save("svd-25")                                                   # svd-25.json + .safetensors
    handle = rehash(pipe, RehashConfig(schedule="svd-25.json", count=13))
    frames = pipe(image, num_inference_steps=25).frames
    print(handle.last_run.describe())        # which steps ran whole, which reused, the cache's bytes
    handle.remove()                          # the pipeline exactly as before

The pieces, in the style of diffusers' hooks: :class:`RehashConfig` (what to do), :func:`rehash`
(apply it to a pipeline or U-Net; the handle's ``remove()`` undoes it), and the per-run state
:class:`RehashState` (the cache, per guidance branch and per context window, with ``reset()``),
created when a run starts and freed when it ends or raises. The step index comes from the scheduler
(its ``step`` calls), never from the timestep's value. Hosts can drive the same machinery
with their own step index and branch keys: a controller in the run context (``RunContext.rehash``,
``context.py``) takes precedence over one attached to the U-Net.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Sequence

import torch
from torch import nn

from ..engine.stages import CutPoint, CutState, StageRequest

log = logging.getLogger(__name__)

FORMAT = "streamline.rehash/1"
# After the last up block's second attention: a reuse step recomputes only conv_in before its tail.
# Chosen by `streamline bench --rehash` on the fixture model (docs/step-rehash.md: Step Rehash against the field): at
# 13 of 25 key steps, the cut closest to full compute on calibration clips among those no dearer than
# DeepCache's that no other setting beats on both axes.
DEFAULT_CUT = "up0.1.attn"
# Candidates swept by calibration: the six boundaries of the last up block (the last replays the output).
LAST_UP_BLOCK = ("up0.0.res", "up0.0.attn", "up0.1.res", "up0.1.attn", "up0.2.res", "up0.2.attn")
DEFAULT_POSITIONS = 4096  # feature positions compared per sample, branch and step
DEFAULT_CALIBRATION_CAP = 512 * 2**20  # bytes of sampled features kept on the CPU during a calibration


# -- Algorithm 1: key steps from a similarity map ----------------------------------------------------


def _check_map(similarity: torch.Tensor, name: str = "similarity") -> torch.Tensor:
    if not isinstance(similarity, torch.Tensor) or similarity.dim() != 2 or similarity.shape[0] != similarity.shape[1]:
        shape = tuple(similarity.shape) if isinstance(similarity, torch.Tensor) else type(similarity).__name__
        raise ValueError(f"{name}: expected a square (steps, steps) map, got {shape}")
    if similarity.shape[0] < 1:
        raise ValueError(f"{name}: expected at least one step")
    if not torch.isfinite(similarity).all():
        raise ValueError(f"{name}: the map holds NaN or infinite values")
    return similarity.detach().double().cpu()


def key_steps_for_gamma(similarity: torch.Tensor, gamma: float) -> list[int]:
    """The paper's Algorithm 1: step 0 is key; a step whose similarity to the last key step is below
    ``gamma`` becomes key; the last step is key. ``similarity[i, j]``: step i's feature against step j's."""
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not math.isfinite(gamma):
        raise ValueError(f"gamma={gamma!r}: expected a number (a cosine similarity threshold, usually 0 to 1)")
    s = _check_map(similarity)
    n = s.shape[0]
    keys, last = [0], 0
    for i in range(1, n):
        if s[last, i] < gamma:
            keys.append(i)
            last = i
    if keys[-1] != n - 1:
        keys.append(n - 1)
    return keys


def key_steps_for_count(similarity: torch.Tensor, count: int) -> tuple[list[int], float]:
    """Key steps by Algorithm 1 at the threshold whose key-step count is closest to ``count`` without
    exceeding it (the highest such threshold: the strictest reuse); returns the steps and the threshold."""
    s = _check_map(similarity)
    n = s.shape[0]
    least = min(n, 2)
    if isinstance(count, bool) or not isinstance(count, int) or not least <= count:
        raise ValueError(f"count={count!r}: expected a whole number of key steps from {least} (the first and the last "
                         f"step) to {n} (every step)")
    # The walk changes only where gamma passes a similarity of the map: try every one, highest first, and
    # one just above the highest (every step key). The highest threshold of the best count is the strictest.
    values = sorted({float(v) for v in s[torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)]}, reverse=True)
    candidates = ([math.nextafter(values[0], math.inf)] if values else []) + values
    if not values:  # one step
        return [0], 1.0
    best: tuple[list[int], float] = ([], 0.0)  # the lowest similarity gives the least: the first and last step
    for gamma in candidates:
        keys = key_steps_for_gamma(s, gamma)
        if len(best[0]) < len(keys) <= count:
            best = (keys, gamma)
        if len(best[0]) == count:
            break
    return best


def interval_key_steps(steps: int, interval: int) -> list[int]:
    """Fixed-interval key steps (DeepCache's schedule): 0, k, 2k, ... and the last step."""
    keys = list(range(0, steps, interval))
    if keys[-1] != steps - 1:
        keys.append(steps - 1)
    return keys


# -- similarity maps ---------------------------------------------------------------------------------


def similarity_map(features: torch.Tensor) -> torch.Tensor:
    """Cosine similarity between every pair of steps, averaged over rows (samples and guidance branches).

    ``features``: (steps, rows, positions), each row one sample's or branch's sampled feature."""
    if features.dim() != 3:
        raise ValueError(f"features: expected (steps, rows, positions), got {tuple(features.shape)}")
    f = features.double()
    f = f / f.norm(dim=2, keepdim=True).clamp_min(1e-30)
    return torch.einsum("irp,jrp->ij", f, f) / f.shape[1]


class FeatureSampler:
    """Keeps, for each cut and each U-Net call of a step, a fixed random subset of every row's feature
    (the same positions for every step) on the CPU in fp32, under a byte cap.

    A row is one sample of the call's batch (a guidance branch of a CFG batch is a row of its own), with
    all its frames. Used as the ``reduce`` of a :class:`~streamlined_core.engine.stages.StageRequest`."""

    def __init__(self, cuts: Sequence[str], positions: int = DEFAULT_POSITIONS, seed: int = 0,
                 cap_bytes: int = DEFAULT_CALIBRATION_CAP) -> None:
        if isinstance(positions, bool) or not isinstance(positions, int) or positions < 1:
            raise ValueError(f"positions={positions!r}: expected a positive whole number of feature positions")
        self.cuts, self.positions, self.seed, self.cap_bytes = tuple(cuts), positions, seed, cap_bytes
        self._index: dict[tuple[str, int], torch.Tensor] = {}
        self.features: dict[tuple[str, Hashable], list[torch.Tensor]] = {}  # (cut, branch) -> one (rows, P) per step
        self.bytes = 0
        self.branch: Hashable = 0
        self.rows: dict[Hashable, int] = {}
        self.row_branches: Sequence[Hashable] | None = None  # set: each row of the call is a branch of its own

    def reduce(self, cut: str, h: torch.Tensor) -> None:
        rows = len(self.row_branches) if self.row_branches is not None else self.rows.get(self.branch)
        if rows is None:
            raise RuntimeError("FeatureSampler.rows: set the call's batch size (rows) before the call")
        flat = h.detach().reshape(rows, -1)
        n = flat.shape[1]
        index = self._index.get((cut, n))
        if index is None:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + n)
            index = torch.randperm(n, generator=g)[: self.positions].sort().values
            self._index[(cut, n)] = index
        kept = flat[:, index.to(flat.device)].float().cpu()
        self.bytes += kept.numel() * 4
        if self.bytes > self.cap_bytes:
            raise MemoryError(f"calibration: the sampled features exceed the cap of {self.cap_bytes / 2**20:.0f} MiB; "
                              f"lower positions= (now {self.positions}), the steps, or the number of cuts")
        if self.row_branches is None:
            self.features.setdefault((cut, self.branch), []).append(kept)
        else:  # a host that batches branches at some steps and runs them apart at others
            for b, row in zip(self.row_branches, kept.split(1)):
                self.features.setdefault((cut, b), []).append(row)

    def maps(self) -> dict[str, torch.Tensor]:
        """One (steps, steps) map per cut, averaged over every row of every branch."""
        out: dict[str, torch.Tensor] = {}
        for cut in self.cuts:
            per_branch = [torch.stack(v) for (c, _b), v in self.features.items() if c == cut]
            if not per_branch:
                continue
            steps = {f.shape[0] for f in per_branch}
            if len(steps) != 1:
                raise RuntimeError(f"calibration: branches saw different step counts at {cut}: {sorted(steps)}")
            out[cut] = similarity_map(torch.cat(per_branch, dim=1)).float()
        return out


# -- what a schedule was made for ---------------------------------------------------------------------


def fingerprint(model: nn.Module, samples: int = 8) -> str:
    """A hash of the model's parameter and buffer names, shapes and a fixed sample of values (rounded to
    fp16, so fp16 and fp32 copies agree; a LoRA or a fine-tune changes it)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if t.device.type == "meta":
            raise ValueError(f"fingerprint: {name} is on the meta device; a schedule needs the loaded weights")
        h.update(name.encode())
        h.update(repr(tuple(t.shape)).encode())
        flat = t.detach().reshape(-1)
        if flat.numel():
            index = torch.linspace(0, flat.numel() - 1, min(samples, flat.numel())).round().long()
            h.update(flat[index.to(flat.device)].to(torch.float16).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


MADE_FOR = ("model", "steps", "sampler", "scheduler", "denoise")


@dataclass
class Schedule:
    """Calibrated key steps and what they were made for (model fingerprint, step count, sampler,
    scheduler, denoise). Loading it for another setting is an error unless ``override=True``."""

    cut: str
    steps: int
    key_steps: list[int]
    made_for: dict[str, Any]
    gamma: float | None = None
    count: int | None = None
    maps: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # cut -> (steps, steps), when loaded

    def with_keys(self, cut: str | None = None, gamma: float | None = None, count: int | None = None) -> "Schedule":
        """The same calibration with key steps searched again at another cut, threshold or count."""
        cut = cut or self.cut
        if cut not in self.maps:
            raise ValueError(f"cut={cut!r}: this calibration has similarity maps at {', '.join(self.maps) or 'no cut'}")
        if (gamma is None) == (count is None):
            raise ValueError("give one of gamma= (a similarity threshold) or count= (a number of key steps)")
        if gamma is not None:
            return Schedule(cut, self.steps, key_steps_for_gamma(self.maps[cut], gamma), dict(self.made_for), gamma, None,
                            self.maps)
        keys, g = key_steps_for_count(self.maps[cut], count)
        return Schedule(cut, self.steps, keys, dict(self.made_for), g, count, self.maps)

    def check(self, made_for: dict[str, Any], override: bool = False) -> None:
        """Raise unless this schedule was made for ``made_for`` (the keys both give), or ``override``."""
        wrong = [f"{k}: made for {self.made_for[k]!r}, used with {made_for[k]!r}" for k in MADE_FOR
                 if k in made_for and k in self.made_for and made_for[k] != self.made_for[k]]
        if wrong and not override:
            raise ValueError("this Step Rehash schedule was calibrated for another setting (" + "; ".join(wrong) +
                             "): calibrate again for this one, or pass override=True to use it anyway")
        if wrong:
            log.warning("rehash: using a schedule made for another setting (%s)", "; ".join(wrong))

    def save(self, path: str | Path) -> tuple[Path, Path]:
        """Write ``path`` (.json: key steps and what they were made for) and, beside it, the maps (.safetensors)."""
        from safetensors.torch import save_file

        path = Path(path)
        json_path = path if path.suffix == ".json" else path.with_name(path.name + ".json")
        maps_path = json_path.with_suffix(".safetensors")
        doc = {"format": FORMAT, "cut": self.cut, "steps": self.steps, "key_steps": self.key_steps, "gamma": self.gamma,
               "count": self.count, "made_for": self.made_for, "maps": maps_path.name if self.maps else None}
        json_path.parent.mkdir(parents=True, exist_ok=True)
        if self.maps:
            save_file({f"similarity/{c}": m.float().contiguous() for c, m in self.maps.items()}, str(maps_path),
                      metadata={"format": FORMAT, "model": str(self.made_for.get("model")), "steps": str(self.steps)})
        json_path.write_text(json.dumps(doc, indent=2) + "\n")
        return json_path, maps_path

    @classmethod
    def load(cls, path: str | Path) -> "Schedule":
        """Read a schedule written by :meth:`save` (its maps too, when the file beside it exists)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"schedule {str(path)!r}: no such file (write one with `streamline calibrate`)")
        try:
            doc = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"schedule {str(path)!r} is not a Step Rehash schedule (not JSON: {e})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError(f"schedule {str(path)!r} is not a Step Rehash schedule (format {FORMAT!r} expected)")
        try:
            steps, keys, cut = int(doc["steps"]), [int(k) for k in doc["key_steps"]], str(doc["cut"])
            made_for = dict(doc["made_for"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"schedule {str(path)!r} is damaged: {type(e).__name__} {e}") from None
        _check_keys(keys, steps, f"schedule {str(path)!r}")
        maps: dict[str, torch.Tensor] = {}
        if doc.get("maps"):
            maps_path = path.with_name(doc["maps"])
            if not maps_path.exists():
                raise FileNotFoundError(f"schedule {str(path)!r} names its similarity maps {doc['maps']!r}, which is missing "
                                        f"beside it")
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            try:
                raw = load_file(str(maps_path))
            except (SafetensorError, OSError) as e:
                raise ValueError(f"similarity maps {str(maps_path)!r} are damaged: {e}") from None
            for name, m in raw.items():
                if not name.startswith("similarity/") or tuple(m.shape) != (steps, steps):
                    raise ValueError(f"similarity maps {str(maps_path)!r}: {name} {tuple(m.shape)} is not a ({steps}, "
                                     f"{steps}) map")
                maps[name.removeprefix("similarity/")] = m
        return cls(cut, steps, keys, made_for, doc.get("gamma"), doc.get("count"), maps)


def _check_keys(keys: Sequence[int], steps: int, name: str) -> None:
    if not keys or sorted(set(keys)) != list(keys) or keys[0] != 0 or keys[-1] != steps - 1:
        raise ValueError(f"{name}: key steps must rise strictly from 0 to the last step ({steps - 1}), got {list(keys)}")


# -- configuration -----------------------------------------------------------------------------------


@dataclass
class RehashConfig:
    """What Step Rehash does; give exactly one source of key steps.

    - ``schedule``: a calibrated :class:`Schedule` or its JSON path; with ``gamma`` or ``count``, key
      steps are searched again on its maps (Algorithm 1);
    - ``key_steps``: the key steps themselves (0 and the last step are added);
    - ``interval``: every ``interval``-th step and the last (DeepCache's fixed schedule).

    ``cut``: the cut point whose feature is cached (a canonical id, see ``stages.py``; the schedule's
    when one is given). Cuts whose tail uses no fresh input replay the last key step's output and are
    refused unless ``replay=True``. ``override``: use a schedule made for another model or setting.
    ``denoise``: what the runs sample (1.0: from pure noise), compared with what a schedule was made for.
    """

    cut: str | None = None
    schedule: Schedule | str | Path | None = None
    gamma: float | None = None
    count: int | None = None
    key_steps: Sequence[int] | None = None
    interval: int | None = None
    replay: bool = False
    override: bool = False
    denoise: float = 1.0  # the share of the schedule the run samples (img2img strength), checked against a schedule's

    def __post_init__(self) -> None:
        sources = [n for n in ("schedule", "key_steps", "interval") if getattr(self, n) is not None]
        if len(sources) != 1:
            raise ValueError("RehashConfig: give exactly one of schedule= (calibrated, from `streamline calibrate`), "
                             f"key_steps= or interval=; got {', '.join(sources) or 'none'}")
        if (self.gamma is not None or self.count is not None) and self.schedule is None:
            raise ValueError("RehashConfig: gamma= and count= search key steps on a calibration's maps: give schedule= too")
        if self.gamma is not None and self.count is not None:
            raise ValueError("RehashConfig: give gamma= or count=, not both")
        if self.interval is not None and (isinstance(self.interval, bool) or not isinstance(self.interval, int)
                                          or self.interval < 1):
            raise ValueError(f"interval={self.interval!r}: expected a whole number of steps, at least 1")
        if self.key_steps is not None:
            if any(isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in self.key_steps):
                raise ValueError(f"key_steps={list(self.key_steps)!r}: expected step indices (whole numbers from 0)")
        if isinstance(self.schedule, (str, Path)):
            self.schedule = Schedule.load(self.schedule)
        if isinstance(self.schedule, Schedule) and (self.gamma is not None or self.count is not None
                                                    or (self.cut is not None and self.cut != self.schedule.cut)):
            gamma, count = self.gamma, self.count
            if gamma is None and count is None:  # another cut, searched as the schedule was
                count = self.schedule.count
                gamma = self.schedule.gamma if count is None else None
                if gamma is None and count is None:
                    count = len(self.schedule.key_steps)
            self.schedule = self.schedule.with_keys(self.cut, gamma, count)

    @property
    def cut_id(self) -> str:
        if self.schedule is not None:
            return self.schedule.cut
        return self.cut or DEFAULT_CUT

    def key_steps_for(self, steps: int, made_for: dict[str, Any] | None = None) -> list[int]:
        """The key steps of a run of ``steps`` steps (checked against what a schedule was made for)."""
        if self.schedule is not None:
            self.schedule.check({**(made_for or {}), "steps": steps}, self.override)
            if self.schedule.steps != steps:
                keys = [k for k in self.schedule.key_steps if k < steps]
                return sorted(set(keys) | {0, steps - 1})
            return list(self.schedule.key_steps)
        if self.interval is not None:
            return interval_key_steps(steps, self.interval)
        beyond = [k for k in self.key_steps if k >= steps]
        if beyond:
            raise ValueError(f"key_steps={list(self.key_steps)!r}: steps {beyond} are beyond this run's {steps} steps")
        return sorted(set(self.key_steps) | {0, steps - 1})


def check_cut(cut: CutPoint | None, cut_id: str, cuts: Sequence[CutPoint], replay: bool) -> CutPoint:
    """The cut point Step Rehash caches at, or a clear error naming ``cut`` and the cuts it accepts."""
    usable = [c.id for c in cuts if c.section in ("mid", "up") and (c.fresh or replay)]
    if cut is None or cut.section not in ("mid", "up"):
        raise ValueError(f"cut={cut_id!r}: Step Rehash caches at a cut in the middle or up path; this U-Net's: "
                         f"{', '.join(usable)}")
    if not cut.fresh and not replay:
        raise ValueError(f"cut={cut_id!r} {cut.label}: a reuse step there only repeats the last key step's output; "
                         f"pass replay=True to sweep it, or take a cut with a fresh tail: {', '.join(usable)}")
    return cut


# -- per-run state -----------------------------------------------------------------------------------


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
                f"({_ranges(full)}), {len(reused)} reused the cached feature ({_ranges(reused) or 'none'}); "
                f"cache {self.cache_peak_bytes / 2**20:.1f} MiB")
        missing = [r.step for r in self.records if r.kind == "key (no cache)"]
        if missing:
            text += f"; steps {_ranges(missing)} ran whole because a branch had no cached feature yet"
        return text


def _ranges(steps: Sequence[int]) -> str:
    parts, start, prev = [], None, None
    for s in steps:
        if start is None:
            start = prev = s
        elif s == prev + 1:
            prev = s
        else:
            parts.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = prev = s
    if start is not None:
        parts.append(f"{start}" if start == prev else f"{start}-{prev}")
    return ", ".join(parts)


# -- the controller a streamlined U-Net consults ---------------------------------------------------------


def patch_scheduler(scheduler: Any, **methods: Callable) -> Callable[[], None]:
    """Replace methods on a scheduler instance; returns what puts back exactly what was there (a method
    replaced again since by someone else is left to them)."""
    saved = {name: scheduler.__dict__.get(name) for name in methods}
    for name, fn in methods.items():
        setattr(scheduler, name, fn)

    def restore() -> None:
        for name, previous in saved.items():
            if scheduler.__dict__.get(name) is not methods[name]:
                continue
            if previous is None:
                del scheduler.__dict__[name]
            else:
                setattr(scheduler, name, previous)
    return restore


class _Clock:
    """The step index of a diffusers run, from its scheduler: ``set_timesteps`` starts a run, each
    ``step`` call ends a step. U-Net calls between two ``step`` calls belong to one step; within a
    step, the n-th call is branch n (a pipeline that calls the U-Net once per guidance branch)."""

    def __init__(self, scheduler: Any, owner: "_Attached") -> None:
        self.step = 0
        self.steps: int | None = None
        self.calls_this_step = 0
        original_set, original_step = scheduler.set_timesteps, scheduler.step

        def set_timesteps(*args: Any, **kwargs: Any) -> Any:
            out = original_set(*args, **kwargs)
            if owner.removed:  # still in a chain another library built on top: pass through
                return out
            self.step, self.calls_this_step = 0, 0
            self.steps = len(scheduler.timesteps)
            owner.start_run(self.steps)
            return out

        def step(*args: Any, **kwargs: Any) -> Any:
            try:
                out = original_step(*args, **kwargs)
            except BaseException:
                owner.end_run(ok=False)
                raise
            if owner.removed:
                return out
            self.step += 1
            self.calls_this_step = 0
            if self.steps is not None and self.step >= self.steps:
                owner.end_run(ok=True)
            return out

        self.remove = patch_scheduler(scheduler, set_timesteps=set_timesteps, step=step)


def describe_scheduler(scheduler: Any) -> tuple[str, str]:
    """(sampler, scheduler) names a schedule records for a diffusers scheduler."""
    config = getattr(scheduler, "config", {})
    get = config.get if hasattr(config, "get") else (lambda k, d=None: getattr(config, k, d))
    if get("use_karras_sigmas", False):
        spacing = "karras"
    elif get("use_exponential_sigmas", False):
        spacing = "exponential"
    else:
        spacing = str(get("timestep_spacing", "default"))
    return type(scheduler).__name__, spacing


class _Attached:
    """A controller attached to a diffusers U-Net (``unet._streamline_rehash``) and driven by a scheduler's clock.

    The streamlined forward (``api.Streamliner``) asks ``controller.before(cuts, emit, rows)`` for the
    call's :class:`~streamlined_core.engine.stages.StageRequest` and a token, runs, then calls
    ``controller.after(request, token, ok)``; ``controller.cut`` names the cut whose state the
    controller keeps across calls (its bytes come off the memory budget), or None. A U-Net without a
    ``streamline()`` handle gets a pass-through one, removed with the controller: its full calls run
    the model's own forward (capturing with forward hooks), so they equal plain sampling bit for bit;
    only reuse steps run the stage loop, unsliced."""

    def __init__(self, unet: nn.Module, scheduler: Any, controller: Any) -> None:
        self.unet, self.controller = unet, controller
        self.make_run: Callable[[int], Any] = controller.make_run
        self.run: Any = None
        self.last_run: Any = None
        self.removed = False
        previous = unet.__dict__.get("_streamline_rehash")
        if previous is not None:  # applying again replaces the previous controller, its clock first
            previous.remove()
        self._owned = None
        self._own_handle()
        unet._streamline_rehash = self
        self.clock = _Clock(scheduler, self)  # last: nothing below can fail once the scheduler is patched

    def _own_handle(self) -> None:
        """Without a streamline() handle, install a pass-through one (see the class docstring)."""
        from ..engine.api import StreamlineHandle, resolve_unet

        if self.unet.__dict__.get("_streamline_handle") is None:
            _, adapter = resolve_unet(self.unet)
            self._owned = StreamlineHandle(self.unet, adapter, slices=1, budget_bytes=None, passthrough=True)

    # the clock's side
    def start_run(self, steps: int) -> None:
        """A run starts (the previous one, if it never reached its last step, ends here)."""
        if self.run is not None:
            self.end_run(ok=False)
        self.run = self.make_run(steps)

    def end_run(self, ok: bool) -> None:
        if self.run is None:
            return
        run, self.run = self.run, None
        run.finish(ok)
        self.last_run = run

    # the streamlined call's side
    def call(self) -> tuple[Any, int, int]:
        """The run, step and branch of a U-Net call about to run."""
        if self.run is None:
            raise RuntimeError("a U-Net call outside a run: the scheduler's set_timesteps() starts one")
        branch = self.clock.calls_this_step
        self.clock.calls_this_step += 1
        return self.run, self.clock.step, branch

    def reinstall(self) -> None:
        """A streamline() handle was removed under us: keep Step Rehash running on a pass-through one."""
        if not self.removed:
            self._own_handle()

    def remove(self) -> None:
        if self.removed:
            return
        self.removed = True
        if self.run is not None:
            self.run.reset()
            self.run = None
        self.clock.remove()
        if self.unet.__dict__.get("_streamline_rehash") is self:
            del self.unet._streamline_rehash
        if self._owned is not None and self.unet.__dict__.get("_streamline_handle") is self._owned:
            self._owned.remove()


# -- Step Rehash for diffusers ------------------------------------------------------------------------


class _RehashDriver:
    """A :class:`RehashState` bound to a run: what each U-Net call of it does, given its step and branches."""

    def __init__(self, config: RehashConfig, steps: int, made_for: dict[str, Any]) -> None:
        keys = config.key_steps_for(steps, made_for)
        self.config = config
        self.state = RehashState(config.cut_id, steps, keys)
        self.checked = False
        self._announced: int | None = None  # the last step whose kind was sent to the listeners

    @property
    def cut(self) -> str:
        return self.state.cut

    def request(self, cuts: Sequence[CutPoint], emit: Callable[[Any], None], step: int,
                branches: Sequence[Hashable]) -> StageRequest:
        if not self.checked:
            cut = next((c for c in cuts if c.id == self.state.cut or c.after == self.state.cut), None)
            check_cut(cut, self.state.cut, cuts, self.config.replay)
            self.state.cut = cut.id
            self.checked = True
        request, kind = self.state.request(step, branches)
        if self._announced != step:
            self._announced = step
            emit(RehashEvent(step, "key" if kind != "reuse" else "reuse", self.state.cut))
        return request

    def finish(self, ok: bool) -> None:
        self.state.reset()
        self.state.finished = ok
        log.info("rehash: %s%s", self.state.describe(), "" if ok else " (the run ended early or raised; cache freed)")

    def reset(self) -> None:
        self.state.reset()


class HostRehash(_RehashDriver):
    """Step Rehash for a run whose host drives the steps (ComfyUI's sampler loop): the host's wrapper
    sets each U-Net call's step and branches with :meth:`at`, and the run's context carries this
    controller (``RunContext.rehash``) to the streamlined forward."""

    def __init__(self, config: RehashConfig, steps: int, made_for: dict[str, Any]) -> None:
        super().__init__(config, steps, made_for)
        self._call: tuple[int, tuple[Hashable, ...]] = (0, (0,))

    def at(self, step: int, branches: Sequence[Hashable]) -> None:
        """The step and the branches (in row order) of the U-Net call about to run."""
        self._call = (step, tuple(branches))

    def before(self, cuts: Sequence[CutPoint], emit: Callable[[Any], None], rows: int) -> tuple[StageRequest, Any]:
        step, branches = self._call
        return self.request(cuts, emit, step, branches), branches

    def after(self, request: StageRequest, token: Any, ok: bool) -> None:
        if ok:
            self.state.store(token, request)
        else:
            self.state.reset()


class HostCalibration:
    """A calibration run driven by a host (see :class:`HostRehash`): every call runs whole and leaves a
    fixed sample of its features at ``cuts`` on the CPU; :meth:`calibration` turns them into maps."""

    cut = None  # keeps nothing on the device across calls

    def __init__(self, cuts: Sequence[str] = LAST_UP_BLOCK, positions: int = DEFAULT_POSITIONS, seed: int = 0,
                 cap_bytes: int = DEFAULT_CALIBRATION_CAP) -> None:
        self.sampler = FeatureSampler(cuts, positions, seed, cap_bytes)
        self._branches: tuple[Hashable, ...] = (0,)
        self._step = 0
        self._seen: set[tuple[Hashable, int]] = set()
        self.calls = 0
        self.overflow = False  # the sampled features reached the cap: the run goes on, nothing more is kept

    def at(self, step: int, branches: Sequence[Hashable]) -> None:
        self._step, self._branches = step, tuple(branches)

    def before(self, cuts: Sequence[CutPoint], emit: Callable[[Any], None], rows: int) -> tuple[StageRequest, Any]:
        if self.overflow or any((b, self._step) in self._seen for b in self._branches):
            return StageRequest(), None  # a sampler's later evaluation within the step: one feature per step
        self._seen.update((b, self._step) for b in self._branches)
        if not self.calls:  # the candidates this U-Net has (a small U-Net's last up block has fewer layers)
            known = {c.id for c in cuts}
            self.sampler.cuts = tuple(c for c in self.sampler.cuts if c in known)
            if not self.sampler.cuts:
                raise ValueError(f"calibration: none of the cuts asked for is a cut point of this U-Net; its cut points: "
                                 f"{', '.join(c.id for c in cuts)}")
        # rows are samples (all frames of one); a call's branches take equal shares of them
        per = rows // len(self._branches) if rows % len(self._branches) == 0 else None
        if per is None:
            raise ValueError(f"calibration: a U-Net call of {rows} samples carries {len(self._branches)} branches")
        self.sampler.row_branches = [(b, r) for b in self._branches for r in range(per)]
        self.calls += 1
        return StageRequest(capture=frozenset(self.sampler.cuts), reduce=self._reduce), None

    def _reduce(self, cut: str, h: torch.Tensor) -> None:
        if self.overflow:
            return
        try:
            self.sampler.reduce(cut, h)
        except MemoryError:
            self.overflow = True
            log.warning("calibration: the sampled features reached the cap of %.0f MiB; this run keeps no more",
                        self.sampler.cap_bytes / 2**20)

    def after(self, request: StageRequest, token: Any, ok: bool) -> None:
        pass

    def calibration(self, steps: int, made_for: dict[str, Any]) -> Calibration:
        return Calibration(self.sampler.maps(), steps, dict(made_for), 1, self.sampler.positions)


class RehashHandle:
    """Step Rehash applied to a pipeline's U-Net: ``last_run`` reports the last run; ``remove()`` undoes it."""

    def __init__(self, unet: nn.Module, scheduler: Any, config: RehashConfig) -> None:
        self.unet, self.config = unet, config
        self.model_fingerprint = fingerprint(unet) if config.schedule is not None else None
        self.scheduler = scheduler
        self._attached = _Attached(unet, scheduler, self)

    def _made_for(self) -> dict[str, Any]:
        made_for: dict[str, Any] = {}
        if self.model_fingerprint is not None:
            made_for["model"] = self.model_fingerprint
        made_for["denoise"] = self.config.denoise
        if self.scheduler is not None:
            made_for["sampler"], made_for["scheduler"] = describe_scheduler(self.scheduler)
        return made_for

    def make_run(self, steps: int) -> _RehashDriver:
        return _RehashDriver(self.config, steps, self._made_for())

    @property
    def last_run(self) -> RehashState | None:
        """The state of the last finished (or failed) run: what each step did; its cache is freed."""
        last = self._attached.last_run
        return last.state if last is not None else None

    # the streamlined call's side (api.Streamliner)
    def before(self, cuts: Sequence[CutPoint], emit: Callable[[Any], None], rows: int) -> tuple[StageRequest, Any]:
        """The stage request of the U-Net call about to run, and a token for :meth:`after`."""
        driver, step, branch = self._attached.call()
        return driver.request(cuts, emit, step, (branch,)), (driver, branch)

    def after(self, request: StageRequest, token: Any, ok: bool) -> None:
        """Keep what a key call captured; a call that raised ends the run and frees the cache."""
        driver, branch = token
        if ok:
            driver.state.store((branch,), request)
        else:
            self._attached.end_run(ok=False)

    @property
    def cut(self) -> str:
        return self.config.cut_id

    def remove(self) -> None:
        """Restore the pipeline's U-Net and scheduler exactly; calling it again does nothing."""
        self._attached.remove()

    def __enter__(self) -> "RehashHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def _unet_and_scheduler(target: Any, scheduler: Any) -> tuple[nn.Module, Any]:
    unet = target if isinstance(target, nn.Module) else getattr(target, "unet", None)
    if not isinstance(unet, nn.Module):
        raise TypeError(f"target must be a pipeline with .unet and .scheduler, or a U-Net with scheduler=; got "
                        f"{type(target).__name__}")
    if scheduler is None and not isinstance(target, nn.Module):
        scheduler = getattr(target, "scheduler", None)
    if scheduler is None or not callable(getattr(scheduler, "step", None)) \
            or not callable(getattr(scheduler, "set_timesteps", None)):
        raise TypeError("rehash() counts steps with the pipeline's scheduler: pass a pipeline with .scheduler, or "
                        "scheduler= (an object with set_timesteps() and step(), like diffusers' schedulers)")
    return unet, scheduler


def rehash(target: Any, config: RehashConfig, scheduler: Any = None) -> RehashHandle:
    """Apply Step Rehash to a diffusers pipeline's U-Net (or a U-Net, with the ``scheduler`` that drives
    it). Composes with :func:`~streamlined_core.streamline` in either order; returns a handle with
    ``remove()`` and ``last_run``."""
    if not isinstance(config, RehashConfig):
        raise TypeError(f"config must be a RehashConfig, got {type(config).__name__}")
    unet, scheduler = _unet_and_scheduler(target, scheduler)
    from ..engine.api import resolve_unet

    resolve_unet(unet)  # a supported U-Net, or the API's error
    return RehashHandle(unet, scheduler, config)


# -- calibration --------------------------------------------------------------------------------------


class _CalibrationDriver:
    """A calibration run keeps nothing across calls (its features go to the sampler as they come)."""

    def finish(self, ok: bool) -> None:
        pass

    def reset(self) -> None:
        pass


@dataclass
class Calibration:
    """Similarity maps per cut from full-compute runs, and what they were made for."""

    maps: dict[str, torch.Tensor]
    steps: int
    made_for: dict[str, Any]
    runs: int
    positions: int

    def schedule(self, cut: str = DEFAULT_CUT, gamma: float | None = None, count: int | None = None) -> Schedule:
        """Key steps by Algorithm 1 at ``cut`` (by ``gamma``, or the count closest to ``count``, never more;
        by default 13 of 25 steps, scaled)."""
        if gamma is None and count is None:
            count = default_count(self.steps)
        base = Schedule(cut, self.steps, list(range(self.steps)), dict(self.made_for), maps=self.maps)
        return base.with_keys(cut, gamma, count)

    def save(self, path: str | Path, cut: str = DEFAULT_CUT, gamma: float | None = None,
             count: int | None = None) -> tuple[Path, Path]:
        """Save the key steps at ``cut`` (see :meth:`schedule`) with every cut's map (:meth:`Schedule.save`)."""
        return self.schedule(cut, gamma, count).save(path)


def default_count(steps: int) -> int:
    """The paper's share of key steps (13 of 25), scaled to ``steps``."""
    return min(steps, max(min(steps, 2), round(steps * 13 / 25)))


def format_calibration(cal: Calibration, clips: int, frames: int, gamma: float | None = None,
                       count: int | None = None, on: str = "the fixture model (not on SVD)",
                       runs: str = "calibration clips") -> str:
    """The calibration as a table: per cut, how similar adjacent steps are and the key steps found
    (measured ``on`` a model, over ``clips`` ``runs``)."""
    count = count if gamma is None else None
    head = ["cut", "adjacent steps (mean / min)", "key steps", "gamma"]
    rows = []
    for cut, m in cal.maps.items():
        adjacent = torch.diagonal(m, offset=1) if cal.steps > 1 else m.new_ones(1)
        sched = cal.schedule(cut, gamma, count)
        rows.append([cut + (" (replay)" if cut == LAST_UP_BLOCK[-1] else ""),
                     f"{float(adjacent.mean()):.4f} / {float(adjacent.min()):.4f}",
                     f"{len(sched.key_steps)}: {_ranges(sched.key_steps)}", f"{sched.gamma:.4f}"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]
    by = f"gamma {gamma}" if gamma is not None else f"the count closest to {count or default_count(cal.steps)}, never more"
    note = (f"Measured on {on}: {clips} {runs} of {frames} frames, {cal.steps} steps, "
            f"cosine similarity at {cal.positions} positions per sample and guidance branch. Key steps by Algorithm 1 "
            f"at {by}. Model fingerprint {cal.made_for.get('model')}.")
    return "\n".join(lines) + "\n\n" + note + "\n"


class CalibrationHandle:
    """Collects features during full-compute runs (see :func:`calibrate`)."""

    def __init__(self, unet: nn.Module, scheduler: Any, cuts: Sequence[str], positions: int, seed: int,
                 cap_bytes: int) -> None:
        self.unet, self.scheduler = unet, scheduler
        self.sampler = FeatureSampler(cuts, positions, seed, cap_bytes)
        self.steps: int | None = None
        self.runs = 0
        self._attached = _Attached(unet, scheduler, self)
        self.cut = None

    def make_run(self, steps: int) -> _CalibrationDriver:
        if self.steps is not None and steps != self.steps:
            raise ValueError(f"calibration: every run must take the same number of steps ({self.steps}), got {steps}")
        self.steps = steps
        self.runs += 1
        return _CalibrationDriver()

    def before(self, cuts: Sequence[CutPoint], emit: Callable[[Any], None], rows: int) -> tuple[StageRequest, Any]:
        _driver, _step, branch = self._attached.call()
        known = {c.id for c in cuts}
        unknown = [c for c in self.sampler.cuts if c not in known]
        if unknown:
            raise ValueError(f"cuts: {unknown[0]!r} is not a cut point of this U-Net; its cut points: {', '.join(known)}")
        self.sampler.branch = (self.runs, branch)
        self.sampler.rows[self.sampler.branch] = rows
        return StageRequest(capture=frozenset(self.sampler.cuts), reduce=self.sampler.reduce), None

    def after(self, request: StageRequest, token: Any, ok: bool) -> None:
        if not ok:
            self._attached.end_run(ok=False)

    def remove(self) -> None:
        self._attached.remove()


def calibrate(target: Any, run: Callable[[], Any], cuts: Sequence[str] = LAST_UP_BLOCK, runs: int = 1,
              positions: int = DEFAULT_POSITIONS, seed: int = 0, cap_bytes: int = DEFAULT_CALIBRATION_CAP,
              scheduler: Any = None, denoise: float = 1.0,
              progress: Callable[[str], None] | None = None) -> Calibration:
    """Run ``run()`` (a full-compute sampling run of the pipeline, e.g. a seed of the calibration set)
    ``runs`` times and measure, at each of ``cuts``, the cosine similarity of every step's feature to
    every other's (``positions`` fixed random positions per sample and guidance branch, kept on the
    CPU in fp32, at most ``cap_bytes``). The U-Net and scheduler are restored afterwards, even on error.
    ``run`` may take the run's index (0 to ``runs - 1``) to vary the seed."""
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
        raise ValueError(f"runs={runs!r}: expected a whole number of calibration runs, at least 1")
    unet, scheduler = _unet_and_scheduler(target, scheduler)
    from ..engine.api import resolve_unet

    resolve_unet(unet)  # a supported U-Net, or the API's error, before anything is patched
    takes_index = _takes_index(run)
    handle = CalibrationHandle(unet, scheduler, cuts, positions, seed, cap_bytes)
    try:
        for i in range(runs):
            if progress:
                progress(f"calibration run {i + 1}/{runs}")
            run(i) if takes_index else run()
        if handle.steps is None:
            raise RuntimeError("calibration: run() never called the pipeline's scheduler.set_timesteps(); nothing measured")
        maps = handle.sampler.maps()
        sampler, spacing = describe_scheduler(scheduler)
        made_for = {"model": fingerprint(unet), "steps": handle.steps, "sampler": sampler, "scheduler": spacing,
                    "denoise": denoise}
        return Calibration(maps, handle.steps, made_for, runs, positions)
    finally:
        handle.remove()


def _takes_index(fn: Callable) -> bool:
    import inspect

    try:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    except (TypeError, ValueError):
        return False
    return len(params) >= 1


__all__ = [
    "Calibration", "DEFAULT_CUT", "FeatureSampler", "HostCalibration", "HostRehash", "LAST_UP_BLOCK", "RehashConfig", "RehashEvent",
    "RehashHandle", "RehashState", "Schedule", "calibrate", "check_cut", "fingerprint", "interval_key_steps",
    "key_steps_for_count", "key_steps_for_gamma", "patch_scheduler", "rehash", "similarity_map",
]
