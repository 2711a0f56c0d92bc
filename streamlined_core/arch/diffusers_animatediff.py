"""diffusers ``UNetMotionModel`` (AnimateDiff: an SD1.5 U-Net with motion modules).

Groups: ResBlocks, spatial transformers, downsamplers and the output head are spatial groups
(frame-sliced; in the up path the skip concatenation and the upsampler fuse into the ResBlock's
group); every motion module is a temporal group (pixel-sliced), its GroupNorm on statistics over
all frames and pixels of each video, as diffusers defines it. The engine owns the forward, so every
skip is freed as soon as the up path has consumed it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import slicing
from ..slicing import Pixels, Runner, pixel_view, to_video
from . import _diffusers_unet as common


def matches(model: nn.Module) -> bool:
    """True for diffusers' AnimateDiff U-Net."""
    return type(model).__name__ == "UNetMotionModel" and hasattr(model, "down_blocks")


skip_layout = common.skip_layout
skip_sources = common.skip_sources


def call_shape(arguments: dict) -> tuple[int, int, int, int]:
    """(batch, frames, latent height, latent width) of a (B, C, T, h, w) sample."""
    b, _, t, h, w = arguments["sample"].shape
    return b, t, h, w


def motion_module(runner: Runner, name: str, mm: nn.Module, x: torch.Tensor, batch: int, frames: int) -> torch.Tensor:
    """``AnimateDiffTransformer3D`` on pixel slices, its GroupNorm over all frames and pixels."""
    n, c, height, width = x.shape
    pixels = height * width
    xv = pixel_view(x, batch, frames)
    stats = slicing.GroupNormStats(mm.norm.num_groups)
    affine = slicing.norm_affine(mm.norm, x.dtype)

    def norm_stats(a: int, b: int, mode) -> None:
        stats.add(to_video(xv[..., a:b]))

    def body(a: int, b: int) -> torch.Tensor:
        p = b - a
        xs = xv[..., a:b]
        v = to_video(xs)
        h = mm.norm(v) if p == pixels else slicing.group_norm(v, stats, mm.norm.eps, affine)
        h = h.squeeze(-1).permute(0, 3, 2, 1).reshape(batch * p, frames, c)
        h = mm.proj_in(input=h)
        for block in mm.transformer_blocks:
            h = block(hidden_states=h, encoder_hidden_states=None, timestep=None, cross_attention_kwargs=None, class_labels=None)
        h = mm.proj_out(input=h)
        return h.view(batch, p, frames, c).permute(0, 2, 3, 1) + xs

    return runner.run(name, "pixels", pixels, body, Pixels(batch, frames, height, width), passes=[norm_stats])


def _attention(attn: nn.Module, kwargs: dict[str, Any]):
    def call(xs: torch.Tensor, context, mask, encoder_mask) -> torch.Tensor:
        return attn(
            hidden_states=xs, encoder_hidden_states=context, attention_mask=mask,
            encoder_attention_mask=encoder_mask, return_dict=False, **kwargs,
        )[0]

    return call


def _resnet(resnet: nn.Module):
    return lambda xs, temb: resnet(input_tensor=xs, temb=temb)


def streamlined_forward(
    unet: nn.Module,
    runner: Runner,
    sample: torch.Tensor,
    timestep,
    encoder_hidden_states: torch.Tensor,
    timestep_cond: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    cross_attention_kwargs: dict[str, Any] | None = None,
    added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    down_block_additional_residuals: tuple[torch.Tensor] | None = None,
    mid_block_additional_residual: torch.Tensor | None = None,
    return_dict: bool = True,
):
    """``UNetMotionModel.forward`` with every layer group run by ``runner``."""
    forward_upsample_size = common.needs_upsample_size(unet, sample)
    if attention_mask is not None:
        attention_mask = ((1 - attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
    batch, frames = sample.shape[0], sample.shape[2]
    timesteps = common.time_steps(timestep, sample, batch)
    emb = unet.time_embedding(unet.time_proj(timesteps).to(dtype=unet.dtype), timestep_cond)
    if unet.config.addition_embed_type == "text_time":
        for key in ("text_embeds", "time_ids"):
            if key not in (added_cond_kwargs or {}):
                raise ValueError(f"{type(unet).__name__} with addition_embed_type 'text_time' needs `{key}` in added_cond_kwargs")
        text_embeds = added_cond_kwargs["text_embeds"]
        time_embeds = unet.add_time_proj(added_cond_kwargs["time_ids"].flatten()).reshape((text_embeds.shape[0], -1))
        emb = emb + unet.add_embedding(torch.concat([text_embeds, time_embeds], dim=-1).to(emb.dtype))
    emb = emb.repeat_interleave(frames, dim=0, output_size=emb.shape[0] * frames)
    context: Any = encoder_hidden_states
    if unet.encoder_hid_proj is not None and unet.config.encoder_hid_dim_type == "ip_image_proj":
        if "image_embeds" not in (added_cond_kwargs or {}):
            raise ValueError(f"{type(unet).__name__} with an image projection needs `image_embeds` in added_cond_kwargs")
        image_embeds = unet.encoder_hid_proj(added_cond_kwargs["image_embeds"])
        image_embeds = [e.repeat_interleave(frames, dim=0, output_size=e.shape[0] * frames) for e in image_embeds]
        context = (encoder_hidden_states, image_embeds)
    cak = {"cross_attention_kwargs": cross_attention_kwargs}

    x = sample.permute(0, 2, 1, 3, 4).reshape((batch * frames, -1) + sample.shape[3:])
    h = unet.conv_in(x)
    del x

    skips = [h]
    for i, block in enumerate(unet.down_blocks):
        attentions = getattr(block, "attentions", None)
        for j, (res, mm) in enumerate(zip(block.resnets, block.motion_modules)):
            h = common.frames_group(runner, f"down_blocks.{i}.resnets.{j}", _resnet(res), h, [emb])
            if attentions is not None:
                h = common.frames_group(
                    runner, f"down_blocks.{i}.attentions.{j}", _attention(attentions[j], cak), h,
                    [context, attention_mask, None],
                )
            h = motion_module(runner, f"down_blocks.{i}.motion_modules.{j}", mm, h, batch, frames)
            skips.append(h)
        for d, down in enumerate(block.downsamplers or []):
            h = common.frames_group(runner, f"down_blocks.{i}.downsamplers.{d}", lambda xs, down=down: down(hidden_states=xs), h)
        if block.downsamplers:
            skips.append(h)
    if down_block_additional_residuals is not None:
        skips = [s + r for s, r in zip(skips, down_block_additional_residuals)]

    mid = unet.mid_block
    if mid is not None:
        h = common.frames_group(runner, "mid_block.resnets.0", _resnet(mid.resnets[0]), h, [emb])
        motion = getattr(mid, "motion_modules", None) or [None] * len(mid.attentions)
        for j, (attn, res, mm) in enumerate(zip(mid.attentions, mid.resnets[1:], motion)):
            h = common.frames_group(runner, f"mid_block.attentions.{j}", _attention(attn, cak), h, [context, attention_mask, None])
            if mm is not None:
                h = motion_module(runner, f"mid_block.motion_modules.{j}", mm, h, batch, frames)
            h = common.frames_group(runner, f"mid_block.resnets.{j + 1}", _resnet(res), h, [emb])
    if mid_block_additional_residual is not None:
        h = h + mid_block_additional_residual

    pending, upsample_size = None, None
    for i, block in enumerate(unet.up_blocks):
        attentions = getattr(block, "attentions", None)
        freeu = None
        if all(getattr(block, k, None) for k in ("s1", "s2", "b1", "b2")):
            from diffusers.utils.torch_utils import apply_freeu

            def freeu(hs, rs, block=block):
                return apply_freeu(block.resolution_idx, hs, rs, s1=block.s1, s2=block.s2, b1=block.b1, b2=block.b2)

        for j, (res, mm) in enumerate(zip(block.resnets, block.motion_modules)):
            skip = skips.pop()
            if pending is not None and forward_upsample_size:
                upsample_size = skip.shape[2:]
            up = None if pending is None else (lambda xs, size, pending=pending: pending(hidden_states=xs, output_size=size))
            h = common.up_group(
                runner, f"up_blocks.{i}.resnets.{j}", _resnet(res), h, skip, up, upsample_size, [emb], freeu=freeu
            )
            del skip
            pending = None
            if attentions is not None:
                h = common.frames_group(
                    runner, f"up_blocks.{i}.attentions.{j}", _attention(attentions[j], cak), h,
                    [context, attention_mask, None],
                )
            h = motion_module(runner, f"up_blocks.{i}.motion_modules.{j}", mm, h, batch, frames)
        if block.upsamplers:
            (pending,) = block.upsamplers
    if pending is not None:
        h = common.frames_group(runner, "upsample", lambda xs: pending(hidden_states=xs, output_size=upsample_size), h)

    out = common.output_head(runner, unet, h)
    out = out[None, :].reshape((-1, frames) + out.shape[1:]).permute(0, 2, 1, 3, 4)
    if not return_dict:
        return (out,)
    from diffusers.models.unets.unet_motion_model import UNetMotionOutput

    return UNetMotionOutput(sample=out)
