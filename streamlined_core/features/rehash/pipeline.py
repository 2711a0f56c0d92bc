"""Step Rehash and its calibration on a diffusers pipeline: ``rehash(...)`` and ``calibrate(...)``,
driven by the scheduler's clock (its ``set_timesteps`` starts a run, each ``step`` ends a step)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from torch import nn

from ...engine.context import ControllerCall
from ...engine.stages import StageRequest
from .keysteps import DEFAULT_CALIBRATION_CAP, DEFAULT_POSITIONS, LAST_UP_BLOCK, FeatureSampler, fingerprint
from .schedule import Calibration, RehashConfig
from .state import RehashDriver, RehashState


def patch_scheduler(scheduler: Any, **methods: Callable) -> Callable[[], None]:
    """Replace methods on a scheduler instance; returns what puts back exactly what was there (a method
    replaced again since by someone else is left to them)."""
    saved = {name: scheduler.__dict__.get(name) for name in methods}
    for name, fn in methods.items():
        setattr(scheduler, name, fn)

    def restore() -> None:
        for name, previous in saved.items():
            if scheduler.__dict__.get(name) is not methods[name]:
                continue
            if previous is None:
                del scheduler.__dict__[name]
            else:
                setattr(scheduler, name, previous)
    return restore


class _Clock:
    """The step index of a diffusers run, from its scheduler: ``set_timesteps`` starts a run, each
    ``step`` call ends a step. U-Net calls between two ``step`` calls belong to one step; within a
    step, the n-th call is branch n (a pipeline that calls the U-Net once per guidance branch)."""

    def __init__(self, scheduler: Any, owner: "_Attached") -> None:
        self.step = 0
        self.steps: int | None = None
        self.calls_this_step = 0
        original_set, original_step = scheduler.set_timesteps, scheduler.step

        def set_timesteps(*args: Any, **kwargs: Any) -> Any:
            out = original_set(*args, **kwargs)
            if owner.removed:  # still in a chain another library built on top: pass through
                return out
            self.step, self.calls_this_step = 0, 0
            self.steps = len(scheduler.timesteps)
            owner.start_run(self.steps)
            return out

        def step(*args: Any, **kwargs: Any) -> Any:
            try:
                out = original_step(*args, **kwargs)
            except BaseException:
                owner.end_run(ok=False)
                raise
            if owner.removed:
                return out
            self.step += 1
            self.calls_this_step = 0
            if self.steps is not None and self.step >= self.steps:
                owner.end_run(ok=True)
            return out

        self.remove = patch_scheduler(scheduler, set_timesteps=set_timesteps, step=step)


def describe_scheduler(scheduler: Any) -> tuple[str, str]:
    """(sampler, scheduler) names a schedule records for a diffusers scheduler."""
    config = getattr(scheduler, "config", {})
    get = config.get if hasattr(config, "get") else (lambda k, d=None: getattr(config, k, d))
    if get("use_karras_sigmas", False):
        spacing = "karras"
    elif get("use_exponential_sigmas", False):
        spacing = "exponential"
    else:
        spacing = str(get("timestep_spacing", "default"))
    return type(scheduler).__name__, spacing


class _Attached:
    """A controller attached to a diffusers U-Net (``unet._streamline_rehash``) and driven by a scheduler's clock.

    The streamlined forward (``api.Streamliner``) asks ``controller.before(call)`` for the call's
    :class:`~streamlined_core.engine.stages.StageRequest` and a token, runs, then calls
    ``controller.after(request, token, ok)``; ``controller.cut`` names the cut whose state the
    controller keeps across calls (its bytes come off the memory budget), or None (the protocol:
    :class:`~streamlined_core.engine.context.Controller`). A U-Net without a
    ``streamline()`` handle gets a pass-through one, removed with the controller: its full calls run
    the model's own forward (capturing with forward hooks), so they equal plain sampling bit for bit;
    only reuse steps run the stage loop, unsliced."""

    def __init__(self, unet: nn.Module, scheduler: Any, controller: Any) -> None:
        self.unet, self.controller = unet, controller
        self.make_run: Callable[[int], Any] = controller.make_run
        self.run: Any = None
        self.last_run: Any = None
        self.removed = False
        previous = unet.__dict__.get("_streamline_rehash")
        if previous is not None:  # applying again replaces the previous controller, its clock first
            previous.remove()
        self._owned = None
        self._own_handle()
        unet._streamline_rehash = self
        self.clock = _Clock(scheduler, self)  # last: nothing below can fail once the scheduler is patched

    def _own_handle(self) -> None:
        """Without a streamline() handle, install a pass-through one (see the class docstring)."""
        from ...engine.api import StreamlineHandle, resolve_unet

        if self.unet.__dict__.get("_streamline_handle") is None:
            _, adapter = resolve_unet(self.unet)
            self._owned = StreamlineHandle(self.unet, adapter, slices=1, budget_bytes=None, passthrough=True)

    # the clock's side
    def start_run(self, steps: int) -> None:
        """A run starts (the previous one, if it never reached its last step, ends here)."""
        if self.run is not None:
            self.end_run(ok=False)
        self.run = self.make_run(steps)

    def end_run(self, ok: bool) -> None:
        if self.run is None:
            return
        run, self.run = self.run, None
        run.finish(ok)
        self.last_run = run

    # the streamlined call's side
    def call(self) -> tuple[Any, int, int]:
        """The run, step and branch of a U-Net call about to run."""
        if self.run is None:
            raise RuntimeError("a U-Net call outside a run: the scheduler's set_timesteps() starts one")
        branch = self.clock.calls_this_step
        self.clock.calls_this_step += 1
        return self.run, self.clock.step, branch

    def reinstall(self) -> None:
        """A streamline() handle was removed under us: keep Step Rehash running on a pass-through one."""
        if not self.removed:
            self._own_handle()

    def remove(self) -> None:
        if self.removed:
            return
        self.removed = True
        if self.run is not None:
            self.run.reset()
            self.run = None
        self.clock.remove()
        if self.unet.__dict__.get("_streamline_rehash") is self:
            del self.unet._streamline_rehash
        if self._owned is not None and self.unet.__dict__.get("_streamline_handle") is self._owned:
            self._owned.remove()


class RehashHandle:
    """Step Rehash applied to a pipeline's U-Net: ``last_run`` reports the last run; ``remove()`` undoes it."""

    def __init__(self, unet: nn.Module, scheduler: Any, config: RehashConfig) -> None:
        self.unet, self.config = unet, config
        self.model_fingerprint = fingerprint(unet) if config.schedule is not None else None
        self.scheduler = scheduler
        self._attached = _Attached(unet, scheduler, self)

    def _made_for(self) -> dict[str, Any]:
        made_for: dict[str, Any] = {}
        if self.model_fingerprint is not None:
            made_for["model"] = self.model_fingerprint
        made_for["denoise"] = self.config.denoise
        if self.scheduler is not None:
            made_for["sampler"], made_for["scheduler"] = describe_scheduler(self.scheduler)
        return made_for

    def make_run(self, steps: int) -> RehashDriver:
        return RehashDriver(self.config, steps, self._made_for())

    @property
    def last_run(self) -> RehashState | None:
        """The state of the last finished (or failed) run: what each step did; its cache is freed."""
        last = self._attached.last_run
        return last.state if last is not None else None

    # the streamlined call's side (api.Streamliner)
    def before(self, call: ControllerCall) -> tuple[StageRequest, Any]:
        """The stage request of the U-Net call about to run, and a token for :meth:`after`."""
        driver, step, branch = self._attached.call()
        return driver.request(call.cuts, call.emit, step, (branch,)), (driver, branch)

    def after(self, request: StageRequest, token: Any, ok: bool) -> None:
        """Keep what a key call captured; a call that raised ends the run and frees the cache."""
        driver, branch = token
        if ok:
            driver.state.store((branch,), request)
        else:
            self._attached.end_run(ok=False)

    @property
    def cut(self) -> str:
        return self.config.cut_id

    def remove(self) -> None:
        """Restore the pipeline's U-Net and scheduler exactly; calling it again does nothing."""
        self._attached.remove()

    def __enter__(self) -> "RehashHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def _unet_and_scheduler(target: Any, scheduler: Any) -> tuple[nn.Module, Any]:
    unet = target if isinstance(target, nn.Module) else getattr(target, "unet", None)
    if not isinstance(unet, nn.Module):
        raise TypeError(f"target must be a pipeline with .unet and .scheduler, or a U-Net with scheduler=; got "
                        f"{type(target).__name__}")
    if scheduler is None and not isinstance(target, nn.Module):
        scheduler = getattr(target, "scheduler", None)
    if scheduler is None or not callable(getattr(scheduler, "step", None)) \
            or not callable(getattr(scheduler, "set_timesteps", None)):
        raise TypeError("rehash() counts steps with the pipeline's scheduler: pass a pipeline with .scheduler, or "
                        "scheduler= (an object with set_timesteps() and step(), like diffusers' schedulers)")
    return unet, scheduler


def rehash(target: Any, config: RehashConfig, scheduler: Any = None) -> RehashHandle:
    """Apply Step Rehash to a diffusers pipeline's U-Net (or a U-Net, with the ``scheduler`` that drives
    it). Composes with :func:`~streamlined_core.streamline` in either order; returns a handle with
    ``remove()`` and ``last_run``."""
    if not isinstance(config, RehashConfig):
        raise TypeError(f"config must be a RehashConfig, got {type(config).__name__}")
    unet, scheduler = _unet_and_scheduler(target, scheduler)
    from ...engine.api import resolve_unet

    resolve_unet(unet)  # a supported U-Net, or the API's error
    return RehashHandle(unet, scheduler, config)


class _CalibrationDriver:
    """A calibration run keeps nothing across calls (its features go to the sampler as they come)."""

    def finish(self, ok: bool) -> None:
        pass

    def reset(self) -> None:
        pass


class CalibrationHandle:
    """Collects features during full-compute runs (see :func:`calibrate`)."""

    def __init__(self, unet: nn.Module, scheduler: Any, cuts: Sequence[str], positions: int, seed: int,
                 cap_bytes: int) -> None:
        self.unet, self.scheduler = unet, scheduler
        self.sampler = FeatureSampler(cuts, positions, seed, cap_bytes)
        self.steps: int | None = None
        self.runs = 0
        self._attached = _Attached(unet, scheduler, self)
        self.cut = None

    def make_run(self, steps: int) -> _CalibrationDriver:
        if self.steps is not None and steps != self.steps:
            raise ValueError(f"calibration: every run must take the same number of steps ({self.steps}), got {steps}")
        self.steps = steps
        self.runs += 1
        return _CalibrationDriver()

    def before(self, call: ControllerCall) -> tuple[StageRequest, Any]:
        _driver, _step, branch = self._attached.call()
        known = {c.id for c in call.cuts}
        unknown = [c for c in self.sampler.cuts if c not in known]
        if unknown:
            raise ValueError(f"cuts: {unknown[0]!r} is not a cut point of this U-Net; its cut points: {', '.join(known)}")
        self.sampler.branch = (self.runs, branch)
        self.sampler.rows[self.sampler.branch] = call.rows
        return StageRequest(capture=frozenset(self.sampler.cuts), reduce=self.sampler.reduce), None

    def after(self, request: StageRequest, token: Any, ok: bool) -> None:
        if not ok:
            self._attached.end_run(ok=False)

    def remove(self) -> None:
        self._attached.remove()


def calibrate(target: Any, run: Callable[[], Any], cuts: Sequence[str] = LAST_UP_BLOCK, runs: int = 1,
              positions: int = DEFAULT_POSITIONS, seed: int = 0, cap_bytes: int = DEFAULT_CALIBRATION_CAP,
              scheduler: Any = None, denoise: float = 1.0,
              progress: Callable[[str], None] | None = None) -> Calibration:
    """Run ``run()`` (a full-compute sampling run of the pipeline, e.g. a seed of the calibration set)
    ``runs`` times and measure, at each of ``cuts``, the cosine similarity of every step's feature to
    every other's (``positions`` fixed random positions per sample and guidance branch, kept on the
    CPU in fp32, at most ``cap_bytes``). The U-Net and scheduler are restored afterwards, even on error.
    ``run`` may take the run's index (0 to ``runs - 1``) to vary the seed."""
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
        raise ValueError(f"runs={runs!r}: expected a whole number of calibration runs, at least 1")
    unet, scheduler = _unet_and_scheduler(target, scheduler)
    from ...engine.api import resolve_unet

    resolve_unet(unet)  # a supported U-Net, or the API's error, before anything is patched
    takes_index = _takes_index(run)
    handle = CalibrationHandle(unet, scheduler, cuts, positions, seed, cap_bytes)
    try:
        for i in range(runs):
            if progress:
                progress(f"calibration run {i + 1}/{runs}")
            run(i) if takes_index else run()
        if handle.steps is None:
            raise RuntimeError("calibration: run() never called the pipeline's scheduler.set_timesteps(); nothing measured")
        maps = handle.sampler.maps()
        sampler, spacing = describe_scheduler(scheduler)
        made_for = {"model": fingerprint(unet), "steps": handle.steps, "sampler": sampler, "scheduler": spacing,
                    "denoise": denoise}
        return Calibration(maps, handle.steps, made_for, runs, positions)
    finally:
        handle.remove()


def _takes_index(fn: Callable) -> bool:
    import inspect

    try:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    except (TypeError, ValueError):
        return False
    return len(params) >= 1
