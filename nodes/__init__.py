"""ComfyUI nodes of the Streamline pack: the only code that uses ComfyUI's API.

The engine is reached relatively (``..streamlined_core``), never by its installed name, so one
ComfyUI process holds a single copy of it.
"""

from ..streamlined_core import __version__
from .streamline_model import StreamlineModel

NODE_CLASS_MAPPINGS: dict[str, type] = {"StreamlineModel": StreamlineModel}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {"StreamlineModel": "Streamline Model"}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "__version__"]
