"""The pack loads in a real ComfyUI, from outside its folder, with the engine under one name."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _custom_nodes_dir(tmp_path: Path) -> Path:
    nodes = tmp_path / "custom_nodes"
    nodes.mkdir()
    (nodes / "Streamline").symlink_to(ROOT, target_is_directory=True)
    return nodes


def test_comfyui_starts_with_the_pack_loaded_from_outside(comfyui, tmp_path):
    nodes = _custom_nodes_dir(tmp_path)
    config = tmp_path / "extra_model_paths.yaml"
    config.write_text(f"streamline:\n  base_path: {tmp_path}\n  custom_nodes: custom_nodes\n")
    result = subprocess.run(
        [sys.executable, "main.py", "--cpu", "--quick-test-for-ci", "--extra-model-paths-config", str(config),
         "--base-directory", str(tmp_path)],
        cwd=comfyui, capture_output=True, text=True, timeout=600,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "IMPORT FAILED" not in log, log[-4000:]
    loaded = [line for line in log.splitlines() if "seconds" in line and line.rstrip().endswith("Streamline")]
    assert loaded and str(nodes) in loaded[0], log[-4000:]
    assert "Unable to parse pyproject.toml" not in log


LOAD_WITH_COMFYUIS_LOADER = r"""
import asyncio, inspect, sys
comfy_root, pack = sys.argv[1], sys.argv[2]
sys.path.insert(0, comfy_root)
from comfy.cli_args import args
args.cpu = True
import nodes
ok = nodes.load_custom_node(pack)
ok = asyncio.run(ok) if inspect.iscoroutine(ok) else ok
assert ok, "load_custom_node failed"
names = sorted(n for n in sys.modules if n == "streamlined_core" or n.endswith(".streamlined_core"))
print(names)
assert len(names) == 1 and names[0] != "streamlined_core", names
assert names[0].endswith("Streamline.streamlined_core"), names
ext = [k for k, v in nodes.EXTENSION_WEB_DIRS.items() if v.startswith(pack)]
assert ext, nodes.EXTENSION_WEB_DIRS
"""


def test_comfyuis_own_loader_holds_the_engine_under_one_module_name(comfyui, tmp_path):
    pack = _custom_nodes_dir(tmp_path) / "Streamline"
    result = subprocess.run(
        [sys.executable, "-c", LOAD_WITH_COMFYUIS_LOADER, str(comfyui), str(pack)],
        cwd=comfyui, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
