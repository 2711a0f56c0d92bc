"""diffusers ``TemporalDecoder``: the decoder of SVD's ``AutoencoderKLTemporalDecoder``, run by groups, exactly.

A full decode of 25 frames at 576x1024 holds tens of GiB of activations: every layer of the last up
block works on 128 channels of every frame at full resolution. The decoder's layers are the U-Net's
kinds, so the same groups apply:

* spatial groups, sliced over frames: ``conv_in``; each ``SpatioTemporalResBlock``'s 2-D ResBlock;
  the middle block's attention (per frame, its GroupNorm per frame); the output head
  (``conv_norm_out``, ``conv_act``, ``conv_out``; GroupNorm per frame). An up block's upsampler is
  fused into the next block's first spatial group, per slice, so the upsampled tensor (the largest
  of the decode: 256 channels at full resolution) never exists whole. A ResBlock that allocates its
  output (the fused ones) is sliced over tiles: whole frames, then row bands inside a frame, with
  halo rows for its convolutions and whole-frame statistics passes for its GroupNorms;
* temporal groups, sliced over pixels: each ``SpatioTemporalResBlock``'s 3-D ResBlock and mixer,
  whose two GroupNorms span the whole video (statistics passes, as in the U-Net); ``time_conv_out``
  (a time-only convolution). A pixel slice holds every frame, so no frame halo is needed.

Groups whose output has their input's shape write each slice's result over the input
(:class:`~streamlined_core.engine.slicing.InPlace`): a sliced ResBlock at full resolution holds one
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


def _upsampler_halo(up: nn.Module) -> int | None:
    """1 for diffusers' ``Upsample2D`` as SVD's VAE has it (nearest 2x, then a 3x3 convolution), else None."""
    if type(up).__name__ != "Upsample2D" or getattr(up, "norm", None) is not None or up.use_conv_transpose:
        return None
    if not up.interpolate or not up.use_conv:
        return None
    return slicing.conv_halo(up.conv if up.name == "conv" else up.Conv2d_0)


def tiled_parts(res: nn.Module, upsampler: nn.Module | None) -> slicing.SpatialResBlock | None:
    """diffusers' ``ResnetBlock2D`` (no time embedding) in the parts a row band runs, or None where its
    layout is not one :func:`~streamlined_core.engine.slicing.spatial_resblock` reproduces."""
    halos = [slicing.conv_halo(res.conv1), slicing.conv_halo(res.conv2)]
    if None in halos or res.upsample is not None or res.downsample is not None or res.time_emb_proj is not None:
        return None
    if res.time_embedding_norm == "scale_shift" or not isinstance(res.norm1, nn.GroupNorm):  # without temb: norm2 alone
        return None
    if res.conv_shortcut is not None and slicing.conv_halo(res.conv_shortcut) not in (0, 1):  # 1x1 or 3x3
        return None
    if upsampler is not None and _upsampler_halo(upsampler) != 1:
        return None
    scale = res.output_scale_factor
    return slicing.SpatialResBlock(
        norm1=res.norm1,
        first=lambda h: res.conv1(res.nonlinearity(h)),
        norm2=res.norm2,
        second=lambda h: res.conv2(res.dropout(res.nonlinearity(h))),
        shortcut=lambda v: res.conv_shortcut(v) if res.conv_shortcut is not None else v,
        add=lambda v, h: (v + h) / scale,
        whole=lambda v: res(v, None),
        affine=lambda norm, like: slicing.module_affine(norm, like.dtype),
        upsampler=upsampler,
        halo=sum(halos),
    )


def spatial_resnet(
    runner: Runner, name: str, res: nn.Module, x: torch.Tensor, upsampler: nn.Module | None,
) -> torch.Tensor:
    """A 2-D ``ResnetBlock2D`` without time embedding over tiles (whole frames, then row bands), written
    over its input where its output has its input's shape (no pending upsampler, as many channels out)."""
    same = upsampler is None and res.in_channels == (res.out_channels or res.in_channels)
    parts = tiled_parts(res, upsampler)
    if parts is not None:
        return slicing.spatial_resblock(runner, name, parts, x, in_place=same)
    if same:
        return slicing.frames_group(runner, name, lambda xs: res(xs, None), [x], in_place=True)
    if upsampler is not None:
        return slicing.frames_group(runner, name, lambda xs: res(upsampler(xs), None), [x])
    return slicing.frames_group(runner, name, lambda xs: res(xs, None), [x])


def resblock(
    runner: Runner, name: str, block: nn.Module, feature: list[torch.Tensor], batch: int, frames: int,
    ioi: torch.Tensor, upsampler: nn.Module | None = None,
) -> torch.Tensor:
    """A whole ``SpatioTemporalResBlock`` without time embedding: spatial group, then temporal group (in place).

    ``feature`` holds the input alone: it is taken out, so the input is freed once the spatial group
    has read it (before the temporal group runs), unless the spatial group wrote over it."""
    h = spatial_resnet(runner, f"{name}.spatial", block.spatial_res_block, feature.pop(), upsampler)
    return temporal_resblock(runner, f"{name}.temporal", block, h, None, batch, frames, ioi, in_place=True)


def head(runner: Runner, decoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``conv_norm_out``, ``conv_act``, ``conv_out`` over tiles (whole frames, then row bands), or over
    frames where ``conv_out`` is no size-keeping convolution."""
    def whole(xs: torch.Tensor) -> torch.Tensor:
        return decoder.conv_out(decoder.conv_act(decoder.conv_norm_out(xs)))

    halo = slicing.conv_halo(decoder.conv_out)
    if halo is None or not isinstance(decoder.conv_norm_out, nn.GroupNorm):
        return slicing.frames_group(runner, "conv_out", whole, [x])
    return slicing.spatial_head(runner, "conv_out", decoder.conv_norm_out,
                                lambda h: decoder.conv_out(decoder.conv_act(h)),
                                lambda norm, like: slicing.module_affine(norm, like.dtype), halo, whole, x)


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

    h = head(runner, decoder, feature.pop())
    return slicing.time_conv(runner, "time_conv_out", decoder.time_conv_out, h, batch, frames)
