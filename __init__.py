"""Streamline for ComfyUI: memory-efficient, faster video diffusion (SVD, SVD-XT, AnimateDiff).

ComfyUI imports this folder as a package by its path; everything inside it is reached relatively,
so the engine is loaded under one module name only.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
