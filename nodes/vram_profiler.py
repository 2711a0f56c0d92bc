"""The "VRAM Profiler" node: the memory timeline of every sampling run of a MODEL, per step and per group.

MODEL in, MODEL out: a clone with two keyed wrappers, never a patch of ComfyUI's executor.

- OUTER_SAMPLE (:class:`ProfilerOuter`): opens the run's context with a
  :class:`~streamlined_core.features.profiler.Recorder` in it, and when the run ends (success or failure)
  keeps the timeline in a bounded history by prompt id, pushes it to the page
  (``streamline.timeline`` event) and logs one line: the peak, where it happened, and the saving
  against the previous run with the same label.
- DIFFUSION_MODEL (:class:`ProfilerCall`): each U-Net call tells the recorder its step (from
  ``transformer_options["sample_sigmas"]``), sigma and conds. At group granularity, a streamlined
  U-Net's groups arrive as the engine's group events (with the plan's predicted peak beside each);
  without Streamline, forward hooks on the last layer of each host block mark the block's end, added
  for the call and removed after it. Nothing is added that changes how the host runs the U-Net (an
  ``output_block_patch``, for one, would change how ComfyUI's loop fuses upsamplers).

Routes: ``GET /streamline/timelines`` (the history, newest first; ``?limit=N``) and
``GET /streamline/timelines/{prompt_id}`` (one timeline as JSON, schema ``streamline.timeline/1``).
"""

from __future__ import annotations

import logging
import re
import threading
import uuid
from collections import OrderedDict
from typing import Any

from ..streamlined_core.engine.context import StepClock, current, listen, run_context
from ..streamlined_core.engine.slicing import GroupEvent
from ..streamlined_core.features.profiler import GRANULARITIES, Recorder, Timeline, format_bytes, predicted_bytes, step_index
from ..streamlined_core.features.rehash import RehashEvent

KEY = "streamline.profiler"
EVENT = "streamline.timeline"
HISTORY_LIMIT = 32
PROMPT_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
log = logging.getLogger(__name__)

_HISTORY: OrderedDict[str, dict] = OrderedDict()  # prompt id -> timeline document, newest last
_LAST_PEAK: dict[str, int] = {}  # label -> peak of its previous run
_LOCK = threading.Lock()


class _Profiled:
    """What one profiled run holds in its run context: the recorder and the patcher being run."""

    def __init__(self, recorder: Recorder, patcher: Any, snapshot_steps: int = 0) -> None:
        self.recorder = recorder
        self.patcher = patcher
        self.weights_seen = False
        self.snapshot_steps = snapshot_steps
        self.recording = False

    def start_snapshot(self) -> None:
        import torch

        torch.cuda.memory._record_memory_history(max_entries=200_000)
        self.recording = True

    def finish_snapshot(self) -> None:
        """Write the allocator history of the first steps where PyTorch's memory visualizer reads it."""
        import torch

        if not self.recording:
            return
        self.recording = False
        try:
            import folder_paths

            path = f"{folder_paths.get_temp_directory()}/streamline_snapshot_{self.recorder.timeline.prompt_id}.pickle"
            torch.cuda.memory._dump_snapshot(path)
            self.recorder.timeline.snapshot = {"steps": self.snapshot_steps, "path": path}
            log.info("VRAM Profiler: allocator history of the first %d steps in %s (open it at PyTorch's "
                     "memory visualizer)", self.snapshot_steps, path)
        except Exception as exc:  # noqa: BLE001 - a snapshot must never fail the run
            self.recorder.timeline.snapshot = {"why_not": f"writing the snapshot failed: {type(exc).__name__}: {exc}"}
        finally:
            torch.cuda.memory._record_memory_history(enabled=None)


def current_prompt_id() -> str:
    try:  # ComfyUI >= 0.3.6x: the executing node's context
        from comfy_execution.utils import get_executing_context

        ctx = get_executing_context()
        if ctx is not None and ctx.prompt_id:
            return str(ctx.prompt_id)
    except ImportError:
        pass
    try:
        from server import PromptServer

        pid = getattr(getattr(PromptServer, "instance", None), "last_prompt_id", None)
        if pid:
            return str(pid)
    except ImportError:
        pass
    return f"local-{uuid.uuid4().hex[:12]}"


def _snapshot_unavailable(device: Any, steps: int) -> str | None:
    """Why no allocator history snapshot is taken, or None when one can be."""
    import torch

    if steps <= 0:
        return "snapshot_steps is 0"
    if getattr(device, "type", "cpu") != "cuda":
        return f"allocator snapshots exist on CUDA only; this run was on {device}"
    backend = torch.cuda.get_allocator_backend()
    if backend != "native":
        return (f"PyTorch's {backend} allocator backend (ComfyUI's default) keeps no allocation history; start "
                "ComfyUI with --disable-cuda-malloc for a snapshot")
    return None


class ProfilerOuter:
    """OUTER_SAMPLE wrapper: record the run, then keep, push and log its timeline."""

    def __init__(self, granularity: str, snapshot_steps: int, label: str) -> None:
        self.granularity, self.snapshot_steps, self.label = granularity, snapshot_steps, label

    def __call__(self, executor, *args: Any, **kwargs: Any) -> Any:
        patcher = executor.class_obj.model_patcher
        with run_context() as ctx:
            if ctx.recorder is not None:  # a second profiler on the same run: the outer one records
                log.info("VRAM Profiler: this run is already being profiled (%s); recording it once",
                         ctx.recorder.recorder.timeline.label or "unlabelled")
                return executor(*args, **kwargs)
            recorder = Recorder(patcher.load_device, self.granularity, self.label)
            why_not = _snapshot_unavailable(patcher.load_device, self.snapshot_steps)
            recorder.timeline.snapshot = {"why_not": why_not} if why_not else {"steps": self.snapshot_steps}
            run = ctx.recorder = _Profiled(recorder, patcher, self.snapshot_steps)

            def on_event(event: Any) -> None:
                if isinstance(event, GroupEvent) and event.kind == "end":
                    recorder.group(event.name, predicted_bytes(ctx, event.name))
                elif isinstance(event, RehashEvent):  # Step Rehash Sampler: the step is key or reused
                    recorder.rehash(event.kind)

            recorder.timeline.prompt_id = current_prompt_id()
            try:
                with listen(on_event), recorder:
                    if why_not is None:
                        run.start_snapshot()
                    return executor(*args, **kwargs)
            finally:
                run.finish_snapshot()
                ctx.recorder = None
                plans = [p for p in ctx.plans if p is not None]
                if plans:
                    worst = max(plans, key=lambda p: p.predicted_peak_bytes)
                    recorder.set_streamline({
                        "predicted_peak_bytes": worst.predicted_peak_bytes, "plan": worst.describe(),
                        "sliced_groups": len(worst.sliced_groups), "groups": len(worst.groups),
                    })
                publish(recorder.timeline)


class ProfilerCall:
    """DIFFUSION_MODEL wrapper: tell the run's recorder about each U-Net call (and, without Streamline
    at group granularity, about each host block's end)."""

    def __call__(self, executor, *args: Any, **kwargs: Any) -> Any:
        ctx = current()
        run = getattr(ctx, "recorder", None)
        if run is None:
            return executor(*args, **kwargs)
        recorder = run.recorder
        options = kwargs.get("transformer_options", args[5] if len(args) > 5 else {}) or {}
        sigma = _first(options.get("sigmas"))
        schedule = options.get("sample_sigmas")
        step = step_index(sigma, [float(s) for s in schedule]) if schedule is not None and sigma is not None else None
        clock = ctx.rehash
        if step is not None and isinstance(clock, StepClock):  # Step Rehash counts steps by the sampler's callback
            step = clock.step_of(sigma, clock.branches_of(options), commit=False)
        conds = [("uncond" if c == 1 else "cond") for c in options.get("cond_or_uncond", [])] or None
        unet = executor.class_obj
        if not run.weights_seen:
            run.weights_seen = True
            recorder.set_weights(unet, partial_load=bool(getattr(run.patcher.model, "model_lowvram", False)))
        if run.recording and step is not None and step >= run.snapshot_steps:
            run.finish_snapshot()
        recorder.call(step, sigma, conds)
        hooks = []
        if recorder.granularity == "group" and not _streamlined(unet):
            hooks = _block_hooks(unet, recorder)
        try:
            return executor(*args, **kwargs)
        finally:
            for h in hooks:
                h.remove()


def _first(value: Any) -> float | None:
    if value is None:
        return None
    try:
        return float(value.flatten()[0]) if hasattr(value, "flatten") else float(value[0])
    except (TypeError, IndexError, ValueError):
        return None


def _streamlined(unet: Any) -> bool:
    """Whether Streamline's engine runs this U-Net (its groups then come as the engine's events)."""
    from ..streamlined_core.engine.api import Streamliner

    engine = unet.__dict__.get("_forward")
    return isinstance(engine, Streamliner) and not engine.passthrough  # Step Rehash's own engine runs the host's


def _block_hooks(unet: Any, recorder: Recorder) -> list:
    """Forward hooks marking the end of each of the host's blocks: a U-Net's input, middle and output blocks and
    its head (on each block's last layer), a Wan transformer's blocks and its head (on the block itself)."""
    if _is_wan(unet):
        blocks = [(f"blocks.{i}", b) for i, b in enumerate(unet.blocks)] + [("head", unet.head)]
        return [block.register_forward_hook(lambda *_a, _n=name: recorder.group(_n)) for name, block in blocks]
    blocks = [(f"input_blocks.{i}", b) for i, b in enumerate(getattr(unet, "input_blocks", []))]
    if getattr(unet, "middle_block", None) is not None:
        blocks.append(("middle_block", unet.middle_block))
    blocks += [(f"output_blocks.{i}", b) for i, b in enumerate(getattr(unet, "output_blocks", []))]
    if getattr(unet, "out", None) is not None:
        blocks.append(("out", unet.out))
    hooks = []
    for name, block in blocks:
        children = list(block.children())
        last = children[-1] if children else block
        hooks.append(last.register_forward_hook(lambda *_a, _n=name: recorder.group(_n)))
    return hooks


def _is_wan(unet: Any) -> bool:
    from ..streamlined_core.engine.arch import comfy_wan

    return comfy_wan.matches(unet)


def publish(timeline: Timeline) -> None:
    """Keep the timeline, push it to the page, log its summary with the saving against the label's last run."""
    doc = timeline.to_json()
    key = timeline.prompt_id or f"local-{uuid.uuid4().hex[:12]}"
    with _LOCK:
        _HISTORY.pop(key, None)
        _HISTORY[key] = doc
        while len(_HISTORY) > HISTORY_LIMIT:
            _HISTORY.popitem(last=False)
        previous = _LAST_PEAK.get(timeline.label)
        _LAST_PEAK[timeline.label] = timeline.peak_bytes
    line = f"VRAM Profiler{f' [{timeline.label}]' if timeline.label else ''}: {timeline.summary()}"
    if previous:
        saved = previous - timeline.peak_bytes
        line += (f"; {format_bytes(abs(saved))} {'less' if saved >= 0 else 'more'} than the previous run with this "
                 f"label ({saved / previous:+.0%})")
    if timeline.dropped_events:
        line += f"; {timeline.dropped_events} older group events dropped to stay within the event limit"
    log.info(line)
    try:
        from server import PromptServer

        server = getattr(PromptServer, "instance", None)
        if server is not None:
            server.send_sync(EVENT, doc, server.client_id)
    except ImportError:
        pass


def history() -> list[dict]:
    """Summaries of the kept timelines, newest first."""
    with _LOCK:
        docs = list(_HISTORY.values())[::-1]
    return [{k: d.get(k) for k in ("prompt_id", "label", "started_at", "seconds", "peak_bytes", "activation_peak_bytes",
                                   "predicted_peak_bytes", "device", "granularity")} | {"steps": len(d.get("steps", []))}
            for d in docs]


def timeline(prompt_id: str) -> dict | None:
    with _LOCK:
        return _HISTORY.get(prompt_id)


def register_routes() -> bool:
    """Add the GET routes to ComfyUI's server, when one is running; False when there is none."""
    try:
        from aiohttp import web
        from server import PromptServer
    except ImportError:
        return False
    server = getattr(PromptServer, "instance", None)
    if server is None:
        return False
    routes = server.routes

    @routes.get("/streamline/timelines")
    async def list_timelines(request):
        raw = request.query.get("limit", str(HISTORY_LIMIT))
        if not raw.isdigit() or not 1 <= int(raw) <= HISTORY_LIMIT:
            return web.json_response({"error": f"limit: expected an integer from 1 to {HISTORY_LIMIT}, got {raw[:40]!r}"},
                                     status=400)
        return web.json_response(history()[: int(raw)])

    @routes.get("/streamline/timelines/{prompt_id}")
    async def get_timeline(request):
        pid = request.match_info.get("prompt_id", "")
        if not PROMPT_ID.match(pid):
            return web.json_response({"error": "prompt_id: expected 1 to 128 letters, digits or '_.:-'"}, status=400)
        doc = timeline(pid)
        if doc is None:
            return web.json_response({"error": f"no timeline for prompt {pid} (the last {HISTORY_LIMIT} are kept)"},
                                     status=404)
        return web.json_response(doc)

    return True


class VRAMProfiler:
    """Record where the memory of each sampling run goes: per step, or per group, with the peak."""

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "Any MODEL whose diffusion model is ComfyUI's UNetModel (SVD, SD1.5, "
                                               "SDXL) or WanModel (Wan 2.1, 2.2), with or without Streamline Model, "
                                               "before or after it."}),
                "granularity": (list(GRANULARITIES), {
                    "default": "step",
                    "tooltip": "step: one reading per denoising step and model call (cheapest). group: also one "
                               "per layer group (Streamline's groups, or the host's blocks), to see where in the "
                               "model the peak happens.",
                }),
                "snapshot_steps": ("INT", {
                    "default": 0, "min": 0, "max": 1000,
                    "tooltip": "CUDA only: record PyTorch's allocator history for this many steps, for its memory "
                               "visualizer. Needs ComfyUI started with --disable-cuda-malloc (the default "
                               "cudaMallocAsync backend keeps no history); the timeline says why when none is taken.",
                }),
                "label": ("STRING", {
                    "default": "",
                    "tooltip": "A name for this run: the log compares each run's peak with the previous run of the "
                               "same label (e.g. with and without Streamline Model).",
                }),
            }
        }

    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The same model; its sampling runs are recorded.",)
    FUNCTION = "patch"
    CATEGORY = "Streamline"
    DESCRIPTION = (
        "Records the memory timeline of each sampling run of this model: the peak of every step (and group), "
        "where the run's peak happens, and Streamline's predicted peak beside the measured one. The timeline "
        "goes to the Streamline panel and to GET /streamline/timelines; the log gets one summary line."
    )

    def patch(self, model, granularity: str, snapshot_steps: int, label: str):
        import comfy.patcher_extension as pe

        unet = model.get_model_object("diffusion_model")
        if not all(hasattr(unet, a) for a in ("input_blocks", "middle_block", "output_blocks")) and not _is_wan(unet):
            raise ValueError(
                f"VRAM Profiler records ComfyUI's UNetModel (SVD, SD1.5, SDXL) and WanModel (Wan 2.1, 2.2); this MODEL's "
                f"diffusion model is {type(unet).__module__}.{type(unet).__name__}")
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
        if not isinstance(snapshot_steps, int) or snapshot_steps < 0:
            raise ValueError(f"snapshot_steps must be 0 or a positive integer, got {snapshot_steps!r}")
        if len(label) > 200:
            raise ValueError(f"label must be at most 200 characters, got {len(label)}")
        patched = model.clone()
        patched.remove_wrappers_with_key(pe.WrappersMP.OUTER_SAMPLE, KEY)
        patched.remove_wrappers_with_key(pe.WrappersMP.DIFFUSION_MODEL, KEY)
        patched.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, KEY, ProfilerOuter(granularity, snapshot_steps, label))
        patched.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, KEY, ProfilerCall())
        return (patched,)
