"""``streamline simulate``: activation memory of the full-size models on the meta device."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from typing import Any

from .common import (
    choices,
    positive,
    resolution,
    stdout_to_stderr,
)


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the command's parser to ``sub`` (the ``streamline`` subparsers)."""
    from ..sim.unet import IMPLEMENTATIONS, MODELS
    from ..sim.wan import WAN_MODELS

    sim = sub.add_parser(
        "simulate",
        help="activation memory of full-size models, simulated on the meta device (no weights, no GPU)",
        description="Build the full-size models on the meta device in fp16 and measure one U-Net call "
        "of each workload: weights, activation peak and skip floor, with the field's built-in options.",
    )
    sim.add_argument(
        "--model", type=choices((*MODELS, *WAN_MODELS, "wan")), default=list(MODELS), metavar="NAMES",
        help=f"comma-separated models among {', '.join(MODELS)} (the U-Nets, default: all three) and "
             f"{', '.join(WAN_MODELS)} (ComfyUI's WanModel at its usual sizes, weights in bf16 and fp8, cond and uncond "
             f"batched and separate; 'wan': all three)",
    )
    sim.add_argument(
        "--implementation", type=choices(IMPLEMENTATIONS), default=list(IMPLEMENTATIONS), metavar="NAMES",
        help="comma-separated among diffusers, comfyui (default: both; ComfyUI rows need a ComfyUI checkout)",
    )
    sim.add_argument(
        "--resolution", type=resolution, nargs="+", default=None, metavar="HxW",
        help="pixel resolutions, multiples of 8 (default: 512x512 576x1024)",
    )
    sim.add_argument("--frames", type=positive, default=None, help="frames per video (default: 14 SVD, 25 SVD-XT, 16 AnimateDiff)")
    sim.add_argument("--batch", type=positive, default=2, help="videos per U-Net call; 2 is classifier-free guidance (default: 2)")
    mode = sim.add_mutually_exclusive_group()
    mode.add_argument("--decode", action="store_true",
                      help="instead: SVD's VAE decode (SVD 14 frames, SVD-XT 25), the stock decoder against the decoder "
                           "run by groups (default resolution: 576x1024)")
    mode.add_argument("--pipeline", action="store_true",
                      help="instead: every stage of each model's workflow (encoders, U-Net with guidance, VAE decode), "
                           "original and streamlined, the pipeline's peak beside the paper's and the smallest card it "
                           "should fit (default resolution: 576x1024; --model chooses the workflows)")
    sim.add_argument("--card", type=_cards_gb, default=None, metavar="GB[,GB...]",
                     help="with --pipeline: whether each workflow fits a card of this many GB (comma-separated: several "
                          "cards), loaded as ComfyUI loads it (part of the weights streamed on a small card): the stage "
                          "that decides, the slicing, the share of weights streamed (default: the smallest card of each "
                          "workflow, both views)")
    sim.add_argument("--system", choices=("linux", "windows"), default="linux",
                     help="with --card: the host's system (ComfyUI keeps 400 MiB free on Linux, 600 MiB on Windows; "
                          "default: linux)")
    sim.add_argument("--desktop-gb", type=_desktop_gb, default=0.0, metavar="GB",
                     help="with --card: device memory a desktop and other programs already hold (default: 0)")
    out = sim.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print a JSON list, one object per row")
    out.add_argument("--markdown", action="store_true", help="print the Markdown table the docs embed")
    return sim


def run(args: argparse.Namespace) -> int:
    """``streamline simulate``: the U-Net table, or --decode's, or --pipeline's."""
    if not args.pipeline and (args.card is not None or args.system != "linux" or args.desktop_gb):
        args.parser.error("arguments --card, --system, --desktop-gb: they go with --pipeline")
    wan = [m for m in dict.fromkeys(args.model) if m in WAN_NAMES or m == "wan"]
    if wan:
        if len(wan) != len(set(args.model)):
            args.parser.error("argument --model: the Wan models and the U-Nets are separate tables: ask for one kind "
                              "at a time")
        if args.pipeline or args.decode:
            args.parser.error("argument --model: --pipeline and --decode are the U-Net workflows; the Wan models have "
                              "their own table (without them)")
        if args.batch != 2:
            args.parser.error("argument --batch: the Wan rows show cond and uncond batched (2) and separate (1) each")
        return _wan(args, list(WAN_NAMES) if "wan" in wan else wan)
    if "diffusers" in (args.implementation or ()) and importlib.util.find_spec("diffusers") is None:
        print("streamline: this needs diffusers: pip install 'comfyui-streamline[diffusers]' (or, from a clone, "
              "pip install '.[diffusers]'); ComfyUI rows alone: --implementation comfyui", file=sys.stderr)
        return 2
    if args.pipeline:
        from ..sim.pipeline import format_markdown as pipeline_markdown
        from ..sim.pipeline import pipeline_rows

        if args.frames is not None or args.batch != 2:
            args.parser.error("argument --pipeline: each workflow runs its own frame count with guidance; "
                              "--frames and --batch are for the U-Net table")
        cards = _cards(args) if args.card is not None else None  # refused before anything is built
        rows = []
        for height, width in args.resolution or ((576, 1024),):
            rows += pipeline_rows(args.model, height, width, progress=lambda msg: print(msg, file=sys.stderr, flush=True))
        if cards is not None:
            return _on_cards(args, cards, rows)
        print(json.dumps([r.as_dict() for r in rows], indent=2) if args.json else pipeline_markdown(rows),
              end="\n" if args.json else "")
    elif args.decode:
        from ..sim.decode import decode_rows
        from ..sim.decode import format_markdown as decode_markdown

        rows = decode_rows(args.resolution or ((576, 1024),), progress=lambda msg: print(msg, file=sys.stderr, flush=True))
        print(json.dumps([r.as_dict() for r in rows], indent=2) if args.json else decode_markdown(rows), end="\n" if args.json else "")
    else:
        from ..sim.unet import RESOLUTIONS, format_markdown, format_text, simulate

        with stdout_to_stderr():  # whatever ComfyUI and its custom nodes print while loaded and run
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
    return 0


WAN_NAMES = ("wan2.1-1.3b", "wan2.1-14b", "wan2.2-5b")


def _wan(args: argparse.Namespace, models: list[str]) -> int:
    """The Wan table: each model at its usual sizes (or ``--resolution``, given as HEIGHTxWIDTH)."""
    from ..sim.wan import format_markdown, format_text, wan_rows

    sizes = [(w, h) for h, w in args.resolution] if args.resolution else None
    try:
        with stdout_to_stderr():
            rows = wan_rows(models, sizes, args.frames, progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    except RuntimeError as e:
        print(f"streamline: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
    else:
        print(format_markdown(rows) if args.markdown else format_text(rows), end="")
    return 0


def _cards_gb(text: str) -> tuple[float, ...]:
    sizes = []
    for part in text.split(","):
        try:
            gb = float(part)
        except ValueError:
            gb = -1.0
        if not 1 <= gb <= 1024:
            raise argparse.ArgumentTypeError(f"expected a card's memory in GB between 1 and 1024 (e.g. 6, or 6,8,12 for "
                                             f"several cards), got {part!r}")
        sizes.append(gb)
    return tuple(sizes)


def _desktop_gb(text: str) -> float:
    try:
        gb = float(text)
    except ValueError:
        gb = -1.0
    if not 0 <= gb <= 64:
        raise argparse.ArgumentTypeError(f"expected GB already in use on the card, 0 to 64 (e.g. 0.5), got {text!r}")
    return gb


def _cards(args: argparse.Namespace) -> list:
    """The cards ``--card``, ``--system`` and ``--desktop-gb`` describe."""
    from ..sim.host_memory import GIB, Card

    cards = [Card(gb, args.system, int(args.desktop_gb * GIB)) for gb in args.card]
    for card in cards:
        if card.free_bytes <= 0:
            args.parser.error(f"argument --desktop-gb: {args.desktop_gb:g} GB and the CUDA context leave nothing of a "
                              f"{card.gb:g} GB card")
    return cards


def _on_cards(args: argparse.Namespace, cards: list, rows: list) -> int:
    """``simulate --pipeline --card N``: each workflow, original and streamlined, on each card."""
    from ..sim.cards import VARIANTS, format_card_markdown

    predictions = [[r.host.predict(card, variant) for r in rows for variant in VARIANTS] for card in cards]
    if args.json:
        print(json.dumps([p.as_dict() for on_card in predictions for p in on_card], indent=2))
    else:
        print("\n".join(format_card_markdown(on_card) for on_card in predictions), end="")
    return 0
