"""``streamline bench --rehash``: Step Rehash against the field's step caches, on the fixture model.

Every setting samples the same held-out clips (seeds disjoint from training and calibration) with the
same noise as a full-compute run, and is scored against that run: PSNR of the final clips and the
error of tracked shape centroids. Its U-Net time is the share of full forwards it costs, from
``bench --cuts``' per-stage fractions (a reuse step costs its cut's shallow path plus tail; a skipped
step costs nothing); pyramid attention broadcast, which skips attention inside full forwards, is
timed end to end instead. The default (the cut Step Rehash caches at, at the paper's 13 of 25 key steps)
is chosen on calibration clips, where every setting but pyramid attention broadcast runs too: among the
cuts whose reuse step costs no more than DeepCache's, the one closest to full compute that no other
setting beats on both axes there. It is then reported on the held-out clips like every other row.

Methods:

- ``rehash``: Algorithm 1 key steps from the calibration's maps, at each of the last up block's six
  cuts (the last two only replay the last key step's output), over a range of key-step counts;
- ``deepcache``: DeepCache's SVD setting (cache after the last up block's first ResBlock and attention,
  recompute ``conv_in`` and the first down block's first ResBlock and attention: the cut ``up0.0.attn``)
  at fixed intervals; interval 2 gives 13 full steps of 25;
- ``whole-step``: reuse of the U-Net's output residual (output minus its noisy input) over whole
  steps, at fixed intervals and with EasyCache's online rule (skip while the accumulated estimate of
  the output's relative change stays under a threshold), as ComfyUI's EasyCache node does; this is the
  project's implementation of that rule for a diffusers U-Net (ComfyUI's own node runs in the host);
- ``pab``: diffusers' pyramid attention broadcast on the U-Net's attention modules.

Figures measured on the fixture model are properties of that 6 M-parameter model, never of SVD.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch

from ...features.rehash import LAST_UP_BLOCK, Calibration, RehashConfig, default_count, interval_key_steps, patch_scheduler, rehash
from ...fixture import data, quality
from ...fixture import model as fixture
from ...fixture.calibration import batches as clip_batches
from ...fixture.calibration import calibrate_fixture, sample_batch

DEEPCACHE_CUT = "up0.0.attn"
COUNTS = (7, 10, 13, 16, 19, 22, 25)  # key steps swept, up to every step (full compute at 25 of 25)
INTERVALS = (2, 3, 4, 5)
EASYCACHE_THRESHOLDS = (0.05, 0.1, 0.2, 0.4)
EASYCACHE_START, EASYCACHE_END = 0.15, 0.95  # ComfyUI's EasyCache defaults, as shares of the steps
PAB_SKIPS = (2, 3, 4)
PAB_TIMESTEPS = (100, 800)  # diffusers' default range, on a 1000-step scale mapped over the run


@dataclass
class Setting:
    method: str
    setting: str
    configure: Callable[[], Any]  # returns what to sample with, and a cleanup
    full_steps: int | None = None
    share: float | None = None  # U-Net time of a reuse step, as a share of a full forward (None: timed)
    cut: str | None = None
    count: int | None = None


@dataclass
class Row:
    method: str
    setting: str
    full_steps: int
    unet_time_ratio: float
    psnr_db: float | None
    centroid_px: float | None
    measured_ratio: float  # wall time of the run over the full-compute run's, on this CPU (fixture model)
    default: bool = False
    split: str = "held-out"
    error: str | None = None  # what the setting raised instead of sampling (no figures then)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RehashBenchResult:
    rows: list[Row]
    calibration_rows: list[Row]  # every setting run on the calibration clips
    candidates: list[Row]  # those among them the default was chosen from
    default_cut: str
    steps: int
    clips: int
    calibration_clips: int
    frames: int
    shares: dict[str, float]
    shares_from: str
    threads: int
    end_to_end: dict[str, float] = field(default_factory=dict)

    def default(self) -> Row:
        return next(r for r in self.rows if r.default)

    def checks(self) -> dict[str, bool | None]:
        """The issue's targets, checked on the held-out rows (None: a row they need was not run)."""
        d = self.default()
        dc = next((r for r in self.rows if r.method == "deepcache" and r.setting.endswith("every 2 steps")), None)
        ws = next((r for r in self.rows if r.method == "whole-step" and r.setting == "every 2 steps"), None)
        dominated = beaten_by(d, self.rows)
        return {
            "closer to full compute than DeepCache's setting at interval 2": None if dc is None else psnr_db(d) > psnr_db(dc),
            "closer than whole-step reuse at interval 2": None if ws is None else psnr_db(d) > psnr_db(ws),
            "U-Net time no more than DeepCache's setting's": None if dc is None
            else d.unet_time_ratio <= dc.unet_time_ratio + 1e-9,
            "no swept alternative (pyramid attention broadcast aside) better on both axes": not dominated,
        }


def beaten_by(row: Row, rows: Sequence[Row]) -> list[Row]:
    """The rows closer to full compute than ``row`` at less U-Net time (rows that raised have neither).
    Pyramid attention broadcast's time is measured end to end, not modelled from the cut fractions, so it
    is not compared."""
    return [r for r in rows if r is not row and r.error is None and r.method not in ("full", "pab") and psnr_db(r) > psnr_db(row)
            and r.unet_time_ratio < row.unet_time_ratio]


def choose_default(tried: Sequence[tuple[str, Row]], rows: Sequence[Row]) -> str:
    """The cut of the candidate (cut, row) closest to full compute that no row beats on both axes (the
    cheaper of equals); the closest of them all when every candidate is beaten."""
    unbeaten = [(cut, row) for cut, row in tried if not beaten_by(row, rows)]
    return max(unbeaten or tried, key=lambda pair: (psnr_db(pair[1]), -pair[1].unet_time_ratio))[0]


def unet_time(full_steps: float, steps: int, share: float) -> float:
    """U-Net time of a run, as a share of full compute: ``full_steps`` whole forwards, each other step
    costing ``share`` of one (a reuse step's shallow path and tail; a skipped step 0)."""
    return (full_steps + (steps - full_steps) * share) / steps


def psnr_db(row: Row) -> float:
    """PSNR for comparisons: a result identical to full compute (no error) is infinitely close."""
    return math.inf if row.psnr_db is None else row.psnr_db


def _shown(db: float | None) -> str:
    return "identical" if db is None else f"{db:.2f}"


# -- sampling ------------------------------------------------------------------------------------------


def _sample(model: torch.nn.Module, chunks: list[data.Batch], steps: int, frames: int, scheduler: Any) -> torch.Tensor:
    return torch.cat([data.unpack(sample_batch(model, b, i, steps, frames, scheduler)).clamp(0, 1)
                      for i, b in enumerate(chunks)])


def psnr(got: torch.Tensor, reference: torch.Tensor) -> float | None:
    mse = float(((got - reference) ** 2).mean())
    return None if mse == 0 else 10 * math.log10(1.0 / mse)


def centroid_px(got: torch.Tensor, reference: torch.Tensor, seeds: Sequence[int], frames: int) -> float:
    total, pairs = 0.0, 0
    for k, seed in enumerate(seeds):
        colors = [s.color for s in data.sample_clip_spec(seed, frames).shapes]
        d, n, _ = quality.centroid_errors(reference[k], got[k], colors)
        total, pairs = total + d, pairs + n
    return total / max(pairs, 1)


class WholeStepReuse(torch.nn.Module):
    """A U-Net whose output residual (output minus its noisy input) is reused over whole steps: at fixed
    steps, or by EasyCache's rule (the accumulated estimate of the output's relative change, the last
    measured output-to-input change ratio times the input's change, stays under ``threshold``), only
    between ``start`` and ``end`` shares of the run. Counts steps with the scheduler, like Step Rehash."""

    def __init__(self, unet: torch.nn.Module, scheduler: Any, steps: int, key_steps: Sequence[int] | None = None,
                 threshold: float | None = None, start: float = EASYCACHE_START, end: float = EASYCACHE_END) -> None:
        super().__init__()
        self.unet, self.steps, self.threshold = unet, steps, threshold
        self.key_steps = set(key_steps) if key_steps is not None else None
        self.start, self.end = start, end
        self.full = 0
        self._scheduler_step, self._set_timesteps = scheduler.step, scheduler.set_timesteps
        self._start_state()
        self.restore = patch_scheduler(scheduler, step=self._count, set_timesteps=self._start)

    def _start_state(self) -> None:
        self.step = 0
        self.x_prev = self.out_prev = self.diff = None
        self.rate: float | None = None
        self.accumulated = 0.0

    def _start(self, *args: Any, **kwargs: Any) -> Any:
        self._start_state()
        return self._set_timesteps(*args, **kwargs)

    def _count(self, *args: Any, **kwargs: Any) -> Any:
        self.step += 1
        return self._scheduler_step(*args, **kwargs)

    def _skip(self, x: torch.Tensor) -> bool:
        if self.diff is None:
            return False
        if self.key_steps is not None:
            return self.step not in self.key_steps
        share = self.step / max(self.steps - 1, 1)
        if share < self.start or share > self.end or self.rate is None or self.x_prev is None:
            return False
        change = float((x - self.x_prev).abs().mean())
        self.accumulated += self.rate * change / float(self.out_prev.abs().mean())
        if self.accumulated < self.threshold:
            return True
        self.accumulated = 0.0
        return False

    def forward(self, sample: torch.Tensor, timestep: Any, **kwargs: Any) -> Any:
        x = sample[:, :, :4]  # the noisy latents; the first frame's latents are concatenated after them
        if self._skip(x):
            return (x + self.diff,)
        out = self.unet(sample, timestep, **kwargs)[0]
        self.full += 1
        if self.x_prev is not None and self.key_steps is None:
            input_change = float((x - self.x_prev).abs().mean())
            if input_change > 0:
                self.rate = float((out - self.out_prev).abs().mean()) / input_change
        self.x_prev, self.out_prev, self.diff = x.clone(), out.clone(), out - x
        return (out,)


# -- the settings ----------------------------------------------------------------------------------------


def _rehash_setting(unet, cal: Calibration, scheduler, cut: str, count: int | None = None,
                    interval: int | None = None) -> Callable[[], Any]:
    def configure():
        if interval is not None:
            config = RehashConfig(interval=interval, cut=cut)
        else:
            config = RehashConfig(schedule=cal.schedule(cut, count=count), replay=not _fresh(cut))
        handle = rehash(unet, config, scheduler=scheduler)
        return unet, handle.remove
    return configure


def _fresh(cut: str) -> bool:
    return cut not in LAST_UP_BLOCK[-2:]


def _whole_step_setting(unet, scheduler, steps: int, interval: int | None = None,
                        threshold: float | None = None) -> Callable[[], Any]:
    def configure():
        keys = interval_key_steps(steps, interval) if interval is not None else None
        wrapper = WholeStepReuse(unet, scheduler, steps, key_steps=keys, threshold=threshold)
        return wrapper, wrapper.restore
    return configure


def _pab_setting(unet, scheduler, steps: int, skip: int) -> Callable[[], Any]:
    def configure():
        from diffusers import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast

        model = copy.deepcopy(unet)
        counter = {"step": 0}
        original, original_set = scheduler.step, scheduler.set_timesteps

        def count(*args, **kwargs):
            counter["step"] += 1
            return original(*args, **kwargs)


        def start(*args, **kwargs):  # a new run: the step count and every attention cache start again
            counter["step"] = 0
            for m in model.modules():
                registry = getattr(m, "_diffusers_hook", None)
                if registry is not None:
                    registry.reset_stateful_hooks(recurse=False)
            return original_set(*args, **kwargs)

        config = PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=skip, spatial_attention_timestep_skip_range=PAB_TIMESTEPS,
            current_timestep_callback=lambda: 999 * (1 - counter["step"] / max(steps - 1, 1)))
        apply_pyramid_attention_broadcast(model, config)
        return model, patch_scheduler(scheduler, step=count, set_timesteps=start)
    return configure


def settings(unet, cal: Calibration, scheduler, steps: int, counts: Sequence[int] = COUNTS,
             intervals: Sequence[int] = INTERVALS, thresholds: Sequence[float] = EASYCACHE_THRESHOLDS,
             pab: Sequence[int] = PAB_SKIPS, cuts: Sequence[str] = LAST_UP_BLOCK) -> list[Setting]:
    out: list[Setting] = []
    for cut in cuts:
        for count in counts:
            keys = cal.schedule(cut, count=count).key_steps
            out.append(Setting("rehash", f"{cut}{'' if _fresh(cut) else ' (replay)'}, {len(keys)} key steps",
                               _rehash_setting(unet, cal, scheduler, cut, count=count), len(keys), cut=cut, count=count))
    for k in intervals:
        n = len(interval_key_steps(steps, k))
        out.append(Setting("deepcache", f"{DEEPCACHE_CUT}, every {k} steps", _rehash_setting(
            unet, cal, scheduler, DEEPCACHE_CUT, interval=k), n, cut=DEEPCACHE_CUT))
    for k in intervals:
        n = len(interval_key_steps(steps, k))
        out.append(Setting("whole-step", f"every {k} steps", _whole_step_setting(unet, scheduler, steps, interval=k), n,
                           share=0.0))
    for t in thresholds:
        out.append(Setting("whole-step", f"EasyCache rule, threshold {t}",
                           _whole_step_setting(unet, scheduler, steps, threshold=t), None, share=0.0))
    for s in pab:
        out.append(Setting("pab", f"spatial attention every {s} steps, timesteps {PAB_TIMESTEPS}",
                           _pab_setting(unet, scheduler, steps, s), steps))
    return out


# -- running -------------------------------------------------------------------------------------------


def _run(setting: Setting, batches, reference, full_s: float, seeds, steps, frames, scheduler,
         shares: dict[str, float], split: str) -> Row:
    model, cleanup = setting.configure()  # patches nothing when it raises
    start = time.perf_counter()
    try:
        got = _sample(model, batches, steps, frames, scheduler)
    finally:
        cleanup()
    seconds = time.perf_counter() - start
    full_steps = setting.full_steps
    if isinstance(model, WholeStepReuse):
        full_steps = model.full // len(batches)
    measured = seconds / full_s
    if setting.method == "pab":
        ratio = measured
    else:
        ratio = unet_time(full_steps, steps, setting.share if setting.share is not None else shares[setting.cut])
    return Row(setting.method, setting.setting, full_steps, ratio, psnr(got, reference),
               centroid_px(got, reference, seeds, frames), measured, split=split)


def bench_rehash(weights: str | None = None, clips: int = 4, calibration_clips: int = 4, steps: int = 25,
                 frames: int | None = None, threads: int = 2, cuts_config: str = "mid", quick: bool = False,
                 end_to_end: bool = True, progress: Callable[[str], None] | None = None) -> RehashBenchResult:
    """Run the comparison (see the module docstring). ``quick``: fewer settings, for tests."""
    from .unet import cuts as cut_costs

    say = progress or (lambda _m: None)
    torch.set_num_threads(threads)
    frames = frames or data.DEFAULT_FRAMES
    unet = fixture.load_unet(weights)
    say(f"timing each cut's tail on the {cuts_config} configuration (bench --cuts)")
    costs = cut_costs(cuts_config, warmup=0 if quick else 1, repeats=1 if quick else 3, threads=threads,
                      direct=("up0.0.attn",))
    torch.set_num_threads(threads)
    shares = {c.cut: c.shallow_tail for c in costs.cuts}
    say(f"calibrating on {calibration_clips} calibration clips")
    cal = calibrate_fixture(unet, clips=calibration_clips, steps=steps, frames=frames, progress=say)
    scheduler = fixture.make_scheduler()
    count = default_count(steps)

    def reference(seeds):
        batches = clip_batches(seeds, frames)
        start = time.perf_counter()
        ref = _sample(unet, batches, steps, frames, scheduler)
        return batches, ref, time.perf_counter() - start

    counts = sorted({c for c in COUNTS if c <= steps} | {count})  # the default's count is always swept
    # The default: Step Rehash at the paper's key-step count, at the cut closest to full compute on the
    # calibration clips among those whose reuse step costs no more than DeepCache's and that no other
    # setting run there beats on both axes (the most accurate of the candidates when every one is beaten).
    cal_seeds = list(data.CALIBRATION_SEEDS[:calibration_clips])
    cal_batches, cal_ref, cal_full_s = reference(cal_seeds)
    limit = shares[DEEPCACHE_CUT]
    candidates = [c for c in LAST_UP_BLOCK if _fresh(c) and shares[c] <= limit + 1e-9]
    if quick:
        cal_settings = settings(unet, cal, scheduler, steps, counts=(count,), intervals=(), thresholds=(), pab=(),
                                cuts=candidates)
    else:
        cal_settings = settings(unet, cal, scheduler, steps, counts=counts, pab=())
    cal_rows = []
    for i, s in enumerate(cal_settings):
        cal_rows.append(_run(s, cal_batches, cal_ref, cal_full_s, cal_seeds, steps, frames, scheduler, shares,
                             "calibration"))
        say(f"calibration clips [{i + 1}/{len(cal_settings)}]: {s.setting}: {_shown(cal_rows[-1].psnr_db)} dB")
    tried = [(s.cut, row) for s, row in zip(cal_settings, cal_rows)
             if s.method == "rehash" and s.cut in candidates and s.count == count]
    default_cut = choose_default(tried, cal_rows)

    seeds = list(data.EVAL_SEEDS[:clips])
    batches, ref, full_s = reference(seeds)
    say(f"full compute on {clips} held-out clips: {full_s:.1f} s")
    if quick:
        chosen = settings(unet, cal, scheduler, steps, counts=(count,), intervals=(2,), thresholds=(0.2,), pab=(2,),
                          cuts=tuple(dict.fromkeys((DEEPCACHE_CUT, default_cut))))
    else:
        chosen = settings(unet, cal, scheduler, steps, counts=counts)
    rows = [Row("full", f"{steps} of {steps} steps", steps, 1.0, None, 0.0, 1.0)]
    for i, s in enumerate(chosen):
        row = _run(s, batches, ref, full_s, seeds, steps, frames, scheduler, shares, "held-out")
        row.default = s.method == "rehash" and s.cut == default_cut and s.count == count
        rows.append(row)
        say(f"[{i + 1}/{len(chosen)}] {row.method}: {row.setting}: {_shown(row.psnr_db)} dB, U-Net time "
            f"{row.unet_time_ratio:.3f}")
    result = RehashBenchResult(rows, cal_rows, [row for _cut, row in tried], default_cut, steps, clips,
                               calibration_clips, frames, shares, f"bench --cuts, {cuts_config} configuration", threads)
    if end_to_end:
        result.end_to_end = end_to_end_ratio(cuts_config, cal.schedule(default_cut, count=count).key_steps,
                                             default_cut, steps, threads, say)
    return result


def end_to_end_ratio(config: str, key_steps: Sequence[int], cut: str, steps: int, threads: int,
                     say: Callable[[str], None]) -> dict[str, float]:
    """Wall time of a ``steps``-step sampling loop of the bench configuration (random weights, its
    planned slicing) with Step Rehash at ``key_steps``, over the same loop at full compute."""
    from ...engine.api import streamline
    from .unet import bench_model

    model, args, kwargs = bench_model(config, threads)
    scheduler = fixture.make_scheduler()

    def loop() -> float:
        scheduler.set_timesteps(steps)
        start = time.perf_counter()
        with torch.no_grad():
            for t in scheduler.timesteps:
                out = model(*args, **kwargs)[0]
                scheduler.step(out, t, scheduler.scale_model_input(torch.zeros_like(out), t))
        return time.perf_counter() - start

    with streamline(model):
        loop_full = loop()
        say(f"{config}: {steps} full steps in {loop_full:.1f} s")
        with rehash(model, RehashConfig(key_steps=list(key_steps), cut=cut), scheduler=scheduler):
            loop_rehash = loop()
        say(f"{config}: Step Rehash in {loop_rehash:.1f} s")
    return {"full_s": loop_full, "rehash_s": loop_rehash, "ratio": loop_rehash / loop_full}


# -- reporting ------------------------------------------------------------------------------------------

PAPER_TABLE_2 = (
    "The paper's Table 2 (13 full steps of 25; FVD, lower is better / CLIP score, higher is better; original, "
    "DeepCache, Step Rehash): SVD on UCF-101 307.7 / 29.25, 394.0 / 28.57, 340.6 / 28.98; on MSR-VTT 373.6 / 26.06, "
    "463.6 / 25.30, 402.1 / 25.86. AnimateDiff on UCF-101 758.7 / 28.89, 840.2 / 28.15, 784.5 / 28.71; on MSR-VTT "
    "607.1 / 29.40, 615.8 / 29.06, 603.9 / 29.29."
)


def markdown_rows(rows: Sequence[Row], wall: str = "CPU") -> str:
    """The settings as a Markdown table; a row that raised shows its error instead of figures."""
    head = ["method", "setting", "full steps", "U-Net time", "PSNR (dB)", "centroid error (px)", f"wall time ({wall})", ""]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        if row.error is not None:
            cells = [row.method, row.setting, "-", "-", "-", "-", "-", f"raised {row.error}"]
        else:
            cells = [row.method, row.setting, str(row.full_steps), f"{row.unet_time_ratio:.3f}",
                     "-" if row.method == "full" else _shown(row.psnr_db),
                     "-" if row.centroid_px is None else f"{row.centroid_px:.3f}", f"{row.measured_ratio:.2f}",
                     "**default**" if row.default else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_checks(checks: dict[str, bool | None]) -> str:
    return "\n".join(f"- {name}: {'not measured' if ok is None else 'holds' if ok else 'does not hold'}"
                     for name, ok in checks.items())


def format_markdown(r: RehashBenchResult) -> str:
    table = markdown_rows(r.rows)
    checks = format_checks(r.checks())
    def candidate(row: Row) -> str:
        better = max(beaten_by(row, r.calibration_rows), key=psnr_db, default=None)
        beaten = "" if better is None else f", beaten by {better.setting} ({_shown(better.psnr_db)} dB)"
        return f"{row.setting}: {_shown(row.psnr_db)} dB at {row.unet_time_ratio:.3f}{beaten}"
    cal = "; ".join(candidate(row) for row in r.candidates)
    e2e = ""
    if r.end_to_end:
        e2e = (f" End to end on the {r.shares_from.split(', ')[1]} (random weights, {r.steps} steps, the default's key "
               f"steps): {r.end_to_end['rehash_s']:.1f} s against {r.end_to_end['full_s']:.1f} s, "
               f"{r.end_to_end['ratio']:.3f}x.")
    note = (f"Measured on the fixture model (not on SVD): {r.clips} held-out clips of {r.frames} frames, {r.steps} steps, "
            f"each setting against full compute from the same noise. U-Net time: full forwards' share, a reuse step "
            f"costing its cut's shallow path plus tail ({r.shares_from}), a skipped whole step nothing; pyramid attention "
            f"broadcast timed end to end. Wall time: this CPU, {r.threads} threads. Default chosen on {r.calibration_clips} "
            f"calibration clips, where {len(r.calibration_rows)} settings ran, as the cut closest to full compute among "
            f"those no dearer than DeepCache's that no setting beats on both axes there: {cal}.{e2e}")
    return table + "\n\n" + note + "\n\nTargets:\n" + checks + "\n\n" + PAPER_TABLE_2 + "\n"


def plot(r: RehashBenchResult, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    series: dict[str, list[Row]] = {}
    for row in r.rows:
        if row.psnr_db is None:
            continue
        key = row.method if row.method != "rehash" else f"Step Rehash at {row.setting.split(',')[0]}"
        if row.method == "whole-step":
            key = "whole-step (EasyCache rule)" if "EasyCache" in row.setting else "whole-step (intervals)"
        series.setdefault(key, []).append(row)
    for key, rows in series.items():
        rows = sorted(rows, key=lambda x: x.unet_time_ratio)
        ax.plot([x.unet_time_ratio for x in rows], [x.psnr_db for x in rows], marker="o", markersize=3,
                linewidth=1, label=key)
    d = r.default()
    ax.plot([d.unet_time_ratio], [d.psnr_db], marker="*", markersize=14, color="black", linestyle="none",
            label=f"default: {d.setting}")
    ax.set_xlabel("U-Net time (share of full compute)")
    ax.set_ylabel("PSNR against full compute (dB)")
    ax.set_title(f"Step caches on the fixture model (not SVD): {r.clips} held-out clips, {r.steps} steps", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["Row", "RehashBenchResult", "WholeStepReuse", "bench_rehash", "choose_default", "format_markdown", "plot"]
