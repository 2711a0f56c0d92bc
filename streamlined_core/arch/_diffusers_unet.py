"""Pieces shared by diffusers' video U-Nets (SVD and AnimateDiff).

The down path (``conv_in``, then down blocks that each return one residual per resnet and one per
downsampler) and the groups both families run the same way: frame-sliced calls of a host module,
the up path's skip concatenation and upsampler fused into the spatial group that follows them,
downsamplers, and the output head.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from .. import slicing
from ..slicing import Runner


def skip_layout(model: nn.Module, height: int, width: int):
    """Skip tensors per batch-x-frame item: ``conv_in``, each down block's resnets and downsamplers."""
    from . import SkipTensor, after_strided_convs, last_conv

    layout = [SkipTensor(model.conv_in.out_channels, height, width)]
    for block in model.down_blocks:
        for resnet in block.resnets:
            layout.append(SkipTensor(last_conv(resnet).out_channels, height, width))
        for down in getattr(block, "downsamplers", None) or []:
            height, width = after_strided_convs(down, height, width)
            layout.append(SkipTensor(last_conv(down).out_channels, height, width))
    return layout


def skip_sources(model: nn.Module) -> list[tuple[nn.Module, Callable]]:
    """Modules whose outputs are the skip tensors, with how to pick them from each output."""
    sources: list[tuple[nn.Module, Callable]] = [(model.conv_in, lambda out: [out])]
    sources += [(block, lambda out: list(out[1])) for block in model.down_blocks]
    return sources


def frames_group(runner: Runner, name: str, call: Callable[..., torch.Tensor], x: torch.Tensor, per_item=()) -> torch.Tensor:
    """Run ``call(x_slice, *per_item_slices)`` over batch-x-frame slices of ``x``."""
    return slicing.frames_group(runner, name, call, [x], per_item)


def up_group(
    runner: Runner,
    name: str,
    call: Callable[..., torch.Tensor],
    h: torch.Tensor,
    skip: torch.Tensor,
    upsampler: Callable | None,
    upsample_size: Sequence[int] | None,
    per_item: Sequence[torch.Tensor | None] = (),
    freeu: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """The up path's fused group: upsample (if pending), concatenate the skip, run ``call``.

    Per slice only, so neither the upsampled tensor nor the concatenation ever exists whole.
    """

    def fused(hs: torch.Tensor, rs: torch.Tensor, *rest) -> torch.Tensor:
        if upsampler is not None:
            hs = upsampler(hs, upsample_size)  # a module or a callable taking (x, output size)
        if freeu is not None:
            hs, rs = freeu(hs if upsampler is not None else hs.clone(), rs)
        return call(torch.cat([hs, rs], dim=1), *rest)

    return slicing.frames_group(runner, name, fused, [h, skip], per_item)


def output_head(runner: Runner, model: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """``conv_norm_out`` -> ``conv_act`` -> ``conv_out``, frame-sliced (GroupNorm is per frame here)."""

    def call(x: torch.Tensor) -> torch.Tensor:
        if getattr(model, "conv_norm_out", None) is not None:
            x = model.conv_act(model.conv_norm_out(x))
        return model.conv_out(x)

    return frames_group(runner, "conv_out", call, h)


def time_steps(timestep, sample: torch.Tensor, batch: int) -> torch.Tensor:
    """The host's timestep handling: a tensor of ``batch`` timesteps on the sample's device."""
    from diffusers.utils.torch_utils import maybe_adjust_dtype_for_device

    timesteps = timestep
    if not torch.is_tensor(timesteps):
        dtype = maybe_adjust_dtype_for_device(torch.float64 if isinstance(timestep, float) else torch.int64, sample.device)
        timesteps = torch.tensor([timesteps], dtype=dtype, device=sample.device)
    elif len(timesteps.shape) == 0:
        timesteps = timesteps[None].to(sample.device)
    return timesteps.expand(batch)


def needs_upsample_size(model: nn.Module, sample: torch.Tensor) -> bool:
    """True when the latent is not a multiple of the overall up factor (sizes must be forwarded)."""
    factor = 2**model.num_upsamplers
    return any(s % factor != 0 for s in sample.shape[-2:])
