"""Host tests run against a real ComfyUI checkout (docs/development.md, The hosts); without one they skip, saying why.

scripts/dev.sh runs this suite once per host with ``$COMFYUI_PATH`` set. Run directly (``pytest tests/host``)
without it, the suite takes the first host tests/hosts.py finds (``$COMFYUI_PATHS``, the ComfyUI this pack
sits in, ``~/comfy/ComfyUI``, else the reference hosts of ``../shared/hosts`` unpacked in ``build/hosts``)
and sets ``$COMFYUI_PATH`` to it, so that every ``find_comfyui()`` in the tests and in the commands they
start finds that one.
"""

import os
import sys
from pathlib import Path

import pytest

from streamlined_core.host.comfyui import find_comfyui, import_comfy

if not os.environ.get("COMFYUI_PATH"):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import hosts

    _roots, _why, _ = hosts.find_hosts()
    if _roots:
        os.environ["COMFYUI_PATH"] = str(_roots[0])
    HOSTS_WHY = f"the first of {len(_roots)} host(s) found, {_why}" if _roots else _why
else:
    HOSTS_WHY = None

COMFYUI, WHY = find_comfyui()
if COMFYUI is None and HOSTS_WHY is not None:
    WHY = f"no ComfyUI host found: {HOSTS_WHY}"


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
    import sys

    from streamlined_core.host.comfyui import PACK_ROOT, load_pack_nodes

    load_pack_nodes()  # raises, naming why, when ComfyUI cannot load it
    return sys.modules[str(PACK_ROOT).replace(".", "_x_")]


def pytest_report_header(config):
    if COMFYUI is None:
        return f"host: skipping: {WHY}"
    return f"host: {WHY}" + (f" ({HOSTS_WHY})" if HOSTS_WHY else "")


ADE_DIR = "custom_nodes/ComfyUI-AnimateDiff-Evolved"


@pytest.fixture(scope="session")
def ade(comfyui, pack):
    """AnimateDiff-Evolved, loaded by ComfyUI's own loader from the checkout's custom_nodes."""
    from pathlib import Path

    import nodes
    from streamlined_core.host.comfyui import load_custom_node

    path = Path(comfyui) / ADE_DIR
    if not (path / "__init__.py").exists():
        pytest.skip(f"AnimateDiff-Evolved is not in {path.parent} (the reference hosts carry commit 90fb133 there)")
    if "ADE_UseEvolvedSampling" not in nodes.NODE_CLASS_MAPPINGS:
        assert load_custom_node(path), "ComfyUI could not load AnimateDiff-Evolved"
    return nodes.NODE_CLASS_MAPPINGS


@pytest.fixture(scope="session")
def motion_models(ade, tmp_path_factory):
    """Motion model files generated here with ADE's own classes and seeded weights, found by ADE's loader.

    ``v2`` (mid block, 32 positions) runs ADE's per-frame norms; ``v1`` (no mid block, 24 positions)
    switches ADE to its cross-frame GroupNorm mode.
    """
    from streamlined_core.tools.selftest.comfy_graph import motion_model_files

    return motion_model_files(tmp_path_factory.mktemp("animatediff_models"))


@pytest.fixture(scope="session")
def sd15_patcher(comfyui):
    """A full-width SD1.5 UNetModel (what AnimateDiff motion modules fit), seeded, run at tiny latent sizes."""
    from streamlined_core.tools.selftest.comfy_graph import sd15_patcher

    return sd15_patcher()
