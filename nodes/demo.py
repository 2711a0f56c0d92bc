"""The demo nodes: the pack's fixture model (a small video diffusion model with SVD's exact U-Net layout,
trained on synthetic clips) as a ComfyUI MODEL, so an SVD workflow runs on a CPU with nothing downloaded.

"Streamline Demo Model" builds ComfyUI's own SVD model (``model_base.SVD_img2vid`` around
``openaimodel.UNetModel``) from the shipped weights, the way ComfyUI's diffusion-model loader does:
a model config, ComfyUI's choice of weight dtype for the device, ``get_model``, ``load_model_weights``,
and a ``ModelPatcher`` with ComfyUI's load and offload devices. Two things differ from stock SVD: the
config (``comfy_keys.comfy_unet_config``: narrow widths, 32-channel heads) and the latent format, whose
``scale_factor`` is 1.0 (the fixture's latents are its exactly packed pixels, with no VAE between) and
whose preview factors are the packing's inverse, so ComfyUI's live previews show the true colours.

Its conditioning is what ComfyUI's ``SVD_img2vid_Conditioning`` builds from an image, with the
fixture's fixed encoders in place of CLIP vision and the VAE (``streamlined_core.fixture.demo``):
the clip's embedding tokens, ``fps``, the clip's ``motion_bucket_id``, ``augmentation_level`` and the
augmented first-frame latent as ``concat_latent_image``; the negative has a zero embedding and a zero
first frame. "Streamline Demo Frames" turns the sampled latents back into frames.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..streamlined_core.fixture import comfy_keys, data
from ..streamlined_core.fixture import demo as fixture_demo
from ..streamlined_core.fixture import model as fixture_model

CATEGORY = "Streamline/demo"
_STATE: dict = {}  # the shipped weights with ComfyUI's keys, loaded once per file version
_CLASSES: dict = {}  # the model config and latent format classes, made once ComfyUI is importable


def comfy_state_dict(path: Path | str | None = None) -> dict[str, torch.Tensor]:
    """The fixture weights (default: the shipped file) with ComfyUI's keys, as stored (fp16). Loaded once
    per file and kept; a replaced file (other size or modification time) is loaded again."""
    path = Path(path) if path is not None else fixture_model.weights_path()
    stat = path.stat() if path.exists() else None
    key = (str(path), stat.st_mtime_ns, stat.st_size) if stat else None
    if key is None or _STATE.get("key") != key:
        state = comfy_keys.diffusers_to_comfy(fixture_model.load_state_dict(path))  # names a missing file
        _STATE.clear()
        _STATE.update(key=key, state=state)
    return _STATE["state"]


def fixture_classes() -> tuple[type, type]:
    """ComfyUI's SVD model config and a latent format for the fixture: ``(FixtureSVD, FixtureLatent)``."""
    if not _CLASSES:
        import comfy.latent_formats
        import comfy.supported_models

        config = comfy_keys.comfy_unet_config()
        # ComfyUI's previewer maps a latent pixel to rgb in [-1, 1] as latent @ factors + bias; the
        # unpacking is linear in that range (2 * unpack(latent) - 1), so row c is the image of channel c.
        basis = torch.eye(4).view(4, 4, 1, 1)
        factors = (2 * data.unpack(basis) - 1).view(4, 3).tolist()

        class FixtureLatent(comfy.latent_formats.LatentFormat):
            """The fixture's latents: exactly packed pixels (``data.pack``), unscaled."""

            scale_factor = 1.0
            latent_channels = 4
            latent_rgb_factors = factors
            latent_rgb_factors_bias = [0.0, 0.0, 0.0]

        class FixtureSVD(comfy.supported_models.SVD_img2vid):
            """SVD_img2vid at the fixture's widths: its heads are 32 channels wide, not SVD's 64."""

            unet_config = config
            unet_extra_config = {
                **comfy.supported_models.SVD_img2vid.unet_extra_config,
                "num_heads": config["num_heads"],
                "num_head_channels": config["num_head_channels"],
            }
            latent_format = FixtureLatent

        _CLASSES.update(config=FixtureSVD, latent=FixtureLatent)
    return _CLASSES["config"], _CLASSES["latent"]


def load_fixture_model(path: Path | str | None = None, dtype: torch.dtype | None = None):
    """The fixture as a ComfyUI MODEL (``ModelPatcher``), built as ComfyUI's diffusion-model loader builds
    a U-Net; ``dtype`` None lets ComfyUI choose the weight dtype for its device (fp32 on the CPU)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.utils

    state = comfy_state_dict(path)
    config_class, _ = fixture_classes()
    model_config = config_class(comfy_keys.comfy_unet_config())
    load_device = mm.get_torch_device()
    offload_device = mm.unet_offload_device()
    supported = list(model_config.supported_inference_dtypes)
    if dtype is None:
        dtype = mm.unet_dtype(model_params=comfy.utils.calculate_parameters(state), supported_dtypes=supported,
                              weight_dtype=comfy.utils.weight_dtype(state))
    model_config.set_inference_dtype(dtype, mm.unet_manual_cast(dtype, load_device, supported))
    model = model_config.get_model(state, "").to(offload_device)
    expected = set(model.diffusion_model.state_dict())
    if expected != set(state):
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"fixture weights do not fit ComfyUI's UNetModel: missing {missing[:8]}, unexpected {extra[:8]}")
    model.load_model_weights(dict(state), "")  # it pops what it loads: hand it a copy of the cache
    unet = model.diffusion_model
    for name, eps in comfy_keys.norm_eps().items():  # the fixture's norms are diffusers', not ComfyUI's defaults
        unet.get_submodule(name).eps = eps
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


def conditioning(clip: fixture_demo.DemoClip) -> tuple[list, list]:
    """SVD_img2vid_Conditioning's positive and negative for a demo clip."""
    ids = {"motion_bucket_id": clip.motion_bucket_id, "fps": data.FPS, "augmentation_level": clip.augmentation_level}
    first = clip.augmented_first_frame
    positive = [[clip.embedding.clone(), {**ids, "concat_latent_image": first}]]
    negative = [[torch.zeros_like(clip.embedding), {**ids, "concat_latent_image": torch.zeros_like(first)}]]
    return positive, negative


def _widget_int(name: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name}={value!r}: expected an integer in {low}..{high}")
    return value


class StreamlineDemoLoader:
    """The fixture video model, one held-out clip's conditioning, an empty video latent and the true clip."""

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "clip_seed": ("INT", {
                    "default": 0, "min": 0, "max": fixture_demo.CLIPS - 1,
                    "tooltip": "Which held-out clip (never trained on) to animate: its first frame and its "
                               "description (shapes, colours, motions) condition the model.",
                }),
                "frames": ("INT", {
                    "default": data.DEFAULT_FRAMES, "min": data.MIN_FRAMES, "max": data.MAX_FRAMES,
                    "tooltip": "Frames to generate (the model was trained on 14).",
                }),
                "augmentation_level": ("FLOAT", {
                    "default": fixture_model.SAMPLE_NOISE_AUG, "min": 0.0, "max": 10.0, "step": 0.01,
                    "tooltip": "SVD's noise augmentation: the standard deviation of the noise added to the "
                               "first-frame latent (drawn from the clip's seed), also given to the model.",
                }),
            }
        }

    RETURN_TYPES = ("MODEL", "CONDITIONING", "CONDITIONING", "LATENT", "IMAGE")
    RETURN_NAMES = ("model", "positive", "negative", "latent", "true_clip")
    OUTPUT_TOOLTIPS = (
        "The fixture as ComfyUI's SVD model (about 6 M parameters): runs on a CPU.",
        "The clip's conditioning, as SVD_img2vid_Conditioning builds it.",
        "Zero embedding and zero first frame, as SVD_img2vid_Conditioning builds it.",
        "An empty video latent (frames x 4 x 32 x 32); the fixture's latents are its pixels.",
        "The true clip, to compare the sampled one with.",
    )
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "A small video diffusion model with SVD's exact U-Net layout, trained on synthetic clips of moving "
        "shapes, shipped with the pack: SVD workflows (and Streamline's nodes) run on a CPU with nothing "
        "downloaded. Outputs what SVD_img2vid_Conditioning gives for one held-out clip."
    )

    def load(self, clip_seed: int, frames: int, augmentation_level: float):
        clip_seed = _widget_int("clip_seed", clip_seed, 0, fixture_demo.CLIPS - 1)
        frames = _widget_int("frames", frames, data.MIN_FRAMES, data.MAX_FRAMES)
        if isinstance(augmentation_level, bool) or not isinstance(augmentation_level, (int, float)) \
                or not math.isfinite(augmentation_level) or not 0 <= augmentation_level <= 10:
            raise ValueError(f"augmentation_level={augmentation_level!r}: expected a number in 0..10")
        clip = fixture_demo.demo_clip(clip_seed, frames, float(augmentation_level))
        positive, negative = conditioning(clip)
        _, _, h, w = clip.first_frame.shape
        latent = {"samples": torch.zeros(frames, 4, h, w)}
        return load_fixture_model(), positive, negative, latent, clip.frames.permute(0, 2, 3, 1).contiguous()


class StreamlineDemoFrames:
    """The fixture's latents as frames: its exact unpacking, no VAE."""

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"samples": ("LATENT", {"tooltip": "Latents sampled with the Streamline Demo Model."})}}

    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The frames, clamped to [0, 1].",)
    FUNCTION = "frames"
    CATEGORY = CATEGORY
    DESCRIPTION = "Turns the demo model's latents into frames (its latents are exactly packed pixels: no VAE)."

    def frames(self, samples: dict):
        latent = samples.get("samples") if isinstance(samples, dict) else None
        if not isinstance(latent, torch.Tensor) or latent.dim() != 4 or latent.shape[1] != 4:
            shape = tuple(latent.shape) if isinstance(latent, torch.Tensor) else type(latent).__name__
            raise ValueError(f"samples: expected the demo model's latent (frames x 4 x H x W), got {shape}")
        rgb = data.unpack(latent.float().cpu()).clamp(0, 1)
        return (rgb.permute(0, 2, 3, 1).contiguous(),)
