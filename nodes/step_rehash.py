"""The "Step Rehash Sampler" node (a KSampler with Step Rehash) and the "Step Rehash Guider" (a GUIDER
for SamplerCustomAdvanced): key steps run the whole U-Net, the others reuse the deep feature cached
at a cut of the last up block and run only the layers after it (plus the shallow path that feeds
their skips). How a run works inside ComfyUI: ``streamlined_core/features/rehash/comfyui.py``.
"""

from __future__ import annotations

from typing import Any

from ..streamlined_core.features.rehash import DEFAULT_CUT
from ..streamlined_core.features.rehash.comfyui import (
    AUTO,
    AUTO_CUT,
    CUT_CHOICES,
    FOLDER,
    SCHEDULES,
    RehashOptions,
    calibration_files,
    with_rehash,
)

# -- the nodes -----------------------------------------------------------------------------------------


def _rehash_inputs() -> dict:
    return {
        "schedule": (list(SCHEDULES), {
            "default": "target key steps",
            "tooltip": "Which steps run the whole U-Net (key steps). target key steps / gamma: the paper's Algorithm 1 "
                       "on a calibration's step-similarity map (a step is reused while its deep feature stays at "
                       "least gamma-similar to the last key step's). uniform interval: every interval-th step.",
        }),
        "key_steps": ("INT", {
            "default": 0, "min": 0, "max": 10000,
            "tooltip": "With target key steps: how many steps run the whole U-Net (the closest reachable, never "
                       "more). 0: 13 of 25, scaled to the steps. Counts sampler steps, not model calls.",
        }),
        "gamma": ("FLOAT", {"default": 0.95, "min": 0.0, "max": 1.0, "step": 0.0001,
                            "tooltip": "With gamma: the similarity a reuse step must keep to the last key step."}),
        "interval": ("INT", {"default": 2, "min": 1, "max": 100,
                             "tooltip": "With uniform interval: every interval-th step is key (2: 13 of 25)."}),
        "cut": (list(CUT_CHOICES), {
            "default": AUTO_CUT,
            "tooltip": f"Where in the last up block the cached feature is taken: later cuts leave less to compute on "
                       f"a reuse step. auto: {DEFAULT_CUT}, or on a U-Net where that is the last layer (one ResBlock "
                       f"per level) the nearest cut whose tail takes fresh input; the report names the cut taken. "
                       f"See docs/step-rehash.md for the measured trade-off.",
        }),
        "calibration": ([AUTO] + calibration_files(), {
            "default": AUTO,
            "tooltip": f"Similarity maps from models/{FOLDER}. auto: a calibration made for this model, step count, "
                       "sampler, scheduler and denoise, or else this run calibrates (every step whole) and saves one. "
                       "A newly written calibration appears in this list after refreshing the node definitions "
                       "(press R).",
        }),
        "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                    "tooltip": "Steps before this share of the schedule (as sigma) always run whole."}),
        "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                  "tooltip": "Steps after this share of the schedule (as sigma) always run whole."}),
        "max_consecutive_reuses": ("INT", {"default": 0, "min": 0, "max": 10000,
                                           "tooltip": "The most reuse steps in a row (0: no limit)."}),
        "override_calibration": ("BOOLEAN", {
            "default": False,
            "tooltip": "Use a chosen calibration made for another model, step count, sampler or scheduler anyway.",
        }),
    }


def _options(kw: dict, **known: Any) -> RehashOptions:
    return RehashOptions(**{n: kw[n] for n in _rehash_inputs()}, **known)


class StepRehashSampler:
    """KSampler with Step Rehash."""

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        import nodes

        ks = nodes.KSampler.INPUT_TYPES()
        return {"required": {**ks["required"], **_rehash_inputs()}, "hidden": {"unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The denoised latent.",)
    FUNCTION = "sample"
    CATEGORY = "Streamline"
    DESCRIPTION = (
        "KSampler with Step Rehash: key steps run the whole U-Net; the others reuse a deep feature cached at a key "
        "step and run only the layers after it. The node shows which steps were key and how many U-Net calls were "
        "saved; with ControlNet, its network still runs on every call."
    )

    def sample(self, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise=1.0,
               unique_id=None, **kw):
        import nodes

        options = _options(kw, sampler=sampler_name, scheduler=scheduler, denoise=float(denoise))
        patched = with_rehash(model, options, None if unique_id is None else str(unique_id))
        return nodes.common_ksampler(patched, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                     latent_image, denoise=denoise)


class StepRehashGuider:
    """A CFG GUIDER with Step Rehash, for SamplerCustomAdvanced."""

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        from comfy_extras.nodes_custom_sampler import CFGGuider

        guider = CFGGuider.INPUT_TYPES()
        return {"required": {**guider["required"], **_rehash_inputs()}, "hidden": {"unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = ("GUIDER",)
    FUNCTION = "get_guider"
    CATEGORY = "Streamline"
    DESCRIPTION = ("A CFG guider with Step Rehash for SamplerCustomAdvanced: key steps refer to the sigmas it "
                   "receives (after SplitSigmas, the sub-schedule).")

    def get_guider(self, model, positive, negative, cfg, unique_id=None, **kw):
        import comfy.samplers

        patched = with_rehash(model, _options(kw), None if unique_id is None else str(unique_id))
        guider = comfy.samplers.CFGGuider(patched)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        return (guider,)


__all__ = ["RehashOptions", "StepRehashGuider", "StepRehashSampler", "with_rehash"]
