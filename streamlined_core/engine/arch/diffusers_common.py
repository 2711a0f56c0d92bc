"""Pieces shared by diffusers' video U-Nets (SVD and AnimateDiff).

Both families have the same skeleton: ``conv_in``; down blocks that each hand one skip tensor per
resnet (after its attention and motion module, where present) and one per downsampler; a middle
block; up blocks whose units pop a skip; the output head. :func:`build_stages` turns that skeleton
into the stage list the core loop runs, from the per-layer group functions each adapter supplies
(:class:`Layers`); the up path's skip concatenation and pending upsampler fuse into the spatial
group of the unit's resnet.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch
from torch import nn

from .. import slicing
from ..slicing import Runner
from ..stages import Pending, Stage, StageIO, StageSpec, UNetStages

Group = Callable[[torch.Tensor], torch.Tensor]


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


@dataclass(frozen=True)
class Layers:
    """One call's per-layer group functions: each returns the group (feature in, feature out).

    ``up_resnet(name, module, block)`` returns the fused group ``(h, take_skip, upsample, size) -> h``
    that upsamples (if ``upsample``), concatenates the skip (``take_skip()``: called where it is
    consumed, so it is freed right after) and runs the resnet, per slice.
    """

    resnet: Callable[[str, nn.Module], Group]
    up_resnet: Callable[[str, nn.Module, nn.Module], Callable[..., torch.Tensor]]
    attention: Callable[[str, nn.Module], Group]
    motion: Callable[[str, nn.Module], Group] | None = None  # AnimateDiff's motion modules


def build_stages(
    unet: nn.Module,
    runner: Runner,
    layers: Layers,
    prologue: Callable[[torch.Tensor], torch.Tensor],
    forward_upsample_size: bool,
    down_residuals: Sequence[torch.Tensor] | None = None,
    mid_residual: torch.Tensor | None = None,
) -> UNetStages:
    """The stage list of a diffusers video U-Net call (``prologue`` maps the sample to ``conv_in``'s input)."""
    stages: list[Stage] = [Stage(StageSpec("prologue", "prologue", "prologue"), lambda h, io: prologue(h))]
    residuals = list(down_residuals) if down_residuals is not None else None

    def pushed() -> Callable[[torch.Tensor], torch.Tensor] | None:
        # ControlNet's down residuals are added to the skips only, never to the feature that goes on
        if residuals is None:
            return None
        index = sum(s.spec.push for s in stages)
        if index >= len(residuals):
            raise ValueError(f"down_block_additional_residuals holds {len(residuals)} tensors; this U-Net hands "
                             f"{len(skip_layout(unet, 1, 1))} skip tensors to its up path")
        r = residuals[index]
        return lambda h: h + r

    def plain(name: str, section, kind, group: Group, push: bool = False, uses_emb: bool = False) -> None:
        spec = StageSpec(name, section, kind, push=push, uses_emb=uses_emb)
        stages.append(Stage(spec, lambda h, io: group(h), skip_of=pushed() if push else None))

    plain("conv_in", "down", "conv_in", unet.conv_in, push=True)
    for i, block in enumerate(unet.down_blocks):
        attentions = getattr(block, "attentions", None)
        motion = getattr(block, "motion_modules", None)
        for j, res in enumerate(block.resnets):
            unit = [(f"down_blocks.{i}.resnets.{j}", "res", layers.resnet(f"down_blocks.{i}.resnets.{j}", res))]
            if attentions is not None:
                unit.append((f"down_blocks.{i}.attentions.{j}", "attn", layers.attention(f"down_blocks.{i}.attentions.{j}", attentions[j])))
            if motion is not None and layers.motion is not None:
                name = f"down_blocks.{i}.motion_modules.{j}"
                unit.append((name, "motion", layers.motion(name, motion[j])))
            for k, (name, kind, group) in enumerate(unit):
                plain(name, "down", kind, group, push=k == len(unit) - 1, uses_emb=kind == "res")
        downsamplers = getattr(block, "downsamplers", None) or []
        for d, down in enumerate(downsamplers):
            name = f"down_blocks.{i}.downsamplers.{d}"
            plain(name, "down", "down", lambda h, name=name, down=down: frames(runner, name, down, h),
                  push=d == len(downsamplers) - 1)

    mid = unet.mid_block
    if mid is not None:
        plain("mid_block.resnets.0", "mid", "res", layers.resnet("mid_block.resnets.0", mid.resnets[0]), uses_emb=True)
        motion = getattr(mid, "motion_modules", None) or [None] * len(mid.attentions)
        for j, (attn, res, mm) in enumerate(zip(mid.attentions, mid.resnets[1:], motion)):
            plain(f"mid_block.attentions.{j}", "mid", "attn", layers.attention(f"mid_block.attentions.{j}", attn))
            if mm is not None and layers.motion is not None:
                plain(f"mid_block.motion_modules.{j}", "mid", "motion", layers.motion(f"mid_block.motion_modules.{j}", mm))
            plain(f"mid_block.resnets.{j + 1}", "mid", "res", layers.resnet(f"mid_block.resnets.{j + 1}", res), uses_emb=True)
    if mid_residual is not None:  # ControlNet's middle residual goes onto the feature after the middle block
        if mid is None:
            raise ValueError("mid_block_additional_residual was given but this U-Net has no mid_block")
        last = stages[-1]
        stages[-1] = replace(last, body=lambda h, io, body=last.body: body(h, io) + mid_residual)

    for i, block in enumerate(unet.up_blocks):
        attentions = getattr(block, "attentions", None)
        motion = getattr(block, "motion_modules", None)
        upsampler = block.upsamplers[0] if getattr(block, "upsamplers", None) else None
        for j, res in enumerate(block.resnets):
            name = f"up_blocks.{i}.resnets.{j}"
            fused = layers.up_resnet(name, res, block)

            def body(_: None, io: StageIO, fused=fused) -> torch.Tensor:
                size = None
                if io.pending is not None and forward_upsample_size and io.pending.skip_shape is not None:
                    size = io.pending.skip_shape[2:]
                return fused(io.take_feature(), io.take_skip, io.pending.module if io.pending is not None else None, size)

            unit = [(StageSpec(name, "up", "res", consumes=True, uses_emb=True, takes_feature=True), body)]
            if attentions is not None:
                group = layers.attention(f"up_blocks.{i}.attentions.{j}", attentions[j])
                unit.append((StageSpec(f"up_blocks.{i}.attentions.{j}", "up", "attn"), lambda h, io, g=group: g(h)))
            if motion is not None and layers.motion is not None:
                group = layers.motion(f"up_blocks.{i}.motion_modules.{j}", motion[j])
                unit.append((StageSpec(f"up_blocks.{i}.motion_modules.{j}", "up", "motion"), lambda h, io, g=group: g(h)))
            for k, (spec, b) in enumerate(unit):
                last_unit = j == len(block.resnets) - 1 and k == len(unit) - 1
                if last_unit and upsampler is not None:
                    stages.append(Stage(replace(spec, upsamples=True), b, upsampler=upsampler))
                else:
                    stages.append(Stage(spec, b))

    def head(h: torch.Tensor, io: StageIO) -> torch.Tensor:
        return output_head(runner, unet, h)

    stages.append(Stage(StageSpec("conv_out", "head", "head"), head))

    def flush(h: torch.Tensor, pending: Pending) -> torch.Tensor:  # an up path ending on an upsampler
        return frames(runner, "upsample", lambda xs: pending.module(xs, output_size=None), h)

    return UNetStages(stages, flush)


def cuts(unet: nn.Module) -> list:
    """The cut points of a diffusers video U-Net, from its structure alone (no call is made)."""
    def never(*_args):
        return None

    motion = never if any(hasattr(b, "motion_modules") for b in unet.down_blocks) else None
    return build_stages(unet, Runner(), Layers(never, never, never, motion), never, False).cuts


def frames(runner: Runner, name: str, call: Callable[..., torch.Tensor], x: torch.Tensor, per_item=()) -> torch.Tensor:
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
            hs = upsampler(hs, output_size=upsample_size)
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

    return frames(runner, "conv_out", call, h)


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
