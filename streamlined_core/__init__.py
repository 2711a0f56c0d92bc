"""Streamlined inference for video diffusion U-Nets: the host-agnostic engine.

Import as ``streamlined_core`` (installed) or relatively from the ComfyUI pack; modules inside
refer to each other relatively so either way there is one copy.
"""

from .api import StreamlineHandle, streamline
from .memory import MemoryTracker
from .plan import GroupPlan, Plan

__version__ = "0.1.0"

__all__ = ["GroupPlan", "MemoryTracker", "Plan", "StreamlineHandle", "__version__", "streamline"]
