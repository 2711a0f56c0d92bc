"""A tiny SVD built the way ComfyUI builds one, its conditioning, KSampler on it and SVD's VAE as ComfyUI's own
``VAE`` object: what the reliability self-test (and the host tests) run graphs on. Needs ComfyUI importable."""

from __future__ import annotations

import torch

from .. import configs

SVD_CONFIG = configs.TINY_COMFY_SVD_CONFIG  # ComfyUI's unet_config of a tiny SVD_img2vid
# Sampling from sigma 700 (EDM) scales each call's rounding by up to ~700 in the latent, so final
# latents are compared at 2e-3 while every U-Net call is held to 1e-5 (docs/benchmarks.md).
LATENT_TOL = 2e-3


def build_svd(weight_dtype=torch.float32, manual_cast=None):
    """A tiny SVD built the way ComfyUI builds one, seeded (ComfyUI leaves weights uninitialised)."""
    import comfy.model_patcher
    import comfy.supported_models

    model_config = comfy.supported_models.SVD_img2vid(dict(SVD_CONFIG))
    model_config.set_inference_dtype(weight_dtype, manual_cast)
    model = model_config.get_model({}, "", device=torch.device("cpu"))
    configs.seed_weights(model, std=0.05)  # ComfyUI leaves weights uninitialised
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def conditioning(frames, h, w):
    gen = torch.Generator().manual_seed(1)
    extra = {"motion_bucket_id": 127, "fps": 6, "augmentation_level": 0.0,
             "concat_latent_image": torch.randn(1, 4, h, w, generator=gen)}
    positive = [[torch.randn(1, 1, 64, generator=gen), dict(extra)]]
    negative = [[torch.zeros(1, 1, 64), dict(extra, concat_latent_image=torch.zeros(1, 4, h, w))]]
    return positive, negative, {"samples": torch.zeros(frames, 4, h, w)}


def ksample(model, frames=3, h=8, w=12, steps=2, sampler="euler"):
    """KSampler (karras, cfg 2.5), as SVD workflows run it."""
    import nodes

    positive, negative, latent = conditioning(frames, h, w)
    (out,) = nodes.KSampler().sample(model, 7, steps, 2.5, sampler, "karras", positive, negative, latent, denoise=1.0)
    return out["samples"]


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def build_svd_vae(seed_weights=None):
    """ComfyUI's own VAE object for SVD's VAE (comfy/sd.py picks VideoDecoder from the keys), its weights seeded by
    ``seed_weights`` (default: ``configs.seed_weights`` at std 0.02)."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencodingEngine

    config = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
              "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    torch.manual_seed(0)
    engine = AutoencodingEngine(
        regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
        encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": config},
        decoder_config={"target": "comfy.ldm.modules.temporal_ae.VideoDecoder",
                        "params": {**config, "video_kernel_size": [3, 1, 1], "alpha": 0.0}},
    )
    (seed_weights or (lambda module: configs.seed_weights(module, std=0.02)))(engine)
    return comfy.sd.VAE(sd=engine.state_dict())


def out_of_memory(module: torch.nn.Module, failures: int):
    """The device's own out-of-memory error (``torch.OutOfMemoryError``) on ``module``'s first ``failures`` real
    calls; plans run on ``meta`` and are left alone. Returns the hook's handle and its count of failures."""
    count = [0]

    def hook(_module, inputs):
        if inputs and isinstance(inputs[0], torch.Tensor) and inputs[0].device.type != "meta" and count[0] < failures:
            count[0] += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")

    return module.register_forward_pre_hook(hook), count


def controlnet(conds):
    """A ControlNet built from ComfyUI's own classes for the tiny SVD (seeded), applied to both conds by ComfyUI's
    Apply ControlNet node; the conds and a list the network's calls are counted in."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ops

    import nodes

    cpu = torch.device("cpu")
    net = comfy.cldm.cldm.ControlNet(
        image_size=32, in_channels=4, model_channels=64, hint_channels=3, num_res_blocks=[1, 1], channel_mult=[1, 2],
        num_head_channels=32, use_spatial_transformer=True, transformer_depth=[1, 1], context_dim=64,
        use_linear_in_transformer=True, adm_in_channels=768, num_classes="sequential", transformer_depth_middle=1,
        operations=comfy.ops.disable_weight_init, device=cpu, dtype=torch.float32)
    configs.seed_weights(net, std=0.05)
    calls = []
    net.register_forward_hook(lambda *_: calls.append(1))
    control = comfy.controlnet.ControlNet(net, load_device=cpu, manual_cast_dtype=None)
    hint = torch.rand(1, 64, 96, 3, generator=torch.Generator().manual_seed(3))
    positive, negative = conds
    return nodes.ControlNetApplyAdvanced().apply_controlnet(positive, negative, control, hint, 1.0, 0.0, 1.0), calls


def rehash_options(**kw):
    """The Step Rehash nodes' inputs: a uniform interval of 2 at up0.0.attn unless ``kw`` says otherwise (the
    tiny U-Net's last up block has two layers: up0.1.attn, the default, only replays there)."""
    base = dict(schedule="uniform interval", key_steps=0, gamma=0.95, interval=2, cut="up0.0.attn",
                calibration="auto (find or make one)", start_percent=0.0, end_percent=1.0, max_consecutive_reuses=0,
                override_calibration=False)
    return base | kw


def sd15_patcher():
    """A full-width SD1.5 ``UNetModel`` (what AnimateDiff motion modules fit), seeded, in a ``ModelPatcher``."""
    import comfy.model_patcher
    import comfy.supported_models

    model_config = comfy.supported_models.SD15(dict(configs.COMFY_SD15_UNET))
    model_config.set_inference_dtype(torch.float32, None)
    model = configs.seed_weights_scaled(model_config.get_model({}, "", device=torch.device("cpu")))
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def motion_model_files(folder) -> dict[str, str]:
    """Motion model files written to ``folder`` with AnimateDiff-Evolved's own classes and seeded weights, and the
    folder added to its model paths: ``v2`` (mid block, 32 positions: per-frame norms) and ``v1`` (no mid block, 24
    positions: ADE's cross-frame GroupNorm mode). Needs ADE loaded by ComfyUI."""
    import sys
    from pathlib import Path

    import folder_paths
    from safetensors.torch import save_file

    ad = next(m for name, m in sys.modules.items() if name.endswith("animatediff.motion_module_ad"))
    names = {}
    for version, mid, positions in (("v2", True, 32), ("v1", False, 24)):
        pe = "down_blocks.3.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.1.pos_encoder.pe"
        shape = {pe: torch.zeros(1, positions, 320), "up_blocks.3.motion_modules.0.temporal_transformer.x": torch.zeros(1)}
        if mid:
            shape["mid_block.motion_modules.0.temporal_transformer.x"] = torch.zeros(1)
        info = ad.AnimateDiffInfo("SD1.5", ad.AnimateDiffFormat.ANIMATEDIFF, version, version)
        model = configs.seed_weights_scaled(ad.AnimateDiffModel(shape, info), seed=1)
        names[version] = f"streamline_test_{version}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(Path(folder) / names[version]))
        del model
    folder_paths.add_model_folder_path("animatediff_models", str(folder))
    return names


def evolved(model, motion_model: str, context_length: int | None = None):
    """Load AnimateDiff Model -> Apply AnimateDiff Model -> (Context Options) -> Use Evolved Sampling, with
    AnimateDiff-Evolved's own nodes."""
    import nodes

    ade = nodes.NODE_CLASS_MAPPINGS
    (loaded,) = ade["ADE_LoadAnimateDiffModel"]().load_motion_model(motion_model)
    (m_models,) = ade["ADE_ApplyAnimateDiffModelSimple"]().apply_motion_model(loaded)
    context = None
    if context_length:
        (context,) = ade["ADE_StandardStaticContextOptions"]().create_options(context_length, 2)
    (out,) = ade["ADE_UseEvolvedSampling"]().use_evolved_sampling(model, "autoselect", m_models, context)
    return out


def ksample_sd15(model, frames: int, steps: int = 2, h: int = 8, w: int = 8, cfg: float = 7.0):
    """KSampler (euler, normal, cfg 7) over ``frames`` latents, as AnimateDiff workflows run it."""
    import nodes

    gen = torch.Generator().manual_seed(1)
    positive = [[torch.randn(1, 2, 768, generator=gen), {}]]
    negative = [[torch.zeros(1, 2, 768), {}]]
    latent = {"samples": torch.zeros(frames, 4, h, w)}
    (out,) = nodes.KSampler().sample(model, 7, steps, cfg, "euler", "normal", positive, negative, latent, denoise=1.0)
    return out["samples"]


# -- Wan ---------------------------------------------------------------------------------------------------

# ComfyUI's unet_config of tiny Wan models (comfy/model_detection.py's keys; text_dim and text_len, which detection
# leaves at umt5's 4096 and 512, small too): 2.1 text-to-video and image-to-video with Wan 2.1's 16-channel latents,
# 2.2's 5B layout with its 48 channels
WAN_TINY = {"image_model": "wan2.1", **configs.WAN_COMMON,
            **{k: v for k, v in configs.TINY_WAN_CONFIG.items() if k not in ("model_type", "in_dim", "out_dim")}}
WAN_CONFIGS = {
    "wan2.1-t2v": ("WAN21_T2V", {**WAN_TINY, "model_type": "t2v", "in_dim": 16, "out_dim": 16}),
    "wan2.1-i2v": ("WAN21_I2V", {**WAN_TINY, "model_type": "i2v", "in_dim": 36, "out_dim": 16}),
    "wan2.2-5b": ("WAN22_T2V", {**WAN_TINY, "model_type": "t2v", "in_dim": 48, "out_dim": 48}),
}


def build_wan(kind="wan2.1-t2v", weight_dtype=torch.float32, manual_cast=None, **overrides):
    """A tiny Wan built the way ComfyUI builds one (its supported model class and model_base), weights seeded by fan-in."""
    import comfy.model_patcher
    import comfy.supported_models

    name, config = WAN_CONFIGS[kind]
    model_config = getattr(comfy.supported_models, name)({**config, **overrides})
    model_config.set_inference_dtype(weight_dtype, manual_cast)
    model = model_config.get_model({}, "", device=torch.device("cpu"))
    configs.seed_weights_scaled(model.diffusion_model)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def wan_conditioning(model, frames=5, h=6, w=10, tokens=7):
    """Positive and negative text conditioning (umt5-shaped, at the tiny text width) and an empty latent of
    ``frames`` latent frames of the model's latent channels; an image-to-video model also gets CLIP vision's
    output and the image latent it concatenates."""
    wan = model.model.diffusion_model
    gen = torch.Generator().manual_seed(1)
    channels = wan.out_dim
    extra, negative_extra = {}, {}
    if wan.model_type == "i2v":
        image = torch.randn(1, channels, frames, h, w, generator=gen)
        mask = torch.zeros(1, 4, frames, h, w)
        mask[:, :, :1] = 1.0
        clip = torch.randn(1, 257, 1280, generator=gen)
        extra = {"concat_latent_image": image, "concat_mask": mask, "clip_vision_output": _ClipOutput(clip)}
        negative_extra = dict(extra)
    positive = [[torch.randn(1, tokens, wan.text_dim, generator=gen), extra]]
    negative = [[torch.randn(1, tokens, wan.text_dim, generator=gen), negative_extra]]
    return positive, negative, {"samples": torch.zeros(1, channels, frames, h, w)}


class _ClipOutput:
    """CLIP vision's output as ComfyUI's WAN21 reads it (``penultimate_hidden_states``)."""

    def __init__(self, hidden: torch.Tensor) -> None:
        self.penultimate_hidden_states = hidden


def ksample_wan(model, frames=5, h=6, w=10, steps=2, cfg=5.0, noise_mask=None, sampler="euler", scheduler="simple"):
    """KSampler as Wan workflows run it (ComfyUI's flow-matching model sampling, shift 8 from the model's own
    sampling settings); ``noise_mask`` (B, 1, T, H, W) makes a denoise mask (Wan 2.2: per-frame timesteps)."""
    import nodes

    positive, negative, latent = wan_conditioning(model, frames, h, w)
    if noise_mask is not None:
        latent["noise_mask"] = noise_mask
    (out,) = nodes.KSampler().sample(model, 7, steps, cfg, sampler, scheduler, positive, negative, latent, denoise=1.0)
    return out["samples"]
