"""The "Streamline Model" node: run ComfyUI's video U-Net by sliced layer groups, exactly.

MODEL in, MODEL out: a clone whose ``diffusion_model._forward`` is the engine's (an object patch,
applied only while that clone is loaded), plus an OUTER_SAMPLE wrapper that opens the run's context
(listeners, plans, stage requests: ``streamlined_core/engine/context.py``), refuses a typed budget
this latent cannot meet before the first step, and lowers ComfyUI's memory estimate to what the plan
predicts for the run, restoring it afterwards, so ComfyUI keeps more weights on the GPU. At its
default budget each call is planned for what ComfyUI leaves free as it runs, less its reserve
(``host/comfyui.py``): on a small card, where ComfyUI streams part of the weights, the plan goes
down to the least-memory plan. The MODEL that came in is untouched; its clones share the engine,
which holds configuration only.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from ..streamlined_core.engine.api import Streamliner
from ..streamlined_core.engine.arch import comfy_unet, comfy_wan, engine_adapter
from ..streamlined_core.engine.context import current, run_context
from ..streamlined_core.host.comfyui import free_for_activations, room_with_weights_resident

KEY = "streamline"
log = logging.getLogger(__name__)
GIB = 1024**3
AXES = {"all": frozenset({"frames", "pixels", "tokens"}), "spatial": frozenset({"frames"}), "temporal": frozenset({"pixels"})}


class StreamlineOuter:
    """OUTER_SAMPLE wrapper: the run's context; a typed budget checked against this latent; ComfyUI's
    ``memory_required`` lowered for the run (on a device: to the plan's predicted peak for the room
    every weight resident would leave; on the CPU or under a typed budget: scaled by the plan's ratio),
    then restored exactly."""

    def __init__(self, engine: Streamliner) -> None:
        self.engine = engine

    def __call__(self, executor, *args: Any, **kwargs: Any) -> Any:
        with run_context():
            patcher = executor.class_obj.model_patcher
            self._check_budget(args[1] if len(args) > 1 else kwargs.get("latent_image"), patcher)
            return self._with_estimate(executor, *args, **kwargs)

    def _check_budget(self, latent, patcher) -> None:
        """A budget the user typed that this latent cannot meet is refused before the first step.

        Where another pack injects modules while the model loads (AnimateDiff-Evolved's motion
        modules, context windows) the U-Net's calls are not known yet: the first call's plan refuses
        such a budget instead, naming it the same way.
        """
        engine = self.engine
        if engine.budget_bytes is None or latent is None or getattr(patcher, "injections", None):
            return
        wan = comfy_wan.matches(engine.unet)
        if latent.dim() != (5 if wan else 4):
            return
        frames = latent.shape[2] if wan else latent.shape[0]
        # both conds batched: the most the model sees at once
        shape = (2 * latent.shape[0], *latent.shape[1:]) if wan else (2 * frames, *latent.shape[1:])
        least = engine.least_total_bytes(_arch(engine.unet).example_arguments(engine.unet, shape, frames=frames))
        if least > engine.budget_bytes:
            h, w = latent.shape[-2:]
            raise ValueError(
                f"vram_budget_gb={engine.budget_bytes / GIB:g} cannot be met for this latent ({frames} frames at "
                f"{h}x{w}, both conds batched): the least budget that works is {least / GIB:.2f} GiB (weights and "
                f"the activation peak at the most slicing); raise vram_budget_gb to at least {least / GIB:.2f}, or 0 "
                f"to plan for what ComfyUI leaves free"
            )

    def _with_estimate(self, executor, *args: Any, **kwargs: Any) -> Any:
        import comfy.patcher_extension as pe

        guider = executor.class_obj
        patcher = guider.model_patcher
        base_model = patcher.model
        had_own = "memory_required" in base_model.__dict__
        previous = base_model.__dict__.get("memory_required")
        host_estimate = base_model.memory_required  # ours wraps whatever is there (another pack's too)
        engine = self.engine
        latent = args[1] if len(args) > 1 else kwargs.get("latent_image")
        sigmas = args[3] if len(args) > 3 else kwargs.get("sigmas")
        frames = latent.shape[0] if latent is not None and latent.dim() == 4 else None  # U-Nets: frames are the batch
        dtype = base_model.manual_cast_dtype or base_model.get_dtype()
        preparing = [False]  # inside the sampler's prepare_sampling (its estimate before loading)

        def prepare(prepare_executor, *a: Any, **k: Any) -> Any:
            preparing[0] = True
            try:
                return prepare_executor(*a, **k)
            finally:
                preparing[0] = False

        def memory_required(input_shape, cond_shapes={}):
            estimate = host_estimate(input_shape, cond_shapes=cond_shapes)
            try:
                room = room_with_weights_resident(patcher.load_device, patcher.model_size())
                if room is None and preparing[0]:
                    # comfy.model_management.load_models_gpu frees and partially loads for devices other than
                    # the CPU only: this estimate is not read, so it is not planned (the sampler's batching
                    # estimate, next, is: it shares the calls' plan)
                    _once("cpu estimate", "Streamline: on the CPU ComfyUI loads every weight whatever its memory "
                                          "estimate: its estimate before loading is left as it is, unplanned")
                    return estimate
                arguments = self._example(input_shape, cond_shapes, guider, frames, sigmas, dtype)
                if room is None or engine.budget_bytes is not None:  # the CPU, or a typed budget: scale the host's
                    return estimate * engine.memory_ratio(arguments)
                # on a device: the smaller of the host's formula and the plan for the room every weight resident
                # leaves (its least-memory plan where that is short), so the host keeps as many weights as fit
                return min(estimate, engine.planned_peak(arguments, *room))
            except Exception as exc:  # an estimate must never stop a run: keep the host's
                log.warning("Streamline: keeping ComfyUI's memory estimate (%s: %s)", type(exc).__name__, exc)
                return estimate

        base_model.memory_required = memory_required
        pe.add_wrapper_with_key(pe.WrappersMP.PREPARE_SAMPLING, KEY, prepare, guider.model_options, is_model_options=True)
        try:
            return executor(*args, **kwargs)
        finally:
            wrappers = pe.get_wrappers_with_key(pe.WrappersMP.PREPARE_SAMPLING, KEY, guider.model_options,
                                                is_model_options=True)
            if prepare in wrappers:
                wrappers.remove(prepare)
            if had_own:
                base_model.memory_required = previous
            else:
                base_model.__dict__.pop("memory_required", None)

    def _example(self, input_shape, cond_shapes, guider, frames, sigmas, dtype) -> dict[str, Any]:
        """The ``_forward`` arguments a sampler call of ``input_shape`` will have, as far as a plan reads them:
        videos of the latent's frames, the conditioning's context length, the sampler's options with the
        entries each call adds (``calc_cond_batch``), the compute dtype."""
        import uuid

        n = input_shape[0]
        videos = n // frames if frames and n % frames == 0 else 1
        options = dict(guider.model_options.get("transformer_options", {}))
        options.update(cond_or_uncond=[0] * videos, uuids=[uuid.uuid4() for _ in range(videos)])
        if isinstance(sigmas, torch.Tensor) and sigmas.numel():
            options["sigmas"] = sigmas[:1].expand(n // videos)
        tokens = _context_tokens(cond_shapes, getattr(guider, "conds", None))
        return _arch(self.engine.unet).example_arguments(self.engine.unet, input_shape, frames=n // videos, tokens=tokens,
                                            transformer_options=options, dtype=dtype)


def _arch(model):
    """The adapter module of the model Streamline Model patched: ComfyUI's U-Net, or Wan's transformer."""
    return comfy_wan if comfy_wan.matches(model) else comfy_unet


def _context_tokens(cond_shapes: dict, conds: dict | None) -> int:
    """The context length of the sampler's calls: from the batching query's ``c_crossattn`` shapes, else the
    conditioning's ``cross_attn``; lengths that differ are padded to their least common multiple when batched
    (``CONDCrossAttn.concat``)."""
    shapes = list(cond_shapes.get("c_crossattn", ()) or ())
    if not shapes:
        shapes = [c["cross_attn"].shape for cs in (conds or {}).values() for c in cs
                  if isinstance(c, dict) and isinstance(c.get("cross_attn"), torch.Tensor)]
    tokens = [int(shape[1]) for shape in shapes if len(shape) >= 3]
    return math.lcm(*tokens) if tokens else 1


def _once(what: str, message: str) -> None:
    """Log ``message`` once per run."""
    ctx = current()
    if ctx is None or what not in ctx.warned:
        if ctx is not None:
            ctx.warned.add(what)
        log.info(message)


class StreamlineModel:
    """Patch a MODEL so each layer group runs on slices of its input, with unchanged output."""

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "An SVD / SVD-XT model, an SD1.5 / SDXL model used with "
                                               "AnimateDiff-Evolved (before or after Use Evolved Sampling), or a Wan "
                                               "2.1 / 2.2 model."}),
                "slicing": (["auto", "upper bound"], {
                    "default": "auto",
                    "tooltip": "auto: per group, the least slicing whose predicted peak fits the VRAM budget "
                               "(every extra slice costs a little speed). upper bound: every group runs "
                               "max_slices slices, fewer where its axis is shorter.",
                }),
                "max_slices": ("INT", {
                    "default": 8, "min": 1, "max": 4096,
                    "tooltip": "With 'upper bound': the most slices any group runs (ignored by 'auto').",
                }),
                "vram_budget_gb": ("FLOAT", {
                    "default": 0.0, "min": 0.0, "max": 1024.0, "step": 0.25,
                    "tooltip": "Total device memory the U-Net may use, weights included, in GiB; a budget this "
                               "latent cannot meet is refused before the first step. 0: plan for what ComfyUI "
                               "leaves free as it runs (less its reserve), down to the least-memory plan on a "
                               "small card, where ComfyUI streams the weights that do not fit; on the CPU: 1.5x "
                               "the skip floor.",
                }),
                "groups": (list(AXES), {
                    "default": "all",
                    "tooltip": "Which layer groups may be sliced: spatial ones along frames, temporal ones "
                               "along pixels, or all (Wan: all; its blocks are sliced along tokens).",
                }),
            }
        }

    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The same model run by sliced layer groups: less memory, the same output.",)
    FUNCTION = "patch"
    CATEGORY = "Streamline"
    DESCRIPTION = (
        "Runs every layer group of the video U-Net on slices of its input (spatial groups along frames, "
        "temporal groups along pixels, norms on full-video statistics), so the activation peak drops to "
        "about 1.5x the skip tensors while the output stays the same. On Wan 2.1 / 2.2 each transformer block "
        "runs on token slices (keys and values of every token first): about 1.5x the residual stream with one "
        "self-attention's keys and values."
    )

    def patch(self, model, slicing: str, max_slices: int, vram_budget_gb: float, groups: str):
        import comfy.patcher_extension as pe

        unet = model.get_model_object("diffusion_model")
        wan = comfy_wan.matches(unet)
        if not comfy_unet.matches(unet) and not wan:
            raise ValueError(
                f"Streamline Model supports ComfyUI's UNetModel (SVD and SVD-XT, and SD1.5 / SDXL models animated by "
                f"AnimateDiff-Evolved) and WanModel (Wan 2.1 and 2.2); this MODEL's diffusion model is "
                f"{type(unet).__module__}.{type(unet).__name__}"
            )
        if slicing not in ("auto", "upper bound"):
            raise ValueError(f'slicing must be "auto" or "upper bound", got {slicing!r}')
        if groups not in AXES:
            raise ValueError(f"groups must be one of {', '.join(AXES)}, got {groups!r}")
        if wan and groups != "all":
            raise ValueError(f"groups={groups!r} chooses among a U-Net's spatial and temporal groups; Wan's blocks are "
                             f"sliced along tokens: set groups to all")
        if max_slices < 1:
            raise ValueError(f"max_slices must be a positive integer, got {max_slices}")
        if vram_budget_gb < 0:
            raise ValueError(f"vram_budget_gb must be 0 (plan for what ComfyUI leaves free) or a positive number of GiB, "
                             f"got {vram_budget_gb}")
        budget = int(vram_budget_gb * GIB) if vram_budget_gb > 0 else None
        slices = max_slices if slicing == "upper bound" else "auto"
        adapter = engine_adapter(unet)
        if not wan and adapter.forward is not comfy_unet.streamlined_forward:
            log.warning("Streamline: this ComfyUI's UNetModel._forward is not one Streamline reproduces; slicing each "
                        "layer under the host's own loop instead (exact, with a higher peak)")
        device = model.load_device
        engine = Streamliner(unet, adapter, slices, budget, AXES[groups],
                             device_budget_bytes=lambda: free_for_activations(device),
                             budget_name="vram_budget_gb", budget_unit=GIB)
        patched = model.clone()
        patched.add_object_patch("diffusion_model._forward", engine)
        patched.remove_wrappers_with_key(pe.WrappersMP.OUTER_SAMPLE, KEY)
        patched.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, KEY, StreamlineOuter(engine))
        return (patched,)

