"""Step Rehash inside ComfyUI's sampling: one run's state, clock and controller (:class:`ComfyRehash`), the
keyed OUTER_SAMPLE wrapper a MODEL clone carries (:class:`RehashOuter`), as ComfyUI's EasyCache does, and
the calibration folder ``models/streamline_rehash``.

- OUTER_SAMPLE creates the run's state in the run's context, wraps the sampler's callback so that each
  callback ends a step (key steps count sampler steps, not model calls), and in ``finally`` frees the
  cache, logs which steps were key and shows it on the node, also after an error or an interrupt;
- inside each U-Net call the streamlined forward asks the run (one point: ``before`` and ``after``),
  which reads the call's step and branches from its ``transformer_options`` (the guidance branches by
  their cond uuid, AnimateDiff-Evolved's context window by its frame indices).

The U-Net runs through Streamline's engine: Streamline Model's, when the MODEL came through it, or a
pass-through one whose full calls are the host's own forward (bit for bit) and whose reuse calls run the
tail by stages, unsliced. ComfyUI's modules are imported inside the functions that need them.
"""


from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ...engine.api import Streamliner
from ...engine.arch import comfy_unet, engine_adapter
from ...engine.context import ControllerCall, run_context
from ...engine.stages import CutPoint, StageRequest
from .keysteps import DEFAULT_CUT, LAST_UP_BLOCK, default_count, fingerprint, interval_key_steps
from .schedule import RehashConfig, Schedule, nearest_cut
from .state import HostCalibration, RehashDriver

KEY = "streamline.rehash"
FOLDER = "streamline_rehash"
AUTO = "auto (find or make one)"
SCHEDULES = ("target key steps", "gamma", "uniform interval")
HEUN_LIKE = ("heun", "heunpp2")  # evaluate at the next step's sigma to correct a step (learnt for others)
CUTS = tuple(c for c in LAST_UP_BLOCK if c not in LAST_UP_BLOCK[-2:])  # the cuts whose tail takes fresh input
# The cut widget's default: DEFAULT_CUT, or on a U-Net where its tail takes no fresh input (one ResBlock per level,
# where it is the last layer) the nearest cut whose tail does; the report names the cut taken.
AUTO_CUT = "auto"
CUT_CHOICES = (AUTO_CUT, *CUTS)
log = logging.getLogger(__name__)


# -- the calibration folder -----------------------------------------------------------------------------
def calibration_folder() -> Path:
    """``models/streamline_rehash``, registered with ComfyUI's ``folder_paths`` (once)."""
    import folder_paths

    if FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[FOLDER] = ([str(Path(folder_paths.models_dir) / FOLDER)], {".json"})
    return Path(folder_paths.folder_names_and_paths[FOLDER][0][0])


def calibration_files() -> list[str]:
    import folder_paths

    calibration_folder()
    return sorted(folder_paths.get_filename_list(FOLDER))


def _calibration_path(name: str) -> Path:
    """The listed calibration called ``name`` (never a path the user typed: only names in the list)."""
    import folder_paths

    if name not in calibration_files():
        raise ValueError(f"calibration={name!r}: not in {calibration_folder()}; choose one of the list, or "
                         f"{AUTO!r} (refresh the node definitions after adding a file)")
    return Path(folder_paths.get_full_path(FOLDER, name))


# -- the options ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RehashOptions:
    """What the node's widgets ask for, checked."""

    schedule: str = "target key steps"
    key_steps: int = 0  # 0: the paper's share, 13 of 25 steps, scaled
    gamma: float = 0.95
    interval: int = 2
    cut: str = AUTO_CUT
    calibration: str = AUTO
    start_percent: float = 0.0
    end_percent: float = 1.0
    max_consecutive_reuses: int = 0  # 0: no limit
    override_calibration: bool = False
    sampler: str | None = None  # what a calibration records; None: read from the run
    scheduler: str | None = None
    denoise: float | None = None

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}; got {self.schedule!r}")
        if self.cut not in CUT_CHOICES:
            raise ValueError(f"cut must be {AUTO_CUT} or one of {', '.join(CUTS)} (the last up block's cuts whose tail "
                             f"takes fresh input); got {self.cut!r}")
        _whole("key_steps", self.key_steps, 0, "0 (13 of 25 steps, scaled) or a number of steps")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma must be a similarity from 0 to 1; got {self.gamma}")
        _whole("interval", self.interval, 1, "a whole number of steps, at least 1")
        if not 0.0 <= self.start_percent <= self.end_percent <= 1.0:
            raise ValueError(f"start_percent and end_percent must satisfy 0 <= start_percent <= end_percent <= 1; got "
                             f"{self.start_percent} and {self.end_percent}")
        _whole("max_consecutive_reuses", self.max_consecutive_reuses, 0, "0 (no limit) or a number of steps")
        if self.schedule != "uniform interval" and self.calibration != AUTO:
            _calibration_path(self.calibration)

    @property
    def needs_calibration(self) -> bool:
        return self.schedule != "uniform interval"


def _whole(name: str, value: Any, least: int, accepted: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be {accepted}; got {value!r}")


# -- one run -------------------------------------------------------------------------------------------
@dataclass
class ComfyRehash:
    """One sampling run under Step Rehash, and the controller the streamlined forward consults for it
    (``RunContext.rehash``): its steps and the sampler's callback clock; on the first U-Net call, what
    the run does (a :class:`RehashDriver` on its key steps, or a :class:`HostCalibration` when no
    calibration fits); each call's step and branches read from its ``transformer_options``, as
    ComfyUI's EasyCache reads them."""

    options: RehashOptions
    sigmas: list[float]
    sampler: str
    model_sampling: Any
    node_id: str | None
    step: int = 0  # callbacks seen
    by_sigmas: bool = False  # the sampler skipped callbacks: steps come from matching sigmas
    heun_like: bool = False  # the sampler evaluates at the next step's sigma before that step starts
    learn: bool = True  # off where guidance calls the model again at a step's sigma (PAG, SAG)
    _at_next: dict = field(default_factory=dict)  # branch -> its calls at the next step's sigma since the callback
    controller: RehashDriver | HostCalibration | None = None
    cut_id: str | None = None  # the cut this run caches at (``options.cut``, or where auto took it)
    lines: list[str] = field(default_factory=list)
    _made_for: dict[str, Any] | None = None

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def mode(self) -> str:
        """"rehash", "calibrate", or "" before the first U-Net call."""
        return {RehashDriver: "rehash", HostCalibration: "calibrate"}.get(type(self.controller), "")

    # the controller's side, for the streamlined forward
    @property
    def cut(self) -> str | None:
        return getattr(self.controller, "cut", None)

    def before(self, call: ControllerCall) -> tuple[StageRequest, Any]:
        """The stage request of the U-Net call about to run, from its step and branches (read from the
        call's ``transformer_options``), and its branches as the token for :meth:`after`."""
        options = call.arguments.get("transformer_options") or {}
        if self.controller is None:
            self.start(call.unet, call.cuts)
        branches = self.branches_of(options)
        step = self.step_of(_sigma(options), branches)
        if isinstance(self.controller, HostCalibration):
            return self.controller.request(call.cuts, call.rows, step, branches), branches
        driver = self.controller
        try:
            driver.check(call.cuts)
        except ValueError as e:  # a cut the user chose that does not fit this U-Net: what the node offers instead
            raise ValueError(str(e).replace("pass replay=True to sweep it, or take a cut with a fresh tail",
                                            f"choose {AUTO_CUT} (the nearest that fits) or a cut with a fresh tail")) from None
        request, kind = driver.state.request(step, branches)
        driver.announce(step, kind, call.emit)
        return request, branches

    def after(self, request: StageRequest, token: Any, ok: bool) -> None:
        if not isinstance(self.controller, RehashDriver):
            return
        if ok:
            self.controller.state.store(token, request)
        else:
            self.controller.state.reset()

    # the clock
    def on_step(self, i: int) -> None:
        """The sampler's callback. k-diffusion's samplers call it right after a step's first model call,
        before its later ones (heun's correction, dpm_2's midpoint), so the calls that follow belong to
        step ``i`` until the call at step ``i + 1``'s scheduled sigma."""
        if max(self._at_next.values(), default=0) >= 2 and not self.heun_like and self.learn:  # a branch, twice
            self.heun_like = True
            self.lines.append(f"the sampler evaluates at the next step's sigma within a step (as heun does); until "
                              f"step {i} that call counted as the next step's")
            log.info("Step Rehash: %s", self.lines[-1])
        self.step = i + 1
        self._at_next = {}
        if self.mode == "rehash" and self.step < self.steps:
            kind = "key" if self.controller.state.is_key(self.step) else "reuse"
            self.progress(f"Step Rehash: step {self.step + 1}/{self.steps} {kind}")

    def step_of(self, sigma: float | None, branches: tuple = (), commit: bool = True) -> int:
        """The step of a U-Net call at ``sigma`` carrying ``branches``. After the callback of step
        ``c - 1``: a call at step ``c``'s scheduled sigma starts step ``c`` (for a sampler that evaluates
        at the next sigma to correct a step, heun's, a branch's first such call is still step ``c - 1``'s);
        any other call is a later evaluation of step ``c - 1``. Where the sampler skips its callback (a
        call at or below the sigma after next), the step whose interval holds the call's sigma.
        ``commit=False`` only looks (the VRAM Profiler asks before the call runs)."""
        c = self.step
        if sigma is None or c == 0 and not self.by_sigmas:
            return c
        if not self.by_sigmas and c + 1 < len(self.sigmas) - 1 and sigma <= self.sigmas[c + 1]:
            if not commit:
                return c
            self.by_sigmas = True
            log.warning("Step Rehash: this sampler calls back less than once per step; counting steps by sigma")
        if self.by_sigmas:
            from ..profiler import step_index

            found = step_index(sigma, self.sigmas)
            return c if found is None else found
        if c < len(self.sigmas) and sigma == self.sigmas[c]:  # samplers pass the scheduled value itself
            first = self.heun_like and not any(self._at_next.get(b) for b in branches)
            if commit:
                for b in branches:
                    self._at_next[b] = self._at_next.get(b, 0) + 1
            return c - 1 if first else c
        return c - 1

    @staticmethod
    def branches_of(options: dict) -> tuple:
        """A call's branches, in row order: (context window, cond uuid) each."""
        ids = options.get("uuids") or options.get("cond_or_uncond") or [0]
        ad = options.get("ad_params") or {}
        window = tuple(int(i) for i in ad["sub_idxs"]) if ad.get("sub_idxs") is not None else None
        own = getattr(options.get("context_window"), "index_list", None)  # ComfyUI's own context windows
        if own is not None:
            window = (window, tuple(int(i) for i in own))
        return tuple((window, str(u)) for u in ids)

    # the first U-Net call decides what the run does
    def start(self, unet: Any, cuts: Sequence[CutPoint] = ()) -> None:
        self.cut_id = self._chosen_cut(cuts)
        if self.steps < 2:
            self._use(list(range(self.steps)), "one step: nothing to reuse")
            return
        if not self.options.needs_calibration:
            self._use(interval_key_steps(self.steps, self.options.interval),
                      f"every {self.options.interval} steps and the last")
            return
        self._made_for = {"model": fingerprint(unet), "steps": self.steps, "sampler": self.sampler,
                          "scheduler": self.options.scheduler or _sigmas_name(self.sigmas)}
        if self.options.denoise is not None:
            self._made_for["denoise"] = self.options.denoise
        schedule = self._find_calibration()
        if schedule is None:
            self.controller = HostCalibration()
            self.lines.append(f"no calibration for this model and setting in {calibration_folder()}: this run "
                              "calibrates (every step runs the whole U-Net)")
            log.info("Step Rehash: %s", self.lines[-1])
            return
        if self.options.schedule == "gamma":
            config = RehashConfig(schedule=schedule, cut=self.cut_id, gamma=self.options.gamma, override=True)
        else:
            count = self.options.key_steps or default_count(self.steps)
            config = RehashConfig(schedule=schedule, cut=self.cut_id, count=min(count, self.steps), override=True)
        keys, how = config.schedule.key_steps, f"{self.options.schedule} on the calibration's maps"
        if schedule.steps != self.steps:  # made for another step count (overridden)
            keys = [k for k in keys if k < self.steps]
            how += f" (made for {schedule.steps} steps: those below {self.steps})"
        self._use(keys, how)

    def _chosen_cut(self, cuts: Sequence[CutPoint]) -> str:
        """The cut widget's choice, or where auto takes it on this U-Net (said in the report)."""
        if self.options.cut != AUTO_CUT:
            return self.options.cut  # checked on the first call: one that does not fit is refused, naming the widget
        if not cuts:
            return DEFAULT_CUT
        cut, why = nearest_cut(cuts)
        self.lines.append(f"cut {cut} (auto{': ' + why if why else ''})")
        log.info("Step Rehash: %s", self.lines[-1])
        return cut

    def _find_calibration(self) -> Schedule | None:
        if self.options.calibration != AUTO:
            path = _calibration_path(self.options.calibration)
            try:
                schedule = Schedule.load(path)
                schedule.check(self._made_for, self.options.override_calibration)
            except (ValueError, OSError) as e:
                raise ValueError(f"calibration={self.options.calibration!r}: {e}".replace(
                    "pass override=True", "turn on override_calibration")) from None
            if not schedule.maps:
                raise ValueError(f"calibration={self.options.calibration!r} has no similarity maps beside it; "
                                 "choose another, or auto")
            self.lines.append(f"calibration {self.options.calibration}")
            return schedule
        for name in calibration_files():
            path = _calibration_path(name)
            try:
                schedule = Schedule.load(path)
            except (ValueError, OSError) as e:
                log.warning("Step Rehash: skipping calibration %s (%s)", name, e)
                continue
            if schedule.maps and all(schedule.made_for.get(k) == v for k, v in self._made_for.items()):
                self.lines.append(f"calibration {name} (found for this model and setting)")
                return schedule
        return None

    def _use(self, keys: list[int], how: str) -> None:
        keys = self._limited(keys)
        self.controller = RehashDriver(RehashConfig(key_steps=keys, cut=self.cut_id), self.steps, {})
        self.lines.append(f"key steps by {how}")
        self.progress(f"Step Rehash: step 1/{self.steps} key")

    def _limited(self, keys: list[int]) -> list[int]:
        """Key steps with every step outside start_percent..end_percent made key, and no more than
        max_consecutive_reuses reuse steps in a row."""
        keys = set(keys) | {0, self.steps - 1}
        o = self.options
        if (o.start_percent, o.end_percent) != (0.0, 1.0):
            hi = float(self.model_sampling.percent_to_sigma(o.start_percent))
            lo = float(self.model_sampling.percent_to_sigma(o.end_percent))
            keys |= {i for i in range(self.steps) if not lo <= self.sigmas[i] <= hi}
        if o.max_consecutive_reuses:
            run = 0
            for i in range(self.steps):
                run = 0 if i in keys else run + 1
                if run > o.max_consecutive_reuses:
                    keys.add(i)
                    run = 0
        return sorted(keys)

    # the end
    def finish(self, ok: bool) -> str:
        if self.mode == "rehash":
            state = self.controller.state
            state.reset()
            state.finished = ok
            reused = sum(r.calls for r in state.records if r.kind == "reuse")
            calls = sum(r.calls for r in state.records)
            text = (f"{state.describe()}; {reused} of {calls} U-Net calls ran only the shallow path and the layers "
                    f"after {state.cut}")
        elif self.mode == "calibrate":
            text = self._save_calibration() if ok else "the calibrating run ended early; nothing saved"
        else:
            text = "the run ended before the first U-Net call"
        if self.by_sigmas:
            text += "; steps counted by sigma (the sampler skipped its callback)"
        text = "; ".join(self.lines + [text]) + ("" if ok else " (the run ended early or raised; cache freed)")
        log.info("Step Rehash: %s", text)
        self.progress(f"Step Rehash: {text}")
        return text

    def _save_calibration(self) -> str:
        try:
            return self._write_calibration()
        except Exception as exc:  # noqa: BLE001 - the sampled latent must survive a calibration that cannot be kept
            log.warning("Step Rehash: calibration not saved", exc_info=True)
            return f"the calibration was not saved ({type(exc).__name__}: {exc})"

    def _write_calibration(self) -> str:
        if self.controller.overflow:
            return (f"the calibration stopped: its sampled features exceeded "
                    f"{self.controller.sampler.cap_bytes / 2**20:.0f} MiB; nothing saved (use interval, or fewer frames)")
        cal = self.controller.calibration(self.steps, self._made_for)
        wrong = [c for c, m in cal.maps.items() if tuple(m.shape) != (self.steps, self.steps)]
        if wrong or self.cut_id not in cal.maps:
            return (f"the calibration's maps do not cover this run's {self.steps} steps at {self.cut_id}; nothing "
                    f"saved")
        m = self._made_for
        denoise = "" if m.get("denoise") in (None, 1.0) else f"-denoise{m['denoise']:g}"
        name = f"{m['model'][:12]}-{m['steps']}steps-{_slug(m['sampler'])}-{_slug(m['scheduler'])}{denoise}.json"
        path = calibration_folder() / name
        json_path, _ = cal.save(path, cut=self.cut_id, count=default_count(self.steps))
        return (f"calibrated on this run and saved {json_path.name} in {json_path.parent}; the next runs with this "
                f"model and setting use it (refresh the node definitions to see it in the calibration list)")

    def progress(self, text: str) -> None:
        try:
            from server import PromptServer

            server = getattr(PromptServer, "instance", None)
            node = _executing_node() or self.node_id
            if server is not None and node is not None:
                server.send_progress_text(text, node)
        except Exception as exc:  # noqa: BLE001 - showing progress must never fail the run
            log.debug("Step Rehash: no progress text (%s)", exc)


def _sigma(options: dict) -> float | None:
    sigma = options.get("sigmas")
    return float(sigma.flatten()[0]) if sigma is not None and hasattr(sigma, "flatten") else None


def _executing_node() -> str | None:
    try:
        from comfy_execution.utils import get_executing_context

        ctx = get_executing_context()
        return None if ctx is None else str(ctx.node_id)
    except ImportError:
        return None


def _sigmas_name(sigmas: list[float]) -> str:
    """A name for a schedule given only as sigmas (a GUIDER does not see the scheduler's name)."""
    digest = hashlib.sha256(",".join(f"{s:.6g}" for s in sigmas).encode()).hexdigest()[:10]
    return f"sigmas {digest}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "_", str(text)).strip("_") or "x"


# -- the wrappers --------------------------------------------------------------------------------------
class RehashOuter:
    """OUTER_SAMPLE wrapper: the run's state in its context, the callback clock, the report in ``finally``."""

    def __init__(self, options: RehashOptions, node_id: str | None = None) -> None:
        self.options, self.node_id = options, node_id

    def __call__(self, executor, *args: Any, **kwargs: Any) -> Any:
        args = list(args)
        sigmas_arg = args[3] if len(args) > 3 else kwargs["sigmas"]
        sampler_arg = args[2] if len(args) > 2 else kwargs["sampler"]
        callback = args[5] if len(args) > 5 else kwargs.get("callback")
        guider = executor.class_obj
        with run_context() as ctx:
            if ctx.rehash is not None:
                log.warning("Step Rehash: a sampling run inside another's Step Rehash run; the outer run's "
                            "Step Rehash applies")
                return executor(*args, **kwargs)
            sigmas = [float(s) for s in sigmas_arg.flatten()]
            sampler = self.options.sampler or _sampler_name(sampler_arg)
            extra_calls = bool(guider.model_options.get("sampler_post_cfg_function"))
            run = ComfyRehash(self.options, sigmas, sampler, guider.model_patcher.get_model_object("model_sampling"),
                          self.node_id, heun_like=sampler in HEUN_LIKE, learn=not extra_calls)

            def on_step(i, *rest):
                run.on_step(int(i))
                if callback is not None:
                    return callback(i, *rest)

            if len(args) > 5:
                args[5] = on_step
            else:
                kwargs["callback"] = on_step
            ctx.rehash = run
            ok = False
            try:
                out = executor(*args, **kwargs)
                ok = True
                return out
            finally:
                ctx.rehash = None
                run.finish(ok)


def _sampler_name(sampler: Any) -> str:
    fn = getattr(sampler, "sampler_function", None)
    return getattr(fn, "__name__", type(sampler).__name__).removeprefix("sample_")


class _Passthrough(Streamliner):
    """The engine on a U-Net that Streamline Model did not patch: full calls run the host's own forward
    (capturing with forward hooks, so they equal plain sampling bit for bit); reuse calls run the tail
    by stages, unsliced."""

    passthrough = True


def with_rehash(model: Any, options: RehashOptions, node_id: str | None = None) -> Any:
    """A clone of ``model`` that runs Step Rehash in every sampling run (the input is untouched)."""
    import comfy.patcher_extension as pe

    unet = model.get_model_object("diffusion_model")
    if not comfy_unet.matches(unet):
        raise ValueError(f"Step Rehash supports ComfyUI's UNetModel (SVD, SVD-XT, and SD1.5 / SDXL with AnimateDiff-"
                         f"Evolved); this MODEL's diffusion model is {type(unet).__module__}.{type(unet).__name__}")
    adapter = engine_adapter(unet)
    if adapter.forward is not comfy_unet.streamlined_forward:
        raise ValueError("Step Rehash runs a reuse step's tail by Streamline's stages, which reproduce ComfyUI's "
                         "UNetModel._forward of the versions it knows; this ComfyUI's differs. Use KSampler here, or "
                         "a ComfyUI version listed in docs/comfyui.md")
    patched = model.clone()
    existing = patched.object_patches.get("diffusion_model._forward")
    if existing is None:
        engine = _Passthrough(unet, adapter, 1, None)
        patched.add_object_patch("diffusion_model._forward", engine)
    elif not isinstance(existing, Streamliner):
        raise ValueError(f"this MODEL's U-Net forward is already replaced by {type(existing).__module__}."
                         f"{type(existing).__name__} (another pack's patch); Step Rehash runs on ComfyUI's own forward "
                         "or Streamline Model's: put Step Rehash before that node, or remove it")
    patched.remove_wrappers_with_key(pe.WrappersMP.OUTER_SAMPLE, KEY)
    patched.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, KEY, RehashOuter(options, node_id))
    return patched
