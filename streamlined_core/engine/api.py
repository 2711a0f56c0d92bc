"""``streamline(...)``: patch a diffusers video U-Net (or the pipeline holding it) to run by groups.

    from streamlined_core import streamline

    handle = streamline(pipe)                  # slices chosen per call from the memory budget
    frames = pipe(image, ...).frames
    print(handle.last_plan.table())            # which group, which axis, how many slices, bytes
    handle.remove()                            # the model is exactly as before

Inside a ``with listen(...)`` or ``with stage_request(...)`` block (``context.py``) the streamlined
calls report their group and stage events, or capture at, start from and stop at cut points.

Only the U-Net's ``forward`` is replaced (an instance attribute, or accelerate's ``_old_forward``
under model CPU offload); no module, weight or hook of the model changes, so ``remove()`` restores
it exactly and an exception in a run leaves nothing behind.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
import warnings
from dataclasses import replace
from typing import Any, Callable, Literal

import torch
from torch import nn

from .arch import Adapter, engine_adapter, skip_floor_bytes
from .arch.comfy_attention import sdpa_on_meta
from .context import Controller, ControllerCall, RunContext, current, run_context
from .memory import GIB, suspend_tracking, weights_bytes
from .plan import Plan, Planner, allowed, fresh_containers, meta_replica, to_meta
from .plan_store import PLANS, structure_key
from .slicing import Runner
from .stages import StageRequest

SUPPORTED_HOOKS = ("layerwise_casting", "peft_autocast_disable")
log = logging.getLogger(__name__)


def _check_slices(slices: Any) -> int | Literal["auto"]:
    if slices == "auto":
        return "auto"
    if isinstance(slices, bool) or not isinstance(slices, int) or slices < 1:
        raise ValueError(f'slices must be a positive integer or "auto", got {slices!r}')
    return slices


def _check_budget(budget_bytes: Any) -> int | None:
    if budget_bytes is None:
        return None
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, (int, float)) or not math.isfinite(budget_bytes):
        raise TypeError(f"budget_bytes must be a number of bytes or None, got {budget_bytes!r}")
    if budget_bytes <= 0:
        raise ValueError(f"budget_bytes must be a positive number of bytes (device memory, weights included), got {budget_bytes!r}")
    return int(budget_bytes)


SUPPORTED = ("diffusers' UNetSpatioTemporalConditionModel (SVD, SVD-XT) and UNetMotionModel (AnimateDiff), "
             "ComfyUI's UNetModel (SVD, and SD1.5 / SDXL under AnimateDiff-Evolved), SVD's VAE "
             "(AutoencoderKLTemporalDecoder: its temporal decoder) and the SD VAE (AutoencoderKL: its decoder)")


def resolve_unet(target: Any) -> tuple[nn.Module, Adapter]:
    unet = target if isinstance(target, nn.Module) else getattr(target, "unet", None)
    if type(unet).__name__ in ("AutoencoderKLTemporalDecoder", "AutoencoderKL"):
        unet = unet.decoder  # pipe.vae: the decoder is what runs by groups
    if not isinstance(unet, nn.Module):
        raise TypeError(f"target must be a video U-Net or a pipeline holding one as .unet, or SVD's VAE ({SUPPORTED}), "
                        f"got {type(target).__name__}")
    try:
        return unet, engine_adapter(unet)
    except TypeError:
        raise TypeError(f"target {type(unet).__name__} is not a supported model: streamline() accepts {SUPPORTED}") from None


def _amount(nbytes: float, unit: float) -> str:
    """Bytes as the user typed them: whole bytes, or a number of ``unit`` (GiB for the node)."""
    return f"{int(nbytes)}" if unit == 1 else f"{nbytes / unit:g}"


def check_weights(budget_bytes: int | None, weights: int, name: str = "budget_bytes", unit: float = 1) -> None:
    """Refuse a budget that does not even hold the weights (``name`` and ``unit`` as the user typed it)."""
    if budget_bytes is not None and budget_bytes <= weights:
        raise ValueError(
            f"{name}={_amount(budget_bytes, unit)} does not even hold the weights ({_amount(weights, unit)}"
            f"{' bytes' if unit == 1 else ''}, {weights / GIB:.2f} GiB): the budget is total device memory, weights included"
        )


def _check_hooks(unet: nn.Module, slot: str, ours: "StreamlineHandle | None" = None) -> None:
    for name, module in unet.named_modules():
        registry = getattr(module, "_diffusers_hook", None)
        hooks = [h for h in getattr(registry, "hooks", {}) if h not in SUPPORTED_HOOKS]
        if hooks:
            raise ValueError(
                f"streamline() cannot run under diffusers hooks {hooks} (on {name or 'the U-Net'}): remove them first; "
                f"layerwise casting and model CPU offload are supported"
            )
    foreign = slot in unet.__dict__ and (ours is None or unet.__dict__[slot] != ours._forward)
    if foreign and "_hf_hook" not in unet.__dict__:
        raise ValueError(
            f"{type(unet).__name__}.{slot} is already replaced on this instance by another library; "
            f"streamline() would hide it. Remove that patch first"
        )


class Streamliner:
    """The forward the engine substitutes: plans per call shape and runs the model by groups.

    Calling it takes the arguments of the model's own ``adapter.slot`` method (``forward`` for
    diffusers, ``_forward`` for ComfyUI). It changes nothing on the model; :class:`StreamlineHandle`
    installs it on an instance, the ComfyUI node as an object patch on a clone, which every later
    clone shares: it holds configuration and plan caches only. Listeners, the plans a run used and
    stage requests live in the run's context (``context.py``).

    ``budget_bytes`` is a budget the user set: a call it cannot meet raises. Without one,
    ``device_budget_bytes`` (ComfyUI: the device's total memory; diffusers on CUDA: free memory
    plus the weights, read per call shape) is planned for, and where it cannot be met the plan goes
    to the least reachable peak with a warning. ``axes`` limits which groups may be sliced
    (``{"frames"}``: spatial only; ``{"pixels"}``: temporal).
    """

    def __init__(self, unet: nn.Module, adapter: Adapter, slices: int | Literal["auto"], budget_bytes: int | None,
                 axes: frozenset[str] = frozenset({"frames", "pixels"}), device_budget_bytes: int | None = None,
                 budget_name: str = "budget_bytes", budget_unit: float = 1):
        self.unet, self.adapter = unet, adapter
        self.slices, self.budget_bytes, self.axes = slices, budget_bytes, axes
        self.device_budget_bytes = device_budget_bytes
        self.budget_name, self.budget_unit = budget_name, budget_unit  # how the user typed the budget
        check_weights(budget_bytes, weights_bytes(unet), budget_name, budget_unit)
        self._plans: dict[tuple, Plan] = {}
        self._reserved: dict[tuple, int] = {}
        self._cut_list: list | None = None
        self._cuts_key: Any = None
        self._planners: dict[tuple, Planner] = {}
        self._signature = inspect.signature(getattr(type(unet), adapter.slot))


    # -- running ---------------------------------------------------------------------------
    def _arguments(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        bound = self._signature.bind(self.unet, *args, **kwargs)
        arguments = dict(bound.arguments)
        arguments.pop(next(iter(self._signature.parameters)))
        for name, parameter in self._signature.parameters.items():
            if parameter.kind is inspect.Parameter.VAR_KEYWORD and name in arguments:
                arguments.update(arguments.pop(name))
        return arguments

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The U-Net's forward, streamlined: planned, sliced, and with a run's controller (Step Rehash, its
        calibration) consulted at one point, before and after the call."""
        with run_context() as ctx:
            if ctx.request is not None and ctx.request.stop is not None:
                raise ValueError("StageRequest(stop=...) ends a forward at a cut and returns its state, which a host "
                                 "cannot take as the model's output: call the adapter's forward directly for that")
            controller = self._controller(ctx)
            if controller is None and self.passthrough:  # nothing to capture or reuse: the model's own forward
                return self._original_forward()(*args, **kwargs)
            arguments = self._arguments(args, kwargs)
            if controller is None:
                return self.adapter.forward(self.unet, Runner(self._decide(arguments, None, ctx), ctx.listeners,
                                                              ctx.request), **arguments)
            if ctx.request is not None:
                raise ValueError("a stage_request() block around a U-Net under Step Rehash (or its calibration): the two "
                                 "would both decide what the call captures; remove one")
            emit = lambda event: [listener(event) for listener in list(ctx.listeners)]  # noqa: E731
            call = ControllerCall(self._cuts(), emit, self.adapter.call_shape(arguments)[0], self.unet, arguments)
            request, token = controller.before(call)
            try:
                # a pass-through engine is not Streamline's slicing: its groups are not reported (a profiler
                # observes the host's blocks instead), only what Step Rehash did
                runner = Runner(self._decide(arguments, controller, ctx), [] if self.passthrough else ctx.listeners)
                runner.request = request
                if self.passthrough and request.start is None and not self._upsample_at(request.capture):
                    out = self._own_forward_capturing(args, kwargs, request)
                else:
                    out = self.adapter.forward(self.unet, runner, **arguments)
            except BaseException:
                controller.after(request, token, False)
                raise
            controller.after(request, token, True)
            return out

    _forward = __call__

    def _decide(self, arguments: dict[str, Any], controller: Controller | None, ctx: RunContext) -> Callable:
        """How each group of this call is sliced: the fixed slice count, or the plan for its shape (kept in
        the run's context)."""
        if self.slices != "auto" and self.budget_bytes is None:
            k, axes = self.slices, self.axes
            return lambda _name, axis, length: (min(k, length) if allowed(axis, axes) else 1, "keep")
        plan = self._plan(arguments, controller)
        ctx.plans.append(plan)
        return plan.decide

    passthrough = False  # full calls run the model's own forward (a handle Step Rehash installed on its own)

    def _own_forward_capturing(self, args: tuple, kwargs: dict, request: StageRequest) -> Any:
        """The model's own forward, bit for bit, capturing the requested cut features with forward hooks
        on the layers they follow (cuts that leave an upsampler pending run through the stage loop instead)."""
        cuts = {c.id: c for c in self._cuts()} | {c.after: c for c in self._cuts()}
        captured: dict[str, Any] = {}
        request.captures.append(captured)
        hooks = []

        def hook(cut, _module, _inputs, output):
            h = output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", output)
            if cut.id not in captured:
                captured[cut.id] = request.keep(cut.id, h, [], None)

        try:
            for name in request.capture:
                cut = cuts[name]
                hooks.append(self.unet.get_submodule(cut.after).register_forward_hook(
                    lambda m, i, o, _c=cut: hook(_c, m, i, o)))
            return self._original_forward()(*args, **kwargs)
        finally:
            for h in hooks:
                h.remove()

    def _original_forward(self) -> Any:
        """The host's own forward (the class's method in the engine's slot)."""
        return getattr(type(self.unet), self.adapter.slot).__get__(self.unet)

    def _upsample_at(self, names: frozenset[str]) -> bool:
        """Whether a cut among ``names`` ends an up unit whose upsampler the stage loop leaves pending."""
        cuts = self._cuts()
        for i, c in enumerate(cuts):
            if (c.id in names or c.after in names) and c.section == "up" and i + 1 < len(cuts) \
                    and cuts[i + 1].level < c.level:
                return True
        return False

    def _controller(self, ctx: RunContext) -> Controller | None:
        """What decides this call's stage request across steps: a host's run (``ctx.rehash``) or a
        diffusers-side Step Rehash or calibration attached to the U-Net (``rehash.py``)."""
        if ctx.rehash is not None:
            return ctx.rehash
        attached = self.unet.__dict__.get("_streamline_rehash")
        return attached.controller if attached is not None else None

    def _cuts(self) -> list:
        key = self.adapter.variant(self.unet)
        if self._cut_list is None or self._cuts_key != key:
            self._cut_list, self._cuts_key = self.adapter.unet.cuts(self.unet), key
        return self._cut_list

    def reserved_bytes(self, arguments: dict[str, Any], controller: Controller) -> int:
        """Device bytes a controller keeps across calls of this shape: Step Rehash's cached feature and
        the copy a reuse step starts from, measured on a meta replica by running the forward to the
        controller's cut (0 for a cut this U-Net lacks: the controller names it in its error)."""
        cut = controller.cut
        if cut is None or not any(cut in (c.id, c.after) for c in self._cuts()):
            return 0
        key = (_shape_key(arguments), self.adapter.variant(self.unet), cut)
        if key not in self._reserved:
            replica = meta_replica(self.unet)
            with suspend_tracking(), sdpa_on_meta(replica), torch.no_grad():
                state = self.adapter.forward(replica, Runner(request=StageRequest(stop=cut)),
                                             **fresh_containers(to_meta(arguments)))
            self._reserved[key] = 2 * state.h.numel() * state.h.element_size()
        return self._reserved[key]

    # -- planning --------------------------------------------------------------------------
    def memory_ratio(self, arguments: dict[str, Any]) -> float:
        """Predicted activation peak of a call with these arguments over the unstreamlined peak."""
        plan = self._plan(arguments)
        return plan.predicted_peak_bytes / self._planner(arguments).unsliced_peak()

    def unsliced_peak_bytes(self, *args: Any, **kwargs: Any) -> int:
        """The activation peak of a call with these arguments with every group whole (the model's own)."""
        return self._planner(self._arguments(args, kwargs)).unsliced_peak()

    def plan_for(self, *args: Any, **kwargs: Any) -> Plan:
        """The plan a call with these arguments runs (computed on a meta replica, then cached)."""
        return self._plan(self._arguments(args, kwargs))

    def least_total_bytes(self, arguments: dict[str, Any]) -> int:
        """Weights plus the least activation peak any plan reaches for a call with these arguments."""
        planner = self._planner(arguments)
        max_slices = None if self.slices == "auto" else self.slices
        return planner.least_peak(max_slices, axes=self.axes) + planner.weights_bytes

    def _plan(self, arguments: dict[str, Any], controller: Controller | None = None) -> Plan:
        sample = arguments[self.adapter.sample]
        reserved = self.reserved_bytes(arguments, controller) if controller is not None else 0
        key = (_shape_key(arguments), self.adapter.variant(self.unet), reserved)
        if key not in self._plans:
            budget = self._activation_budget(sample.device)
            if budget is not None and reserved:
                log.info("streamline: %.2f GiB of the budget kept for Step Rehash's cached feature", reserved / GIB)
                budget = max(0, budget - reserved)
            start = time.perf_counter()
            log.info("streamline: planning %s for input %s on a meta replica", type(self.unet).__name__,
                     tuple(sample.shape))
            try:
                with suspend_tracking():
                    plan = self._new_plan(arguments, budget)
            except ValueError as e:
                if not reserved or budget is None:
                    raise
                raise ValueError(f"{e} (the budget given to the plan is net of {reserved / GIB:.2f} GiB kept for "
                                 f"Step Rehash's cached feature)") from None
            plan = self._plans[key] = replace(plan, seconds=time.perf_counter() - start)
            runs = self._planner(arguments).runs
            log.info("streamline: planned in %.1f s (%s): %s, predicted activation peak %.2f GiB", plan.seconds,
                     f"{runs} meta run{'s' * (runs != 1)}" if runs else "measurements reused",
                     plan.describe(), plan.predicted_peak_bytes / GIB)
        return self._plans[key]

    def _new_plan(self, arguments: dict[str, Any], budget: int | None) -> Plan:
        planner = self._planner(arguments)
        max_slices = None if self.slices == "auto" else self.slices
        if budget is None:
            if self.slices == "auto":
                return planner.plan(int(self.adapter.target_x_floor * planner.skip_floor_bytes), axes=self.axes)
            return planner.plan(None, max_slices, axes=self.axes)
        plan = planner.plan(budget, max_slices, axes=self.axes)
        if not plan.fits:
            least = planner.least_peak(max_slices, axes=self.axes) + planner.weights_bytes
            total = budget + planner.weights_bytes
            found = (f"{_amount(least, self.budget_unit)}{' bytes' if self.budget_unit == 1 else ''} ({least / GIB:.2f} GiB = "
                     f"weights {planner.weights_bytes / GIB:.2f} GiB + activations {(least - planner.weights_bytes) / GIB:.2f} "
                     f"GiB at the most slicing)")
            if self.budget_bytes is not None:
                raise ValueError(f"{self.budget_name}={_amount(total, self.budget_unit)} is below the least reachable peak: "
                                 f"{found}, for input {tuple(arguments[self.adapter.sample].shape)}")
            message = (f"Streamline: the device's memory ({total / GIB:.2f} GiB) is short of the least reachable peak for "
                       f"input {tuple(arguments[self.adapter.sample].shape)}: {found}; planned for that peak, the host may "
                       f"offload weights")
            ctx = current()  # once per run, not once per call shape planned (ComfyUI's estimate plans too)
            if ctx is None or "device memory short" not in ctx.warned:
                if ctx is not None:
                    ctx.warned.add("device memory short")
                if self.budget_name == "budget_bytes":  # the Python API: a warning callers can filter
                    warnings.warn(message, stacklevel=4)
                else:  # inside ComfyUI: its log
                    log.warning(message)
        return plan

    def _planner(self, arguments: dict[str, Any]) -> Planner:
        """The planner of this call shape: this engine's, else one on the measurements any engine made for a
        model of the same structure and this shape (``PLANS``), else one that measures on a meta replica."""
        variant = self.adapter.variant(self.unet)
        key = (_shape_key(arguments), variant)
        if key not in self._planners:
            adapter = self.adapter
            # the model as it is now (a host may have hooked or patched it since an earlier shape was planned)
            shared = (structure_key(self.unet), adapter.slot, adapter.forward, adapter.floor, adapter.floor_name, key)
            measurements = PLANS.get(shared)
            meta_arguments = to_meta(arguments)  # made outside the measured runs: inputs never count
            if measurements is None:
                weights = weights_bytes(self.unet)
                batch, frames, h, w = adapter.call_shape(arguments)
                if adapter.floor is not None:
                    floor = adapter.floor(self.unet, arguments)
                else:
                    floor = skip_floor_bytes(self.unet, batch * frames, h, w, arguments[adapter.sample].dtype)
            else:
                weights, floor = measurements.weights_bytes, measurements.skip_floor_bytes

            replica: list[nn.Module] = []  # made at the planner's first run: none where every run is known

            def session() -> Any:  # around the runs of one planner call: never a host's attention on meta
                if not replica:
                    replica.append(meta_replica(self.unet))
                return sdpa_on_meta(replica[0])

            def run(runner: Runner) -> Any:  # inside the session
                return adapter.forward(replica[0], runner, **fresh_containers(meta_arguments))

            planner = Planner(run, weights, floor, adapter.floor_name, measurements=measurements, session=session)
            PLANS.put(shared, planner.measurements)
            self._planners[key] = planner
        return self._planners[key]

    def _activation_budget(self, device: torch.device) -> int | None:
        weights = weights_bytes(self.unet)
        if self.budget_bytes is not None:
            return self.budget_bytes - weights
        if self.device_budget_bytes is not None:
            return max(0, self.device_budget_bytes - weights)
        if device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(device)
            return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return None


class StreamlineHandle(Streamliner):
    """A streamlined U-Net: plans per call shape, runs by groups, and ``remove()`` undoes it all."""

    def __init__(self, unet: nn.Module, adapter: Adapter, slices: int | Literal["auto"], budget_bytes: int | None,
                 passthrough: bool = False, **options: Any):
        super().__init__(unet, adapter, slices, budget_bytes, **options)
        self.last_plan: Plan | None = None  # the plan of the last planned call through this handle
        self._slot = "_old_forward" if "_hf_hook" in unet.__dict__ else adapter.slot
        self._previous = unet.__dict__.get(self._slot)
        self._removed = False
        self.passthrough = passthrough
        setattr(unet, self._slot, self._forward)
        unet._streamline_handle = self

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        with run_context() as ctx:
            planned = len(ctx.plans)
            try:
                return super()._forward(*args, **kwargs)
            finally:
                if len(ctx.plans) > planned:
                    self.last_plan = ctx.plans[-1]

    def _original_forward(self) -> Any:
        return self._previous if self._previous is not None else super()._original_forward()

    def remove(self) -> None:
        """Restore the U-Net exactly as it was; calling it again does nothing. Under Step Rehash
        (``rehash(...)``), the U-Net keeps running by stages, unsliced, until that is removed too."""
        self._remove(keep_rehash=True)

    def _remove(self, keep_rehash: bool) -> None:
        if self._removed:
            return
        if self._previous is None:
            self.unet.__dict__.pop(self._slot, None)
        else:
            setattr(self.unet, self._slot, self._previous)
        if self.unet.__dict__.get("_streamline_handle") is self:
            del self.unet._streamline_handle
        self._removed = True
        attached = self.unet.__dict__.get("_streamline_rehash")
        if keep_rehash and attached is not None:
            attached.reinstall()

    def __enter__(self) -> "StreamlineHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def streamline(target: Any, slices: int | Literal["auto"] = "auto", budget_bytes: int | None = None) -> StreamlineHandle:
    """Run ``target``'s U-Net by sliced layer groups, exactly; returns a handle with ``remove()``.

    ``slices="auto"`` picks per group the least slicing whose predicted peak fits ``budget_bytes``
    (total device memory, weights included; default on CUDA: free memory plus what the weights
    occupy; on CPU and meta: the least slicing that reaches 1.5x the skip floor). An integer is an
    upper bound, clamped per group to its axis. Applying again replaces the previous settings.
    """
    slices = _check_slices(slices)
    budget_bytes = _check_budget(budget_bytes)
    unet, adapter = resolve_unet(target)
    check_weights(budget_bytes, weights_bytes(unet))
    previous = unet.__dict__.get("_streamline_handle")
    _check_hooks(unet, adapter.slot, previous)
    if previous is not None:
        previous._remove(keep_rehash=False)
    return StreamlineHandle(unet, adapter, slices, budget_bytes)


def _shape_key(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return ("T", tuple(value.shape), value.dtype, value.device)
    if isinstance(value, dict):
        return tuple((k, _shape_key(v)) for k, v in value.items())
    if isinstance(value, (tuple, list)):
        return tuple(_shape_key(v) for v in value)
    return value if isinstance(value, (int, float, str, bool, type(None))) else type(value).__name__
