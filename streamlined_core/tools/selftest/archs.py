"""The architectures the exactness self-test draws: per architecture, a hypothesis strategy of tiny
configurations and of call shapes, a builder of the real model class (seeded weights) and the
:class:`~.contract.Subject` of one call.

diffusers: SVD's U-Net and temporal VAE decoder, AnimateDiff's ``UNetMotionModel`` and SD VAE decoder.
ComfyUI (needs it importable): its SVD ``UNetModel``, its SVD ``VideoDecoder`` and SD1.5's ``UNetModel``
with AnimateDiff-Evolved's motion modules injected (full width: the motion modules fit SD1.5's channels,
so only the call shape is drawn).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from .. import configs
from .contract import Subject

Config = dict[str, Any]
Shape = tuple[int, int, int, int]  # (batch, frames, latent height, latent width)


@dataclass(frozen=True)
class Arch:
    key: str  # "diffusers-svd-unet"
    label: str  # "diffusers SVD U-Net"
    configs: Callable[[Any], Any]  # st -> strategy of a configuration (a dict)
    shapes: Callable[[Any, Config], Any]  # st, configuration -> strategy of a call shape
    build: Callable[[Config], torch.nn.Module]  # fp32, seeded
    subject: Callable[[torch.nn.Module, Shape, torch.dtype], Subject]  # the call, inputs drawn in fp32, cast
    host: bool = False  # needs ComfyUI
    dtypes: tuple[str, ...] = ("fp32", "fp32", "bf16")  # drawn per example (fp32 twice as often)


def _levels(st, bases, mults=(1, 2), most=3):
    """Channels per level, non-decreasing: a base and a multiplier per level after the first."""
    return st.tuples(st.sampled_from(bases), st.lists(st.sampled_from(mults), min_size=1, max_size=most - 1)).map(
        lambda t: tuple(cumulative(t[0], t[1])))


def cumulative(base: int, mults: list[int]) -> list[int]:
    out = [base]
    for m in mults:
        out.append(out[-1] * m)
    return out


def cast_inputs(value: Any, dtype: torch.dtype) -> Any:
    """Inputs drawn in fp32, cast for a low-precision run (timesteps, 1-D, stay as they are)."""
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() >= 2:
        return value.to(dtype)
    if isinstance(value, dict):
        return {k: cast_inputs(v, dtype) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(cast_inputs(v, dtype) for v in value)
    return value


def _seeded(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    return configs.seed_weights_scaled(model, seed=seed)  # fan-in scaled: activations keep their size


# -- diffusers -------------------------------------------------------------------------------------


def _svd_configs(st):
    return st.fixed_dictionaries({
        "block_out_channels": _levels(st, (32, 64)),
        "attention": st.lists(st.booleans(), min_size=3, max_size=3),
        "layers_per_block": st.integers(1, 2),
        "num_attention_heads": st.sampled_from((1, 2, 4)),
        "cross_attention_dim": st.sampled_from((16, 32)),
        "addition_time_embed_dim": st.sampled_from((8, 16)),
    })


def _svd_build(c: Config) -> torch.nn.Module:
    n = len(c["block_out_channels"])
    attention = c["attention"][:n]
    down = tuple("CrossAttnDownBlockSpatioTemporal" if a else "DownBlockSpatioTemporal" for a in attention)
    up = tuple("CrossAttnUpBlockSpatioTemporal" if a else "UpBlockSpatioTemporal" for a in reversed(attention))
    return _seeded(configs.build_diffusers_svd(
        "cpu", torch.float32, block_out_channels=c["block_out_channels"], down_block_types=down, up_block_types=up,
        layers_per_block=c["layers_per_block"], num_attention_heads=c["num_attention_heads"],
        cross_attention_dim=c["cross_attention_dim"], addition_time_embed_dim=c["addition_time_embed_dim"],
        projection_class_embeddings_input_dim=3 * c["addition_time_embed_dim"], in_channels=8, out_channels=4,
        sample_size=32))


def video_shapes(st, _c, frames=5, size=9, batch=2):
    return st.tuples(st.integers(1, batch), st.integers(1, frames), st.integers(1, size), st.integers(1, size))


def _diffusers_unet_subject(fam: str):
    from ...engine.arch import cut_points, diffusers_animatediff, diffusers_svd
    from ...engine.stages import CutState

    forward = {"svd": diffusers_svd, "animatediff": diffusers_animatediff}[fam]
    inputs = {"svd": configs.diffusers_svd_inputs, "animatediff": configs.diffusers_animatediff_inputs}[fam]

    def subject(model: torch.nn.Module, shape: Shape, dtype: torch.dtype) -> Subject:
        b, t, h, w = shape
        torch.manual_seed(1)
        args, kwargs = inputs(model, b, t, 8 * h, 8 * w)  # the model is fp32 here: inputs drawn in fp32
        args, kwargs = cast_inputs(args, dtype), cast_inputs(kwargs, dtype)

        def engine(runner):
            out = forward.streamlined_forward(model, runner, *args, **kwargs)
            return out if isinstance(out, CutState) else out[0]

        return Subject(lambda: model(*args, **kwargs)[0], engine, cut_points(model))

    return subject


def _animatediff_configs(st):
    return st.fixed_dictionaries({
        "groups": st.sampled_from((1, 2, 4, 8)),
        "mults": st.lists(st.sampled_from((1, 2)), min_size=1, max_size=2),
        "base": st.sampled_from((1, 2, 3)),
        "motion_groups": st.sampled_from((1, 2, 4, 8)),
        "layers_per_block": st.integers(1, 2),
        "heads": st.sampled_from((1, 2, 4)),
        "motion_heads": st.sampled_from((1, 2, 4)),
        "mid": st.booleans(),
        "attention": st.lists(st.booleans(), min_size=3, max_size=3),
        "cross_attention_dim": st.sampled_from((16, 24)),
    })


def _animatediff_build(c: Config) -> torch.nn.Module:
    unit = 8 * c["base"]  # a multiple of every drawn group count and head count
    channels = tuple(cumulative(unit, c["mults"]))
    attention = c["attention"][:len(channels)]
    unet = dict(configs.TINY_SD_KWARGS, block_out_channels=channels, layers_per_block=c["layers_per_block"],
                norm_num_groups=c["groups"], attention_head_dim=c["heads"], cross_attention_dim=c["cross_attention_dim"],
                down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
                up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)))
    adapter = dict(block_out_channels=channels, motion_layers_per_block=c["layers_per_block"],
                   motion_norm_num_groups=c["motion_groups"], motion_num_attention_heads=c["motion_heads"],
                   use_motion_mid_block=c["mid"], motion_max_seq_length=32)
    return _seeded(configs.build_diffusers_animatediff("cpu", torch.float32, unet, adapter))


def _svdvae_configs(st):
    return st.fixed_dictionaries({"block_out_channels": _levels(st, (32, 64)), "layers_per_block": st.integers(1, 2)})


def _svd_vae_build(c: Config) -> torch.nn.Module:
    n = len(c["block_out_channels"])
    return _seeded(configs.build_tiny_svd_vae(block_out_channels=c["block_out_channels"],
                                              down_block_types=("DownEncoderBlock2D",) * n,
                                              layers_per_block=c["layers_per_block"])).decoder


def _svd_vae_subject(decoder: torch.nn.Module, shape: Shape, dtype: torch.dtype) -> Subject:
    from ...engine.arch import diffusers_vae

    b, t, h, w = shape
    torch.manual_seed(1)
    z = torch.randn(b * t, 4, h, w).to(dtype)
    ioi = torch.zeros(b, t).to(dtype)
    return Subject(lambda: decoder(z, image_only_indicator=ioi, num_frames=t),
                   lambda runner: diffusers_vae.streamlined_forward(decoder, runner, z, ioi, num_frames=t))


def _sdvae_configs(st):
    return st.fixed_dictionaries({
        "groups": st.sampled_from((1, 2, 4, 8, 16, 32)),
        "block_out_channels": _levels(st, (32, 64)),
        "layers_per_block": st.integers(1, 2),
    })


def _sd_vae_build(c: Config) -> torch.nn.Module:
    n = len(c["block_out_channels"])
    return _seeded(configs.build_tiny_sd_vae(block_out_channels=c["block_out_channels"], norm_num_groups=c["groups"],
                                             down_block_types=("DownEncoderBlock2D",) * n,
                                             up_block_types=("UpDecoderBlock2D",) * n,
                                             layers_per_block=c["layers_per_block"])).decoder


def _sd_vae_subject(decoder: torch.nn.Module, shape: Shape, dtype: torch.dtype) -> Subject:
    from ...engine.arch import diffusers_sd_vae

    _, t, h, w = shape
    torch.manual_seed(1)
    z = torch.randn(t, 4, h, w).to(dtype)
    return Subject(lambda: decoder(z), lambda runner: diffusers_sd_vae.streamlined_forward(decoder, runner, z))


DIFFUSERS = (
    Arch("diffusers-svd-unet", "diffusers SVD U-Net", _svd_configs, video_shapes, _svd_build,
         _diffusers_unet_subject("svd")),
    Arch("diffusers-animatediff-unet", "diffusers AnimateDiff U-Net", _animatediff_configs, video_shapes,
         _animatediff_build, _diffusers_unet_subject("animatediff")),
    Arch("diffusers-svd-vae", "diffusers SVD VAE decoder", _svdvae_configs,
         lambda st, c: video_shapes(st, c, frames=5, size=8), _svd_vae_build, _svd_vae_subject),
    Arch("diffusers-sd-vae", "diffusers SD VAE decoder", _sdvae_configs,
         lambda st, c: video_shapes(st, c, frames=4, size=8, batch=1), _sd_vae_build, _sd_vae_subject),
)
