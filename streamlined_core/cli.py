"""The ``streamline`` command."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence


def _resolution(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH in pixels, e.g. 576x1024, got {text!r}") from None
    if h <= 0 or w <= 0 or h % 8 or w % 8:
        raise argparse.ArgumentTypeError(
            f"height and width must be positive multiples of 8 (the VAE's factor), got {text!r}"
        )
    return h, w


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return n


def _non_negative(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}")
    return n


def _choices(accepted: Sequence[str]):
    def parse(text: str) -> list[str]:
        names = [t.strip().lower() for t in text.split(",") if t.strip()]
        bad = [n for n in names if n not in accepted]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(bad) or 'empty list'}: accepted values are {', '.join(accepted)}")
        return names

    return parse


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send everything written to stdout inside to stderr: ``print``, logging handlers bound to
    ``sys.stdout`` (AnimateDiff-Evolved's, when ComfyUI loads it) and writes to file descriptor 1
    (C extensions, child processes), so the command's stdout holds only its document."""
    stdout = sys.stdout
    stdout.flush()
    handlers = [(h, h.stream) for h in _stream_handlers() if h.stream is stdout or h.stream is sys.__stdout__]
    for h, _ in handlers:
        h.setStream(sys.stderr)
    saved = None
    try:
        saved = os.dup(1)
        os.dup2(2, 1)
    except OSError:  # no descriptor 1 or 2 (an embedding host): Python-level redirection only
        if saved is not None:
            os.close(saved)
            saved = None
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        for stream in (sys.__stdout__, stdout):  # bytes buffered for descriptor 1 belong to stderr
            with contextlib.suppress(Exception):
                stream.flush()
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)
        for h, stream in handlers:
            if h.stream is sys.stderr:  # unless someone else rebound it meanwhile
                h.setStream(stream)


def _stream_handlers() -> list[logging.StreamHandler]:
    loggers = [logging.getLogger()]
    loggers += [lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    return [h for lg in loggers for h in lg.handlers if isinstance(h, logging.StreamHandler)]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``streamline``."""
    from .cuda_bench import DEFAULT_DEADLINE_S
    from .simulate import IMPLEMENTATIONS, MODELS

    parser = argparse.ArgumentParser(
        prog="streamline", description="Memory-efficient inference for video diffusion U-Nets: measure and simulate."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser(
        "simulate",
        help="activation memory of full-size models, simulated on the meta device (no weights, no GPU)",
        description="Build the full-size models on the meta device in fp16 and measure one U-Net call "
        "of each workload: weights, activation peak and skip floor, with the field's built-in options.",
    )
    sim.add_argument(
        "--model", type=_choices(tuple(MODELS)), default=list(MODELS), metavar="NAMES",
        help=f"comma-separated models among {', '.join(MODELS)} (default: all)",
    )
    sim.add_argument(
        "--implementation", type=_choices(IMPLEMENTATIONS), default=list(IMPLEMENTATIONS), metavar="NAMES",
        help="comma-separated among diffusers, comfyui (default: both; ComfyUI rows need a ComfyUI checkout)",
    )
    sim.add_argument(
        "--resolution", type=_resolution, nargs="+", default=None, metavar="HxW",
        help="pixel resolutions, multiples of 8 (default: 512x512 576x1024)",
    )
    sim.add_argument("--frames", type=_positive, default=None, help="frames per video (default: 14 SVD, 25 SVD-XT, 16 AnimateDiff)")
    sim.add_argument("--batch", type=_positive, default=2, help="videos per U-Net call; 2 is classifier-free guidance (default: 2)")
    mode = sim.add_mutually_exclusive_group()
    mode.add_argument("--decode", action="store_true",
                      help="instead: SVD's VAE decode (SVD 14 frames, SVD-XT 25), the stock decoder against the decoder "
                           "run by groups (default resolution: 576x1024)")
    mode.add_argument("--pipeline", action="store_true",
                      help="instead: every stage of each model's workflow (encoders, U-Net with guidance, VAE decode), "
                           "original and streamlined, the pipeline's peak beside the paper's and the smallest card it "
                           "should fit (default resolution: 576x1024; --model chooses the workflows)")
    sim.set_defaults(parser=sim)  # errors about simulate's options show simulate's usage
    out = sim.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print a JSON list, one object per row")
    out.add_argument("--markdown", action="store_true", help="print the Markdown table the README embeds")

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
        help="--latency/--cuts: mid (CONFIGS.md, default) or tiny (a quick check); --cuda: full (default) or tiny",
    )
    bench.add_argument("--warmup", type=_non_negative, default=2, help="untimed calls of each before timing (default: 2)")
    bench.add_argument("--repeats", type=_positive, default=5, help="timed calls of each; the median is reported (default: 5)")
    bench.add_argument("--threads", type=_positive, default=2, help="torch CPU threads of --latency and --cuts (default: 2)")
    bench.add_argument("--markdown", action="store_true", help="print the Markdown table the README embeds (--cuda always does)")
    bench.add_argument(
        "--model", type=_choices(tuple(MODELS)), default=None, metavar="NAMES",
        help=f"--cuda: comma-separated models among {', '.join(MODELS)} (default: all)",
    )
    bench.add_argument(
        "--implementation", type=_choices(IMPLEMENTATIONS), default=None, metavar="NAMES",
        help="--cuda: comma-separated among diffusers, comfyui (default: both; ComfyUI rows need a ComfyUI checkout)",
    )
    bench.add_argument("--deadline", type=_positive, default=None, metavar="SECONDS",
                       help="--cuda: stop after this many seconds; rows not reached are listed as not measured "
                       f"(default: {DEFAULT_DEADLINE_S}, so the run ends within 5 minutes)")
    bench.add_argument("--json-out", default=None, metavar="PATH",
                       help="--cuda, --fixture: also write every figure as JSON to PATH")
    bench.add_argument("--clips", type=_positive, default=None,
                       help="--fixture: held-out clips to sample (default: 16; 25 steps of 16 clips take minutes)")
    bench.add_argument("--steps", type=_positive, default=None, help="--fixture: sampling steps (default: 25)")
    bench.add_argument("--frames", type=_positive, default=None, help="--fixture: frames per clip (default: 8, what the fixture was trained on)")
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
    bench.set_defaults(parser=bench)  # errors about bench's options show bench's usage

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
    prof.add_argument("--steps", type=_positive, default=6, help="sampling steps (default: 6)")
    prof.add_argument("--frames", type=_positive, default=None,
                      help="frames (default: the fixture's 8; 14 for --model svd)")
    prof.add_argument("--json-out", default="timeline.json", metavar="PATH", help="default: timeline.json")
    prof.add_argument("--png", default="timeline.png", metavar="PATH", help="default: timeline.png")
    prof.add_argument("--html", default=None, metavar="PATH",
                      help="also write a self-contained HTML page with the ComfyUI panel's charts of the runs")
    prof.add_argument("--config", choices=("mid", "tiny"), default="mid", help="--overhead: the configuration")
    prof.add_argument("--repeats", type=_positive, default=5, help="--overhead: timed calls of each; the median is reported (default: 5)")
    prof.add_argument("--warmup", type=_non_negative, default=2, help="--overhead: untimed calls of each first (default: 2)")
    prof.add_argument("--threads", type=_positive, default=2, help="torch CPU threads (default: 2)")

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
    cal.add_argument("--resolution", type=_resolution, default=None, metavar="HxW",
                     help="--pipeline: pixels, multiples of 8 (default: 576x1024 SVD, 512x512 AnimateDiff)")
    cal.add_argument("--device", default=None,
                     help="--pipeline: torch device (default: cuda when available, else cpu)")
    cal.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default=None,
                     help="--pipeline: weight dtype (default: fp16 on CUDA, fp32 on the CPU)")
    cal.add_argument("--clips", type=_positive, default=4, help="calibration clips (default: 4)")
    cal.add_argument("--steps", type=_positive, default=25, help="sampling steps (default: 25)")
    cal.add_argument("--frames", type=_positive, default=None,
                     help="frames (default: the fixture's 8; with --pipeline, SVD's num_frames or AnimateDiff's 16)")
    cal.add_argument("--cut", default=None, help="the cut whose key steps are saved (default: Step Rehash's)")
    keys = cal.add_mutually_exclusive_group()
    keys.add_argument("--count", type=_positive, default=None,
                      help="key steps wanted: the closest count reachable, never more (default: 13 of 25, scaled)")
    keys.add_argument("--gamma", type=float, default=None, help="similarity threshold of Algorithm 1 instead of --count")
    cal.add_argument("--positions", type=_positive, default=4096,
                     help="feature positions compared per sample and branch (default: 4096)")
    cal.add_argument("--out", default="rehash-schedule", metavar="PREFIX",
                     help="writes PREFIX.json (key steps) and PREFIX.safetensors (maps); default: rehash-schedule")
    cal.add_argument("--png", default=None, metavar="PATH", help="also draw the maps with the key steps marked")
    cal.add_argument("--threads", type=_positive, default=2, help="torch CPU threads (default: 2)")
    return parser


def _calibrate(args: argparse.Namespace) -> int:
    """``streamline calibrate``: similarity maps and key steps on the fixture model."""
    import torch

    from .fixture import data
    from .fixture import model as fixture
    from .fixture.calibration import calibrate_fixture
    from .rehash import DEFAULT_CUT, LAST_UP_BLOCK

    for option, path in (("--out", args.out + ".json"), ("--png", args.png)):
        if path is not None and (why := _check_json_out(path)) is not None:
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
    from .rehash import format_calibration

    print(format_calibration(result, args.clips, frames, args.gamma, args.count, **where), end="", flush=True)
    print(f"wrote {json_path} and {maps_path}", file=sys.stderr)
    if args.png is not None:
        from .rehash_chart import draw_maps

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

    from .rehash import calibrate, describe_scheduler

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
    with _stdout_to_stderr():
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


def _check_bench(args: argparse.Namespace) -> None:
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
        from .fixture import data

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
        from .fixture import data

        if args.frames is not None and not data.MIN_FRAMES <= args.frames <= data.MAX_FRAMES:
            parser.error(f"argument --frames: {args.frames}: expected {data.MIN_FRAMES} to {data.MAX_FRAMES}")
        return
    for option, value in fixture_only:
        if value is not None:
            parser.error(f"argument {option}: only with --fixture")
    if args.cuda:
        from .simulate import IMPLEMENTATIONS, MODELS

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


def _check_json_out(path: str) -> str | None:
    """Why ``--json-out PATH`` could not be written, before the device time is spent; None if it can."""
    target = os.path.abspath(path)
    folder = os.path.dirname(target)
    if os.path.isdir(target):
        return f"--json-out {path}: is a directory; give a file path"
    if not os.path.isdir(folder):
        return f"--json-out {path}: directory {folder} does not exist"
    if not os.access(folder, os.W_OK) or (os.path.exists(target) and not os.access(target, os.W_OK)):
        return f"--json-out {path}: not writable"
    return None


def _bench_cuda(args: argparse.Namespace) -> int:
    """``streamline bench --cuda``: refuse without a CUDA device, else measure, print the table, write JSON."""
    from . import cuda_bench

    try:
        probe = cuda_bench.cuda_probe()
    except cuda_bench.NoCudaDevice as exc:
        print(f"streamline: bench --cuda measures on a CUDA device and finds none: {exc}. `streamline simulate` "
              f"prints the simulated figures on any machine", file=sys.stderr)
        return 2
    if args.json_out is not None and (why := _check_json_out(args.json_out)) is not None:
        print(f"streamline: {why}", file=sys.stderr)
        return 2
    deadline = args.deadline if args.deadline is not None else cuda_bench.DEFAULT_DEADLINE_S
    with _stdout_to_stderr():  # whatever ComfyUI prints while loaded and run
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


def _bench_decode(args: argparse.Namespace) -> int:
    """``streamline bench --decode``: the hosts' chunked decodes against the whole decode, and ours."""
    from .decode_bench import decode_errors, format_markdown, plot

    for option, path in (("--json-out", args.json_out), ("--grid", args.grid)):
        if path is not None and (why := _check_json_out(path)) is not None:
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


def _bench_fixture(args: argparse.Namespace) -> int:
    """``streamline bench --fixture``: sample held-out clips, print the quality bar, write JSON and a grid."""
    import torch

    from .fixture import data, quality
    from .fixture.model import load_unet

    for option, path in (("--json-out", args.json_out), ("--grid", args.grid)):
        if path is not None and (why := _check_json_out(path)) is not None:
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


def _bench_rehash(args: argparse.Namespace) -> int:
    """``streamline bench --rehash``: the step-cache comparison on the fixture model (and inside ComfyUI)."""
    from .rehash_bench import bench_rehash, format_markdown, plot

    if args.plot is not None and (why := _check_json_out(args.plot)) is not None:
        print(f"streamline: {why.replace('--json-out', '--plot')}", file=sys.stderr)
        return 2
    if args.weights is not None and not os.path.isfile(args.weights):
        print(f"streamline: --weights {args.weights}: no such file", file=sys.stderr)
        return 2
    comfyui = None
    if args.comfyui is not None or args.comfyui_only:
        from .comfy_host import find_comfyui, is_comfyui

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
        from .rehash_bench_comfyui import prepare

        try:
            with _stdout_to_stderr():
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
    with _stdout_to_stderr():
        if not args.comfyui_only:
            result = bench_rehash(args.weights, clips=clips, calibration_clips=min(clips, 4) if args.quick else 4,
                                  steps=steps, frames=args.frames, threads=args.threads, cuts_config=args.config,
                                  quick=args.quick, end_to_end=not args.quick, progress=say)
        if comfyui is not None:
            from .rehash_bench import EASYCACHE_THRESHOLDS
            from .rehash_bench_comfyui import bench_rehash_comfyui

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
            from .rehash_bench_comfyui import format_markdown as format_host

            print(("\n" if result is not None else "") + "Inside ComfyUI:\n\n" + format_host(host), end="")
    if args.plot is not None:
        print(f"wrote {plot(result, args.plot)}", file=sys.stderr)
    return 0 if comfyui is None or host is not None else 1


def _profile(args: argparse.Namespace) -> int:
    """``streamline profile``: record sampling runs, write the JSON and the chart; or print the overhead."""
    import torch

    from . import profile_run

    torch.set_num_threads(args.threads)
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    if args.overhead:
        with _stdout_to_stderr():
            result = profile_run.overhead(args.config, warmup=args.warmup, repeats=args.repeats, threads=args.threads,
                                          progress=say)
        print(profile_run.format_overhead(result), end="")
        return 0
    from .fixture import data

    if args.frames is None:
        args.frames = 14 if args.model in profile_run.FULL_MODELS else data.DEFAULT_FRAMES
    if not data.MIN_FRAMES <= args.frames <= data.MAX_FRAMES:
        print(f"streamline: --frames {args.frames}: expected {data.MIN_FRAMES} to {data.MAX_FRAMES}", file=sys.stderr)
        return 2
    for option, path in (("--json-out", args.json_out), ("--png", args.png), ("--html", args.html)):
        if path is not None and (why := _check_json_out(path)) is not None:
            print(f"streamline: {why.replace('--json-out', option)}", file=sys.stderr)
            return 2
    if args.model in profile_run.FULL_MODELS and not torch.cuda.is_available():
        print(f"streamline: profile --model {args.model} runs the full-size model with random weights on a CUDA device "
              "and finds none; --model fixture or tiny run on a CPU", file=sys.stderr)
        return 2
    runs = [False, True] if args.compare else [args.streamline]
    timelines = []
    try:
        for streamlined in runs:
            say(f"recording the {'streamlined' if streamlined else 'original'} {args.model} model: {args.steps} steps, "
                f"{args.frames} frames, {args.granularity} granularity")
            if args.model in profile_run.FULL_MODELS:
                tl = profile_run.full_size_run(streamlined, args.granularity, args.steps, args.frames)
            else:
                tl = profile_run.sampling_run(args.model, streamlined, args.granularity, args.steps, args.frames,
                                              args.weights)
            print(f"{tl.label}: {tl.summary()}")
            timelines.append(tl)
    except FileNotFoundError as exc:
        print(f"streamline: --weights {args.weights or '(shipped)'}: {exc}", file=sys.stderr)
        return 2
    from .profile_chart import plot

    doc = timelines[0].to_json() if len(timelines) == 1 else {"runs": [t.to_json() for t in timelines]}
    with open(args.json_out, "w") as f:
        json.dump(doc, f, indent=2)
    what = {"fixture": "measured on the fixture model", "tiny": "random weights", "svd": "full size, random weights"}
    plot(timelines, args.png, title=f"{args.model} model, {args.frames} frames, {args.steps} steps ({what[args.model]})")
    say(f"wrote {args.json_out} and {args.png}")
    if args.html is not None:
        from .profile_html import write_html

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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``streamline`` command."""
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        _check_bench(args)
    bench_cuda = args.command == "bench" and args.cuda
    bench_fixture = args.command == "bench" and args.fixture
    wants_diffusers = (args.command == "bench" and not bench_cuda) or "diffusers" in (getattr(args, "implementation", None) or ())
    if wants_diffusers and importlib.util.find_spec("diffusers") is None:
        print("streamline: this needs diffusers: pip install 'comfyui-streamline[diffusers]' (or, from a clone, "
              "pip install '.[diffusers]'); ComfyUI rows alone: --implementation comfyui", file=sys.stderr)
        return 2
    if args.command == "calibrate":
        if importlib.util.find_spec("diffusers") is None:
            print("streamline: calibrate needs diffusers: pip install 'comfyui-streamline[diffusers]'", file=sys.stderr)
            return 2
        return _calibrate(args)
    if args.command == "profile":
        if importlib.util.find_spec("diffusers") is None:
            print("streamline: profile needs diffusers: pip install 'comfyui-streamline[diffusers]'", file=sys.stderr)
            return 2
        return _profile(args)
    if args.command == "simulate" and args.pipeline:
        from .pipeline_sim import format_markdown as pipeline_markdown
        from .pipeline_sim import pipeline_rows

        if args.frames is not None or args.batch != 2:
            args.parser.error("argument --pipeline: each workflow runs its own frame count with guidance; "
                              "--frames and --batch are for the U-Net table")
        rows = []
        for height, width in args.resolution or ((576, 1024),):
            rows += pipeline_rows(args.model, height, width, progress=lambda msg: print(msg, file=sys.stderr, flush=True))
        print(json.dumps([r.as_dict() for r in rows], indent=2) if args.json else pipeline_markdown(rows),
              end="\n" if args.json else "")
    elif args.command == "simulate" and args.decode:
        from .decode_sim import decode_rows
        from .decode_sim import format_markdown as decode_markdown

        rows = decode_rows(args.resolution or ((576, 1024),), progress=lambda msg: print(msg, file=sys.stderr, flush=True))
        print(json.dumps([r.as_dict() for r in rows], indent=2) if args.json else decode_markdown(rows), end="\n" if args.json else "")
    elif args.command == "simulate":
        from .simulate import RESOLUTIONS, format_markdown, format_text, simulate

        with _stdout_to_stderr():  # whatever ComfyUI and its custom nodes print while loaded and run
            rows = simulate(
                models=args.model,
                resolutions=args.resolution or RESOLUTIONS,
                frames=args.frames,
                batch=args.batch,
                implementations_wanted=args.implementation,
                progress=lambda msg: print(msg, file=sys.stderr, flush=True),
            )
        if args.json:
            print(json.dumps([r.as_dict() for r in rows], indent=2))
        elif args.markdown:
            print(format_markdown(rows), end="")
        else:
            print(format_text(rows), end="")
    elif bench_cuda:
        return _bench_cuda(args)
    elif bench_fixture:
        return _bench_fixture(args)
    elif args.command == "bench" and args.rehash:
        return _bench_rehash(args)
    elif args.command == "bench" and args.decode:
        return _bench_decode(args)
    elif args.command == "bench":
        from .bench import cuts, format_cuts, format_latency, latency

        measure, show = (cuts, format_cuts) if args.cuts else (latency, format_latency)
        with _stdout_to_stderr():
            result = measure(
                args.config, warmup=args.warmup, repeats=args.repeats, threads=args.threads,
                progress=lambda msg: print(msg, file=sys.stderr, flush=True),
            )
        print(show(result, markdown=args.markdown), end="")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
