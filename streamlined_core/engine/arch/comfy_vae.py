"""ComfyUI's ``VideoDecoder`` (``comfy/ldm/modules/temporal_ae.py``): SVD's VAE decoder, run by groups, exactly.

The same groups as diffusers' ``TemporalDecoder`` (``diffusers_vae.py``) on ComfyUI's classes: each
``VideoResBlock`` is its 2-D ``ResnetBlock`` over frame slices and its ``time_stack`` (a 3-D ResBlock
whose two GroupNorms span the whole video, on full-extent statistics) plus the learned mix over
pixel slices; the middle ``AttnBlock`` and the head (``norm_out``, the activation, ``conv_out``'s 2-D
convolution) over frame slices; ``conv_out``'s ``time_mix_conv`` over pixel slices. Each level's
``Upsample`` runs inside the next level's first spatial group, per slice, and same-shape groups write
over their input; the ResBlocks that allocate their output run over tiles (whole frames, then row
bands with halo rows and whole-frame statistics passes). ComfyUI decodes a batch of latents as one clip when no ``timesteps`` is given (the
host's ``VAE.decode`` cuts the batch by free memory first; the Streamline VAE Decode node does not).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import slicing
from ..slicing import Runner
from .comfy_common import cast_affine

SLOT = "forward"
SAMPLE = "z"


def matches(model: nn.Module) -> bool:
    """True for ComfyUI's ``VideoDecoder`` whose ResBlocks mix over time (``time_mode="conv-only"``, SVD's)."""
    if type(model).__name__ != "VideoDecoder" and not any(c.__name__ == "VideoDecoder" for c in type(model).__mro__):
        return False
    return getattr(model, "time_mode", None) == "conv-only" and hasattr(model, "mid") and hasattr(model, "up")


def _frames(arguments: dict) -> int:
    return int(arguments.get("timesteps") or arguments["z"].shape[0])


def call_shape(arguments: dict) -> tuple[int, int, int, int]:
    """(batch, frames, latent height, latent width): the batch is one clip unless ``timesteps`` says otherwise."""
    n, _, h, w = arguments["z"].shape
    frames = _frames(arguments)
    return n // frames, frames, h, w


def _base(module: nn.Module, name: str) -> type:
    """The class named ``name`` among ``module``'s bases (ComfyUI builds these through ``partialclass``)."""
    for cls in type(module).__mro__:
        if cls.__name__ == name:
            return cls
    raise TypeError(f"{type(module).__name__} has no base {name}")


def floor_bytes(decoder: nn.Module, arguments: dict) -> int:
    """One tensor of the output level (``ch`` channels, every frame at full size), the decode's floor."""
    n, _, h, w = arguments["z"].shape
    scale = 2 ** (decoder.num_resolutions - 1)
    dtype = decoder.conv_out.weight.dtype
    return n * decoder.ch * (h * scale) * (w * scale) * torch.empty((), dtype=dtype).element_size()


def _time_stack(runner: Runner, name: str, block: nn.Module, x: torch.Tensor, batch: int, frames: int) -> torch.Tensor:
    ts = block.time_stack
    parts = slicing.TemporalResBlock(
        norm1=ts.in_layers[0],
        first=lambda h: ts.in_layers[2](ts.in_layers[1](h)),
        norm2=ts.out_layers[0],
        second=lambda h: ts.out_layers[1:](h),
        shortcut=ts.skip_connection,
        whole=lambda v: ts(v, None),
        affine=cast_affine,
    )
    alpha = block.get_alpha(bs=batch).to(x.device)
    mix = lambda v, out: alpha * out + (1.0 - alpha) * v  # noqa: E731 - VideoResBlock.forward's merge
    return slicing.temporal_resblock(runner, name, parts, x, batch, frames, mix, in_place=True)


def _upsampler_halo(up: nn.Module) -> int | None:
    """1 for ComfyUI's ``Upsample`` as SVD's VAE has it (nearest 2x, then a 3x3 convolution), else None."""
    if type(up).__name__ != "Upsample" or not getattr(up, "with_conv", False):
        return None
    if getattr(up, "scale_factor", 2.0) not in (2, 2.0):
        return None
    return slicing.conv_halo(up.conv)


def tiled_parts(block: nn.Module, spatial, upsampler: nn.Module | None) -> slicing.SpatialResBlock | None:
    """A ``VideoResBlock``'s 2-D ``ResnetBlock`` in the parts a row band runs, or None where its layout is
    not one :func:`~streamlined_core.engine.slicing.spatial_resblock` reproduces."""
    halos = [slicing.conv_halo(block.conv1), slicing.conv_halo(block.conv2)]
    if None in halos or not isinstance(block.norm1, nn.GroupNorm) or not isinstance(block.norm2, nn.GroupNorm):
        return None
    shortcut = None
    if block.in_channels != block.out_channels:
        shortcut = block.conv_shortcut if block.use_conv_shortcut else block.nin_shortcut
        if slicing.conv_halo(shortcut) not in (0, 1):  # 1x1 or 3x3: a band's one-row shortcut halo covers both
            return None
    if upsampler is not None and _upsampler_halo(upsampler) != 1:
        return None
    return slicing.SpatialResBlock(
        norm1=block.norm1,
        first=lambda h: block.conv1(block.swish(h)),
        norm2=block.norm2,
        second=lambda h: block.conv2(block.dropout(block.swish(h))),
        shortcut=shortcut if shortcut is not None else (lambda v: v),
        add=lambda v, h: v + h,  # ResnetBlock.forward's sum
        whole=lambda v: spatial(block, v, None),
        affine=cast_affine,
        upsampler=upsampler,
        halo=sum(halos),
    )


def resblock(runner: Runner, name: str, block: nn.Module, feature: list[torch.Tensor], batch: int, frames: int,
             upsampler: nn.Module | None = None) -> torch.Tensor:
    """A ``VideoResBlock``: its ``ResnetBlock`` (a pending upsampler first), then its ``time_stack`` and mix
    over pixels, in place. The ``ResnetBlock`` runs over tiles (whole frames, then row bands), written over
    its input where its output has its input's shape. ``feature`` holds the input alone and gives it up."""
    spatial = _base(block, "ResnetBlock").forward
    x = feature.pop()
    same = upsampler is None and block.in_channels == block.out_channels
    parts = tiled_parts(block, spatial, upsampler)
    if parts is not None:
        h = slicing.spatial_resblock(runner, f"{name}.spatial", parts, x, in_place=same)
    elif upsampler is not None:
        h = slicing.frames_group(runner, f"{name}.spatial", lambda xs: spatial(block, upsampler(xs), None), [x])
    else:
        same = block.in_channels == block.out_channels
        h = slicing.frames_group(runner, f"{name}.spatial", lambda xs: spatial(block, xs, None), [x], in_place=same)
    del x
    return _time_stack(runner, f"{name}.temporal", block, h, batch, frames)


def streamlined_forward(decoder: nn.Module, runner: Runner, z: torch.Tensor, **kwargs) -> torch.Tensor:
    """``VideoDecoder.forward`` run by groups: the same arguments, the same result within rounding."""
    if kwargs.get("skip_video"):
        return type(decoder).forward(decoder, z, **kwargs)  # no time mixing: the host's own forward
    if z.dim() != 4:
        raise ValueError(f"z must be (batch x frames, channels, height, width) latents, got shape {tuple(z.shape)}")
    frames = _frames({"z": z, **kwargs})
    if frames < 1 or z.shape[0] % frames:
        raise ValueError(f"timesteps={frames} does not divide the {z.shape[0]} latent frames of z")
    batch = z.shape[0] // frames

    feature = [slicing.frames_group(runner, "conv_in", decoder.conv_in, [z])]
    feature.append(resblock(runner, "mid.block_1", decoder.mid.block_1, feature, batch, frames))
    feature.append(slicing.frames_group(runner, "mid.attn_1", decoder.mid.attn_1, [feature.pop()], in_place=True))
    feature.append(resblock(runner, "mid.block_2", decoder.mid.block_2, feature, batch, frames))
    pending = None
    for level in reversed(range(decoder.num_resolutions)):
        up = decoder.up[level]
        for i, block in enumerate(up.block):
            feature.append(resblock(runner, f"up.{level}.block.{i}", block, feature, batch, frames, upsampler=pending))
            pending = None
            if len(up.attn) > 0:
                feature.append(slicing.frames_group(runner, f"up.{level}.attn.{i}", up.attn[i], [feature.pop()],
                                                    in_place=True))
        if level != 0:
            pending = up.upsample
    if decoder.give_pre_end:
        return feature.pop()

    conv_out = decoder.conv_out
    conv2d = _base(conv_out, "AE3DConv").__mro__[1].forward  # the 2-D convolution AE3DConv runs first

    def head(xs: torch.Tensor) -> torch.Tensor:
        return conv2d(conv_out, torch.nn.functional.silu(decoder.norm_out(xs)))

    halo = slicing.conv_halo(conv_out)
    if halo is None or not isinstance(decoder.norm_out, nn.GroupNorm):
        h = slicing.frames_group(runner, "conv_out", head, [feature.pop()])
    else:
        h = slicing.spatial_head(runner, "conv_out", decoder.norm_out,
                                 lambda v: conv2d(conv_out, torch.nn.functional.silu(v)), cast_affine, halo, head,
                                 feature.pop())
    h = slicing.time_conv(runner, "conv_out.time_mix_conv", conv_out.time_mix_conv, h, batch, frames)
    return torch.tanh(h) if decoder.tanh_out else h
