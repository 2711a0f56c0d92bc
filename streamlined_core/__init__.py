"""Streamlined inference for video diffusion U-Nets: the host-agnostic engine.

Import as ``streamlined_core`` (installed) or relatively from the ComfyUI pack; modules inside
refer to each other relatively so either way there is one copy.
"""

from .engine.api import StreamlineHandle, streamline
from .engine.context import RunContext, listen, run_context, stage_request
from .engine.memory import MemoryTracker
from .engine.plan import GroupPlan, Plan
from .engine.stages import CutPoint, CutState, StageRequest
from .features.rehash import RehashConfig, RehashHandle, Schedule, calibrate, rehash

__version__ = "0.1.0"

__all__ = [
    "CutPoint", "CutState", "GroupPlan", "MemoryTracker", "Plan", "RehashConfig", "RehashHandle", "RunContext",
    "Schedule", "StageRequest", "StreamlineHandle", "__version__", "calibrate", "listen", "rehash", "run_context",
    "stage_request", "streamline",
]
