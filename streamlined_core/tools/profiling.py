"""What ``streamline profile`` runs: a recorded sampling run of the fixture model (or a tiny random one),
with and without Streamline, and the recorder's own cost on the mid-size configuration."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..engine.api import streamline
from ..features.profiler import Timeline, profile
from . import configs

MODELS = ("fixture", "tiny")
FULL_MODELS = ("svd",)  # full size, random weights, CUDA only


def sampling_run(model: str = "fixture", streamlined: bool = False, granularity: str = "group", steps: int = 6,
                 frames: int = 8, weights: str | None = None, label: str | None = None) -> Timeline:
    """Sample one held-out clip with the fixture sampler loop (SVD's, classifier-free guidance batched)
    under the recorder; ``model="tiny"`` takes random weights of the fixture's layout (no file needed)."""
    from ..fixture import data
    from ..fixture.model import SAMPLE_NOISE_AUG, Conditioning, build_fixture_unet, load_unet, sample

    if model not in MODELS:
        raise ValueError(f"model={model!r}: expected one of {', '.join(MODELS)}")
    unet = load_unet(weights) if model == "fixture" else build_fixture_unet(seed=0).eval()
    b = data.make_batch([data.EVAL_SEEDS[0]], frames, data.DEFAULT_SIZE, noise_aug_strength=SAMPLE_NOISE_AUG)
    handle = streamline(unet) if streamlined else None
    name = label or ("streamlined" if streamlined else "original")
    try:
        with profile(unet, granularity=granularity, label=name) as rec:
            sample(unet, b.first_frame, Conditioning(b.embedding, b.time_ids), steps=steps, frames=frames,
                   generator=torch.Generator().manual_seed(0))
    finally:
        if handle is not None:
            handle.remove()
    return rec.timeline


def full_size_run(streamlined: bool = False, granularity: str = "group", steps: int = 4, frames: int = 14,
                  height: int = 576, width: int = 1024, label: str | None = None) -> Timeline:
    """Full-size SVD with random weights in fp16 on the CUDA device: ``steps`` U-Net calls (classifier-free
    guidance batched) at falling noise levels, recorded by the allocator."""
    if not torch.cuda.is_available():
        raise RuntimeError("the full-size model runs on a CUDA device and none is available")
    model = configs.seed_weights(configs.build_diffusers_svd("cuda", torch.float16), std=0.02)
    args, kwargs = configs.diffusers_svd_inputs(model, 2, frames, height, width)
    handle = streamline(model) if streamlined else None
    try:
        with torch.no_grad(), profile(model, granularity=granularity,
                                      label=label or ("streamlined" if streamlined else "original")) as rec:
            for t in torch.linspace(1.6, -1.5, steps):  # 0.25 * ln(sigma) from about 600 down to 0.0025
                model(args[0], t.to(args[0].device), *args[2:], **kwargs)
    finally:
        if handle is not None:
            handle.remove()
        del model
        torch.cuda.empty_cache()
    return rec.timeline


@dataclass
class OverheadResult:
    """Median seconds per U-Net call without the recorder, and with it at step and group granularity."""

    config: str
    plain_s: float
    step_s: float
    group_s: float
    repeats: int
    threads: int
    source: str
    warmup: int = 2

    @property
    def step_overhead(self) -> float:
        return self.step_s / self.plain_s - 1

    @property
    def group_overhead(self) -> float:
        return self.group_s / self.plain_s - 1


def overhead(config: str = "mid", warmup: int = 2, repeats: int = 5, threads: int = 2,
             progress: Callable[[str], None] | None = None) -> OverheadResult:
    """Time streamlined U-Net calls of the bench configuration ``config`` (each call one step) without the
    recorder and inside it at step and at group granularity, alternating (in rotated order), after
    warm-up; medians."""
    from .bench.unet import bench_model

    say = progress or (lambda _m: None)
    model, args, kwargs = bench_model(config, threads)
    handle = streamline(model)
    handle.plan_for(*args, **kwargs)
    times: dict[str, list[float]] = {"plain": [], "step": [], "group": []}
    source = ""
    try:
        with torch.no_grad():
            names = list(times)
            for i in range(warmup + repeats):
                for name in names[i % 3:] + names[:i % 3]:  # rotated: no variant always runs first
                    start = time.perf_counter()
                    if name == "plain":
                        model(*args, **kwargs)
                    else:
                        with profile(model, granularity=name) as rec:
                            model(*args, **kwargs)
                        source = rec.timeline.source
                    if i >= warmup:
                        times[name].append(time.perf_counter() - start)
                say(f"{'warm-up' if i < warmup else 'run'} {i + 1}/{warmup + repeats}")
    finally:
        handle.remove()
    med = {k: statistics.median(v) for k, v in times.items()}
    return OverheadResult(config, med["plain"], med["step"], med["group"], repeats, threads, source, warmup)


def format_overhead(r: OverheadResult) -> str:
    """The overhead table (Markdown)."""
    return (
        f"| SVD {r.config}, streamlined (CPU fp32, {r.threads} threads, {r.warmup} warm-ups, median of {r.repeats}) "
        "| seconds per step | "
        "overhead |\n|---|---|---|\n"
        f"| no recorder | {r.plain_s:.3f} | |\n"
        f"| recorder, step granularity ({r.source}) | {r.step_s:.3f} | {r.step_overhead:+.1%} |\n"
        f"| recorder, group granularity ({r.source}) | {r.group_s:.3f} | {r.group_overhead:+.1%} |\n"
    )
