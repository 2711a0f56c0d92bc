"""Host tests run against a real ComfyUI checkout (HOST.md); without one they skip, saying why."""

import pytest

from streamlined_core.comfy_host import find_comfyui, import_comfy

COMFYUI, WHY = find_comfyui()


@pytest.fixture(scope="session")
def comfyui():
    """The ComfyUI checkout, imported in-process with PyTorch attention on the CPU."""
    if COMFYUI is None:
        pytest.skip(WHY)
    import_comfy(COMFYUI)
    return COMFYUI


@pytest.fixture(scope="session")
def pack(comfyui):
    """This pack, loaded by ComfyUI's own loader as ComfyUI loads it from custom_nodes."""
    import asyncio
    import inspect
    import sys
    from pathlib import Path

    import nodes

    root = str(Path(__file__).resolve().parents[2])
    loaded = nodes.load_custom_node(root)
    loaded = asyncio.run(loaded) if inspect.iscoroutine(loaded) else loaded
    assert loaded, "ComfyUI could not load the pack"
    return sys.modules[root.replace(".", "_x_")]


def pytest_report_header(config):
    return f"host: {WHY}" if COMFYUI is not None else f"host: skipping: {WHY}"
