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


def pytest_report_header(config):
    return f"host: {WHY}" if COMFYUI is not None else f"host: skipping: {WHY}"
