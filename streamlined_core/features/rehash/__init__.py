"""Step Rehash: full U-Net on key steps, the cached deep feature plus the layers after it on the others.

On a **key step** the U-Net runs whole and the feature at a cut point (``up0.0.attn``: after the last
up block's first attention) is kept. On a **reuse step** the stage loop (the engine's stage loop) recomputes
only the shallow part of the down path whose skips the tail consumes, then runs the tail from the
cut on the cached feature: the same sliced groups as a full step, fewer of them. Which steps are key
comes from a measured step-similarity map (the paper's Algorithm 1): step 0 is key; walk forward
while the feature's similarity to the last key step stays at or above ``gamma``; the first step
below becomes key; the last step is key.

    from streamlined_core import rehash, RehashConfig, calibrate

    cal = calibrate(pipe, lambda: pipe(image, num_inference_steps=25))   # full compute, maps per cut
    cal.save("svd-25")                                                   # svd-25.json + .safetensors
    handle = rehash(pipe, RehashConfig(schedule="svd-25.json", count=13))
    frames = pipe(image, num_inference_steps=25).frames
    print(handle.last_run.describe())        # which steps ran whole, which reused, the cache's bytes
    handle.remove()                          # the pipeline exactly as before

The pieces, in the style of diffusers' hooks: :class:`RehashConfig` (what to do), :func:`rehash`
(apply it to a pipeline or U-Net; the handle's ``remove()`` undoes it), and the per-run state
:class:`RehashState` (the cache, per guidance branch and per context window, with ``reset()``),
created when a run starts and freed when it ends or raises. The step index comes from the scheduler
(its ``step`` calls), never from the timestep's value. Hosts can drive the same machinery
with their own step index and branch keys: a controller in the run context (``RunContext.rehash``,
a :class:`~streamlined_core.engine.context.Controller`) takes precedence over one attached to the U-Net.

Its parts: ``keysteps`` (Algorithm 1), ``schedule`` (the file and the configuration), ``state`` (one run's
state and controllers), ``pipeline`` (the attachment to a diffusers pipeline) and ``comfyui`` (the attachment
to ComfyUI's sampling, imported by the nodes).
"""

from .keysteps import (
    DEFAULT_CALIBRATION_CAP,
    DEFAULT_CUT,
    DEFAULT_POSITIONS,
    LAST_UP_BLOCK,
    FeatureSampler,
    check_map,
    default_count,
    fingerprint,
    interval_key_steps,
    key_steps_for_count,
    key_steps_for_gamma,
    similarity_map,
    step_ranges,
)
from .pipeline import CalibrationHandle, RehashHandle, calibrate, describe_scheduler, patch_scheduler, rehash
from .schedule import FORMAT, MADE_FOR, Calibration, RehashConfig, Schedule, check_cut, check_keys, format_calibration
from .state import HostCalibration, RehashDriver, RehashEvent, RehashState, StepRecord

__all__ = [
    "Calibration",
    "CalibrationHandle",
    "DEFAULT_CALIBRATION_CAP",
    "DEFAULT_CUT",
    "DEFAULT_POSITIONS",
    "FORMAT",
    "FeatureSampler",
    "HostCalibration",
    "LAST_UP_BLOCK",
    "MADE_FOR",
    "RehashConfig",
    "RehashDriver",
    "RehashEvent",
    "RehashHandle",
    "RehashState",
    "Schedule",
    "StepRecord",
    "calibrate",
    "check_cut",
    "check_keys",
    "check_map",
    "default_count",
    "describe_scheduler",
    "fingerprint",
    "format_calibration",
    "interval_key_steps",
    "key_steps_for_count",
    "key_steps_for_gamma",
    "patch_scheduler",
    "rehash",
    "similarity_map",
    "step_ranges",
]
