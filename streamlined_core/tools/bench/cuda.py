"""``streamline bench --cuda``: the simulator's memory figures and the slicing latency, measured on a GPU.

Each row is a full-size U-Net with seeded random weights in fp16, classifier-free guidance as a
batch of 2, run original and streamlined with the plan that meets the memory target
(``TARGET_X_FLOOR`` times the skip floor, not the free-memory default, which on a large GPU plans no
slicing). A row reports ``max_memory_allocated`` minus what was allocated before the call (weights,
inputs), ``max_memory_reserved``, device memory in use, the simulator's figure for the same row
and their ratio, and the streamlined/original latency ratio (synchronised, warm-ups, median).

Everything device-specific sits in a probe: :class:`CudaProbe` reads the CUDA allocator (and NVML
where ``pynvml`` is importable); :class:`CpuProbe` runs the same rows on the CPU under
:class:`~streamlined_core.engine.memory.MemoryTracker`, so the tests run the whole row loop without a GPU.
The simulator's figures come from worker processes (no GPU visible to them) while the GPU runs, and
a global deadline keeps the whole command within a short device lease: rows it cannot reach are
listed as not measured.
"""

from __future__ import annotations

import gc
import os
import pickle
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any, BinaryIO, Callable, Iterable

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from ...engine.api import Streamliner
from ...engine.arch import engine_adapter, skip_floor_bytes
from ...engine.memory import GIB, MemoryTracker, weights_bytes
from ...engine.plan import TARGET_X_FLOOR, Plan, fresh_containers
from ...host.comfyui import find_comfyui, import_comfy
from .. import configs
from ..sim.unet import CFG_BATCH, IMPLEMENTATIONS, MODELS, implementations, measure_call

# Stop before 5 minutes of device time: the last phase a deadline check lets start (one U-Net call,
# one model build) still ends well inside them.
DEFAULT_DEADLINE_S = 270
# A measured figure further than this from the simulated one is a defect (docs/benchmarks.md).
TOLERANCE = 0.10
CONFIGS = ("full", "tiny")
# (model, height, width, frames or None for the model's own) per configuration, most wanted first.
FULL_ROWS = (("svd", 576, 1024, None), ("svd-xt", 576, 1024, None), ("animatediff", 512, 512, None),
             ("animatediff", 576, 1024, None))
TINY_ROWS = (("svd", 64, 64, 3), ("svd-xt", 64, 96, 5), ("animatediff", 64, 64, 4))
# Tiny models (the tests' configurations); ComfyUI's AnimateDiff needs SD1.5's full widths: no tiny row.
TINY_BUILDS: dict[tuple[str, str], tuple[Callable[..., nn.Module], Callable[..., tuple[tuple, dict]]]] = {
    ("diffusers", "svd"): (configs.build_tiny_diffusers_svd, configs.diffusers_svd_inputs),
    ("diffusers", "animatediff"): (configs.build_tiny_diffusers_animatediff, configs.diffusers_animatediff_inputs),
    ("comfyui", "svd"): (configs.build_tiny_comfy_svd, configs.comfy_svd_inputs),
}
ALLOCATOR_NOTE = "ComfyUI's default is cudaMallocAsync, which its launcher selects unless --disable-cuda-malloc"


class NoCudaDevice(RuntimeError):
    """Raised where ``--cuda`` cannot run: no CUDA device is visible to torch."""


class DeadlineReached(Exception):
    """The global deadline passed before ``doing`` could start."""

    def __init__(self, doing: str) -> None:
        super().__init__(doing)
        self.doing = doing


class Deadline:
    """Seconds left before the command must stop; ``check`` refuses to start what would not fit."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = time.monotonic()

    def elapsed(self) -> float:
        """Seconds since the deadline was set."""
        return time.monotonic() - self.start

    def remaining(self) -> float:
        """Seconds left, never below zero."""
        return max(0.0, self.seconds - self.elapsed())

    def check(self, doing: str, needs: float = 0.0) -> None:
        """Raise :class:`DeadlineReached` unless ``needs`` seconds are left for ``doing``."""
        if self.remaining() <= needs:
            raise DeadlineReached(doing)


# -- what a row runs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """One row: a model family, a host implementation, its builder and inputs, a workload shape."""

    model: str  # a key of simulate.MODELS
    implementation: str  # "diffusers" or "comfyui"
    arch: str  # rows of one arch share one built model (SVD and SVD-XT share a U-Net)
    build: Callable[..., nn.Module]  # build(device=..., dtype=...)
    inputs: Callable[..., tuple[tuple, dict]]  # inputs(model, batch, frames, height, width)
    height: int
    width: int
    frames: int
    batch: int = CFG_BATCH

    @property
    def label(self) -> str:
        return f"{MODELS[self.model][0]} ({self.implementation}) {self.height}x{self.width} {self.frames} frames"


def workloads(config: str = "full", models: Iterable[str] = tuple(MODELS),
              implementations_wanted: Iterable[str] = IMPLEMENTATIONS) -> list[Workload]:
    """The rows of ``config`` ("full": the issue's GPU rows; "tiny": the tests' models), diffusers first."""
    if config not in CONFIGS:
        raise ValueError(f"config must be one of {', '.join(CONFIGS)}, got {config!r}")
    models, wanted = set(models), list(implementations_wanted)
    rows = []
    for impl_key in [k for k in IMPLEMENTATIONS if k in wanted]:
        for model, h, w, frames in (FULL_ROWS if config == "full" else TINY_ROWS):
            if model not in models:
                continue
            t = frames or MODELS[model][1]
            if config == "full":
                impl = next(i for i in implementations(model) if i.key == impl_key)
                rows.append(Workload(model, impl_key, impl.arch, impl.build, impl.inputs, h, w, t))
            else:
                family = "svd" if model in ("svd", "svd-xt") else model
                if (impl_key, family) in TINY_BUILDS:
                    build, inputs = TINY_BUILDS[(impl_key, family)]
                    rows.append(Workload(model, impl_key, f"tiny-{impl_key}-{family}", build, inputs, h, w, t))
    # Rows of one arch run back to back, so each model is built once.
    order = list(dict.fromkeys(r.arch for r in rows))
    return sorted(rows, key=lambda r: order.index(r.arch))


# -- devices -----------------------------------------------------------------------------------


@dataclass
class MemoryFigures:
    """What one call held on the device (``None`` where the probe cannot see it)."""

    activation_bytes: int  # peak allocated during the call minus what was allocated before it
    reserved_bytes: int | None = None  # the allocator's peak reservation, weights included
    device_in_use_bytes: int | None = None  # the whole device's used memory after the call (context included)
    process_bytes: int | None = None  # this process's device memory after the call, from NVML


class DeviceProbe:
    """The device-specific calls of the row loop: run and measure one call, synchronise, release."""

    kind = "device"
    device: torch.device

    def info(self) -> dict[str, Any]:
        """The device's name and the software it runs (printed above the table)."""
        raise NotImplementedError

    def synchronize(self) -> None:
        """Wait until the device has finished the work queued so far."""

    def release(self) -> None:
        """Hand cached memory back to the device."""
        gc.collect()

    def measure(self, call: Callable[[], Any]) -> tuple[Any, MemoryFigures]:
        """Run ``call()`` once and return its result and the memory it held."""
        raise NotImplementedError


class CudaProbe(DeviceProbe):
    """PyTorch's CUDA allocator statistics, ``mem_get_info`` and, where importable, NVML."""

    kind = "cuda"

    def __init__(self, index: int | None = None) -> None:
        if not torch.cuda.is_available():
            built = (f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build")
            raise NoCudaDevice(f"torch.cuda.is_available() is False (torch {torch.__version__}, {built})")
        self.device = torch.device("cuda", torch.cuda.current_device() if index is None else index)
        self._nvml = self._nvml_handle()

    def _nvml_handle(self) -> Any:
        try:
            import pynvml

            pynvml.nvmlInit()
            p = torch.cuda.get_device_properties(self.device)
            bus = f"{p.pci_domain_id:08X}:{p.pci_bus_id:02X}:{p.pci_device_id:02X}.0"
            return pynvml, pynvml.nvmlDeviceGetHandleByPciBusId(bus)
        except Exception:  # no pynvml, no NVML library, or a device NVML does not list
            return None

    def info(self) -> dict[str, Any]:
        props = torch.cuda.get_device_properties(self.device)
        driver = None
        if self._nvml is not None:
            try:
                driver = self._nvml[0].nvmlSystemGetDriverVersion()
                driver = driver.decode() if isinstance(driver, bytes) else driver
            except Exception:
                driver = None
        return {
            "probe": self.kind, "device": torch.cuda.get_device_name(self.device), "memory_total_bytes": props.total_memory,
            "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "driver": driver, "allocator": torch.cuda.get_allocator_backend(), "nvml": self._nvml is not None,
        }

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def release(self) -> None:
        gc.collect()
        torch.cuda.empty_cache()

    def measure(self, call: Callable[[], Any]) -> tuple[Any, MemoryFigures]:
        self.synchronize()
        torch.cuda.empty_cache()  # the reservation peak is this call's, not an earlier call's cache
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        out = call()
        self.synchronize()
        free, total = torch.cuda.mem_get_info(self.device)
        return out, MemoryFigures(
            torch.cuda.max_memory_allocated(self.device) - before, torch.cuda.max_memory_reserved(self.device),
            total - free, self._process_bytes(),
        )

    def _process_bytes(self) -> int | None:
        if self._nvml is None:
            return None
        pynvml, handle = self._nvml
        try:
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid == os.getpid():
                    return proc.usedGpuMemory
        except Exception:
            pass
        return None  # another PID namespace (a container) hides this process from NVML


class CpuProbe(DeviceProbe):
    """The CPU, measured by the project's tracker and ``time.perf_counter``: the tests' device."""

    kind = "cpu"

    def __init__(self) -> None:
        self.device = torch.device("cpu")

    def info(self) -> dict[str, Any]:
        return {"probe": self.kind, "device": f"CPU ({platform.machine() or 'unknown'}, {torch.get_num_threads()} threads)",
                "memory_total_bytes": None, "torch": torch.__version__, "cuda": None, "cudnn": None, "driver": None,
                "allocator": "none: MemoryTracker counts live tensor storage", "nvml": False}

    def measure(self, call: Callable[[], Any]) -> tuple[Any, MemoryFigures]:
        with MemoryTracker() as tracker:
            out = call()
        return out, MemoryFigures(tracker.peak_bytes)


def cuda_probe() -> CudaProbe:
    """The probe of the current CUDA device; :class:`NoCudaDevice` where there is none."""
    return CudaProbe()


# -- the simulator's figures, in worker processes ------------------------------------------------

_META: dict[tuple[str, str], nn.Module] = {}  # a worker's meta models, per arch and dtype


def _simulate_workload(w: Workload, dtype_name: str, comfy_path: str | None) -> dict[str, Any]:
    """The simulator's figures for ``w`` (run in a worker): original and streamlined peaks on ``meta``, the plan."""
    from ...engine.api import streamline

    start = time.perf_counter()
    dtype = getattr(torch, dtype_name)
    if w.implementation == "comfyui":
        import_comfy(comfy_path, pytorch_attention=False)  # as the simulator does: SDPA on meta whatever the backend
    key = (w.arch, dtype_name)
    if key not in _META:
        _META[key] = w.build(device="meta", dtype=dtype)
    model = _META[key]
    args, kwargs = w.inputs(model, w.batch, w.frames, w.height, w.width)
    original, _ = measure_call(model, args, fresh_containers(kwargs))
    handle = streamline(model)  # no device budget on meta: the plan for TARGET_X_FLOOR x the skip floor
    try:
        streamlined, _ = measure_call(model, args, fresh_containers(kwargs))
        plan = handle.last_plan
    finally:
        handle.remove()
    return {"original_bytes": original, "streamlined_bytes": streamlined, "plan": plan.describe(),
            "plan_groups": _plan_groups(plan), "seconds": round(time.perf_counter() - start, 3)}


def _plan_groups(plan: Plan) -> list[tuple[str, int, str]]:
    return [(g.name, g.slices, g.mode) for g in plan.groups]


def _serve(payload: dict[str, Any], out: BinaryIO) -> None:
    """A worker's loop: simulate each of its rows in order, one pickled ``(index, figures or error)`` per row."""
    torch.set_num_threads(1)  # the main process keeps the cores that feed the device
    for index, w in payload["rows"]:
        try:
            result: Any = _simulate_workload(w, payload["dtype"], payload["comfy_path"])
        except Exception as exc:
            result = f"{type(exc).__name__}: {exc}"
        pickle.dump((index, result), out)
        out.flush()


# The command a worker runs: it reads this process's import path and module name, then its rows,
# from stdin, and answers on a private copy of descriptor 1, which then points at stderr, so
# whatever the hosts print cannot mix with the answers.
_WORKER = (
    "import importlib, os, pickle, sys\n"
    "path, module = pickle.load(sys.stdin.buffer)\n"
    "sys.path[:0] = path\n"
    "payload = pickle.load(sys.stdin.buffer)\n"
    "out = os.fdopen(os.dup(1), 'wb')\n"
    "os.dup2(2, 1)\n"
    "importlib.import_module(module)._serve(payload, out)\n"
)


class _Simulations:
    """The simulator's figures of every row, computed in worker processes that see no GPU."""

    def __init__(self, work: list[Workload], dtype: torch.dtype, comfy_path: str | None) -> None:
        self.results: dict[int, Any] = {}
        self.done = threading.Condition()
        self.procs: list[subprocess.Popen] = []
        n = min(len(work), 8, max(1, (os.cpu_count() or 2) // 2))
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the workers never touch the GPU being measured
        for k in range(n):
            rows = [(i, w) for i, w in enumerate(work) if i % n == k]
            log = tempfile.TemporaryFile()
            proc = subprocess.Popen([sys.executable, "-c", _WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=log, env=env)
            payload = {"rows": rows, "dtype": str(dtype).removeprefix("torch."), "comfy_path": comfy_path}
            try:
                proc.stdin.write(pickle.dumps(([p for p in sys.path if p], __name__)) + pickle.dumps(payload))
                proc.stdin.close()
            except BrokenPipeError:  # it died at start: its reader reports why, row by row
                pass
            self.procs.append(proc)
            threading.Thread(target=self._read, args=(proc, log, [i for i, _ in rows]), daemon=True).start()

    def _read(self, proc: subprocess.Popen, log: Any, indices: list[int]) -> None:
        try:
            while True:
                index, result = pickle.load(proc.stdout)
                with self.done:
                    self.results[index] = result
                    self.done.notify_all()
        except Exception:  # end of its answers: finished, killed, or crashed
            proc.wait()
            log.seek(0)
            tail = log.read().decode(errors="replace").strip().splitlines()[-1:]
            log.close()
            with self.done:
                for i in indices:
                    self.results.setdefault(i, f"the simulation worker exited ({proc.returncode}): {' '.join(tail)}")
                self.done.notify_all()

    def get(self, index: int, timeout: float) -> dict[str, Any]:
        """Row ``index``'s figures; ``TimeoutError`` after ``timeout`` seconds, ``RuntimeError`` if it failed."""
        with self.done:
            if not self.done.wait_for(lambda: index in self.results, timeout=timeout):
                raise TimeoutError(f"no simulated figures within {timeout:.0f} s")
            result = self.results[index]
        if isinstance(result, str):
            raise RuntimeError(result)
        return result

    def close(self) -> None:
        """Stop the workers, also those still simulating rows the deadline cut."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


# -- rows --------------------------------------------------------------------------------------


@dataclass
class CudaRow:
    """One workload's measurements, as far as the run got (``status`` says how far)."""

    model: str
    implementation: str
    height: int
    width: int
    frames: int
    batch: int
    status: str = "not measured"  # measured, partial, not measured, error
    note: str = ""
    weights_bytes: int | None = None
    skip_floor_bytes: int | None = None
    target_bytes: int | None = None  # TARGET_X_FLOOR x the skip floor: the activation budget planned for
    plan: str | None = None
    plan_fits: bool | None = None
    plan_predicted_bytes: int | None = None
    plan_table: str | None = None
    plan_groups: list[tuple[str, int, str]] | None = None  # (group, slices, mode) of every group
    original: MemoryFigures | None = None
    streamlined: MemoryFigures | None = None
    output_max_abs: float | None = None
    streamlined_max_abs_diff: float | None = None
    original_times_s: list[float] = field(default_factory=list)
    streamlined_times_s: list[float] = field(default_factory=list)
    simulated_original_bytes: int | None = None
    simulated_streamlined_bytes: int | None = None
    simulated_plan: str | None = None
    simulated_plan_matches: bool | None = None
    seconds: float = 0.0

    @property
    def label(self) -> str:
        return f"{MODELS[self.model][0]} ({self.implementation}) {self.height}x{self.width} {self.frames} frames"

    def ratio(self, variant: str) -> float | None:
        """Measured activation peak over the simulated one for ``variant`` ("original" or "streamlined")."""
        measured = getattr(self, variant)
        simulated = getattr(self, f"simulated_{variant}_bytes")
        if measured is None or not simulated:
            return None
        return measured.activation_bytes / simulated

    def off(self, variant: str) -> bool:
        """Whether the measured figure is more than :data:`TOLERANCE` away from the simulated one."""
        r = self.ratio(variant)
        return r is not None and abs(r - 1) > TOLERANCE

    def median_s(self, variant: str) -> float | None:
        """Median seconds of the timed calls of ``variant``."""
        times = getattr(self, f"{variant}_times_s")
        return statistics.median(times) if times else None

    @property
    def latency_ratio(self) -> float | None:
        """Streamlined over original median seconds."""
        o, s = self.median_s("original"), self.median_s("streamlined")
        return s / o if o and s is not None else None

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for v in ("original", "streamlined"):
            d[f"{v}_measured_over_simulated"] = self.ratio(v)
            d[f"{v}_off_by_more_than_{round(TOLERANCE * 100)}_percent"] = self.off(v)
            d[f"{v}_median_s"] = self.median_s(v)
        d["latency_ratio"] = self.latency_ratio
        return d


@dataclass
class CudaBenchResult:
    """Every row, the device it ran on, and how the run was set up."""

    device: dict[str, Any]
    config: str
    dtype: str
    warmup: int
    repeats: int
    deadline_s: float
    elapsed_s: float
    rows: list[CudaRow]
    notes: list[str] = field(default_factory=list)

    @property
    def defects(self) -> list[str]:
        """Rows whose measured figure is more than :data:`TOLERANCE` away from the simulated one."""
        return [f"{r.label} {v}: measured / simulated = {r.ratio(v):.3f}" for r in self.rows
                for v in ("original", "streamlined") if r.off(v)]

    def as_dict(self) -> dict[str, Any]:
        return {"command": "streamline bench --cuda", "device": self.device, "config": self.config, "dtype": self.dtype,
                "batch": CFG_BATCH, "warmup": self.warmup, "repeats": self.repeats, "deadline_s": self.deadline_s,
                "elapsed_s": self.elapsed_s, "target_x_floor": TARGET_X_FLOOR, "tolerance": TOLERANCE,
                "allocator_note": ALLOCATOR_NOTE, "notes": self.notes, "defects": self.defects,
                "rows": [r.as_dict() for r in self.rows]}


def _first_tensor(out: Any) -> torch.Tensor:
    leaves, _ = tree_flatten(out)
    return next(x for x in leaves if isinstance(x, torch.Tensor))


def _check_finite(t: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise FloatingPointError(f"the {what} output is not finite: seeded weights should keep it finite")


def measure(probe: DeviceProbe, config: str = "full", models: Iterable[str] = tuple(MODELS),
            implementations_wanted: Iterable[str] = IMPLEMENTATIONS, warmup: int = 2, repeats: int = 5,
            deadline_s: float = DEFAULT_DEADLINE_S, dtype: torch.dtype = torch.float16,
            progress: Callable[[str], None] | None = None) -> CudaBenchResult:
    """Run every row of ``config`` on ``probe``'s device, original and streamlined, until ``deadline_s``."""
    say = progress or (lambda _m: None)
    deadline = Deadline(deadline_s)
    notes: list[str] = []
    wanted = list(implementations_wanted)
    comfy_path = None
    if "comfyui" in wanted:
        comfy_path, why = find_comfyui()
        if comfy_path is None:
            notes.append(f"no ComfyUI rows: {why}")
            say(f"skipping ComfyUI rows: {why}")
            wanted.remove("comfyui")
    work = workloads(config, models, wanted)
    rows = [CudaRow(w.model, w.implementation, w.height, w.width, w.frames, w.batch) for w in work]
    info = probe.info()
    say(f"{info['device']}, torch {info['torch']}, CUDA {info['cuda']}, allocator {info['allocator']}; "
        f"{len(work)} rows, deadline {deadline_s:g} s")
    sims = _Simulations(work, dtype, str(comfy_path) if comfy_path else None)
    built: dict[str, nn.Module] = {}
    broken: dict[str, BaseException] = {}
    hosts: dict[str, BaseException | None] = {}
    build_s: list[float] = []
    row_s: list[float] = []
    try:
        for i, (w, row) in enumerate(zip(work, rows)):
            start = time.perf_counter()
            say(f"[{i + 1}/{len(work)}] {w.label}")
            try:
                deadline.check("the row", needs=min(row_s, default=0.0))
                if w.arch in broken:
                    raise broken[w.arch]
                if w.arch not in built:
                    built.clear()
                    probe.release()
                    deadline.check("building the model", needs=max(build_s, default=0.0))
                    b0 = time.perf_counter()
                    try:
                        built[w.arch] = _build(w, probe, dtype, comfy_path, hosts, say)
                    except Exception as exc:
                        broken[w.arch] = exc.with_traceback(None)  # its frames would hold device memory
                        raise
                    build_s.append(time.perf_counter() - b0)
                _measure_row(w, row, built[w.arch], probe, dtype, warmup, repeats, deadline, say)
                row.status = "measured"
            except DeadlineReached as exc:
                measured = row.original is not None
                row.status = "partial" if measured else "not measured"
                row.note = f"deadline ({deadline_s:g} s) reached before {exc.doing}"
                say(f"    {row.status}: {row.note}")
            except ModuleNotFoundError as exc:
                row.status, row.note = "not measured", str(exc)
                say(f"    not measured: {exc}")
            except Exception as exc:
                row.status, row.note = "error", f"{type(exc).__name__}: {exc}"
                say(f"    error: {row.note}\n{traceback.format_exc()}")
            finally:
                probe.release()
            if row.original is not None:
                _simulated(sims, i, row, deadline, say)
            row.seconds = round(time.perf_counter() - start, 3)
            if row.status == "measured":
                row_s.append(row.seconds)
    finally:
        sims.close()
        built.clear()
        probe.release()
    return CudaBenchResult(info, config, str(dtype).removeprefix("torch."), warmup, repeats, deadline_s,
                           round(deadline.elapsed(), 1), rows, notes)


def _build(w: Workload, probe: DeviceProbe, dtype: torch.dtype, comfy_path: Any,
           hosts: dict[str, BaseException | None], say: Callable[[str], None]) -> nn.Module:
    """Build ``w``'s model on the probe's device with seeded weights (importing ComfyUI first for its rows)."""
    if w.implementation == "comfyui":
        if "comfyui" not in hosts:
            try:
                import_comfy(comfy_path, pytorch_attention=True)  # PyTorch attention: what GPU users run
                hosts["comfyui"] = None
            except Exception as exc:
                hosts["comfyui"] = ModuleNotFoundError(f"importing ComfyUI from {comfy_path} failed: {exc}")
        if hosts["comfyui"] is not None:
            raise hosts["comfyui"]
    say(f"    building {w.arch} on {probe.device} in {str(dtype).removeprefix('torch.')}, seeding its weights")
    model = w.build(device=probe.device, dtype=dtype)
    return configs.seed_weights_scaled(model, seed=0)


def _measure_row(w: Workload, row: CudaRow, model: nn.Module, probe: DeviceProbe, dtype: torch.dtype, warmup: int,
                 repeats: int, deadline: Deadline, say: Callable[[str], None]) -> None:
    """Plan, then measure memory and time of the original and streamlined calls of one row, filling ``row``."""
    torch.manual_seed(0)
    args, kwargs = w.inputs(model, w.batch, w.frames, w.height, w.width)
    row.weights_bytes = weights_bytes(model)
    row.skip_floor_bytes = skip_floor_bytes(model, w.batch * w.frames, w.height // 8, w.width // 8, dtype)
    row.target_bytes = int(TARGET_X_FLOOR * row.skip_floor_bytes)
    # The memory target as the device's budget: the plan the simulator's streamlined rows run, where
    # the default (free memory) would plan no slicing on a large GPU.
    streamliner = Streamliner(model, engine_adapter(model), "auto", None,
                              device_budget_bytes=row.weights_bytes + row.target_bytes)
    calls = {
        "original": lambda: model(*args, **fresh_containers(kwargs)),
        "streamlined": lambda: streamliner(*args, **fresh_containers(kwargs)),
    }
    deadline.check("planning")
    say("    planning on a meta replica")
    plan = streamliner.plan_for(*args, **fresh_containers(kwargs))
    row.plan, row.plan_fits, row.plan_predicted_bytes = plan.describe(), plan.fits, plan.predicted_peak_bytes
    row.plan_table, row.plan_groups = plan.table(), _plan_groups(plan)
    say(f"    plan for {TARGET_X_FLOOR}x the skip floor ({row.target_bytes / GIB:.3f} GiB of activations): "
        f"{row.plan}{'' if plan.fits else ' (the target is out of reach: the least reachable peak)'}\n"
        + "\n".join("      " + line for line in row.plan_table.splitlines()))
    with torch.no_grad():
        for i in range(warmup):
            for name, call in calls.items():
                deadline.check(f"warm-up {i + 1} ({name})")
                call()
                probe.synchronize()
        say(f"    {warmup} warm-up{'' if warmup == 1 else 's'} done")
        deadline.check("measuring memory (original)")
        out, row.original = probe.measure(calls["original"])
        reference = _first_tensor(out).float()
        del out
        _check_finite(reference, "original")
        deadline.check("measuring memory (streamlined)")
        out, row.streamlined = probe.measure(calls["streamlined"])
        result = _first_tensor(out).float()
        del out
        _check_finite(result, "streamlined")
        row.output_max_abs = reference.abs().max().item()
        row.streamlined_max_abs_diff = (result - reference).abs().max().item()
        del reference, result
        say(f"    activations {row.original.activation_bytes / GIB:.3f} -> {row.streamlined.activation_bytes / GIB:.3f} GiB; "
            f"outputs finite, max |streamlined - original| {row.streamlined_max_abs_diff:.3g} of {row.output_max_abs:.3g}")
        for i in range(repeats):
            for name, call in calls.items():
                deadline.check(f"timed call {i + 1} ({name})")
                probe.synchronize()
                t0 = time.perf_counter()
                call()
                probe.synchronize()
                getattr(row, f"{name}_times_s").append(time.perf_counter() - t0)
    say(f"    median {row.median_s('original'):.4f} s original, {row.median_s('streamlined'):.4f} s streamlined: "
        f"ratio {row.latency_ratio:.3f}")


def _simulated(sims: _Simulations, index: int, row: CudaRow, deadline: Deadline, say: Callable[[str], None]) -> None:
    """Fill ``row``'s simulated figures from the worker, waiting no longer than the deadline allows."""
    try:
        sim = sims.get(index, timeout=deadline.remaining())
    except TimeoutError:
        row.note = "; ".join(filter(None, [row.note, "the simulation did not finish before the deadline"]))
        say("    the simulation did not finish before the deadline")
        return
    except Exception as exc:
        row.note = "; ".join(filter(None, [row.note, f"simulation failed: {type(exc).__name__}: {exc}"]))
        say(f"    simulation failed: {exc}")
        return
    row.simulated_original_bytes = sim["original_bytes"]
    row.simulated_streamlined_bytes = sim["streamlined_bytes"]
    row.simulated_plan = sim["plan"]
    if row.plan_groups is not None:
        row.simulated_plan_matches = [tuple(g) for g in sim["plan_groups"]] == row.plan_groups
    parts = [f"{v} {r:.3f}{' (more than 10% off: a defect)' if row.off(v) else ''}"
             for v in ("original", "streamlined") if (r := row.ratio(v)) is not None]
    say(f"    measured / simulated: {', '.join(parts)} (simulated in {sim['seconds']:.1f} s)")


# -- tables ------------------------------------------------------------------------------------

HEAD = ("model", "implementation", "size", "frames", "variant", "weights {u}", "activations {u} (max allocated - before)",
        "simulated {u}", "measured / simulated", "max reserved {u}", "in use {u} (device / process)", "median s",
        "latency vs original", "max abs diff / max abs output")


MIB = 1024**2


def _unit(result: CudaBenchResult) -> tuple[str, int]:
    """GiB for full-size rows; MiB where every figure is below a tenth of a GiB (the tiny models)."""
    figures = [m.activation_bytes for r in result.rows for m in (r.original, r.streamlined) if m is not None]
    figures += [r.weights_bytes for r in result.rows if r.weights_bytes]
    return ("GiB", GIB) if any(b >= GIB / 10 for b in figures) else ("MiB", MIB)


def _size(b: int | None, unit: int, digits: int = 3) -> str:
    return "-" if b is None else f"{b / unit:.{digits}f}"


def _cells(row: CudaRow, unit: int) -> list[list[str]]:
    first = [MODELS[row.model][0], row.implementation, f"{row.height}x{row.width}", str(row.frames)]
    if row.original is None:
        return [first + [f"{row.status}: {row.note}"] + ["-"] * (len(HEAD) - len(first) - 1)]
    lines = []
    for v in ("original", "streamlined"):
        m: MemoryFigures | None = getattr(row, v)
        ratio = row.ratio(v)
        name = v if v == "original" else f"streamlined ({row.plan}{'' if row.plan_fits else ', target out of reach'})"
        if v == "streamlined" and row.simulated_plan_matches is False:
            name += f"; simulated with {row.simulated_plan}"
        med = row.median_s(v)
        lines.append(first + [
            name,
            _size(row.weights_bytes, unit, 2),
            "-" if m is None else _size(m.activation_bytes, unit),
            _size(getattr(row, f"simulated_{v}_bytes"), unit),
            "-" if ratio is None else f"{ratio:.3f}{' (!)' if row.off(v) else ''}",
            "-" if m is None else _size(m.reserved_bytes, unit, 2),
            "-" if m is None else f"{_size(m.device_in_use_bytes, unit, 2)} / {_size(m.process_bytes, unit, 2)}",
            "-" if med is None else f"{med:.4f}",
            ("-" if row.latency_ratio is None else f"{row.latency_ratio:.3f}") if v == "streamlined" else "-",
            ("-" if row.streamlined_max_abs_diff is None or not row.output_max_abs
             else f"{row.streamlined_max_abs_diff / row.output_max_abs:.2e}") if v == "streamlined" else "-",
        ])
    if row.status != "measured":
        lines[-1][4] += f" [{row.status}: {row.note}]"
    return lines


def format_markdown(result: CudaBenchResult) -> str:
    """The Markdown table the docs embed, with the device and software above it and notes below."""
    d = result.device
    if d["probe"] == "cuda":
        where = (f"{d['device']} ({d['memory_total_bytes'] / GIB:.1f} GiB), torch {d['torch']}, CUDA {d['cuda']}, "
                 f"cuDNN {d['cudnn']}{', driver ' + d['driver'] if d.get('driver') else ''}; PyTorch's "
                 f"`{d['allocator']}` allocator ({ALLOCATOR_NOTE})")
    else:
        where = (f"{d['device']}, torch {d['torch']}: the CPU probe (MemoryTracker and time.perf_counter, no CUDA "
                 f"call), which the tests run; no GPU figure")
    dtype = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}.get(result.dtype, result.dtype)
    header = (f"`streamline bench --cuda` ({result.config} models, {dtype}, classifier-free guidance as a batch of "
              f"{CFG_BATCH}, seeded random weights) on {where}. Latency: {result.warmup} warm-up"
              f"{'' if result.warmup == 1 else 's'} and the median of {result.repeats} call"
              f"{'' if result.repeats == 1 else 's'}, synchronised; "
              f"{result.elapsed_s:g} s in all (deadline {result.deadline_s:g} s).")
    name, unit = _unit(result)
    head = [h.format(u=name) for h in HEAD]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c) + " |" for r in result.rows for c in _cells(r, unit)]
    notes = [
        f"Activations: the peak of `max_memory_allocated` during one U-Net call minus what was allocated before it "
        f"(weights, inputs, library workspaces), beside the simulator's live-tensor peak of the same call "
        f"(`streamline simulate`, meta device). Streamlined: the plan for {TARGET_X_FLOOR}x the skip floor. Max "
        f"reserved: the allocator's peak reservation in that call, weights included. In use: the device's used "
        f"memory after the call (CUDA context and allocator cache included) / this process's, from NVML where "
        f"`pynvml` is importable.",
        f"(!): more than {TOLERANCE:.0%} away from the simulated figure: a defect of the simulator.",
    ]
    notes += [f"Defect: {x}." for x in result.defects]
    notes += [n[0].upper() + n[1:] + "." for n in result.notes]
    return "\n".join([header, ""] + lines) + "\n\n" + "\n".join(notes) + "\n"
