"""Model configurations (docs/benchmarks.md, "The configurations"): one source for tests, benchmarks and the simulator.

Full-size models are built on the ``meta`` device, so they cost no memory and need no weights.
Builders take ``device`` and ``dtype``; the ``*_inputs`` functions make a workload's U-Net inputs.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch

from ..engine.arch import comfy_unet

SVD_KWARGS: dict[str, Any] = {}  # diffusers' defaults are SVD's
SVD_MID_KWARGS = dict(block_out_channels=(64, 128, 256, 256), num_attention_heads=(2, 4, 8, 8), cross_attention_dim=1024)
SD15_KWARGS = dict(
    sample_size=64, cross_attention_dim=768, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_head_dim=8
)
MOTION_ADAPTER_KWARGS = dict(
    block_out_channels=(320, 640, 1280, 1280),
    motion_layers_per_block=2,
    motion_mid_block_layers_per_block=1,
    motion_num_attention_heads=8,
    motion_norm_num_groups=32,
    motion_max_seq_length=32,
    use_motion_mid_block=True,
)


def comfy_svd_unet_kwargs() -> dict[str, Any]:
    """ComfyUI's full-size SVD ``UNetModel`` arguments (imports ComfyUI's ops lazily)."""
    import comfy.ops

    return dict(
        image_size=None, in_channels=8, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4],
        transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        transformer_depth_middle=1, context_dim=1024, use_linear_in_transformer=True, num_classes="sequential",
        adm_in_channels=768, use_spatial_transformer=True, extra_ff_mix_layer=True, use_spatial_context=True,
        merge_strategy="learned_with_images", merge_factor=0.0, video_kernel_size=[3, 1, 1],
        use_temporal_resblock=True, use_temporal_attention=True, disable_temporal_crossattention=False,
        num_head_channels=64, num_heads=-1, operations=comfy.ops.disable_weight_init,
    )


def _place(model: torch.nn.Module, device: str | torch.device, dtype: torch.dtype) -> torch.nn.Module:
    # Legacy torch.Tensor([...]) buffers (AlphaBlender.mix_factor) ignore the default device: move.
    with quiet_diffusers():
        return model.to(device=device, dtype=dtype).eval()


@contextmanager
def quiet_diffusers() -> Iterator[None]:
    """Silence diffusers' warning about casting with ``.to()``: these models keep no fp32 modules."""
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        yield
    finally:
        dlogging.set_verbosity(level)


def build_diffusers_svd(device: str | torch.device = "meta", dtype: torch.dtype = torch.float16, **overrides: Any):
    """diffusers ``UNetSpatioTemporalConditionModel`` (SVD and SVD-XT share it)."""
    from diffusers import UNetSpatioTemporalConditionModel

    with torch.device(device):
        model = UNetSpatioTemporalConditionModel(**{**SVD_KWARGS, **overrides})
    return _place(model, device, dtype)


SVD_VAE_KWARGS = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                      layers_per_block=2, latent_channels=4)
# Two levels of 32 and 64 channels (the GroupNorms' 32 groups need 32 channels at least); SVD's two
# layers per block, so the middle block runs its attention between two ResBlocks.
TINY_SVD_VAE_KWARGS = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                           layers_per_block=2, latent_channels=4)


def build_svd_vae(device: str | torch.device = "meta", dtype: torch.dtype = torch.float16, **overrides: Any):
    """diffusers ``AutoencoderKLTemporalDecoder``, SVD's VAE (its ``decoder`` is the temporal decoder)."""
    from diffusers import AutoencoderKLTemporalDecoder

    with torch.device(device):
        model = AutoencoderKLTemporalDecoder(**{**SVD_VAE_KWARGS, **overrides})
    return _place(model, device, dtype)


def build_tiny_svd_vae(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, **overrides: Any):
    """A tiny SVD VAE: SVD's layout at two levels of 32 and 64 channels."""
    return build_svd_vae(device, dtype, **{**TINY_SVD_VAE_KWARGS, **overrides})


SD_VAE_KWARGS = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                     up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4)


def build_sd_vae(device: str | torch.device = "meta", dtype: torch.dtype = torch.float16, **overrides: Any):
    """diffusers ``AutoencoderKL`` as SD1.5's VAE (the one AnimateDiff decodes with)."""
    from diffusers import AutoencoderKL

    with torch.device(device):
        model = AutoencoderKL(**{**SD_VAE_KWARGS, **overrides})
    return _place(model, device, dtype)


def build_tiny_sd_vae(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, **overrides: Any):
    """A tiny SD VAE: its layout at two levels of 32 and 64 channels."""
    tiny = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2)
    return build_sd_vae(device, dtype, **{**tiny, **overrides})


def build_diffusers_animatediff(
    device: str | torch.device = "meta",
    dtype: torch.dtype = torch.float16,
    unet_kwargs: dict[str, Any] | None = None,
    adapter_kwargs: dict[str, Any] | None = None,
):
    """diffusers ``UNetMotionModel``: an SD1.5 U-Net with the v1-5-2 motion adapter."""
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    with torch.device(device), quiet_diffusers():
        unet = UNet2DConditionModel(**(unet_kwargs or SD15_KWARGS))
        adapter = MotionAdapter(**(adapter_kwargs or MOTION_ADAPTER_KWARGS))
        model = UNetMotionModel.from_unet2d(unet, adapter)
    return _place(model, device, dtype)


def build_comfy_svd(device: str | torch.device = "meta", dtype: torch.dtype = torch.float16, **overrides: Any):
    """ComfyUI's ``openaimodel.UNetModel`` configured as SVD (needs ComfyUI importable)."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    model = UNetModel(**{**comfy_svd_unet_kwargs(), **overrides, "device": device, "dtype": dtype})
    return _place(model, device, dtype)


def build_comfy_animatediff(device: str | torch.device = "meta", dtype: torch.dtype = torch.float16):
    """ComfyUI's SD1.5 ``UNetModel`` with AnimateDiff-Evolved's motion modules injected, shaped as
    ``mm_sd_v15_v2`` (8 down, 1 mid, 12 up; 32 positions). Needs ADE in the checkout's custom_nodes."""
    from types import SimpleNamespace

    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    from ..host.comfyui import animatediff_evolved

    ad = animatediff_evolved("animatediff.motion_module_ad")
    model = UNetModel(**{**COMFY_SD15_UNET, "operations": comfy.ops.disable_weight_init, "device": device, "dtype": dtype})
    pe = "down_blocks.3.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.1.pos_encoder.pe"
    layout = {pe: torch.zeros(1, 32, 320, device="meta"), "mid_block.motion_modules.0.temporal_transformer.x": None,
              "up_blocks.3.motion_modules.0.temporal_transformer.x": None}
    info = ad.AnimateDiffInfo("SD1.5", ad.AnimateDiffFormat.ANIMATEDIFF, ad.AnimateDiffVersion.V2, "mm_sd_v15_v2 (shape)")
    with torch.device(device):
        motion = ad.AnimateDiffModel(layout, info, {"ops": comfy.ops.disable_weight_init})
    motion.inject(SimpleNamespace(model=SimpleNamespace(diffusion_model=model)))
    return _place(model, device, dtype)


# -- workloads -------------------------------------------------------------------------------


def diffusers_svd_inputs(model, batch: int, frames: int, height: int, width: int) -> tuple[tuple, dict]:
    """Inputs of a diffusers SVD U-Net call: latents (B, T, 8, h, w), image embedding, time ids."""
    p = next(model.parameters())
    cfg = model.config
    sample = torch.randn(batch, frames, cfg.in_channels, height // 8, width // 8, device=p.device, dtype=p.dtype)
    context = torch.randn(batch, 1, cfg.cross_attention_dim, device=p.device, dtype=p.dtype)
    n_ids = cfg.projection_class_embeddings_input_dim // cfg.addition_time_embed_dim
    time_ids = torch.ones(batch, n_ids, device=p.device, dtype=p.dtype)
    timestep = torch.full((batch,), 10.0, device=p.device, dtype=torch.float32)
    return (sample, timestep, context), dict(added_time_ids=time_ids, return_dict=False)


def diffusers_animatediff_inputs(model, batch: int, frames: int, height: int, width: int) -> tuple[tuple, dict]:
    """Inputs of a diffusers ``UNetMotionModel`` call: latents (B, 4, T, h, w), per-frame prompt embeddings."""
    p = next(model.parameters())
    cfg = model.config
    sample = torch.randn(batch, cfg.in_channels, frames, height // 8, width // 8, device=p.device, dtype=p.dtype)
    context = torch.randn(batch * frames, 77, cfg.cross_attention_dim, device=p.device, dtype=p.dtype)
    timestep = torch.full((batch,), 500, device=p.device, dtype=torch.long)
    return (sample, timestep, context), dict(return_dict=False)


def comfy_svd_inputs(model, batch: int, frames: int, height: int, width: int) -> tuple[tuple, dict]:
    """Inputs of ComfyUI's SVD ``UNetModel``: frames are the batch, ``num_video_frames`` says how many."""
    p = next(model.parameters())
    n = batch * frames
    x = torch.randn(n, model.in_channels, height // 8, width // 8, device=p.device, dtype=p.dtype)
    timesteps = torch.full((n,), 0.5, device=p.device, dtype=p.dtype)
    context = torch.randn(n, 1, comfy_unet.context_dim(model), device=p.device, dtype=p.dtype)
    y = torch.randn(n, comfy_unet.adm_dim(model), device=p.device, dtype=p.dtype)
    return (x, timesteps, context, y), dict(num_video_frames=frames)


def comfy_animatediff_inputs(model, batch: int, frames: int, height: int, width: int) -> tuple[tuple, dict]:
    """Inputs of an SD1.5 ``UNetModel`` with ADE motion modules: frames are the batch, the motion
    modules hold the video length, and ADE's ``forward_timestep_embed_patch`` reaches them."""
    from ..host.comfyui import animatediff_evolved

    injection = animatediff_evolved("animatediff.model_injection")
    for module in comfy_unet.comfy_ade.motion_modules(model):
        module.set_video_length(frames, frames)
    p = next(model.parameters())
    n = batch * frames
    x = torch.randn(n, model.in_channels, height // 8, width // 8, device=p.device, dtype=p.dtype)
    timesteps = torch.full((n,), 500.0, device=p.device, dtype=p.dtype)
    context = torch.randn(n, 77, comfy_unet.context_dim(model), device=p.device, dtype=p.dtype)
    options = {"patches": {"forward_timestep_embed_patch": [injection.create_forward_timestep_embed_patch()]}}
    return (x, timesteps, context), dict(transformer_options=options)


def seed_weights(model: torch.nn.Module, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Re-initialise every parameter from a seeded normal: ComfyUI leaves tiny models uninitialised
    (its output conv zeroed), and comparisons of outputs need weights that make them differ."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


# ComfyUI's UNetModel configuration of SD1.5 (what its model detection gives an SD1.5 checkpoint).
COMFY_SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}


def seed_weights_scaled(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Seeded weights scaled by fan-in (norm scales near 1, small biases): activations keep their size
    through a full-width network, where a fixed ``std`` would make them grow layer by layer."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
            elif name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    return model


# -- tiny configurations (tests) ---------------------------------------------------------------

TINY_SVD_KWARGS = dict(
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
    up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
    cross_attention_dim=32,
    num_attention_heads=8,
    out_channels=4,
    in_channels=8,
    layers_per_block=2,
    sample_size=32,
    projection_class_embeddings_input_dim=32 * 3,
    addition_time_embed_dim=32,
)
TINY_SD_KWARGS = dict(
    block_out_channels=(32, 64),
    layers_per_block=2,
    sample_size=32,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    norm_num_groups=2,
)
TINY_ADAPTER_KWARGS = dict(
    block_out_channels=(32, 64), motion_layers_per_block=2, motion_norm_num_groups=2, motion_num_attention_heads=4
)


def build_tiny_diffusers_svd(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, **overrides: Any):
    """A tiny diffusers SVD U-Net (diffusers' own test configuration)."""
    return build_diffusers_svd(device, dtype, **{**TINY_SVD_KWARGS, **overrides})


def build_tiny_diffusers_animatediff(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """A tiny diffusers AnimateDiff U-Net (diffusers' own test configuration)."""
    return build_diffusers_animatediff(device, dtype, TINY_SD_KWARGS, TINY_ADAPTER_KWARGS)

# A tiny SVD as ComfyUI's ``unet_config`` (what ``supported_models.SVD_img2vid`` takes): the one
# configuration of the engine tests, the node tests and the server test's node pack.
TINY_COMFY_SVD_CONFIG = {
    "image_size": 32, "model_channels": 64, "in_channels": 8, "out_channels": 4, "use_linear_in_transformer": True,
    "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1], "channel_mult": [1, 2],
    "num_res_blocks": [1, 1], "context_dim": 64, "adm_in_channels": 768, "num_classes": "sequential",
    "use_temporal_attention": True, "use_temporal_resblock": True, "use_spatial_transformer": True,
    "transformer_depth_middle": 1, "extra_ff_mix_layer": True, "use_spatial_context": True,
    "merge_strategy": "learned_with_images", "merge_factor": 0.0, "video_kernel_size": [3, 1, 1],
    "disable_temporal_crossattention": False, "max_ddpm_temb_period": 10000, "num_head_channels": 32,
}
TINY_COMFY_SVD_OVERRIDES = {k: TINY_COMFY_SVD_CONFIG[k] for k in (
    "model_channels", "channel_mult", "num_res_blocks", "transformer_depth", "transformer_depth_output",
    "num_head_channels", "context_dim", "adm_in_channels")}


def build_tiny_comfy_svd(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """A tiny ComfyUI SVD ``UNetModel`` (weights uninitialised: ComfyUI never initialises them)."""
    return build_comfy_svd(device, dtype, **TINY_COMFY_SVD_OVERRIDES)


# -- Wan (ComfyUI's WanModel, comfy/ldm/wan/model.py) --------------------------------------------

# What ComfyUI's model detection gives each checkpoint (comfy/model_detection.py, "Wan 2.1"): num_heads is
# dim // 128; Wan 2.2 A14B's two experts are Wan 2.1 14B's shape. image_model wan2.1 for all three.
WAN_COMMON = dict(patch_size=(1, 2, 2), text_len=512, freq_dim=256, text_dim=4096, window_size=(-1, -1),
                  qk_norm=True, cross_attn_norm=True, eps=1e-6)
WAN_CONFIGS: dict[str, dict[str, Any]] = {
    "wan2.1-1.3b": dict(model_type="t2v", dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, in_dim=16, out_dim=16),
    "wan2.1-14b": dict(model_type="t2v", dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=16, out_dim=16),
    "wan2.2-5b": dict(model_type="t2v", dim=3072, ffn_dim=14336, num_heads=24, num_layers=30, in_dim=48, out_dim=48),
}
# A tiny Wan of the same classes: two blocks, two heads of 16 (the rotary axes need a head of 6 or more).
TINY_WAN_CONFIG = dict(model_type="t2v", dim=32, ffn_dim=64, num_heads=2, num_layers=2, in_dim=4, out_dim=4,
                       text_dim=24, text_len=8, freq_dim=16)


def build_comfy_wan(config: dict[str, Any], device: str | torch.device = "meta", dtype: torch.dtype = torch.bfloat16,
                    compute_dtype: torch.dtype | None = None, **overrides: Any):
    """ComfyUI's ``WanModel`` with ``config`` (one of ``WAN_CONFIGS``' or ``TINY_WAN_CONFIG``), built as ComfyUI
    builds a checkpoint stored in ``dtype``: its operations cast weights per call when the compute dtype differs
    (fp8 weights computed in bf16: ``comfy.ops.manual_cast``). The patch embedding stays fp32, as the host makes it."""
    import comfy.ops
    from comfy.ldm.wan.model import WanModel

    compute = compute_dtype or dtype
    ops = overrides.pop("operations", None) or (comfy.ops.disable_weight_init if compute == dtype else comfy.ops.manual_cast)
    with torch.device(device):
        model = WanModel(**{**WAN_COMMON, **config, **overrides}, device=device, dtype=dtype, operations=ops)
    return model.eval()


def comfy_wan_inputs(model, batch: int, frames: int, height: int, width: int, vae_scale: int = 8,
                     dtype: torch.dtype = torch.bfloat16, context_tokens: int | None = None) -> tuple[tuple, dict]:
    """Inputs of a Wan call for ``frames`` video frames at ``height`` x ``width`` pixels: the latent of the Wan VAE
    (``vae_scale`` x spatial: 8 for Wan 2.1's, 16 for Wan 2.2's; 4x temporal, the first frame alone), timesteps in
    fp32, the text context at ``model.text_len`` tokens (umt5's longest), in the compute ``dtype``."""
    device = next(model.parameters()).device
    t = (frames - 1) // 4 + 1
    x = torch.randn(batch, model.in_dim, t, height // vae_scale, width // vae_scale, device=device, dtype=dtype)
    timestep = torch.full((batch,), 500.0, device=device, dtype=torch.float32)
    context = torch.randn(batch, context_tokens or model.text_len, model.text_dim, device=device, dtype=dtype)
    return (x, timestep, context), {}
