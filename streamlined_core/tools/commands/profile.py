"""``streamline profile``: the memory timeline of a sampling run, as JSON, a chart and a page."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .common import (
    missing_diffusers,
    non_negative,
    positive,
    stdout_to_stderr,
    unwritable,
)


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the command's parser to ``sub`` (the ``streamline`` subparsers)."""
    prof = sub.add_parser(
        "profile",
        help="record the memory timeline of a sampling run (per step and per group) as JSON and a PNG chart",
        description="Sample one held-out clip with the fixture model (25-step SVD sampler loop, shortened by --steps) "
        "under the VRAM profiler's recorder and write its timeline as JSON (schema streamline.timeline/1) and a PNG "
        "chart: memory over time with step markers and the peak named, and each group's peak beside Streamline's "
        "prediction. --compare records the original and the streamlined model in one chart. --overhead instead "
        "prints the recorder's cost per step on the mid-size configuration. On a CPU memory is counted by the "
        "project's tracker, on CUDA by the allocator.",
    )
    prof.add_argument("--model", choices=("fixture", "tiny", "svd"), default="fixture",
                      help="fixture: the shipped trained model (default); tiny: its layout with random weights; "
                      "svd: full-size SVD with random weights in fp16 on a CUDA device (576x1024)")
    prof.add_argument("--weights", default=None, metavar="PATH", help="a fixture safetensors file (default: shipped)")
    mode = prof.add_mutually_exclusive_group()
    mode.add_argument("--streamline", action="store_true", help="record the streamlined model only")
    mode.add_argument("--compare", action="store_true", help="record the original, then the streamlined model")
    mode.add_argument("--overhead", action="store_true",
                      help="print the recorder's overhead per step on the mid-size configuration (no files)")
    prof.add_argument("--granularity", choices=("step", "group"), default="group", help="default: group")
    prof.add_argument("--steps", type=positive, default=6, help="sampling steps (default: 6)")
    prof.add_argument("--frames", type=positive, default=None,
                      help="frames (default: the fixture's 8; 14 for --model svd)")
    prof.add_argument("--json-out", default="timeline.json", metavar="PATH", help="default: timeline.json")
    prof.add_argument("--png", default="timeline.png", metavar="PATH", help="default: timeline.png")
    prof.add_argument("--html", default=None, metavar="PATH",
                      help="also write a self-contained HTML page with the ComfyUI panel's charts of the runs")
    prof.add_argument("--config", choices=("mid", "tiny"), default="mid", help="--overhead: the configuration")
    prof.add_argument("--repeats", type=positive, default=5, help="--overhead: timed calls of each; the median is reported (default: 5)")
    prof.add_argument("--warmup", type=non_negative, default=2, help="--overhead: untimed calls of each first (default: 2)")
    prof.add_argument("--threads", type=positive, default=2, help="torch CPU threads (default: 2)")
    return prof


def run(args: argparse.Namespace) -> int:
    """``streamline profile``: record sampling runs, write the JSON and the chart; or print the overhead."""
    import torch

    if (why := missing_diffusers("profile")) is not None:
        print(why, file=sys.stderr)
        return 2

    from .. import profiling

    torch.set_num_threads(args.threads)
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    if args.overhead:
        with stdout_to_stderr():
            result = profiling.overhead(args.config, warmup=args.warmup, repeats=args.repeats, threads=args.threads,
                                          progress=say)
        print(profiling.format_overhead(result), end="")
        return 0
    from ...fixture import data

    if args.frames is None:
        args.frames = 14 if args.model in profiling.FULL_MODELS else data.DEFAULT_FRAMES
    if not data.MIN_FRAMES <= args.frames <= data.MAX_FRAMES:
        print(f"streamline: --frames {args.frames}: expected {data.MIN_FRAMES} to {data.MAX_FRAMES}", file=sys.stderr)
        return 2
    for option, path in (("--json-out", args.json_out), ("--png", args.png), ("--html", args.html)):
        if path is not None and (why := unwritable(path)) is not None:
            print(f"streamline: {why.replace('--json-out', option)}", file=sys.stderr)
            return 2
    if args.model in profiling.FULL_MODELS and not torch.cuda.is_available():
        print(f"streamline: profile --model {args.model} runs the full-size model with random weights on a CUDA device "
              "and finds none; --model fixture or tiny run on a CPU", file=sys.stderr)
        return 2
    runs = [False, True] if args.compare else [args.streamline]
    timelines = []
    try:
        for streamlined in runs:
            say(f"recording the {'streamlined' if streamlined else 'original'} {args.model} model: {args.steps} steps, "
                f"{args.frames} frames, {args.granularity} granularity")
            if args.model in profiling.FULL_MODELS:
                tl = profiling.full_size_run(streamlined, args.granularity, args.steps, args.frames)
            else:
                tl = profiling.sampling_run(args.model, streamlined, args.granularity, args.steps, args.frames,
                                              args.weights)
            print(f"{tl.label}: {tl.summary()}")
            timelines.append(tl)
    except FileNotFoundError as exc:
        print(f"streamline: --weights {args.weights or '(shipped)'}: {exc}", file=sys.stderr)
        return 2
    from ..charts.profile import plot

    doc = timelines[0].to_json() if len(timelines) == 1 else {"runs": [t.to_json() for t in timelines]}
    with open(args.json_out, "w") as f:
        json.dump(doc, f, indent=2)
    what = {"fixture": "measured on the fixture model", "tiny": "random weights", "svd": "full size, random weights"}
    plot(timelines, args.png, title=f"{args.model} model, {args.frames} frames, {args.steps} steps ({what[args.model]})")
    say(f"wrote {args.json_out} and {args.png}")
    if args.html is not None:
        from ..charts.report import write_html

        try:
            write_html([t.to_json() for t in timelines], args.html, title=f"{args.model} model, {args.frames} frames, "
                       f"{args.steps} steps ({what[args.model]})")
        except (FileNotFoundError, ValueError) as exc:
            print(f"streamline: --html {args.html}: {exc}", file=sys.stderr)
            return 2
        say(f"wrote {args.html}")
    if len(timelines) == 2 and timelines[0].activation_peak_bytes:
        a, b = (t.activation_peak_bytes for t in timelines)
        print(f"saving: {(a - b) / 2**20:.1f} MiB of activations ({1 - b / a:.0%})")
    return 0
