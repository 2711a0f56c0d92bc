"""diffusers ``Decoder`` of the SD VAE (``AutoencoderKL``, the VAE AnimateDiff decodes with), run by groups.

The SD VAE has no temporal layers: every frame decodes on its own, so batching frames is already
exact and what matters is the peak of one frame. The groups are the SVD decoder's spatial ones
(``diffusers_vae.py``): ``conv_in``; each ``ResnetBlock2D`` (written over its input where the shapes
match, else over tiles: whole frames, then row bands with halo rows and whole-frame statistics
passes, an up block's upsampler fused into the next block's first ResBlock); the middle attention;
the head (``conv_norm_out``, ``conv_act``, ``conv_out``).
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from .. import slicing
from ..slicing import Runner
from .diffusers_vae import head, spatial_resnet

SLOT = "forward"
SAMPLE = "sample"


def matches(model: nn.Module) -> bool:
    """True for diffusers' 2-D VAE ``Decoder`` built of ``UpDecoderBlock2D`` blocks with a plain GroupNorm head."""
    if type(model).__name__ != "Decoder" or not hasattr(model, "up_blocks") or hasattr(model, "time_conv_out"):
        return False
    return (all(type(b).__name__ == "UpDecoderBlock2D" for b in model.up_blocks)
            and isinstance(model.conv_norm_out, nn.GroupNorm) and type(model.mid_block).__name__ == "UNetMidBlock2D")


def call_shape(arguments: dict) -> tuple[int, int, int, int]:
    """(frames, 1, latent height, latent width): every frame is an image of its own."""
    n, _, h, w = arguments["sample"].shape
    return n, 1, h, w


def floor_bytes(decoder: nn.Module, arguments: dict) -> int:
    """One tensor of the output level (the last up block's width, every frame at full size)."""
    n, _, h, w = arguments["sample"].shape
    scale = 2 ** sum(1 for block in decoder.up_blocks if block.upsamplers is not None)
    width = decoder.up_blocks[-1].resnets[-1].out_channels
    dtype = next(itertools.chain(decoder.up_blocks.parameters(), decoder.up_blocks.buffers())).dtype
    return n * width * (h * scale) * (w * scale) * torch.empty((), dtype=dtype).element_size()


def streamlined_forward(decoder: nn.Module, runner: Runner, sample: torch.Tensor,
                        latent_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """``Decoder.forward`` run by groups: the same arguments, the same result within rounding."""
    if latent_embeds is not None:
        raise ValueError("latent_embeds: a spatially conditioned decoder head is not supported; call the decoder "
                         "without streamline() for it")
    if sample.dim() != 4:
        raise ValueError(f"sample must be (frames, channels, height, width) latents, got shape {tuple(sample.shape)}")
    feature = [slicing.frames_group(runner, "conv_in", decoder.conv_in, [sample])]
    mid = decoder.mid_block
    feature.append(spatial_resnet(runner, "mid_block.resnets.0", mid.resnets[0], feature.pop(), None))
    for i, (attn, res) in enumerate(zip(mid.attentions, mid.resnets[1:])):
        if attn is not None:
            feature.append(slicing.frames_group(runner, f"mid_block.attentions.{i}", attn, [feature.pop()], in_place=True))
        feature.append(spatial_resnet(runner, f"mid_block.resnets.{i + 1}", res, feature.pop(), None))
    upscale_dtype = next(itertools.chain(decoder.up_blocks.parameters(), decoder.up_blocks.buffers())).dtype
    feature.append(feature.pop().to(upscale_dtype))

    pending = None
    for b, block in enumerate(decoder.up_blocks):
        for r, res in enumerate(block.resnets):
            feature.append(spatial_resnet(runner, f"up_blocks.{b}.resnets.{r}", res, feature.pop(), pending))
            pending = None
        if block.upsamplers is not None:
            (pending,) = block.upsamplers
    if pending is not None:
        feature.append(slicing.frames_group(runner, "upsampler", pending, [feature.pop()]))

    return head(runner, decoder, feature.pop())
