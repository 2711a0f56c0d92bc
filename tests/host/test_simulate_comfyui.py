"""ComfyUI's own SVD UNetModel in the simulator: meta equals CPU, the floor, the reference figures."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from readme import generated_block

from streamlined_core.engine.arch import adapter_for, skip_floor_bytes, traced_skips
from streamlined_core.engine.memory import GIB
from streamlined_core.tools import configs
from streamlined_core.tools.sim.unet import MODULE_LEVEL, format_markdown, measure_call, simulate

SHAPES = [(2, 3, 64, 64), (1, 1, 32, 96), (2, 5, 48, 80)]


@pytest.fixture(scope="module")
def tiny(comfyui):
    cpu = configs.build_tiny_comfy_svd("cpu", torch.float32)
    configs.seed_weights(cpu, std=0.05)  # ComfyUI leaves weights uninitialised
    return cpu, configs.build_tiny_comfy_svd("meta", torch.float32)


def test_comfyui_unet_is_recognised(tiny):
    assert adapter_for(tiny[0]).name == "comfyui-unet"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}_t{}_{}x{}".format(*s))
def test_meta_simulation_equals_tracked_cpu_run_on_comfyui_svd(tiny, shape):
    cpu, meta = tiny
    batch, frames, h, w = shape
    cpu_peak, cpu_skips = measure_call(cpu, *configs.comfy_svd_inputs(cpu, batch, frames, h, w), trace=True)
    meta_peak, meta_skips = measure_call(meta, *configs.comfy_svd_inputs(meta, batch, frames, h, w), trace=True)
    assert cpu_peak == meta_peak > 0
    assert cpu_skips == meta_skips == skip_floor_bytes(meta, batch * frames, h // 8, w // 8, torch.float32)


def test_cpu_run_on_comfyui_svd_is_real(tiny):
    cpu, _ = tiny
    args, kwargs = configs.comfy_svd_inputs(cpu, 1, 3, 32, 32)
    with torch.no_grad(), traced_skips(cpu) as skips:
        out = cpu(*args, **kwargs)
    assert torch.isfinite(out).all() and out.std() > 0
    assert len(skips) == len(cpu.input_blocks)


@pytest.fixture(scope="module")
def all_rows(comfyui):
    """ComfyUI's rows, and diffusers' AnimateDiff to compare them with (tests/core/test_simulate.py
    checks every diffusers row against the reference table; each host needs only its own)."""
    return simulate(implementations_wanted=["comfyui"]) + [
        r for r in simulate(models=["animatediff"], implementations_wanted=["diffusers"]) if r.variant == "original"
    ]


def test_comfyui_svd_agrees_with_the_reference_table_within_5_percent(all_rows):
    rows = {(r.model, r.implementation, r.height, r.width, r.variant): r for r in all_rows}
    svd = rows[("svd", "comfyui", 576, 1024, "original")]
    assert svd.peak_bytes / GIB == pytest.approx(4.19, rel=0.05)
    assert svd.skip_floor_bytes / GIB == pytest.approx(0.78, rel=0.05)
    assert svd.weights_bytes / GIB == pytest.approx(2.84, rel=0.05)
    for r in all_rows:
        if r.implementation == "comfyui" and r.variant == "original":
            assert r.traced_skip_floor_bytes == r.skip_floor_bytes


def test_comfyui_streamlined_with_the_owned_loop_reaches_1_5x_the_skip_floor(all_rows):
    """SVD, SVD-XT, and SD1.5 with AnimateDiff-Evolved's motion modules (needs ADE in custom_nodes)."""
    rows = [r for r in all_rows if r.implementation == "comfyui" and r.variant.startswith("streamlined auto (")]
    models = ("svd", "svd-xt", "animatediff")
    assert {(r.model, r.height) for r in rows} == {(m, h) for m in models for h in (512, 576)}
    for r in rows:
        assert r.peak_bytes <= 1.5 * r.skip_floor_bytes, (r.model, r.height, r.x_floor)


def test_comfyui_animatediff_evolved_original_agrees_with_diffusers_animatediff(all_rows):
    rows = {(r.model, r.implementation, r.height, r.variant): r for r in all_rows}
    for h in (512, 576):
        comfy, diffusers = rows[("animatediff", "comfyui", h, "original")], rows[("animatediff", "diffusers", h, "original")]
        assert comfy.skip_floor_bytes == diffusers.skip_floor_bytes == comfy.traced_skip_floor_bytes
        assert comfy.weights_bytes == pytest.approx(diffusers.weights_bytes, rel=0.01)  # mm_sd_v15_v2's shape
        assert comfy.peak_bytes == pytest.approx(diffusers.peak_bytes, rel=0.05)


def test_the_module_level_fallback_is_reported_and_reaches_1_5x_the_skip_floor(all_rows):
    """What a ComfyUI version the stage loop does not recognise gets: the owned loop's target too."""
    rows = [r for r in all_rows if r.implementation == "comfyui" and "module-level" in r.variant]
    assert {(r.model, r.height) for r in rows} == {(m, h) for m in ("svd", "svd-xt", "animatediff") for h in (512, 576)}
    for r in rows:
        assert r.skip_floor_bytes < r.peak_bytes <= 1.5 * r.skip_floor_bytes, (r.model, r.height, r.x_floor)
        assert r.peak_bytes <= 0.35 * r.original_peak_bytes, (r.model, r.height, r.x_floor)


@pytest.mark.parametrize("shape", [(2, 3, 128, 192), (2, 3, 104, 136)], ids=lambda s: "b{}_t{}_{}x{}".format(*s))
def test_the_module_level_plan_reaches_1_5x_the_skip_floor_on_a_small_latent(comfyui, shape):
    """Full-width SVD, a small latent, on meta. Were the host to concatenate each output block's input
    whole (and hold it through the block), the least reachable peak would be about 2x the floor here."""
    unet = MODULE_LEVEL.apply(configs.build_comfy_svd("meta", torch.float32))
    try:
        peak, _ = measure_call(unet, *configs.comfy_svd_inputs(unet, *shape))
        plan = unet._streamline_handle.last_plan
    finally:
        MODULE_LEVEL.revert(unet)
    assert plan.predicted_peak_bytes == peak <= 1.5 * plan.skip_floor_bytes, plan.table()
    assert plan.sliced_groups


def test_readme_tables_comfyui_rows_are_the_ones_the_command_prints(all_rows):
    """The ComfyUI rows, in order; tests/core/test_simulate.py checks the diffusers rows, the header and
    the footnote of the same table."""
    ours = [line for line in generated_block("simulate").splitlines() if "| comfyui |" in line]
    printed = [line for line in format_markdown(all_rows).splitlines() if "| comfyui |" in line]
    assert len(printed) == 18 and ours == printed, "regenerate with: streamline simulate --markdown"


def test_simulate_json_prints_only_its_document_while_animatediff_evolved_logs(comfyui):
    """ADE logs to stdout when imported (no motion models found, for one); the command's stdout stays JSON.

    The command runs ComfyUI with its default attention (sub-quadratic on a CPU, which cannot run on
    meta), and its rows equal those simulated here under PyTorch attention.
    """
    if not (Path(comfyui) / "custom_nodes" / "ComfyUI-AnimateDiff-Evolved" / "__init__.py").is_file():
        pytest.skip(f"AnimateDiff-Evolved is not in {comfyui}/custom_nodes (docs/comfyui.md: commit 90fb133 there)")
    workload = dict(models=["animatediff"], implementations_wanted=["comfyui"], resolutions=[(64, 64)], frames=2)
    command = Path(sys.executable).with_name("streamline")
    argv = [str(command)] if command.is_file() else [sys.executable, "-m", "streamlined_core.tools.cli"]
    result = subprocess.run(
        argv + ["simulate", "--json", "--model", "animatediff", "--implementation", "comfyui", "--resolution", "64x64",
                "--frames", "2"],
        env={**os.environ, "COMFYUI_PATH": str(comfyui)}, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    rows = json.loads(result.stdout)
    assert "[3/3] AnimateDiff (comfyui) 64x64 2 frames" in result.stderr  # progress goes to stderr
    here = [r.as_dict() for r in simulate(**workload)]
    assert [r["variant"] for r in rows][0] == "original" and len(rows) == len(here) == 3
    timings = ("seconds", "planning_seconds")  # vary run to run
    assert [{k: v for k, v in r.items() if k not in timings} for r in rows] == [
        {k: v for k, v in r.items() if k not in timings} for r in here
    ]
    assert all((r["planning_seconds"] is None) == (r["variant"] == "original") for r in rows)
