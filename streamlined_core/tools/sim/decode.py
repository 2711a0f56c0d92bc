"""``streamline simulate --decode``: SVD's VAE decode on the meta device, stock and by groups.

Each row decodes one video (``frames`` latents of ``height/8 x width/8``) with the full-size SVD VAE
decoder in fp16: the stock ``TemporalDecoder`` in one call (what the pipeline does with
``decode_chunk_size=num_frames``), and the same call under ``streamline(vae)`` with the plan for the
default target, measured by the tracker and beside the plan's prediction.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch

from ...engine.api import streamline
from ...engine.memory import GIB, MemoryTracker, weights_bytes
from ...engine.slicing import Runner
from .. import configs

ROWS = (("SVD", 14), ("SVD-XT", 25))


@dataclass
class DecodeRow:
    model: str
    frames: int
    height: int
    width: int
    weights_bytes: int  # the decoder's
    original_peak_bytes: int  # the stock decoder, one call over every frame
    peak_bytes: int  # by groups, with the plan below
    predicted_peak_bytes: int
    floor_bytes: int  # one tensor of the output level: the least a decode by groups holds
    plan: str

    def as_dict(self) -> dict:
        return asdict(self)


def decode_rows(resolutions=((576, 1024),), rows=ROWS, progress: Callable[[str], None] | None = None) -> list[DecodeRow]:
    """Measure every (model, resolution) row."""
    say = progress or (lambda _m: None)
    vae = configs.build_svd_vae()
    decoder = vae.decoder
    out = []
    for height, width in resolutions:
        for model, frames in rows:
            say(f"decode {model} {height}x{width} {frames} frames")
            z = torch.empty(frames, 4, height // 8, width // 8, device="meta", dtype=torch.float16)
            ioi = torch.zeros(1, frames, device="meta", dtype=torch.float16)
            with MemoryTracker() as stock:
                decoder(z, image_only_indicator=ioi, num_frames=frames)
            with streamline(vae) as handle:
                plan = handle.plan_for(z, image_only_indicator=ioi, num_frames=frames)
                with MemoryTracker() as ours:
                    handle.adapter.forward(decoder, Runner(plan.decide), z, ioi, num_frames=frames)
            out.append(DecodeRow(model, frames, height, width, weights_bytes(decoder), stock.peak_bytes, ours.peak_bytes,
                                 plan.predicted_peak_bytes, plan.skip_floor_bytes, plan.describe()))
    return out


def format_markdown(rows: list[DecodeRow]) -> str:
    """The table the docs embed."""
    lines = [
        "| SVD VAE decode, fp16 | resolution | frames | stock decoder | by groups (predicted) | plan |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.height}x{r.width} | {r.frames} | {r.original_peak_bytes / GIB:.2f} GiB | "
            f"{r.peak_bytes / GIB:.2f} GiB ({r.predicted_peak_bytes / GIB:.2f}), "
            f"{r.original_peak_bytes / r.peak_bytes:.1f}x less | {r.plan} |"
        )
    return "\n".join(lines) + (
        "\n\nActivation peaks on the meta device (the tracker's rules, docs/benchmarks.md); the decoder's weights "
        f"({rows[0].weights_bytes / GIB:.2f} GiB) come on top. The plan is the default target's (1.6x one "
        "tensor of the output level, or the least reachable peak when that is below it).\n" if rows else "\n"
    )
