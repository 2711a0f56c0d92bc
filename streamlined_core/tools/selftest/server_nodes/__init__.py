"""Nodes the self-test's own ComfyUI server loads beside the pack (and the server tests): a tiny SVD, a tiny Wan and
SVD's VAE that need no files, latents shown as frames, and a probe of what the server process holds after a run.

Never loaded by a user's ComfyUI: ``streamline selftest`` (and tests/host/test_server.py) links this folder into
the ``custom_nodes`` of a temporary base directory of the server it starts.
"""

import gc
import math
import os
import sys

import torch

from streamlined_core.tools.configs import TINY_COMFY_SVD_CONFIG as SVD_CONFIG  # the one tiny SVD


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

        _break_once()
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


class TinyWan:
    """A tiny Wan 2.1 text-to-video model (ComfyUI's WAN21, flow matching with shift 8), seeded weights, its text
    conditioning and an empty latent of ``frames`` latent frames."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"frames": ("INT", {"default": 3, "min": 1, "max": 32}),
                             "width": ("INT", {"default": 80, "min": 16, "max": 512, "step": 16}),
                             "height": ("INT", {"default": 48, "min": 16, "max": 512, "step": 16})}}

    RETURN_TYPES = ("MODEL", "CONDITIONING", "CONDITIONING", "LATENT")
    RETURN_NAMES = ("model", "positive", "negative", "latent")
    FUNCTION = "build"
    CATEGORY = "testing"

    def build(self, frames, width, height):
        from streamlined_core.tools.selftest.comfy_graph import build_wan, wan_conditioning

        model = build_wan("wan2.1-t2v")
        positive, negative, latent = wan_conditioning(model, frames, height // 8, width // 8)
        return model, positive, negative, latent


class TinyVAE:
    """SVD's VAE as ComfyUI's own ``VAE`` object, seeded weights."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    RETURN_TYPES = ("VAE",)
    FUNCTION = "build"
    CATEGORY = "testing"

    def build(self):
        from streamlined_core.tools.selftest.comfy_graph import build_svd_vae

        return (build_svd_vae(),)


class LatentFrames:
    """Latents as RGB frames through SD's latent-to-RGB preview factors (no VAE needed); a video latent's frames
    show its first three channels."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",)}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "show"
    CATEGORY = "testing"

    def show(self, samples):
        import comfy.latent_formats

        if samples["samples"].dim() == 5:  # a video latent (B, C, T, H, W), Wan's: its first three channels
            frames = samples["samples"][0].transpose(0, 1)[:, :3].float()
            return (((torch.tanh(frames) + 1) / 2).movedim(1, -1),)
        factors = torch.tensor(comfy.latent_formats.SD15().latent_rgb_factors)
        rgb = torch.einsum("nchw,cr->nhwr", samples["samples"].float(), factors)
        return (((rgb + 1) / 2).clamp(0, 1),)


class Probe:
    """After the graph's other outputs: what the server process holds (live tensors and their bytes, objects of
    the pack's classes, entries of the pack's module-level containers, the VRAM Profiler's kept timelines)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}, "optional": {"after_images": ("IMAGE",), "after_latent": ("LATENT",),
                                             "after_frames": ("IMAGE",)}}

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return math.nan  # every run

    RETURN_TYPES = ()
    FUNCTION = "probe"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def probe(self, **kwargs):
        del kwargs
        gc.collect()
        pack = _pack()
        tensors, storages = 0, {}
        objects: dict[str, int] = {}
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor):
                tensors += 1
                if obj.device.type != "meta":
                    storage = obj.untyped_storage()
                    storages[storage.data_ptr()] = storage.nbytes()
            elif pack and str(getattr(type(obj), "__module__", "")).startswith(pack + "."):
                name = type(obj).__qualname__
                objects[name] = objects.get(name, 0) + 1
        containers = 0
        profiler = sys.modules.get(f"{pack}.nodes.vram_profiler")
        kept = getattr(profiler, "_HISTORY", None)  # bounded by its own limit: reported beside
        for name, module in list(sys.modules.items()):
            if pack and name.startswith(pack + ".") and module is not None:
                for value in list(vars(module).values()):
                    if isinstance(value, (dict, list, set)) and value is not kept:
                        containers += len(value)
        report = {"tensors": tensors, "tensor_bytes": sum(storages.values()), "pack_objects": sum(objects.values()),
                  "objects": objects, "module_entries": containers,
                  "timelines": len(profiler._HISTORY) if profiler else -1,
                  "timeline_limit": profiler.HISTORY_LIMIT if profiler else -1}
        return {"ui": {"streamline_probe": [report]}}


def _pack():
    """The pack's package name as ComfyUI loaded it (from the Streamline Model node's module)."""
    import nodes

    node = nodes.NODE_CLASS_MAPPINGS.get("StreamlineModel")
    return node.__module__.rsplit(".nodes.", 1)[0] if node else None


_BROKEN = []


def _break_once():
    """The broken variants of the server's categories, switched on by the tests' ``$STREAMLINE_SELFTEST_BROKEN``
    at the first run (after every custom node has loaded)."""
    variant = os.environ.get("STREAMLINE_SELFTEST_BROKEN")
    if _BROKEN or variant not in ("leak-per-run", "unchecked-input"):
        return
    _BROKEN.append(variant)
    pack = _pack()
    if variant == "leak-per-run":
        context = sys.modules[f"{pack}.streamlined_core.engine.context"].RunContext
        original = context.__init__

        def __init__(self, *args, **kwargs):
            original(self, *args, **kwargs)
            _BROKEN.append(self)  # every run's context, kept

        context.__init__ = __init__
        return
    import nodes

    for name, cls in nodes.NODE_CLASS_MAPPINGS.items():
        if not cls.__module__.startswith(pack + "."):
            continue
        types = cls.INPUT_TYPES

        def unlimited(types=types):
            spec = types()
            for group in spec.values():
                for key, value in list(group.items()):
                    if isinstance(value, tuple) and len(value) > 1 and isinstance(value[1], dict):
                        group[key] = (value[0], {k: v for k, v in value[1].items() if k not in ("min", "max")})
            return spec

        cls.INPUT_TYPES = classmethod(lambda c, unlimited=unlimited: unlimited())
        function = getattr(cls, cls.FUNCTION)

        def vague(self, *args, function=function, **kwargs):
            try:
                return function(self, *args, **kwargs)
            except ValueError:
                raise RuntimeError("invalid settings") from None

        setattr(cls, cls.FUNCTION, vague)


NODE_CLASS_MAPPINGS = {"StreamlineTestTinySVD": TinySVD, "StreamlineTestTinyWan": TinyWan, "StreamlineTestTinyVAE": TinyVAE,
                       "StreamlineTestLatentFrames": LatentFrames, "StreamlineTestProbe": Probe}
