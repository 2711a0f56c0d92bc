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
import time
import warnings
from dataclasses import replace
from typing import Any, Callable, Literal

import torch
from torch import nn

from .arch import Adapter, skip_floor_bytes
from .arch.comfy_attention import sdpa_on_meta
from .checks import amount, check_budget, check_hooks, check_slices, check_weights, resolve_unet
from .context import Controller, ControllerCall, RunContext, current, run_context
from .memory import GIB, size_text, suspend_tracking, weights_bytes
from .plan import Plan, Planner, allowed, fresh_containers, meta_replica, to_meta
from .plan_store import PLANS, shape_key, structure_key
from .recovery import streamlined_call
from .slicing import Runner
from .stages import StageRequest

log = logging.getLogger(__name__)


class Streamliner:
    """The forward the engine substitutes: plans per call shape and runs the model by groups.

    Calling it takes the arguments of the model's own ``adapter.slot`` method (``forward`` for
    diffusers, ``_forward`` for ComfyUI). It changes nothing on the model; :class:`StreamlineHandle`
    installs it on an instance, the ComfyUI node as an object patch on a clone, which every later
    clone shares: it holds configuration and plan caches only. Listeners, the plans a run used and
    stage requests live in the run's context (``context.py``).

    ``budget_bytes`` is a budget the user set: a call it cannot meet raises. Without one,
    ``device_budget_bytes`` is planned for: a device's total memory (weights included), or a
    function read at each call that returns the activation budget and where it came from
    (ComfyUI: the free memory the host leaves less its reserve), planned in steps of
    ``BUDGET_STEPS`` so a few bytes more or less reuse the plan; diffusers on CUDA: free memory plus
    the weights, read per call shape. Where it cannot be met the plan goes to the least reachable
    peak (a function's budget: exactly the least-memory plan) with a warning. ``axes`` limits which groups may be sliced
    (``{"frames"}``: spatial only; ``{"pixels"}``: temporal).
    """

    def __init__(self, unet: nn.Module, adapter: Adapter, slices: int | Literal["auto"], budget_bytes: int | None,
                 axes: frozenset[str] = frozenset({"frames", "pixels", "tokens"}),
                 device_budget_bytes: int | Callable[[], tuple[int, str] | None] | None = None,
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
                return streamlined_call(self, arguments, self._decide(arguments, None, ctx), ctx.listeners, ctx.request)
            if ctx.request is not None:
                raise ValueError("a stage_request() block around a U-Net under Step Rehash (or its calibration): the two "
                                 "would both decide what the call captures; remove one")
            emit = lambda event: [listener(event) for listener in list(ctx.listeners)]  # noqa: E731
            call = ControllerCall(self._cuts(), emit, self.adapter.call_shape(arguments)[0], self.unet, arguments)
            request, token = controller.before(call)
            try:
                # a pass-through engine is not Streamline's slicing: its groups are not reported (a profiler
                # observes the host's blocks instead), only what Step Rehash did
                decide = self._decide(arguments, controller, ctx)
                if self.passthrough and request.start is None and not self._upsample_at(request.capture):
                    out = self._own_forward_capturing(args, kwargs, request)
                else:
                    out = streamlined_call(self, arguments, decide, [] if self.passthrough else ctx.listeners, request)
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
        key = (self._key(arguments), self.adapter.variant(self.unet), cut)
        if key not in self._reserved:
            replica = meta_replica(self.unet)
            with suspend_tracking(), sdpa_on_meta(replica), torch.no_grad():
                state = self.adapter.forward(replica, Runner(request=StageRequest(stop=cut)),
                                             **fresh_containers(to_meta(arguments)))
            self._reserved[key] = 2 * state.h.numel() * state.h.element_size()
        return self._reserved[key]

    def reserved_for(self, controller: Any, *args: Any, **kwargs: Any) -> int:
        """:meth:`reserved_bytes` of a call with these arguments under ``controller`` (anything with a ``cut``)."""
        return self.reserved_bytes(self._arguments(args, kwargs), controller)

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

    def planner_for(self, *args: Any, **kwargs: Any) -> Planner:
        """The planner of a call with these arguments (measured once per call shape): plans for any
        activation budget, the least reachable peak, the unsliced peak, the floor."""
        return self._planner(self._arguments(args, kwargs))

    def least_total_bytes(self, arguments: dict[str, Any]) -> int:
        """Weights plus the least activation peak any plan reaches for a call with these arguments."""
        planner = self._planner(arguments)
        max_slices = None if self.slices == "auto" else self.slices
        return planner.least_peak(max_slices, axes=self.axes) + planner.weights_bytes

    def bind(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The arguments of a call, by name, as planning takes them."""
        return self._arguments(args, kwargs)

    def plan_within(self, arguments: dict[str, Any], activation_budget: int, source: str = "a host's estimate") -> Plan:
        """The plan a budget read from a host gets: for ``activation_budget`` in its step, or the least-memory
        plan where that is short (``source`` says where the budget came from, for the log)."""
        planner = self._planner(arguments)
        least = planner.least_peak(None if self.slices == "auto" else self.slices, axes=self.axes)
        return self._budget_plan(arguments, max(least, _stepped(activation_budget)), source)

    def planned_peak(self, arguments: dict[str, Any], activation_budget: int, source: str = "a host's estimate") -> int:
        """:meth:`plan_within`'s predicted activation peak: what a host is told a call will need before it
        decides what to load."""
        return self.plan_within(arguments, activation_budget, source).predicted_peak_bytes

    @torch.compiler.disable  # under torch.compile: planned eagerly (meta replicas, hooks), the groups traced
    def _plan(self, arguments: dict[str, Any], controller: Controller | None = None) -> Plan:
        sample = arguments[self.adapter.sample]
        reserved = self.reserved_bytes(arguments, controller) if controller is not None else 0
        if callable(self.device_budget_bytes) and self.budget_bytes is None:
            read = self.device_budget_bytes()
            if read is not None:
                budget, source = read
                if reserved:
                    source += f", less {reserved / GIB:.2f} GiB kept for Step Rehash's cached feature"
                planner = self._planner(arguments)
                least = planner.least_peak(None if self.slices == "auto" else self.slices, axes=self.axes)
                if _stepped(budget - reserved) < least:
                    self._warn_short(arguments, budget - reserved, least + planner.weights_bytes, source)
                return self.plan_within(arguments, budget - reserved, source)
        # the device stays in this key: the budget read where none is given depends on it
        key = (self._key(arguments), _budget_device(sample), self.adapter.variant(self.unet), reserved)
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

    def _budget_plan(self, arguments: dict[str, Any], activation_budget: int, source: str) -> Plan:
        """The plan for an activation budget read from the host (stepped, at least the least-memory plan's).
        The log says once per run, for each budget and where it came from, what was planned (a plan made for
        the host's estimate before loading serves the calls whose budget falls in the same step)."""
        key = (self._key(arguments), self.adapter.variant(self.unet), "budget", activation_budget)
        start = time.perf_counter()
        made = key not in self._plans
        if made:
            with suspend_tracking():
                planner = self._planner(arguments)
                self._plans[key] = planner.plan(activation_budget, None if self.slices == "auto" else self.slices,
                                                axes=self.axes)
        ctx = current()
        said = ("budget plan", key, source)
        if made or (ctx is not None and said not in ctx.said):
            if ctx is not None:
                ctx.said.add(said)
            plan = self._plans[key]
            log.info("streamline: planned %s for input %s for %s of activations (%s) %s: %s, predicted activation peak "
                     "%s", type(self.unet).__name__, tuple(arguments[self.adapter.sample].shape),
                     size_text(activation_budget), source,
                     f"in {time.perf_counter() - start:.1f} s" if made else "before, in this step",
                     plan.describe(), size_text(plan.predicted_peak_bytes))
        return self._plans[key]

    def _warn_short(self, arguments: dict[str, Any], budget: int, least_total: int, source: str) -> None:
        self._warn_once(f"Streamline: {source}: {size_text(max(0, budget))} for activations, short of the least-memory "
                        f"plan for input {tuple(arguments[self.adapter.sample].shape)} ({size_text(least_total)} with "
                        f"the weights); planned for that plan")

    def _warn_once(self, message: str) -> None:
        """Say the device memory is short once per run, not once per call shape planned (ComfyUI's estimate plans
        too): a warning callers can filter from the Python API, ComfyUI's log inside ComfyUI."""
        ctx = current()
        if ctx is not None and "device memory short" in ctx.warned:
            return
        if ctx is not None:
            ctx.warned.add("device memory short")
        if self.budget_name == "budget_bytes":
            warnings.warn(message, stacklevel=5)
        else:
            log.warning(message)

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
            found = (f"{amount(least, self.budget_unit)}{' bytes' if self.budget_unit == 1 else ''} ({least / GIB:.2f} GiB = "
                     f"weights {planner.weights_bytes / GIB:.2f} GiB + activations {(least - planner.weights_bytes) / GIB:.2f} "
                     f"GiB at the most slicing)")
            if self.budget_bytes is not None:
                raise ValueError(f"{self.budget_name}={amount(total, self.budget_unit)} is below the least reachable peak: "
                                 f"{found}, for input {tuple(arguments[self.adapter.sample].shape)}")
            message = (f"Streamline: the device's memory ({total / GIB:.2f} GiB) is short of the least reachable peak for "
                       f"input {tuple(arguments[self.adapter.sample].shape)}: {found}; planned for that peak, the host may "
                       f"offload weights")
            self._warn_once(message)
        return plan

    def _key(self, arguments: dict[str, Any]) -> Any:
        """What a plan of a call with these arguments depends on: shapes and dtypes (not devices: plans are
        measured on ``meta``) of the arguments the adapter says matter, and every plain value among them."""
        return shape_key(self.adapter.planning_arguments(arguments))

    def _planner(self, arguments: dict[str, Any]) -> Planner:
        """The planner of this call shape: this engine's, else one on the measurements any engine made for a
        model of the same structure and this shape (``PLANS``), else one that measures on a meta replica."""
        variant = self.adapter.variant(self.unet)
        key = (self._key(arguments), variant)
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

            planner = Planner(run, weights, floor, adapter.floor_name, measurements=measurements, session=session,
                              replay=adapter.replayable(arguments))
            PLANS.put(shared, planner.measurements)
            self._planners[key] = planner
        return self._planners[key]

    def _activation_budget(self, device: torch.device) -> int | None:
        weights = weights_bytes(self.unet)
        if self.budget_bytes is not None:
            return self.budget_bytes - weights
        if isinstance(self.device_budget_bytes, int):
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
    slices = check_slices(slices)
    budget_bytes = check_budget(budget_bytes)
    unet, adapter = resolve_unet(target)
    check_weights(budget_bytes, weights_bytes(unet))
    previous = unet.__dict__.get("_streamline_handle")
    check_hooks(unet, adapter.slot, previous)
    if previous is not None:
        previous._remove(keep_rehash=False)
    return StreamlineHandle(unet, adapter, slices, budget_bytes)


BUDGET_STEPS = 32  # a budget read from the host is planned for in steps of 1/32 of its power of two (2-3%)


def _stepped(budget: int) -> int:
    """``budget`` rounded down to its step, so a few bytes more or less free plan alike."""
    budget = max(0, int(budget))
    step = max(1, (1 << max(0, budget.bit_length() - 1)) // BUDGET_STEPS)
    return budget // step * step


def _budget_device(sample: torch.Tensor) -> str | None:
    """The device whose free memory a plan without a given budget reads (None: no budget is read)."""
    return sample.device.type if sample.device.type == "cuda" else None

