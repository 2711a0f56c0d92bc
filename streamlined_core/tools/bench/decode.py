"""``streamline bench --decode``: how far the hosts' memory-saving decodes of SVD's VAE are from decoding
the whole clip, beside the decode by groups.

A seeded tiny temporal decoder (SVD's VAE layout at two levels, ``configs.TINY_SVD_VAE_KWARGS``)
decodes one clip of latents in fp32 five ways:

* whole: the decoder's own forward over every frame (the reference);
* ComfyUI's VAE Decode: frame batches sized as ComfyUI sizes them from free memory, each decoded as
  a clip of its own (batch = free memory // ``2178 * h * w * 64 * dtype bytes``, the host's estimate
  for 576x1024 latents; free memory taken as the card's size less 1 GiB of CUDA context and
  ComfyUI's reserve, less the VAE's weights), for 6, 8 and 12 GiB cards in bf16 and in fp32 (cards
  older than Ampere, where ComfyUI decodes in fp32);
* VAE Decode (Tiled), which decodes SVD frame by frame;
* diffusers' ``decode_chunk_size`` (each chunk a clip of its own);
* by groups (``arch/diffusers_vae.py``), every group sliced.

For each: the max abs error and PSNR against the whole decode (values span [-1, 1]), and the mean
abs error on frames next to a cut against the other frames. Random weights say how the cut
propagates, not how visible it is in a trained VAE's output.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from ...engine.arch import diffusers_vae
from ...engine.slicing import Runner
from .. import configs

GIB = 1024**3
FULL_LATENT = (72, 128)  # 576x1024
CARDS_GIB = (6, 8, 12)
RESERVE_GIB = 1.0


@functools.lru_cache(maxsize=None)
def svd_vae_parameters() -> int:
    """Parameters of SVD's full-size VAE (built on the meta device)."""
    return sum(p.numel() for p in configs.build_svd_vae().parameters())


def comfy_batch(card_gib: float, dtype_bytes: int) -> int:
    """Frames per batch ComfyUI's VAE Decode gives SVD latents of 576x1024 on a card of ``card_gib``."""
    per_frame = 2178 * FULL_LATENT[0] * FULL_LATENT[1] * 64 * dtype_bytes
    free = (card_gib - RESERVE_GIB) * GIB - svd_vae_parameters() * dtype_bytes
    return max(1, int(free // per_frame))


@dataclass
class DecodeError:
    method: str
    cuts: list[int]  # frame indices where a new clip starts
    max_abs: float
    psnr_db: float
    border_mean_abs: float  # frames next to a cut
    other_mean_abs: float | None  # None: every frame is next to a cut

    def as_dict(self) -> dict:
        return asdict(self)


def _chunked(decoder, z: torch.Tensor, chunk: int) -> torch.Tensor:
    parts = []
    for a in range(0, z.shape[0], chunk):
        part = z[a:a + chunk]
        ioi = torch.zeros(1, part.shape[0])
        parts.append(decoder(part, image_only_indicator=ioi, num_frames=part.shape[0]))
    return torch.cat(parts)


def _error(method: str, out: torch.Tensor, whole: torch.Tensor, chunk: int | None) -> DecodeError:
    frames = whole.shape[0]
    cuts = list(range(chunk, frames, chunk)) if chunk else []
    diff = (out - whole).abs()
    per_frame = diff.flatten(1).mean(1)
    border = sorted({f for c in cuts for f in (c - 1, c)})
    others = [f for f in range(frames) if f not in border]
    mse = diff.square().mean().item()
    return DecodeError(
        method, cuts, diff.max().item(), 10 * math.log10(4 / mse) if mse > 0 else math.inf,
        per_frame[border].mean().item() if border else 0.0,
        per_frame[others].mean().item() if others else None,
    )


def decode_errors(frames: int = 14, latent: tuple[int, int] = (8, 12), seed: int = 0,
                  progress: Callable[[str], None] | None = None) -> tuple[list[DecodeError], dict]:
    """Every method's error against the whole decode, and the decoded clips for the picture."""
    say = progress or (lambda _m: None)
    vae = configs.seed_weights(configs.build_tiny_svd_vae(), std=0.1, seed=seed)
    decoder = vae.decoder
    z = torch.randn(frames, 4, *latent, generator=torch.Generator().manual_seed(seed + 1))
    ioi = torch.zeros(1, frames)
    rows, clips = [], {}
    with torch.no_grad():
        whole = decoder(z, image_only_indicator=ioi, num_frames=frames)
        clips["whole"] = whole
        methods: list[tuple[str, int | None]] = []
        for dtype, size in (("bf16", 2), ("fp32", 4)):
            for card in CARDS_GIB:
                methods.append((f"ComfyUI VAE Decode, {card} GiB card, {dtype}", comfy_batch(card, size)))
        methods.append(("ComfyUI VAE Decode (Tiled): frame by frame", 1))
        for chunk in (8, 4, 2):
            methods.append((f"diffusers decode_chunk_size={chunk}", chunk))
        for name, chunk in methods:
            say(f"decode: {name} ({chunk} frames per clip)")
            out = whole if chunk >= frames else _chunked(decoder, z, chunk)
            n = min(chunk, frames)
            rows.append(_error(f"{name} ({n} frame{'s' if n > 1 else ''} per clip)", out, whole, chunk if chunk < frames else None))
            clips.setdefault(f"cut{chunk}", out)
        say("decode: by groups")
        ours = diffusers_vae.streamlined_forward(decoder, Runner(lambda _n, _a, length: (length, "recompute")), z, ioi,
                                                 num_frames=frames)
        rows.append(_error("Streamline, by groups (every group at its most slicing)", ours, whole, None))
        clips["ours"] = ours
    return rows, clips


def format_markdown(rows: list[DecodeError]) -> str:
    lines = ["| decode of a 14-frame clip (tiny seeded SVD VAE, fp32) | max abs error | PSNR | mean abs error: frames at a cut / others |",
             "|---|---|---|---|"]
    for r in rows:
        psnr = "exact" if math.isinf(r.psnr_db) else f"{r.psnr_db:.1f} dB"
        if not r.cuts:
            border = "no cut"
        elif r.other_mean_abs is None:
            border = f"{r.border_mean_abs:.2e} / (every frame is at a cut)"
        else:
            border = f"{r.border_mean_abs:.2e} / {r.other_mean_abs:.2e}"
        lines.append(f"| {r.method} | {r.max_abs:.2e} | {psnr} | {border} |")
    return "\n".join(lines) + "\n"


def plot(clips: dict, path, frames_shown: int = 6) -> None:
    """Per frame, the abs difference from the whole decode: frame by frame, decode_chunk_size=4, by groups."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    whole = clips["whole"]
    rows = [("whole decode", whole, False), ("frame by frame: |difference|", clips["cut1"], True),
            ("chunks of 4: |difference|", clips["cut4"], True), ("by groups: |difference|", clips["ours"], True)]
    scale = max((clips["cut1"] - whole).abs().max().item(), 1e-12)
    fig, axes = plt.subplots(len(rows), frames_shown, figsize=(1.6 * frames_shown, 1.7 * len(rows)), squeeze=False)
    for r, (label, clip, is_diff) in enumerate(rows):
        for f in range(frames_shown):
            ax = axes[r][f]
            if is_diff:
                img = ((clip[f] - whole[f]).abs().mean(0) / scale).clamp(0, 1)
                ax.imshow(img.numpy(), cmap="magma", vmin=0, vmax=1)
            else:
                ax.imshow(((clip[f].permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy())
            ax.set_xticks([]), ax.set_yticks([])
            if f == 0:
                ax.set_ylabel(label, fontsize=7)
            if r == 0:
                ax.set_title(f"frame {f}", fontsize=8)
    fig.suptitle("SVD VAE decode (tiny seeded decoder): difference from decoding the whole clip, "
                 f"one colour scale (white = {scale:.2g})", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
