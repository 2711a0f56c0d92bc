"""diffusers ``UNetSpatioTemporalConditionModel`` (SVD, SVD-XT).

Groups: each ``SpatioTemporalResBlock`` is a spatial group (its 2-D ResBlock, frame-sliced) and a
temporal group (its 3-D ResBlock and mixer, pixel-sliced, with both video-wide GroupNorms on
full-extent statistics); each ``TransformerSpatioTemporalModel`` is a spatial group (norm,
``proj_in``, spatial block) and a temporal group (temporal block with its per-pixel time context,
mixer, ``proj_out``, residual). The engine runs the forward as stages (``stages.py``), so the up
path's skip concatenation and upsamplers fuse into the spatial group after them and every skip is
freed once consumed.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import slicing
from ..slicing import Pixels, Runner, Tokens, pixel_view
from ..stages import CutState, UNetStages
from ..stages import run as run_stages
from . import diffusers_common as common


def matches(model: nn.Module) -> bool:
    """True for diffusers' SVD U-Net."""
    return type(model).__name__ == "UNetSpatioTemporalConditionModel" and hasattr(model, "down_blocks")


skip_layout = common.skip_layout
skip_sources = common.skip_sources
cuts = common.cuts


def call_shape(arguments: dict) -> tuple[int, int, int, int]:
    """(batch, frames, latent height, latent width) of a (B, T, C, h, w) sample."""
    b, t, _, h, w = arguments["sample"].shape
    return b, t, h, w


def temporal_resblock(
    runner: Runner, name: str, block: nn.Module, x: torch.Tensor, temb: torch.Tensor | None,
    batch: int, frames: int, image_only_indicator: torch.Tensor, in_place: bool = False,
) -> torch.Tensor:
    """``SpatioTemporalResBlock``'s temporal half on pixel slices: 3-D ResBlock, then the mixer
    (``in_place``: written over ``x``, which must belong to the caller alone)."""
    trb = block.temporal_res_block
    temb3 = temb.reshape(batch, frames, -1) if temb is not None else None
    temb_term = None
    if trb.time_emb_proj is not None and temb3 is not None:
        temb_term = trb.time_emb_proj(trb.nonlinearity(temb3))[:, :, :, None, None].permute(0, 2, 1, 3, 4)

    def first(h: torch.Tensor) -> torch.Tensor:
        h = trb.conv1(trb.nonlinearity(h))
        return h + temb_term if temb_term is not None else h

    parts = slicing.TemporalResBlock(
        norm1=trb.norm1,
        first=first,
        norm2=trb.norm2,
        second=lambda h: trb.conv2(trb.dropout(trb.nonlinearity(h))),
        shortcut=lambda v: trb.conv_shortcut(v) if trb.conv_shortcut is not None else v,
        whole=lambda v: trb(v, temb3),
        affine=lambda norm, like: slicing.module_affine(norm, like.dtype),
    )
    mix = lambda v, out: block.time_mixer(x_spatial=v, x_temporal=out, image_only_indicator=image_only_indicator)  # noqa: E731
    return slicing.temporal_resblock(runner, name, parts, x, batch, frames, mix, in_place=in_place)


def resblock(runner, name, block, x, temb, batch, frames, ioi) -> torch.Tensor:
    """A whole ``SpatioTemporalResBlock``: its spatial group, then its temporal group."""
    h = common.frames(runner, f"{name}.spatial", block.spatial_res_block, x, [temb])
    return temporal_resblock(runner, f"{name}.temporal", block, h, temb, batch, frames, ioi)


def transformer(
    runner: Runner, name: str, tr: nn.Module, x: torch.Tensor, context: torch.Tensor,
    batch: int, frames: int, image_only_indicator: torch.Tensor,
) -> torch.Tensor:
    """``TransformerSpatioTemporalModel``: per layer a spatial group and a temporal group."""
    n, c, height, width = x.shape
    pixels = height * width
    first_context = context[None, :].reshape(batch, frames, -1, context.shape[-1])[:, 0]
    positions = torch.arange(frames, device=x.device).repeat(batch, 1).reshape(-1)
    layers = list(zip(tr.transformer_blocks, tr.temporal_transformer_blocks))
    emb = None
    h = x
    for i, (block, temporal_block) in enumerate(layers):
        last = i == len(layers) - 1
        suffix = "" if i == 0 else f".{i}"

        if i == 0:
            def spatial(xs: torch.Tensor, ctx: torch.Tensor, block=block) -> torch.Tensor:
                hs = tr.norm(xs)
                hs = hs.permute(0, 2, 3, 1).reshape(xs.shape[0], pixels, hs.shape[1])
                return block(tr.proj_in(hs), encoder_hidden_states=ctx)
        else:
            def spatial(hs: torch.Tensor, ctx: torch.Tensor, block=block) -> torch.Tensor:
                return block(hs, encoder_hidden_states=ctx)

        h = common.frames(runner, f"{name}.spatial{suffix}", spatial, h, [context])
        if emb is None:
            emb = tr.time_pos_embed(tr.time_proj(positions).to(dtype=h.dtype))[:, None, :]
        dim = h.shape[-1]
        hv = h.view(batch, frames, pixels, dim)

        def temporal(a: int, b: int, temporal_block=temporal_block, last=last, hv=hv) -> torch.Tensor:
            p = b - a
            hs = hv[:, :, a:b].reshape(n, p, dim)
            time_context = first_context[:, None].broadcast_to(batch, p, *first_context.shape[1:])
            time_context = time_context.reshape(batch * p, -1, first_context.shape[-1])
            mix = temporal_block(hs + emb, num_frames=frames, encoder_hidden_states=time_context)
            hs = tr.time_mixer(x_spatial=hs, x_temporal=mix, image_only_indicator=image_only_indicator)
            if not last:
                return hs
            out = tr.proj_out(hs).view(batch, frames, p, -1).permute(0, 1, 3, 2)
            return out + pixel_view(x, batch, frames)[..., a:b]

        merge = Pixels(batch, frames, height, width) if last else Tokens(pixels)
        h = runner.run(f"{name}.temporal{suffix}", "pixels", pixels, temporal, merge)
        del hv
    return h


def stages(unet: nn.Module, runner: Runner, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
           added_time_ids: torch.Tensor) -> UNetStages:
    """The stage list of one ``UNetSpatioTemporalConditionModel.forward`` call, every group run by ``runner``."""
    batch, frames = sample.shape[:2]
    call: dict[str, torch.Tensor] = {}

    def prologue(x: torch.Tensor) -> torch.Tensor:
        timesteps = common.time_steps(timestep, x, batch)
        emb = unet.time_embedding(unet.time_proj(timesteps).to(dtype=x.dtype))
        time_embeds = unet.add_time_proj(added_time_ids.flatten()).reshape((batch, -1)).to(emb.dtype)
        emb = emb + unet.add_embedding(time_embeds)
        call["emb"] = emb.repeat_interleave(frames, dim=0, output_size=emb.shape[0] * frames)
        call["context"] = encoder_hidden_states.repeat_interleave(
            frames, dim=0, output_size=encoder_hidden_states.shape[0] * frames
        )
        call["ioi"] = torch.zeros(batch, frames, dtype=x.dtype, device=x.device)
        return x.flatten(0, 1)

    def resnet(name: str, res: nn.Module):
        return lambda h: resblock(runner, name, res, h, call["emb"], batch, frames, call["ioi"])

    def up_resnet(name: str, res: nn.Module, block: nn.Module):
        def fused(h, take_skip, upsampler, size):
            h = common.up_group(runner, f"{name}.spatial", res.spatial_res_block, h, take_skip(), upsampler, size,
                                [call["emb"]])  # the skip is freed here, before the temporal group
            return temporal_resblock(runner, f"{name}.temporal", res, h, call["emb"], batch, frames, call["ioi"])
        return fused

    def attention(name: str, tr: nn.Module):
        return lambda h: transformer(runner, name, tr, h, call["context"], batch, frames, call["ioi"])

    layers = common.Layers(resnet, up_resnet, attention)
    return common.build_stages(unet, runner, layers, prologue, common.needs_upsample_size(unet, sample))


def streamlined_forward(
    unet: nn.Module,
    runner: Runner,
    sample: torch.Tensor,
    timestep,
    encoder_hidden_states: torch.Tensor,
    added_time_ids: torch.Tensor,
    return_dict: bool = True,
):
    """``UNetSpatioTemporalConditionModel.forward`` run as stages, every layer group run by ``runner``."""
    batch, frames = sample.shape[:2]
    out = run_stages(stages(unet, runner, sample, timestep, encoder_hidden_states, added_time_ids), sample,
                     runner.request, runner.emit)
    if isinstance(out, CutState):
        return out
    out = out.reshape(batch, frames, *out.shape[1:])
    if not return_dict:
        return (out,)
    from diffusers.models.unets.unet_spatio_temporal_condition import UNetSpatioTemporalConditionOutput

    return UNetSpatioTemporalConditionOutput(sample=out)
