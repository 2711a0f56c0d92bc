"""``streamline calibrate``: Step Rehash's step-similarity maps and key steps."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any

from .common import (
    missing_diffusers,
    positive,
    resolution,
    stdout_to_stderr,
    unwritable,
)


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the command's parser to ``sub`` (the ``streamline`` subparsers)."""
    cal = sub.add_parser(
        "calibrate",
        help="measure Step Rehash's step-similarity maps (the fixture model, or a local SVD or AnimateDiff pipeline) "
        "and save key steps",
        description="Sample calibration clips (a seed range disjoint from training and evaluation) with the fixture "
        "model at full compute, or, with --pipeline, run a local diffusers SVD pipeline on --image or AnimateDiff "
        "pipeline on --prompt at full compute, "
        "measure at each cut point of the last up block the cosine similarity of every "
        "step's feature to every other step's (fixed random positions per sample and guidance branch), and save "
        "the maps (safetensors) and the key steps of the paper's Algorithm 1 (JSON), with what they were made for: "
        "the model's fingerprint, steps, sampler, scheduler and denoise; rehash(pipe, RehashConfig(schedule=...)) "
        "loads them. Figures measured on the fixture model are not properties of SVD.",
    )
    cal.add_argument("--weights", default=None, metavar="PATH", help="a fixture safetensors file (default: shipped)")
    cal.add_argument("--pipeline", default=None, metavar="DIR",
                     help="calibrate a diffusers pipeline saved in a local folder instead of the fixture model: a "
                          "StableVideoDiffusionPipeline (SVD, SVD-XT, a fine-tune; needs --image) or an "
                          "AnimateDiffPipeline (needs --prompt). Its runs use the pipeline's own scheduler and "
                          "guidance, noise from seeds 0 to --clips - 1")
    cal.add_argument("--image", action="append", default=None, metavar="PATH",
                     help="--pipeline (SVD): a conditioning image (repeat for more; the runs take them in turn)")
    cal.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                     help="--pipeline (AnimateDiff): a calibration prompt (repeat for more; the runs take them in turn)")
    cal.add_argument("--resolution", type=resolution, default=None, metavar="HxW",
                     help="--pipeline: pixels, multiples of 8 (default: 576x1024 SVD, 512x512 AnimateDiff)")
    cal.add_argument("--device", default=None,
                     help="--pipeline: torch device (default: cuda when available, else cpu)")
    cal.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default=None,
                     help="--pipeline: weight dtype (default: fp16 on CUDA, fp32 on the CPU)")
    cal.add_argument("--clips", type=positive, default=4, help="calibration clips (default: 4)")
    cal.add_argument("--steps", type=positive, default=25, help="sampling steps (default: 25)")
    cal.add_argument("--frames", type=positive, default=None,
                     help="frames (default: the fixture's 8; with --pipeline, SVD's num_frames or AnimateDiff's 16)")
    cal.add_argument("--cut", default=None, help="the cut whose key steps are saved (default: Step Rehash's)")
    keys = cal.add_mutually_exclusive_group()
    keys.add_argument("--count", type=positive, default=None,
                      help="key steps wanted: the closest count reachable, never more (default: 13 of 25, scaled)")
    keys.add_argument("--gamma", type=float, default=None, help="similarity threshold of Algorithm 1 instead of --count")
    cal.add_argument("--positions", type=positive, default=4096,
                     help="feature positions compared per sample and branch (default: 4096)")
    cal.add_argument("--out", default="rehash-schedule", metavar="PREFIX",
                     help="writes PREFIX.json (key steps) and PREFIX.safetensors (maps); default: rehash-schedule")
    cal.add_argument("--png", default=None, metavar="PATH", help="also draw the maps with the key steps marked")
    cal.add_argument("--threads", type=positive, default=2, help="torch CPU threads (default: 2)")
    return cal


def run(args: argparse.Namespace) -> int:
    """``streamline calibrate``: similarity maps and key steps on the fixture model."""
    import torch

    if (why := missing_diffusers("calibrate")) is not None:
        print(why, file=sys.stderr)
        return 2

    from ...features.rehash import DEFAULT_CUT, LAST_UP_BLOCK
    from ...fixture import data
    from ...fixture import model as fixture
    from ...fixture.calibration import calibrate_fixture

    for option, path in (("--out", args.out + ".json"), ("--png", args.png)):
        if path is not None and (why := unwritable(path)) is not None:
            print(f"streamline: {why.replace('--json-out', option)}", file=sys.stderr)
            return 2
    cut = args.cut or DEFAULT_CUT
    if cut not in LAST_UP_BLOCK:
        print(f"streamline: --cut {cut}: calibration measures the last up block's cuts: {', '.join(LAST_UP_BLOCK)}",
              file=sys.stderr)
        return 2
    if args.count is not None and not min(2, args.steps) <= args.count <= args.steps:
        print(f"streamline: --count {args.count}: from {min(2, args.steps)} (the first and the last step) to --steps "
              f"({args.steps}) key steps", file=sys.stderr)
        return 2
    if args.gamma is not None and not math.isfinite(args.gamma):
        print(f"streamline: --gamma {args.gamma}: expected a similarity threshold (a finite number, usually 0 to 1)",
              file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    if args.pipeline is not None:
        return _calibrate_pipeline(args, cut)
    for option, value in (("--image", args.image), ("--prompt", args.prompt), ("--resolution", args.resolution),
                          ("--device", args.device), ("--dtype", args.dtype)):
        if value is not None:
            print(f"streamline: {option}: only with --pipeline (the fixture model's clips bring their own)",
                  file=sys.stderr)
            return 2
    try:
        unet = fixture.load_unet(args.weights)
    except (FileNotFoundError, OSError, RuntimeError) as exc:
        print(f"streamline: --weights {args.weights or '(shipped)'}: {exc}", file=sys.stderr)
        return 2
    frames = args.frames or data.DEFAULT_FRAMES
    try:
        result = calibrate_fixture(unet, args.clips, args.steps, frames, args.positions,
                                   progress=lambda msg: print(msg, file=sys.stderr, flush=True))
        json_path, maps_path = result.save(args.out + ".json", cut, args.gamma, args.count)
    except (ValueError, MemoryError) as exc:
        print(f"streamline: {exc}", file=sys.stderr)
        return 2
    return _report_calibration(args, result, frames, json_path, maps_path)


def _report_calibration(args: argparse.Namespace, result: Any, frames: int, json_path: Any, maps_path: Any,
                        **where: str) -> int:
    """``streamline calibrate``'s output: the table on stdout, the files written (and the maps drawn)."""
    from ...features.rehash import format_calibration

    print(format_calibration(result, args.clips, frames, args.gamma, args.count, **where), end="", flush=True)
    print(f"wrote {json_path} and {maps_path}", file=sys.stderr)
    if args.png is not None:
        from ..charts.rehash import draw_maps

        print(f"wrote {draw_maps(result, args.png, args.gamma, args.count)}", file=sys.stderr)
    return 0


PIPELINES = {  # what calibrate --pipeline runs: its input option, the default pixels and frames
    "StableVideoDiffusionPipeline": ("--image", (576, 1024), None),  # the pipeline's defaults
    "AnimateDiffPipeline": ("--prompt", None, 16),  # pixels: the U-Net's sample size, as the pipeline's default
}


def _calibrate_pipeline(args: argparse.Namespace, cut: str) -> int:
    """``streamline calibrate --pipeline DIR``: similarity maps and key steps of a local SVD or AnimateDiff
    pipeline."""
    import torch

    from ...features.rehash import calibrate, describe_scheduler

    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    def fail(message: str) -> int:
        print(f"streamline: {message}", file=sys.stderr)
        return 2

    if args.weights is not None:
        return fail("--weights: a fixture file; not with --pipeline")
    index = os.path.join(args.pipeline, "model_index.json")
    try:
        with open(index) as f:
            kind = json.load(f).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return fail(f"--pipeline {args.pipeline}: not a diffusers pipeline folder (expected one saved with "
                    "save_pretrained, with its model_index.json)")
    if not isinstance(kind, str) or kind not in PIPELINES:
        return fail(f"--pipeline {args.pipeline}: a {kind!r} pipeline; the command calibrates StableVideoDiffusionPipeline "
                    "(with --image) and AnimateDiffPipeline (with --prompt) folders. For other pipelines, call "
                    "streamlined_core.calibrate(pipe, run) with a run that samples one calibration input")
    option, default_resolution, default_frames = PIPELINES[kind]
    other = "--prompt" if option == "--image" else "--image"
    if getattr(args, other.lstrip("-")):
        return fail(f"{other}: not for this {kind} (it takes {option})")
    given = getattr(args, option.lstrip("-"))
    if not given:
        what = "the picture SVD animates" if option == "--image" else "a calibration prompt"
        return fail(f"--pipeline: this {kind} needs {option} ({what}; repeat {option} for more)")
    if option == "--image":
        missing = [p for p in given if not os.path.isfile(p)]
        if missing:
            return fail(f"--image {missing[0]}: no such file")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as exc:
        return fail(f"--device {args.device}: {exc}")
    if device.type == "cuda" and not torch.cuda.is_available():
        return fail(f"--device {args.device}: no CUDA device here; --device cpu runs on the CPU (slowly)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        return fail(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                    f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[
        args.dtype or ("fp16" if device.type == "cuda" else "fp32")]
    if len(given) > args.clips:
        say(f"note: {len(given)} {option} values and --clips {args.clips}: the runs use the first {args.clips}")
    from diffusers import DiffusionPipeline
    from diffusers.utils import load_image

    inputs = list(given)
    if option == "--image":
        for k, path in enumerate(given):
            try:
                inputs[k] = load_image(path)
            except Exception as exc:  # noqa: BLE001 - PIL raises several kinds for a file that is not an image
                return fail(f"--image {path}: not an image ({type(exc).__name__}: {exc})")
    say(f"loading {args.pipeline} ({kind}, {str(dtype).removeprefix('torch.')}, {device})")
    with stdout_to_stderr():
        try:
            pipe = DiffusionPipeline.from_pretrained(args.pipeline, dtype=dtype, local_files_only=True)
        except (OSError, ValueError, TypeError, ImportError, AttributeError) as exc:
            return fail(f"--pipeline {args.pipeline}: could not load a diffusers pipeline ({type(exc).__name__}: {exc})")
    try:
        pipe.to(device)
    except (RuntimeError, AssertionError) as exc:  # a device this torch lacks; out of memory
        hint = "; --dtype fp16 takes half the memory" if "out of memory" in str(exc) and dtype != torch.float16 else ""
        return fail(f"--device {device}: the pipeline could not be moved there ({type(exc).__name__}: {exc}){hint}")
    pipe.set_progress_bar_config(disable=True)
    frames = args.frames or default_frames or pipe.unet.config.num_frames
    longest = getattr(pipe.unet.config, "motion_max_seq_length", None)
    if longest is not None and frames > longest:
        return fail(f"--frames {frames}: this pipeline's motion modules take at most {longest} frames")
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    height, width = args.resolution or default_resolution or (side, side)
    what = "image" if option == "--image" else "prompt"

    def run(i: int) -> None:
        say(f"calibration run {i + 1}/{args.clips}: {what} {(i % len(inputs)) + 1}, seed {i}")
        pipe(inputs[i % len(inputs)], height=height, width=width, num_frames=frames, num_inference_steps=args.steps,
             generator=torch.Generator().manual_seed(i), output_type="latent")

    try:
        result = calibrate(pipe, run, runs=args.clips, positions=args.positions)
        json_path, maps_path = result.save(args.out + ".json", cut, args.gamma, args.count)
    except (ValueError, RuntimeError, MemoryError, OSError) as exc:  # torch's out-of-memory error is a RuntimeError
        return fail(f"the calibration stopped: {type(exc).__name__}: {exc}")
    on = f"the pipeline in {args.pipeline} ({height}x{width}, {', '.join(describe_scheduler(pipe.scheduler))})"
    return _report_calibration(args, result, frames, json_path, maps_path, on=on, runs="calibration runs")
