"""The "Streamline VAE Decode" node: SVD's VAE decode of every frame as one clip, by groups, exactly.

ComfyUI's VAE Decode cuts the latent batch by free memory and decodes each part as a clip of its
own, so SVD's temporal decoder sees a cut at every part border (its time convolutions) and takes its
video-wide GroupNorm statistics over the part only. This node decodes the whole batch as one clip,
as the decoder was trained, through the engine's groups (``streamlined_core/arch/comfy_vae.py``):
loaded with ComfyUI's ``load_models_gpu`` under the plan's own memory estimate, in the VAE's dtype,
on its device, with its output device and output processing, as the host's decode does. The
decoder's ``forward`` is replaced only for the call (a ``StreamlineHandle``) and restored in ``finally``.
"""

from __future__ import annotations

import logging

from ..streamlined_core.engine.api import StreamlineHandle
from ..streamlined_core.engine.arch import comfy_vae, engine_adapter
from ..streamlined_core.engine.context import listen, run_context
from ..streamlined_core.engine.slicing import GroupEvent
from ..streamlined_core.features.profiler import Recorder
from ..streamlined_core.host.comfyui import room_with_weights_resident
from .vram_profiler import current_prompt_id, publish

log = logging.getLogger(__name__)
GIB = 1024**3


class StreamlineVAEDecode:
    """VAE Decode for SVD's temporal VAE: every frame as one clip, in a fraction of the memory."""

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "samples": ("LATENT", {"tooltip": "The latent frames to decode (an SVD / SVD-XT sampler's output)."}),
                "vae": ("VAE", {"tooltip": "SVD's VAE (its temporal decoder runs by groups). Any other VAE is decoded "
                                           "by ComfyUI's own VAE Decode, and the node says so."}),
                "vram_budget_gb": ("FLOAT", {
                    "default": 0.0, "min": 0.0, "max": 1024.0, "step": 0.25,
                    "tooltip": "Total device memory the decode may use, the decoder's weights included, in GiB; a "
                               "budget this latent cannot meet is refused before decoding. 0 (auto): plan for what "
                               "ComfyUI can leave free with the VAE loaded (less its reserve), down to the "
                               "least-memory plan on a small card; on the CPU: 1.6x one tensor of the output level.",
                }),
            }
        }

    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The decoded frames: equal to decoding every frame as one clip, within rounding.",)
    FUNCTION = "decode"
    CATEGORY = "Streamline"
    DESCRIPTION = (
        "Decodes SVD latents with every frame in one clip, as the temporal decoder was trained (ComfyUI's VAE "
        "Decode cuts the clip by free memory), running each layer group on slices: frames for spatial layers, "
        "pixels for temporal ones, row bands inside a frame where needed, norms on whole-frame and whole-video "
        "statistics, so a 25-frame 576x1024 decode needs about "
        "5.6 GiB of activations instead of 28."
    )

    def decode(self, samples: dict, vae, vram_budget_gb: float):
        import comfy.model_management as mm

        if not isinstance(vram_budget_gb, (int, float)) or vram_budget_gb < 0:
            raise ValueError(f"vram_budget_gb={vram_budget_gb!r}: expected 0 (auto) or a positive number of GiB")
        latent = samples["samples"]
        decoder = getattr(getattr(vae, "first_stage_model", None), "decoder", None)
        if decoder is None or not comfy_vae.matches(decoder):
            kind = type(decoder).__name__ if decoder is not None else type(getattr(vae, "first_stage_model", vae)).__name__
            text = (f"Streamline VAE Decode: this VAE's decoder ({kind}) is not SVD's temporal decoder; decoded by "
                    f"ComfyUI's own VAE Decode, unchanged")
            log.info(text)
            return {"ui": {"text": [text]}, "result": (vae.decode(latent),)}
        if latent.dim() != 4:
            raise ValueError(f"samples: SVD latents are (frames, 4, height, width), got shape {tuple(latent.shape)}")
        if hasattr(vae, "throw_exception_if_invalid"):
            vae.throw_exception_if_invalid()
        if "forward" in decoder.__dict__:
            raise ValueError("this VAE's decoder.forward is already replaced by another node or library; Streamline "
                             "VAE Decode would hide it. Use ComfyUI's VAE Decode for it")

        device = vae.device
        budget = int(vram_budget_gb * GIB) if vram_budget_gb > 0 else None
        z = latent.to(vae.vae_dtype).to(device)
        # At the default budget: the room ComfyUI can leave with the whole VAE loaded, read once for this decode.
        room = room_with_weights_resident(device, vae.patcher.model_size())
        # The decoder runs by groups for this call only: the handle replaces its forward, remove() restores it.
        handle = StreamlineHandle(decoder, engine_adapter(decoder), "auto", budget, device_budget_bytes=lambda: room,
                                  budget_name="vram_budget_gb", budget_unit=GIB)
        try:
            plan = handle.plan_for(z)  # raises, naming vram_budget_gb, when the budget cannot be met
            stock = handle.unsliced_peak_bytes(z)
            least = handle.planner_for(z).least_peak()
            mm.load_models_gpu([vae.patcher], memory_required=plan.predicted_peak_bytes,
                               force_full_load=getattr(vae, "disable_offload", False))
            # The decode's memory timeline, per group beside the plan's prediction, goes to the VRAM panel
            # as its own run ("<prompt id>:decode"), next to the sampler's timeline of the same prompt.
            predicted = {g.name: g.predicted_bytes for g in plan.groups}
            recorder = Recorder(device, "group", label="decode", weights=decoder)

            def on_event(event) -> None:
                if isinstance(event, GroupEvent) and event.kind == "end":
                    recorder.group(event.name, predicted.get(event.name))

            with run_context() as ctx, listen(on_event), recorder:
                recorder.call(0, None, ["decode"])
                out = vae.first_stage_model.decode(z)  # out of memory: once more at the least-memory plan
                recovered = list(ctx.recovered)
            recorder.set_streamline({"predicted_peak_bytes": plan.predicted_peak_bytes})
        finally:
            handle.remove()
        recorder.timeline.prompt_id = f"{current_prompt_id()}:decode"
        publish(recorder.timeline)
        images = vae.process_output(out.to(vae.output_device).float()).movedim(1, -1)
        floor = plan.skip_floor_bytes
        planned_for = (f"planned for {room[0] / GIB:.2f} GiB: {room[1]}" if budget is None and room is not None
                       else f"planned for vram_budget_gb={vram_budget_gb:g}" if budget is not None
                       else "planned for 1.6x its floor (the CPU)")
        text = (f"Streamline VAE Decode: {latent.shape[0]} frames as one clip, {plan.describe()}; predicted activation "
                f"peak {plan.predicted_peak_bytes / GIB:.2f} GiB, {plan.predicted_peak_bytes / floor:.2f}x its floor of "
                f"{floor / GIB:.2f} GiB (one tensor of the output level; the least reachable, predicted: {least / floor:.2f}x); "
                f"the stock decoder in one call: {stock / GIB:.2f} GiB; {planned_for}")
        if recovered:
            text += "; ran out of memory once and decoded again at the least-memory plan (same output)"
        log.info(text)
        return {"ui": {"text": [text]}, "result": (images,)}
