"""ComfyUI's ``openaimodel.UNetModel`` (SVD's video blocks, and SD1.5 under AnimateDiff-Evolved).

Nothing here imports ComfyUI: the model is recognised by its structure and class names.
"""

from __future__ import annotations

from typing import Callable

from torch import nn


def matches(model: nn.Module) -> bool:
    """True for ComfyUI's ``UNetModel``."""
    return (
        type(model).__name__ == "UNetModel"
        and type(model).__module__.startswith("comfy.")
        and hasattr(model, "input_blocks")
        and hasattr(model, "output_blocks")
    )


def skip_layout(model: nn.Module, height: int, width: int):
    """Skip tensors per batch-x-frame item: one per input block (``hs`` in ``UNetModel._forward``)."""
    from . import SkipTensor, after_strided_convs, last_conv

    layout = []
    for block in model.input_blocks:
        first = block[0]
        height, width = after_strided_convs(first, height, width)
        channels = first.out_channels if isinstance(first, nn.modules.conv._ConvNd) else last_conv(first).out_channels
        layout.append(SkipTensor(channels, height, width))
    return layout


def skip_sources(model: nn.Module) -> list[tuple[nn.Module, Callable]]:
    """The last layer of each input block: ``forward_timestep_embed`` calls layers, not the block."""
    return [(block[-1], lambda out: [out]) for block in model.input_blocks]
