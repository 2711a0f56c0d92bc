"""Latency of the streamlined U-Net against the original, side by side in one process.

The mid-size CPU configuration of CONFIGS.md: SVD's architecture at a quarter width, 14 frames,
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

from . import configs
from .api import streamline
from .memory import GIB, MemoryTracker

# (batch, frames, height, width) in pixels, and how to build the model.
BENCH_CONFIGS: dict[str, tuple[Callable[[], torch.nn.Module], tuple[int, int, int, int]]] = {
    "mid": (lambda: configs.build_diffusers_svd("cpu", torch.float32, **configs.SVD_MID_KWARGS), (2, 14, 256, 448)),
    "tiny": (lambda: configs.build_tiny_diffusers_svd("cpu", torch.float32), (2, 3, 64, 64)),
}

# The paper's A100 latencies at 576x1024 (PAPER.md): streamlined / original, with Step Rehash.
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


def latency(config: str = "mid", warmup: int = 2, repeats: int = 5, threads: int = 2,
            progress: Callable[[str], None] | None = None) -> LatencyResult:
    """Time original and streamlined calls of ``config``, alternating, and measure both peaks."""
    say = progress or (lambda _m: None)
    build, (batch, frames, height, width) = BENCH_CONFIGS[config]
    torch.set_num_threads(threads)
    model = configs.seed_weights(build(), std=0.02)
    args, kwargs = configs.diffusers_svd_inputs(model, batch, frames, height, width)
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
