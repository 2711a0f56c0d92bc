"""diffusers ``UNetMotionModel`` (AnimateDiff: an SD1.5 U-Net with motion modules).

Groups: ResBlocks, spatial transformers, downsamplers and the output head are spatial groups
(frame-sliced; in the up path the skip concatenation and the upsampler fuse into the ResBlock's
group); every motion module is a temporal group (pixel-sliced), its GroupNorm on statistics over
all frames and pixels of each video, as diffusers defines it. The engine runs the forward as stages
(``stages.py``), so every skip is freed as soon as the up path has consumed it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import slicing
from ..slicing import Pixels, Runner, pixel_view, to_video
from ..stages import CutState
from ..stages import run as run_stages
from . import diffusers_common as common


def matches(model: nn.Module) -> bool:
    """True for diffusers' AnimateDiff U-Net."""
    return type(model).__name__ == "UNetMotionModel" and hasattr(model, "down_blocks")


skip_layout = common.skip_layout
skip_sources = common.skip_sources
cuts = common.cuts


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
    affine = slicing.module_affine(mm.norm, x.dtype)

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
    """``UNetMotionModel.forward`` run as stages, every layer group run by ``runner``."""
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

    def prologue(x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 1, 3, 4).reshape((batch * frames, -1) + x.shape[3:])

    def resnet(name: str, res: nn.Module):
        return lambda h: common.frames(runner, name, _resnet(res), h, [emb])

    def up_resnet(name: str, res: nn.Module, block: nn.Module):
        freeu = None
        if all(getattr(block, k, None) for k in ("s1", "s2", "b1", "b2")):
            from diffusers.utils.torch_utils import apply_freeu

            def freeu(hs, rs):
                return apply_freeu(block.resolution_idx, hs, rs, s1=block.s1, s2=block.s2, b1=block.b1, b2=block.b2)

        return lambda h, take_skip, upsampler, size: common.up_group(runner, name, _resnet(res), h, take_skip(), upsampler,
                                                                     size, [emb], freeu=freeu)

    def attention(name: str, attn: nn.Module):
        return lambda h: common.frames(runner, name, _attention(attn, cak), h, [context, attention_mask, None])

    def motion(name: str, mm: nn.Module):
        return lambda h: motion_module(runner, name, mm, h, batch, frames)

    layers = common.Layers(resnet, up_resnet, attention, motion)
    unet_stages = common.build_stages(unet, runner, layers, prologue, forward_upsample_size,
                                      down_block_additional_residuals, mid_block_additional_residual)
    out = run_stages(unet_stages, sample, runner.request, runner.emit)
    if isinstance(out, CutState):
        return out
    out = out[None, :].reshape((-1, frames) + out.shape[1:]).permute(0, 2, 1, 3, 4)
    if not return_dict:
        return (out,)
    from diffusers.models.unets.unet_motion_model import UNetMotionOutput

    return UNetMotionOutput(sample=out)
