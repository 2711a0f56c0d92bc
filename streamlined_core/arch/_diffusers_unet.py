"""The down path shared by diffusers' video U-Nets: ``conv_in``, then down blocks that each
return ``(hidden_states, residuals)`` with one residual per resnet and one per downsampler."""

from __future__ import annotations

from typing import Callable

from torch import nn


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
