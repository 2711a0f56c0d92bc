"""ComfyUI nodes of the Streamline pack: the only code that uses ComfyUI's API.

The engine is reached relatively (``..streamlined_core``), never by its installed name, so one
ComfyUI process holds a single copy of it.
"""

from ..streamlined_core import __version__
from .demo import StreamlineDemoFrames, StreamlineDemoLoader
from .step_rehash import StepRehashGuider, StepRehashSampler
from .streamline_model import StreamlineModel
from .vae_decode import StreamlineVAEDecode
from .vram_profiler import VRAMProfiler, register_routes

NODE_CLASS_MAPPINGS: dict[str, type] = {
    "StreamlineModel": StreamlineModel,
    "StreamlineDemoLoader": StreamlineDemoLoader,
    "StreamlineDemoFrames": StreamlineDemoFrames,
    "VRAMProfiler": VRAMProfiler,
    "StreamlineVAEDecode": StreamlineVAEDecode,
    "StepRehashSampler": StepRehashSampler,
    "StepRehashGuider": StepRehashGuider,
}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {
    "StreamlineModel": "Streamline Model",
    "StreamlineDemoLoader": "Streamline Demo Model",
    "StreamlineDemoFrames": "Streamline Demo Frames",
    "VRAMProfiler": "VRAM Profiler",
    "StreamlineVAEDecode": "Streamline VAE Decode",
    "StepRehashSampler": "Step Rehash Sampler",
    "StepRehashGuider": "Step Rehash Guider",
}

register_routes()  # GET /streamline/timelines[/{prompt_id}] on ComfyUI's server, when one runs

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "__version__"]
