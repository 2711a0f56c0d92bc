"""Import layout and packaging: one copy of the engine per process, no pinned torch."""

import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]

LOAD_PACK_LIKE_COMFYUI = r"""
import importlib.util, sys
root = sys.argv[1]
spec = importlib.util.spec_from_file_location("Streamline", root + "/__init__.py", submodule_search_locations=[root])
pack = importlib.util.module_from_spec(spec)
sys.modules["Streamline"] = pack
spec.loader.exec_module(pack)
assert isinstance(pack.NODE_CLASS_MAPPINGS, dict) and isinstance(pack.NODE_DISPLAY_NAME_MAPPINGS, dict)
assert pack.WEB_DIRECTORY == "./web"
core = sorted(n for n, m in sys.modules.items() if n.endswith("streamlined_core"))
print(core)
assert core == ["Streamline.streamlined_core"], core
assert not any(n == "comfy" or n.startswith("comfy.") for n in sys.modules)
"""


def test_pack_imports_outside_comfyui_with_the_engine_under_one_name():
    result = subprocess.run([sys.executable, "-c", LOAD_PACK_LIKE_COMFYUI, str(ROOT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (ROOT / "web").is_dir()


def test_engine_never_imports_comfy_at_module_level():
    code = (
        "import importlib, pkgutil, sys, streamlined_core\n"
        "for m in pkgutil.walk_packages(streamlined_core.__path__, 'streamlined_core.'):\n"
        "    importlib.import_module(m.name)\n"
        "assert not [n for n in sys.modules if n == 'comfy' or n.startswith('comfy.')]\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_torch_is_never_pinned_for_users():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch" in deps
    reqs = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    assert not [r for r in reqs if r.startswith("torch")]


def test_console_command_is_installed():
    result = subprocess.run([Path(sys.executable).parent / "streamline", "simulate", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--markdown" in result.stdout
