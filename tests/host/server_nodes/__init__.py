"""Test-only nodes for the server test: a tiny SVD that needs no checkpoint, and latents shown as frames.

Never shipped: the server test links this folder into a temporary ``custom_nodes`` beside the pack.
"""

import torch

from streamlined_core.tools.configs import TINY_COMFY_SVD_CONFIG as SVD_CONFIG  # noqa: E402  the one tiny SVD


class TinySVD:
    """A tiny SVD_img2vid model with seeded weights, its conditioning and an empty video latent."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"frames": ("INT", {"default": 5, "min": 1, "max": 64}),
                             "width": ("INT", {"default": 96, "min": 16, "max": 512, "step": 8}),
                             "height": ("INT", {"default": 64, "min": 16, "max": 512, "step": 8})}}

    RETURN_TYPES = ("MODEL", "CONDITIONING", "CONDITIONING", "LATENT")
    RETURN_NAMES = ("model", "positive", "negative", "latent")
    FUNCTION = "build"
    CATEGORY = "testing"

    def build(self, frames, width, height):
        import comfy.model_management
        import comfy.model_patcher
        import comfy.supported_models

        config = comfy.supported_models.SVD_img2vid(dict(SVD_CONFIG))
        config.set_inference_dtype(torch.float32, None)
        model = config.get_model({}, "", device=torch.device("cpu"))
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():  # ComfyUI leaves weights uninitialised
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        device = comfy.model_management.get_torch_device()
        patcher = comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))
        h, w = height // 8, width // 8
        extra = {"motion_bucket_id": 127, "fps": 6, "augmentation_level": 0.0,
                 "concat_latent_image": torch.randn(1, 4, h, w, generator=gen)}
        positive = [[torch.randn(1, 1, 64, generator=gen), dict(extra)]]
        negative = [[torch.zeros(1, 1, 64), dict(extra, concat_latent_image=torch.zeros(1, 4, h, w))]]
        return patcher, positive, negative, {"samples": torch.zeros(frames, 4, h, w)}


class LatentFrames:
    """Latents as RGB frames through SD's latent-to-RGB preview factors (no VAE needed)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",)}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "show"
    CATEGORY = "testing"

    def show(self, samples):
        import comfy.latent_formats

        factors = torch.tensor(comfy.latent_formats.SD15().latent_rgb_factors)
        rgb = torch.einsum("nchw,cr->nhwr", samples["samples"].float(), factors)
        return (((rgb + 1) / 2).clamp(0, 1),)


NODE_CLASS_MAPPINGS = {"StreamlineTestTinySVD": TinySVD, "StreamlineTestLatentFrames": LatentFrames}
