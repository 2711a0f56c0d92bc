"""The ``streamline`` command."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import sys
from typing import Iterator, Sequence


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
    out = sim.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print a JSON list, one object per row")
    out.add_argument("--markdown", action="store_true", help="print the Markdown table the README embeds")

    bench = sub.add_parser(
        "bench",
        help="latency of the streamlined U-Net against the original, and what each cut point costs (CPU, mid-size)",
        description="--latency: time original and streamlined U-Net calls side by side (alternating, after warm-up; "
        "medians) with the plan that meets the memory target, and print the ratio with both peaks. --cuts: time "
        "every stage inside full streamlined forwards and print, for each cut point of the up path, the tail's and "
        "the shallow path plus tail's share of a full forward (checked by timing three cuts directly), with FLOP shares.",
    )
    what = bench.add_mutually_exclusive_group(required=True)
    what.add_argument("--latency", action="store_true", help="measure the latency ratio")
    what.add_argument("--cuts", action="store_true", help="measure what a tail from each up-path cut point costs")
    bench.add_argument("--config", choices=("mid", "tiny"), default="mid", help="mid (CONFIGS.md, default) or tiny (a quick check)")
    bench.add_argument("--warmup", type=_non_negative, default=2, help="untimed calls of each before timing (default: 2)")
    bench.add_argument("--repeats", type=_positive, default=5, help="timed calls of each; the median is reported (default: 5)")
    bench.add_argument("--threads", type=_positive, default=2, help="torch CPU threads (default: 2)")
    bench.add_argument("--markdown", action="store_true", help="print the Markdown table the README embeds")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``streamline`` command."""
    args = build_parser().parse_args(argv)
    wants_diffusers = args.command == "bench" or "diffusers" in getattr(args, "implementation", ())
    if wants_diffusers and importlib.util.find_spec("diffusers") is None:
        print("streamline: this needs diffusers: pip install 'comfyui-streamline[diffusers]' (or, from a clone, "
              "pip install '.[diffusers]'); ComfyUI rows alone: --implementation comfyui", file=sys.stderr)
        return 2
    if args.command == "simulate":
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
