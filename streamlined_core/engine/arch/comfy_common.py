"""What the adapters of ComfyUI's U-Nets share (``comfy_unet`` for its own U-Nets, ``comfy_ade`` for
AnimateDiff-Evolved's motion modules, ``comfy_vae`` for its VAE): the values one call's layers read, and
norm parameters and forward signatures read the way ComfyUI's own forward reads them.

Nothing here imports ComfyUI: ``comfy.ops`` is looked up in ``sys.modules`` when it is loaded.
"""

from __future__ import annotations

import functools
import inspect
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import slicing


def cast_affine(norm: nn.Module, like: torch.Tensor):
    """A ComfyUI norm's affine parameters the way its own forward gets them (cast, LoRA-patched)."""
    ops = sys.modules.get("comfy.ops")
    cast = getattr(ops, "cast_bias_weight", None)
    patched = getattr(norm, "comfy_cast_weights", False) or getattr(norm, "weight_function", None) or getattr(norm, "bias_function", None)
    if cast is not None and patched:
        out = cast(norm, like)
        return out[0], out[1]
    return slicing.module_affine(norm, like.dtype)


@functools.lru_cache(maxsize=None)
def forward_signature(cls: type) -> inspect.Signature:
    """The signature of a layer class's ``forward`` (cached per class)."""
    return inspect.signature(cls.forward)


@dataclass
class Call:
    """The values every layer of one ``_forward`` call reads."""

    emb: torch.Tensor | None
    context: Any
    transformer_options: dict
    time_context: Any
    frames: int
    batch: int
    image_only_indicator: Any
    cross_frame: int | None = None  # AnimateDiff-Evolved's cross-frame GroupNorm mode: frames per video
