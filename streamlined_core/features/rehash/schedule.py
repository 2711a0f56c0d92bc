"""Step Rehash's schedule file (``streamline.rehash/1``: key steps, the maps beside them, what they
were made for), a run's configuration (:class:`RehashConfig`) and a calibration's result."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ...engine.stages import CutPoint
from .keysteps import DEFAULT_CUT, LAST_UP_BLOCK, default_count, interval_key_steps, key_steps_for_count, key_steps_for_gamma, step_ranges

log = logging.getLogger(__name__)


FORMAT = "streamline.rehash/1"

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
        check_keys(keys, steps, f"schedule {str(path)!r}")
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


def check_keys(keys: Sequence[int], steps: int, name: str) -> None:
    if not keys or sorted(set(keys)) != list(keys) or keys[0] != 0 or keys[-1] != steps - 1:
        raise ValueError(f"{name}: key steps must rise strictly from 0 to the last step ({steps - 1}), got {list(keys)}")


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


def nearest_cut(cuts: Sequence[CutPoint], preferred: str = DEFAULT_CUT) -> tuple[str, str]:
    """The cut Step Rehash takes where none was chosen: ``preferred`` where its tail takes fresh input on this
    U-Net; else the nearest of the last up block's cuts whose tail does (the earlier on a tie: more recomputed);
    else the last such cut of the middle or up path. Returns it and, where it is not ``preferred``, why."""
    usable = [c.id for c in cuts if c.section in ("mid", "up") and c.fresh]
    if preferred in usable:
        return preferred, ""
    if not usable:
        raise ValueError("cut: this U-Net has no cut in its middle or up path whose tail takes fresh input; Step Rehash "
                         "has nothing to reuse on it")
    order = list(LAST_UP_BLOCK)
    at = order.index(preferred) if preferred in order else len(order)
    near = sorted((c for c in order if c in usable), key=lambda c: (abs(order.index(c) - at), order.index(c)))
    found = near[0] if near else usable[-1]
    here = next((c for c in cuts if c.id == preferred), None)
    return found, (f"{preferred} {here.label} on this U-Net" if here is not None else f"this U-Net has no {preferred}")


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
                     f"{len(sched.key_steps)}: {step_ranges(sched.key_steps)}", f"{sched.gamma:.4f}"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]
    by = f"gamma {gamma}" if gamma is not None else f"the count closest to {count or default_count(cal.steps)}, never more"
    note = (f"Measured on {on}: {clips} {runs} of {frames} frames, {cal.steps} steps, "
            f"cosine similarity at {cal.positions} positions per sample and guidance branch. Key steps by Algorithm 1 "
            f"at {by}. Model fingerprint {cal.made_for.get('model')}.")
    return "\n".join(lines) + "\n\n" + note + "\n"
