"""Find and import a ComfyUI checkout for the simulator's ComfyUI rows and the host tests.

ComfyUI is not a package index release: users run it from a git checkout. The search order is
``$COMFYUI_PATH``, the ComfyUI this pack sits in (``ComfyUI/custom_nodes/<pack>``), then
``~/comfy/ComfyUI`` (comfy-cli's default workspace).
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

from ..engine.memory import size_text

PACK_ROOT = Path(__file__).resolve().parents[2]


def is_comfyui(path: Path) -> bool:
    """True when ``path`` looks like a ComfyUI checkout."""
    return (path / "comfy" / "model_patcher.py").is_file() and (path / "main.py").is_file()


def find_comfyui() -> tuple[Path | None, str]:
    """The ComfyUI checkout to use, and a sentence saying where it came from or why none was found."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        path = Path(env).expanduser().resolve()
        if is_comfyui(path):
            return path, f"ComfyUI from $COMFYUI_PATH ({path})"
        return None, f"$COMFYUI_PATH={env} is not a ComfyUI checkout (no comfy/model_patcher.py)"
    candidates = [PACK_ROOT.parent.parent, Path.home() / "comfy" / "ComfyUI"]
    for path in candidates:
        if is_comfyui(path):
            return path.resolve(), f"ComfyUI at {path.resolve()}"
    tried = ", ".join(str(p) for p in candidates)
    return None, f"no ComfyUI checkout found ($COMFYUI_PATH unset; looked in {tried})"


def import_comfy(path: Path | None = None, pytorch_attention: bool = True):
    """Make ``comfy`` importable and return ``comfy.model_management``.

    Before ``comfy.model_management`` is first imported, select the CPU device when no GPU is
    present and, with ``pytorch_attention``, PyTorch attention (what GPU users run; ComfyUI's CPU
    default sizes its chunks from free memory). That choice matters to real runs only: on ``meta``
    every backend runs as SDPA (``arch/comfy_attention.py``). Inside a running ComfyUI this only
    returns the module that is already loaded.
    """
    if "comfy.model_management" not in sys.modules:
        if path is None:
            path, why = find_comfyui()
            if path is None:
                raise ModuleNotFoundError(why)
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
        import torch
        from comfy.cli_args import args

        if not torch.cuda.is_available():
            args.cpu = True
        if pytorch_attention:
            args.use_pytorch_cross_attention = True
    import comfy.model_management

    return comfy.model_management


ADE_FOLDER = "ComfyUI-AnimateDiff-Evolved"


def animatediff_evolved(module: str):
    """A module of AnimateDiff-Evolved (e.g. ``"animatediff.motion_module_ad"``), loaded as ComfyUI loads
    the custom node from the checkout's ``custom_nodes`` (import ComfyUI first)."""
    found = _loaded_ade(module)
    if found is None:
        import comfy.model_management

        root = Path(comfy.model_management.__file__).resolve().parents[1] / "custom_nodes" / ADE_FOLDER
        if not (root / "__init__.py").is_file():
            raise ModuleNotFoundError(f"AnimateDiff-Evolved is not in {root.parent}")
        loaded = load_custom_node(root)
        found = _loaded_ade(module)
        if not loaded or found is None:
            raise ModuleNotFoundError(f"ComfyUI could not load AnimateDiff-Evolved from {root}")
    return found


def _loaded_ade(module: str):
    return next((m for name, m in list(sys.modules.items()) if ADE_FOLDER in name and name.endswith("." + module)), None)


def load_custom_node(root: Path) -> bool:
    """Load the custom node at ``root`` with ComfyUI's own loader (synchronous or, in newer ComfyUI, a
    coroutine); whether it loaded."""
    import asyncio
    import inspect

    import nodes

    loaded = nodes.load_custom_node(str(root))
    return bool(asyncio.run(loaded) if inspect.iscoroutine(loaded) else loaded)


def load_pack_nodes(required: str = "StepRehashSampler") -> dict:
    """This pack's nodes, loaded as ComfyUI loads it from ``custom_nodes`` (once; import ComfyUI first):
    ComfyUI's ``NODE_CLASS_MAPPINGS``, with ``required`` in it."""
    import nodes

    if required not in nodes.NODE_CLASS_MAPPINGS:
        if not (PACK_ROOT / "__init__.py").is_file() or not (PACK_ROOT / "nodes").is_dir():
            raise ModuleNotFoundError(f"this pack's ComfyUI nodes are not beside streamlined_core in {PACK_ROOT}: run "
                                      "from a clone of the pack, or from ComfyUI/custom_nodes where it is installed")
        loaded = load_custom_node(PACK_ROOT)
        if not loaded or required not in nodes.NODE_CLASS_MAPPINGS:
            raise ModuleNotFoundError(f"ComfyUI could not load this pack's nodes from {PACK_ROOT} (see the log above)")
    return nodes.NODE_CLASS_MAPPINGS


@contextmanager
def model_folder(name: str, path: Path | str, extensions: set[str]):
    """ComfyUI's ``folder_paths`` entry ``name`` pointed at ``path`` alone for the block, then restored."""
    import folder_paths

    previous = folder_paths.folder_names_and_paths.get(name)
    folder_paths.folder_names_and_paths[name] = ([str(path)], set(extensions))
    getattr(folder_paths, "filename_list_cache", {}).pop(name, None)
    try:
        yield Path(path)
    finally:
        if previous is None:
            folder_paths.folder_names_and_paths.pop(name, None)
        else:
            folder_paths.folder_names_and_paths[name] = previous
        getattr(folder_paths, "filename_list_cache", {}).pop(name, None)


# -- what ComfyUI leaves free: the nodes' default budget ------------------------------------
#
# ComfyUI decides how many weights stay on the device from the free memory and the model's estimate
# (``model_management.load_models_gpu``) and keeps ``extra_reserved_memory()`` free for other
# programs. The nodes plan for what it leaves, read as it runs, not for the card's total.

def free_for_activations(device) -> tuple[int, str] | None:
    """What ComfyUI leaves free on ``device`` now, less its reserve, and a sentence saying so; None on the CPU."""
    import comfy.model_management as mm

    if mm.is_device_cpu(device):
        return None
    free, reserve = mm.get_free_memory(device), mm.extra_reserved_memory()
    return max(0, int(free - reserve)), (f"ComfyUI's free memory at run time, {size_text(free)}, less its "
                                         f"{size_text(reserve)} reserve")


def room_with_weights_resident(device, weights_bytes: int) -> tuple[int, str] | None:
    """Before a model loads: what ComfyUI could leave free for activations with all ``weights_bytes``
    resident (its free memory and every model it may unload, less the weights and its reserve);
    None on the CPU."""
    import comfy.model_management as mm

    if mm.is_device_cpu(device):
        return None
    free, reserve = mm.get_free_memory(device), mm.extra_reserved_memory()
    unloadable = sum(m.model_loaded_memory() for m in list(mm.current_loaded_models)
                     if m.device == device and m.model is not None)  # a collected model's entry holds nothing
    room = int(free + unloadable - weights_bytes - reserve)
    return max(0, room), (f"ComfyUI's free memory before loading, {size_text(free + unloadable)} with the models it "
                          f"may unload, less {size_text(weights_bytes)} of weights and its {size_text(reserve)} reserve")
