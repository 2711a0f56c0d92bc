"""``streamline bench``: latency, cut costs, the GPU table, the fixture's bar, Step Rehash's comparison, decodes."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

from .common import (
    choices,
    non_negative,
    positive,
    stdout_to_stderr,
    unwritable,
)


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the command's parser to ``sub`` (the ``streamline`` subparsers)."""
    from ..bench.cuda import DEFAULT_DEADLINE_S
    from ..sim.unet import IMPLEMENTATIONS, MODELS

    bench = sub.add_parser(
        "bench",
        help="latency of the streamlined U-Net against the original, what each cut point costs (CPU, mid-size), "
        "and every simulated figure measured on a GPU (--cuda)",
        description="--latency: time original and streamlined U-Net calls side by side (alternating, after warm-up; "
        "medians) with the plan that meets the memory target, and print the ratio with both peaks. --cuts: time "
        "every stage inside full streamlined forwards and print, for each cut point of the up path, the tail's and "
        "the shallow path plus tail's share of a full forward (checked by timing three cuts directly), with FLOP shares. "
        "--cuda: on a CUDA device, run full-size random-weight U-Nets in fp16, original and streamlined with the plan "
        "that meets the memory target, and print a Markdown table of max_memory_allocated minus what was allocated "
        "before, max_memory_reserved, device memory in use and the latency ratio beside the simulator's figures; it "
        "stops by itself at --deadline and lists the rows it did not reach; exit status 1 when a row failed. "
        "--fixture: sample held-out clips with the shipped fixture model (a small SVD-layout model trained on "
        "synthetic clips) and print its quality bar, at guidance 1 and at SVD's guidance rising from 1 to 3: the "
        "one-step denoiser's gain over its initialisation and over the identity's share, sampled frame 0 against the "
        "given frame, whether samples follow their motion tokens (own and swapped headings), the tracked path length, "
        "and MSE and tracked-centroid error against the true clips beside the trivial baselines; exit status 1 when "
        "any line of the bar fails.",
    )
    what = bench.add_mutually_exclusive_group(required=True)
    what.add_argument("--latency", action="store_true", help="measure the latency ratio")
    what.add_argument("--cuts", action="store_true", help="measure what a tail from each up-path cut point costs")
    what.add_argument("--cuda", action="store_true",
                      help="measure memory and latency of the full-size models on the CUDA device, beside the simulator's figures")
    what.add_argument("--fixture", action="store_true", help="measure what the shipped fixture model learned (CPU)")
    what.add_argument("--rehash", action="store_true",
                      help="Step Rehash against DeepCache's setting, whole-step reuse (EasyCache's rule) and pyramid "
                      "attention broadcast on the fixture model: error against full compute and U-Net time per setting")
    what.add_argument("--decode", action="store_true",
                      help="how far the hosts' chunked decodes of SVD's VAE are from decoding the whole clip, beside "
                           "the decode by groups (a tiny seeded decoder, CPU)")
    bench.add_argument(
        "--config", choices=("mid", "tiny", "full"), default=None,
        help="--latency/--cuts: mid (SVD at a quarter width, default) or tiny (a quick check); --cuda: full (default) or tiny",
    )
    bench.add_argument("--warmup", type=non_negative, default=2, help="untimed calls of each before timing (default: 2)")
    bench.add_argument("--repeats", type=positive, default=5, help="timed calls of each; the median is reported (default: 5)")
    bench.add_argument("--threads", type=positive, default=2, help="torch CPU threads of --latency and --cuts (default: 2)")
    bench.add_argument("--markdown", action="store_true", help="print the Markdown table the docs embed (--cuda always does)")
    bench.add_argument(
        "--model", type=choices(tuple(MODELS)), default=None, metavar="NAMES",
        help=f"--cuda: comma-separated models among {', '.join(MODELS)} (default: all)",
    )
    bench.add_argument(
        "--implementation", type=choices(IMPLEMENTATIONS), default=None, metavar="NAMES",
        help="--cuda: comma-separated among diffusers, comfyui (default: both; ComfyUI rows need a ComfyUI checkout)",
    )
    bench.add_argument("--deadline", type=positive, default=None, metavar="SECONDS",
                       help="--cuda: stop after this many seconds; rows not reached are listed as not measured "
                       f"(default: {DEFAULT_DEADLINE_S}, so the run ends within 5 minutes)")
    bench.add_argument("--json-out", default=None, metavar="PATH",
                       help="--cuda, --fixture: also write every figure as JSON to PATH")
    bench.add_argument("--clips", type=positive, default=None,
                       help="--fixture: held-out clips to sample (default: 16; 25 steps of 16 clips take minutes)")
    bench.add_argument("--steps", type=positive, default=None, help="--fixture: sampling steps (default: 25)")
    bench.add_argument("--frames", type=positive, default=None,
                       help="--fixture: frames per clip (default: 8, what the fixture was trained on)")
    bench.add_argument("--weights", default=None, metavar="PATH",
                       help="--fixture: a fixture safetensors file (default: the one the package ships)")
    bench.add_argument("--grid", default=None, metavar="PNG", help="--fixture: also write a PNG of true and sampled clips; "
                       "--decode: a PNG of each decode's difference from the whole decode")
    bench.add_argument("--json", action="store_true", help="--rehash: print one JSON object per setting instead of the table")
    bench.add_argument("--plot", default=None, metavar="PNG", help="--rehash: also draw error against U-Net time")
    bench.add_argument("--quick", action="store_true",
                       help="--rehash: a few settings and no end-to-end timing (a check that it runs, not a measurement)")
    bench.add_argument("--comfyui", nargs="?", const="", default=None, metavar="PATH",
                       help="--rehash: also compare inside ComfyUI, through its own nodes: ComfyUI's EasyCache node and "
                            "the Step Rehash Sampler on the fixture model (the demo model). PATH: a ComfyUI checkout "
                            "(default: $COMFYUI_PATH, the ComfyUI this pack is installed in, or ~/comfy/ComfyUI)")
    bench.add_argument("--comfyui-only", action="store_true",
                       help="--rehash: only the comparison inside ComfyUI (implies --comfyui)")
    return bench


def run(args: argparse.Namespace) -> int:
    """``streamline bench``: one of its modes."""
    check(args)
    if (not args.cuda or "diffusers" in (args.implementation or ())) and importlib.util.find_spec("diffusers") is None:
        print("streamline: this needs diffusers: pip install 'comfyui-streamline[diffusers]' (or, from a clone, "
              "pip install '.[diffusers]'); ComfyUI rows alone: --implementation comfyui", file=sys.stderr)
        return 2
    if args.cuda:
        return _cuda(args)
    if args.fixture:
        return _fixture(args)
    if args.rehash:
        return _rehash(args)
    if args.decode:
        return _decode(args)
    from ..bench.unet import cuts, format_cuts, format_latency, latency

    measure, show = (cuts, format_cuts) if args.cuts else (latency, format_latency)
    with stdout_to_stderr():
        result = measure(
            args.config, warmup=args.warmup, repeats=args.repeats, threads=args.threads,
            progress=lambda msg: print(msg, file=sys.stderr, flush=True),
        )
    print(show(result, markdown=args.markdown), end="")
    return 0


def check(args: argparse.Namespace) -> None:
    """Bench options that belong to one mode only, and the default --config of each mode."""
    parser = args.parser
    if not args.rehash:
        for option, value in (("--json", args.json), ("--plot", args.plot), ("--quick", args.quick),
                              ("--comfyui", args.comfyui is not None), ("--comfyui-only", args.comfyui_only)):
            if value:
                parser.error(f"argument {option}: only with --rehash")
    if args.decode:
        for option, value in (("--config", args.config), ("--model", args.model), ("--implementation", args.implementation),
                              ("--deadline", args.deadline), ("--clips", args.clips), ("--steps", args.steps),
                              ("--frames", args.frames), ("--weights", args.weights)):
            if value is not None:
                parser.error(f"argument {option}: not with --decode")
        return
    if args.rehash:
        for option, value in (("--model", args.model), ("--implementation", args.implementation),
                              ("--deadline", args.deadline), ("--grid", args.grid), ("--json-out", args.json_out)):
            if value is not None:
                parser.error(f"argument {option}: not with --rehash")
        if args.config == "full":
            parser.error("argument --config: --rehash times the cuts on mid (default) or tiny")
        if args.comfyui_only and args.plot is not None:
            parser.error("argument --plot: the plot draws the diffusers comparison; not with --comfyui-only")
        args.config = args.config or "mid"
        from ...fixture import data

        if args.frames is not None and not data.MIN_FRAMES <= args.frames <= data.MAX_FRAMES:
            parser.error(f"argument --frames: {args.frames}: expected {data.MIN_FRAMES} to {data.MAX_FRAMES}")
        return
    fixture_only = (("--clips", args.clips), ("--steps", args.steps), ("--frames", args.frames),
                    ("--weights", args.weights), ("--grid", args.grid))
    if args.fixture:
        for option, value in (("--config", args.config), ("--model", args.model),
                              ("--implementation", args.implementation), ("--deadline", args.deadline)):
            if value is not None:
                parser.error(f"argument {option}: not with --fixture")
        from ...fixture import data

        if args.frames is not None and not data.MIN_FRAMES <= args.frames <= data.MAX_FRAMES:
            parser.error(f"argument --frames: {args.frames}: expected {data.MIN_FRAMES} to {data.MAX_FRAMES}")
        return
    for option, value in fixture_only:
        if value is not None:
            parser.error(f"argument {option}: only with --fixture")
    if args.cuda:
        from ..sim.unet import IMPLEMENTATIONS, MODELS

        if args.config == "mid":
            parser.error("argument --config: mid is for --latency and --cuts; --cuda takes full (default) or tiny")
        args.config = args.config or "full"
        args.model = args.model or list(MODELS)
        args.implementation = args.implementation or list(IMPLEMENTATIONS)
        return
    mode = "--latency" if args.latency else "--cuts"
    if args.json_out is not None:
        parser.error("argument --json-out: only with --cuda or --fixture")
    if args.config == "full":
        parser.error(f"argument --config: full is for --cuda; {mode} takes mid (default) or tiny")
    args.config = args.config or "mid"
    for option, value in (("--model", args.model), ("--implementation", args.implementation),
                          ("--deadline", args.deadline)):
        if value is not None:
            parser.error(f"argument {option}: only with --cuda")


def _cuda(args: argparse.Namespace) -> int:
    """``streamline bench --cuda``: refuse without a CUDA device, else measure, print the table, write JSON."""
    from ..bench import cuda as cuda_bench

    try:
        probe = cuda_bench.cuda_probe()
    except cuda_bench.NoCudaDevice as exc:
        print(f"streamline: bench --cuda measures on a CUDA device and finds none: {exc}. `streamline simulate` "
              f"prints the simulated figures on any machine", file=sys.stderr)
        return 2
    if args.json_out is not None and (why := unwritable(args.json_out)) is not None:
        print(f"streamline: {why}", file=sys.stderr)
        return 2
    deadline = args.deadline if args.deadline is not None else cuda_bench.DEFAULT_DEADLINE_S
    with stdout_to_stderr():  # whatever ComfyUI prints while loaded and run
        result = cuda_bench.measure(
            probe, args.config, models=args.model, implementations_wanted=args.implementation, warmup=args.warmup,
            repeats=args.repeats, deadline_s=deadline, progress=lambda msg: print(msg, file=sys.stderr, flush=True),
        )
    print(cuda_bench.format_markdown(result), end="", flush=True)  # first: the table outlives a failed write
    if args.json_out is not None:
        try:
            with open(args.json_out, "w") as f:
                json.dump(result.as_dict(), f, indent=2)
        except OSError as exc:
            print(f"streamline: --json-out {args.json_out}: {exc}", file=sys.stderr)
            return 1
        print(f"wrote {args.json_out}", file=sys.stderr)
    return 1 if any(r.status == "error" for r in result.rows) else 0


def _decode(args: argparse.Namespace) -> int:
    """``streamline bench --decode``: the hosts' chunked decodes against the whole decode, and ours."""
    from ..bench.decode import decode_errors, format_markdown, plot

    for option, path in (("--json-out", args.json_out), ("--grid", args.grid)):
        if path is not None and (why := unwritable(path)) is not None:
            print(f"streamline: {why.replace('--json-out', option)}", file=sys.stderr)
            return 2
    rows, clips = decode_errors(progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(format_markdown(rows), end="")
    if args.grid is not None:
        plot(clips, args.grid)
        print(f"wrote {args.grid}", file=sys.stderr)
    if args.json_out is not None:
        with open(args.json_out, "w") as f:
            json.dump([r.as_dict() for r in rows], f, indent=2)
        print(f"wrote {args.json_out}", file=sys.stderr)
    return 0


def _fixture(args: argparse.Namespace) -> int:
    """``streamline bench --fixture``: sample held-out clips, print the quality bar, write JSON and a grid."""
    import torch

    from ...fixture import data, quality
    from ...fixture.model import load_unet

    for option, path in (("--json-out", args.json_out), ("--grid", args.grid)):
        if path is not None and (why := unwritable(path)) is not None:
            print(f"streamline: {why.replace('--json-out', option)}", file=sys.stderr)
            return 2
    torch.set_num_threads(args.threads)
    try:
        model = load_unet(args.weights)
    except (FileNotFoundError, OSError, RuntimeError) as exc:
        print(f"streamline: --weights {args.weights or '(shipped)'}: {exc}", file=sys.stderr)
        return 2
    clips = args.clips or quality.DEFAULT_CLIPS
    steps = args.steps or 25
    frames = args.frames or data.DEFAULT_FRAMES
    print(f"sampling {clips} held-out clips of {frames} frames, {steps} steps, on {args.threads} CPU threads",
          file=sys.stderr, flush=True)
    report, true, got = quality.evaluate(model, clips=clips, frames=frames, steps=steps,
                                         progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    report.weights = args.weights or "shipped"
    print(quality.format_report(report), flush=True)
    if args.grid is not None:
        print(f"wrote {quality.save_grid(true, got, args.grid)}", file=sys.stderr)
    if args.json_out is not None:
        with open(args.json_out, "w") as f:
            json.dump(report.to_json(), f, indent=2)
        print(f"wrote {args.json_out}", file=sys.stderr)
    return 0 if report.passed else 1


def _rehash(args: argparse.Namespace) -> int:
    """``streamline bench --rehash``: the step-cache comparison on the fixture model (and inside ComfyUI)."""
    from ..bench.rehash import bench_rehash, format_markdown, plot

    if args.plot is not None and (why := unwritable(args.plot)) is not None:
        print(f"streamline: {why.replace('--json-out', '--plot')}", file=sys.stderr)
        return 2
    if args.weights is not None and not os.path.isfile(args.weights):
        print(f"streamline: --weights {args.weights}: no such file", file=sys.stderr)
        return 2
    comfyui = None
    if args.comfyui is not None or args.comfyui_only:
        from ...host.comfyui import find_comfyui, is_comfyui

        if args.comfyui:
            comfyui = Path(args.comfyui).expanduser().resolve()
            if not is_comfyui(comfyui):
                print(f"streamline: --comfyui {args.comfyui}: not a ComfyUI checkout (no comfy/model_patcher.py and "
                      "main.py there)", file=sys.stderr)
                return 2
        else:
            comfyui, why = find_comfyui()
            if comfyui is None:
                print(f"streamline: --comfyui: {why}; give the checkout's path", file=sys.stderr)
                return 2
        from ..bench.rehash_comfyui import prepare

        try:
            with stdout_to_stderr():
                prepare(comfyui)  # before the long diffusers run: ComfyUI imports and loads the pack's nodes
        except ImportError as exc:
            print(f"streamline: --comfyui {comfyui}: could not import ComfyUI or load this pack's nodes into it "
                  f"({type(exc).__name__}: {exc}); ComfyUI's requirements.txt must be installed in this Python",
                  file=sys.stderr)
            return 2
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    clips = args.clips or 4
    steps = args.steps or 25
    result = host = None
    with stdout_to_stderr():
        if not args.comfyui_only:
            result = bench_rehash(args.weights, clips=clips, calibration_clips=min(clips, 4) if args.quick else 4,
                                  steps=steps, frames=args.frames, threads=args.threads, cuts_config=args.config,
                                  quick=args.quick, end_to_end=not args.quick, progress=say)
        if comfyui is not None:
            from ..bench.rehash import EASYCACHE_THRESHOLDS
            from ..bench.rehash_comfyui import bench_rehash_comfyui

            try:
                host = bench_rehash_comfyui(comfyui, clips=clips, steps=steps, frames=args.frames,
                                            threads=args.threads, shares=result.shares if result else None,
                                            shares_from=result.shares_from if result else None,
                                            cuts_config=args.config,
                                            thresholds=(0.2,) if args.quick else EASYCACHE_THRESHOLDS,
                                            weights=args.weights, quick=args.quick, progress=say)
            except Exception:  # noqa: BLE001 - the diffusers comparison above is still printed
                if result is None:
                    raise
                import traceback

                traceback.print_exc()
                print("streamline: the comparison inside ComfyUI stopped (above); the diffusers comparison follows",
                      file=sys.stderr)
    if args.json:
        rows = (result.rows if result else []) + (host.rows if host else [])
        print(json.dumps([r.as_dict() for r in rows], indent=2))
    else:
        if result is not None:
            print(format_markdown(result), end="")
        if host is not None:
            from ..bench.rehash_comfyui import format_markdown as format_host

            print(("\n" if result is not None else "") + "Inside ComfyUI:\n\n" + format_host(host), end="")
    if args.plot is not None:
        print(f"wrote {plot(result, args.plot)}", file=sys.stderr)
    return 0 if comfyui is None or host is not None else 1
