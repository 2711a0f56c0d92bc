"""ComfyUI nodes of the Streamline pack: the only code that uses ComfyUI's API.

The engine is reached relatively (``..streamlined_core``), never by its installed name, so one
ComfyUI process holds a single copy of it.
"""

from ..streamlined_core import __version__

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "__version__"]
