"""diffusers ``TemporalDecoder``: the decoder of SVD's ``AutoencoderKLTemporalDecoder``, run by groups, exactly.

A full decode of 25 frames at 576x1024 holds tens of GiB of activations: every layer of the last up
block works on 128 channels of every frame at full resolution. The decoder's layers are the U-Net's
kinds, so the same groups apply:

* spatial groups, sliced over frames: ``conv_in``; each ``SpatioTemporalResBlock``'s 2-D ResBlock;
  the middle block's attention (per frame, its GroupNorm per frame); the output head
  (``conv_norm_out``, ``conv_act``, ``conv_out``; GroupNorm per frame). An up block's upsampler is
  fused into the next block's first spatial group, per slice, so the upsampled tensor (the largest
  of the decode: 256 channels at full resolution) never exists whole;
* temporal groups, sliced over pixels: each ``SpatioTemporalResBlock``'s 3-D ResBlock and mixer,
  whose two GroupNorms span the whole video (statistics passes, as in the U-Net); ``time_conv_out``
  (a time-only convolution). A pixel slice holds every frame, so no frame halo is needed.

Groups whose output has their input's shape write each slice's result over the input
(:class:`~streamlined_core.slicing.InPlace`): a sliced ResBlock at full resolution holds one
tensor of its level, not two. Every group runs the host's own modules on each slice; with one slice
each group is exactly the host's forward.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from .. import slicing
from ..slicing import Runner
from .diffusers_svd import temporal_resblock

SLOT = "forward"
SAMPLE = "sample"


def matches(model: nn.Module) -> bool:
    """True for diffusers' ``TemporalDecoder`` (``AutoencoderKLTemporalDecoder.decoder``)."""
    return type(model).__name__ == "TemporalDecoder" and hasattr(model, "time_conv_out")


def call_shape(arguments: dict) -> tuple[int, int, int, int]:
    """(batch, frames, latent height, latent width) of a (B*T, C, h, w) sample decoded as ``num_frames`` frames."""
    n, _, h, w = arguments["sample"].shape
    frames = int(arguments.get("num_frames", 1))
    return n // frames, frames, h, w


def floor_bytes(decoder: nn.Module, arguments: dict) -> int:
    """One tensor of the decoder's output level (its last up block's width, every frame at full size):
    what a decode by groups cannot go below, as a ResBlock there holds its input while it writes over it."""
    n, _, h, w = arguments["sample"].shape
    scale = 2 ** sum(1 for block in decoder.up_blocks if block.upsamplers is not None)
    res = decoder.up_blocks[-1].resnets[-1].spatial_res_block
    dtype = next(itertools.chain(decoder.up_blocks.parameters(), decoder.up_blocks.buffers())).dtype
    return n * res.out_channels * (h * scale) * (w * scale) * torch.empty((), dtype=dtype).element_size()


def _check(sample: torch.Tensor, num_frames: int) -> None:
    if sample.dim() != 4:
        raise ValueError(f"sample must be (batch x frames, channels, height, width) latents, got shape {tuple(sample.shape)}")
    if num_frames < 1 or sample.shape[0] % num_frames:
        raise ValueError(f"num_frames={num_frames} does not divide the {sample.shape[0]} latent frames of sample")


def _spatial_resblock(
    runner: Runner, name: str, block: nn.Module, x: torch.Tensor, upsampler: nn.Module | None,
) -> torch.Tensor:
    """A ``SpatioTemporalResBlock``'s 2-D ResBlock over frame slices; a pending upsampler runs per slice first."""
    res = block.spatial_res_block
    if upsampler is not None:
        return slicing.frames_group(runner, name, lambda xs: res(upsampler(xs), None), [x])
    same = res.in_channels == (res.out_channels or res.in_channels)
    return slicing.frames_group(runner, name, lambda xs: res(xs, None), [x], in_place=same)


def resblock(
    runner: Runner, name: str, block: nn.Module, feature: list[torch.Tensor], batch: int, frames: int,
    ioi: torch.Tensor, upsampler: nn.Module | None = None,
) -> torch.Tensor:
    """A whole ``SpatioTemporalResBlock`` without time embedding: spatial group, then temporal group (in place).

    ``feature`` holds the input alone: it is taken out, so the input is freed once the spatial group
    has read it (before the temporal group runs), unless the spatial group wrote over it."""
    h = _spatial_resblock(runner, f"{name}.spatial", block, feature.pop(), upsampler)
    return temporal_resblock(runner, f"{name}.temporal", block, h, None, batch, frames, ioi, in_place=True)


def streamlined_forward(
    decoder: nn.Module, runner: Runner, sample: torch.Tensor, image_only_indicator: torch.Tensor, num_frames: int = 1,
) -> torch.Tensor:
    """``TemporalDecoder.forward`` run by groups: the same arguments, the same result within rounding."""
    _check(sample, num_frames)
    frames = num_frames
    batch = sample.shape[0] // frames
    ioi = image_only_indicator

    # ``feature`` is the only reference to the running feature between groups (see ``resblock``).
    feature = [slicing.frames_group(runner, "conv_in", decoder.conv_in, [sample])]
    mid = decoder.mid_block
    feature.append(resblock(runner, "mid_block.resnets.0", mid.resnets[0], feature, batch, frames, ioi))
    for i, (res, attn) in enumerate(zip(mid.resnets[1:], mid.attentions)):
        feature.append(slicing.frames_group(runner, f"mid_block.attentions.{i}", attn, [feature.pop()], in_place=True))
        feature.append(resblock(runner, f"mid_block.resnets.{i + 1}", res, feature, batch, frames, ioi))
    upscale_dtype = next(itertools.chain(decoder.up_blocks.parameters(), decoder.up_blocks.buffers())).dtype
    feature.append(feature.pop().to(upscale_dtype))

    pending = None
    for b, block in enumerate(decoder.up_blocks):
        for r, res in enumerate(block.resnets):
            feature.append(resblock(runner, f"up_blocks.{b}.resnets.{r}", res, feature, batch, frames, ioi,
                                    upsampler=pending))
            pending = None
        if block.upsamplers is not None:
            (pending,) = block.upsamplers
    if pending is not None:  # an up block with an upsampler last (not SVD's layout): run it on its own
        feature.append(slicing.frames_group(runner, "upsampler", pending, [feature.pop()]))

    def head(xs: torch.Tensor) -> torch.Tensor:
        return decoder.conv_out(decoder.conv_act(decoder.conv_norm_out(xs)))

    h = slicing.frames_group(runner, "conv_out", head, [feature.pop()])
    return slicing.time_conv(runner, "time_conv_out", decoder.time_conv_out, h, batch, frames)
