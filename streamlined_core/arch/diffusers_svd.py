"""diffusers ``UNetSpatioTemporalConditionModel`` (SVD, SVD-XT)."""

from __future__ import annotations

from torch import nn

from . import _diffusers_unet


def matches(model: nn.Module) -> bool:
    """True for diffusers' SVD U-Net."""
    return type(model).__name__ == "UNetSpatioTemporalConditionModel" and hasattr(model, "down_blocks")


skip_layout = _diffusers_unet.skip_layout
skip_sources = _diffusers_unet.skip_sources
