"""Latency of the streamlined U-Net against the original, side by side in one process.

The mid-size CPU configuration (docs/benchmarks.md): SVD's architecture at a quarter width, 14 frames,
classifier-free guidance as a batch of 2, a 32x56 latent, fp32, two threads. The streamlined model
runs the plan that meets the memory target (1.5x the skip floor); original and streamlined calls
alternate, after warm-up, and the medians are compared.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ...engine.api import streamline
from ...engine.memory import GIB, MemoryTracker
from .. import configs

# (batch, frames, height, width) in pixels, and how to build the model.
BENCH_CONFIGS: dict[str, tuple[Callable[[], torch.nn.Module], tuple[int, int, int, int]]] = {
    "mid": (lambda: configs.build_diffusers_svd("cpu", torch.float32, **configs.SVD_MID_KWARGS), (2, 14, 256, 448)),
    "tiny": (lambda: configs.build_tiny_diffusers_svd("cpu", torch.float32), (2, 3, 64, 64)),
}

# The paper's A100 latencies at 576x1024 (the paper): streamlined / original, with Step Rehash.
PAPER_LATENCY_RATIO = {"SVD": 14.24 / 23.29, "SVD-XT": 25.47 / 40.77, "AnimateDiff": 15.15 / 24.38}


@dataclass
class LatencyResult:
    """Median seconds per U-Net call, their ratio, and the streamlined plan's memory."""

    config: str
    original_s: float
    streamlined_s: float
    plan: str
    original_peak_bytes: int
    peak_bytes: int
    predicted_peak_bytes: int
    skip_floor_bytes: int
    threads: int
    repeats: int

    @property
    def ratio(self) -> float:
        return self.streamlined_s / self.original_s


def bench_model(config: str, threads: int) -> tuple[torch.nn.Module, tuple, dict]:
    """The seeded U-Net of bench configuration ``config`` and its call's inputs, on ``threads`` CPU threads."""
    build, (batch, frames, height, width) = BENCH_CONFIGS[config]
    torch.set_num_threads(threads)
    model = configs.seed_weights(build(), std=0.02)
    args, kwargs = configs.diffusers_svd_inputs(model, batch, frames, height, width)
    return model, args, kwargs


def latency(config: str = "mid", warmup: int = 2, repeats: int = 5, threads: int = 2,
            progress: Callable[[str], None] | None = None) -> LatencyResult:
    """Time original and streamlined calls of ``config``, alternating, and measure both peaks."""
    say = progress or (lambda _m: None)
    model, args, kwargs = bench_model(config, threads)
    handle = streamline(model)
    original = lambda: type(model).forward(model, *args, **kwargs)  # noqa: E731 - the unpatched forward
    streamlined = lambda: model(*args, **kwargs)  # noqa: E731
    say("planning on a meta replica")
    plan = handle.plan_for(*args, **kwargs)
    with MemoryTracker() as t:
        original()
    original_peak = t.peak_bytes
    with MemoryTracker() as t:
        streamlined()
    peak = t.peak_bytes
    times: dict[str, list[float]] = {"original": [], "streamlined": []}
    with torch.no_grad():
        for i in range(warmup + repeats):
            for name, fn in (("original", original), ("streamlined", streamlined)):
                start = time.perf_counter()
                fn()
                elapsed = time.perf_counter() - start
                if i >= warmup:
                    times[name].append(elapsed)
            stage = "warm-up" if i < warmup else "run"
            say(f"{stage} {i + 1}/{warmup + repeats}")
    handle.remove()
    return LatencyResult(
        config, statistics.median(times["original"]), statistics.median(times["streamlined"]),
        plan.describe(), original_peak, peak, plan.predicted_peak_bytes, plan.skip_floor_bytes, threads, repeats,
    )


def format_latency(r: LatencyResult, markdown: bool = False) -> str:
    """The latency table, with the paper's ratio beside ours."""
    head = ["config", "original s", "streamlined s", "ratio", "plan", "peak GiB (original -> streamlined)", "x floor",
            "paper ratio*"]
    row = [
        f"SVD {r.config} (CPU fp32, {r.threads} threads, median of {r.repeats})",
        f"{r.original_s:.3f}", f"{r.streamlined_s:.3f}", f"{r.ratio:.3f}", r.plan,
        f"{r.original_peak_bytes / GIB:.3f} -> {r.peak_bytes / GIB:.3f}", f"{r.peak_bytes / r.skip_floor_bytes:.2f}x",
        f"{PAPER_LATENCY_RATIO['SVD']:.2f}",
    ]
    note = ("*The paper's ratio is A100 whole-pipeline latency at 576x1024 including Step Rehash (13 of 25 steps "
            "computed); ours is slicing and grouping alone, per U-Net call. Not directly comparable.")
    if markdown:
        return "| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n| " + " | ".join(row) + " |\n\n" + note + "\n"
    widths = [max(len(a), len(b)) for a, b in zip(head, row)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in (head, row)]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), lines[1]]) + "\n\n" + note + "\n"


# -- cut points: what a tail and a shallow path plus tail cost ------------------------------------


@dataclass
class CutTiming:
    """One up-path cut: the tail's and the shallow path plus tail's share of a full forward."""

    cut: str
    after: str
    fresh: bool
    shallow: tuple[str, ...]
    tail: float  # from per-stage medians
    shallow_tail: float
    tail_flops: float  # share of the forward's FLOPs
    shallow_tail_flops: float
    direct_tail: float | None = None  # timed directly (three cuts)
    direct_shallow_tail: float | None = None


@dataclass
class CutsResult:
    config: str
    full_s: float  # median full forward, seconds
    stage_sum_s: float  # per-stage medians added up
    plan: str
    threads: int
    repeats: int
    cuts: list[CutTiming]


# Outside FLOP estimates of a reuse step's share of a full forward (diffusers SVD, by FLOPs): after the
# last up block's first ResBlock with all of the first down block recomputed (0.39); after its first
# attention with conv_in and the first down block's first ResBlock and attention recomputed, DeepCache's
# SVD setting (0.25); after its second ResBlock with only conv_in recomputed (0.15).
OUTSIDE_ESTIMATES = {"up0.0.res": 0.39, "up0.0.attn": 0.25, "up0.1.res": 0.15}


def _per_stage(run: Callable[[list], object], reading: Callable[[], float]) -> dict[str, float]:
    """How much a cumulative ``reading`` (seconds, FLOPs) grows inside each stage of ``run(listeners)``."""
    from ...engine.stages import StageEvent

    grown: dict[str, float] = {}
    started: dict[str, float] = {}

    def listen(event) -> None:
        if isinstance(event, StageEvent):
            if event.kind == "start":
                started[event.name] = reading()
            elif event.kind == "end":
                grown[event.name] = grown.get(event.name, 0) + reading() - started.pop(event.name)

    run([listen])
    return grown


def _stage_times(run: Callable[[list], object]) -> dict[str, float]:
    """Seconds per stage of one call (the CPU runs synchronously)."""
    return _per_stage(run, time.perf_counter)


def _stage_flops(run: Callable[[list], object]) -> dict[str, float]:
    """FLOPs per stage of one call (``torch.utils.flop_counter``)."""
    from torch.utils.flop_counter import FlopCounterMode

    mode = FlopCounterMode(display=False)
    with mode:
        return _per_stage(run, mode.get_total_flops)


def cuts(config: str = "mid", warmup: int = 2, repeats: int = 5, threads: int = 2, direct: tuple[str, ...] = (),
         progress: Callable[[str], None] | None = None) -> CutsResult:
    """Per-stage times of full streamlined forwards, and what each up-path cut's tail and shallow path cost.

    ``direct``: cut ids also timed directly (a tail from a captured state; the shallow path plus tail),
    as a check of the per-stage sums; by default the three cuts of :data:`OUTSIDE_ESTIMATES` present.
    """
    from ...engine.arch import cut_points, diffusers_svd
    from ...engine.slicing import Runner
    from ...engine.stages import CutState, StageRequest

    say = progress or (lambda _m: None)
    build, (batch, frames, height, width) = BENCH_CONFIGS[config]
    torch.set_num_threads(threads)
    model = configs.seed_weights(build(), std=0.02)
    args, kwargs = configs.diffusers_svd_inputs(model, batch, frames, height, width)
    say("planning on a meta replica")
    with streamline(model) as handle:  # the plan that meets the memory target, as bench --latency times
        plan = handle.plan_for(*args, **kwargs)
    points = [c for c in cut_points(model) if c.section == "up"]
    direct = direct or tuple(c for c in OUTSIDE_ESTIMATES if any(p.id == c for p in points))

    def forward(listeners=(), request=None):
        runner = Runner(plan.decide, listeners, request)
        return diffusers_svd.streamlined_forward(model, runner, *args, **kwargs)

    per_stage: dict[str, list[float]] = {}
    full: list[float] = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            start = time.perf_counter()
            times = _stage_times(lambda listeners: forward(listeners))
            elapsed = time.perf_counter() - start
            if i >= warmup:
                full.append(elapsed)
                for name, t in times.items():
                    per_stage.setdefault(name, []).append(t)
            say(f"{'warm-up' if i < warmup else 'forward'} {i + 1}/{warmup + repeats}")
        flops = _stage_flops(lambda listeners: forward(listeners))
        say("counted FLOPs per stage")
        medians = {name: statistics.median(ts) for name, ts in per_stage.items()}
        names = list(medians)  # in stage order
        total, total_flops = sum(medians.values()), sum(flops.values())
        results = []
        for c in points:
            tail_names = ["prologue", *names[c.index + 1:]]  # a tail run embeds the timestep too
            part = list(c.shallow)
            results.append(CutTiming(
                c.id, c.after, c.fresh, c.shallow,
                sum(medians[n] for n in tail_names) / total,
                sum(medians[n] for n in part + tail_names) / total,
                sum(flops.get(n, 0) for n in tail_names) / total_flops,
                sum(flops.get(n, 0) for n in part + tail_names) / total_flops,
            ))
        request = StageRequest(capture=frozenset(direct))
        forward(request=request)
        full_s = statistics.median(full)
        for r in results:
            if r.cut not in direct:
                continue
            state: CutState = request.captures[0][r.cut]
            for shallow in (False, True):
                ts = []
                for i in range(warmup + repeats):
                    start = time.perf_counter()
                    forward(request=StageRequest(start=state, recompute_skips=shallow) if shallow
                            else StageRequest(start=state))
                    if i >= warmup:
                        ts.append(time.perf_counter() - start)
                share = statistics.median(ts) / full_s
                if shallow:
                    r.direct_shallow_tail = share
                else:
                    r.direct_tail = share
            say(f"timed {r.cut} directly")
    return CutsResult(config, full_s, total, plan.describe(), threads, repeats, results)


def format_cuts(r: CutsResult, markdown: bool = False) -> str:
    """The cut-point table: tail and shallow path plus tail as shares of a full forward, with FLOP shares."""
    head = ["cut", "after (diffusers)", "recomputed (shallow path)", "tail", "shallow + tail", "direct", "FLOPs tail",
            "FLOPs shallow + tail", "outside estimate"]
    rows = []
    for c in r.cuts:
        direct = "-" if c.direct_tail is None else f"{c.direct_tail:.3f} / {c.direct_shallow_tail:.3f}"
        shallow = ", ".join(n.replace("down_blocks.", "d").replace("resnets.", "r").replace("attentions.", "a")
                            .replace("downsamplers.", "ds") for n in c.shallow) or "-"
        rows.append([c.cut + ("" if c.fresh else " (replay)"), c.after, shallow, f"{c.tail:.3f}", f"{c.shallow_tail:.3f}",
                     direct, f"{c.tail_flops:.3f}", f"{c.shallow_tail_flops:.3f}",
                     f"{OUTSIDE_ESTIMATES[c.cut]:.2f}" if c.cut in OUTSIDE_ESTIMATES else "-"])
    note = (f"SVD {r.config} (CPU fp32, {r.threads} threads, plan {r.plan}): a full forward takes {r.full_s:.3f} s "
            f"(median of {r.repeats}; per-stage medians add up to {r.stage_sum_s:.3f} s). Shares of a full forward from "
            f"per-stage medians; 'direct' times the tail and the shallow path plus tail from a captured state. A "
            f"'(replay)' tail uses no fresh input: it reproduces the last full step's output. Outside estimate: the "
            f"FLOP share of a reuse step that caches there and recomputes the shallow path.")
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(x) + " |" for x in rows]
        return "\n".join(lines) + "\n\n" + note + "\n"
    widths = [max(len(h), *(len(x[i]) for x in rows)) for i, h in enumerate(head)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [head] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n\n" + note + "\n"
