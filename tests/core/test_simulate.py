"""The simulator: meta runs equal real CPU runs, the skip floor is right, full-size figures hold."""

import pytest
import torch
from readme import generated_block

from streamlined_core.engine.arch import adapter_for, skip_floor_bytes, traced_skips
from streamlined_core.engine.memory import GIB
from streamlined_core.tools import configs
from streamlined_core.tools.sim.unet import format_markdown, measure_call, simulate

TINY = {
    "svd": (configs.build_tiny_diffusers_svd, configs.diffusers_svd_inputs),
    "animatediff": (configs.build_tiny_diffusers_animatediff, configs.diffusers_animatediff_inputs),
}
# (batch, frames, height, width) in pixels: odd frame counts, one frame, non-square latents.
SHAPES = [(2, 3, 64, 64), (1, 1, 32, 96), (2, 5, 48, 80)]


def _seeded(model):
    return configs.seed_weights(model, std=0.05)


@pytest.fixture(scope="module")
def tiny_models():
    models = {}
    for name, (build, _) in TINY.items():
        models[name] = {"cpu": _seeded(build("cpu", torch.float32)), "meta": build("meta", torch.float32)}
    return models


@pytest.mark.parametrize("name", list(TINY))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}_t{}_{}x{}".format(*s))
def test_meta_simulation_equals_tracked_cpu_run(tiny_models, name, shape):
    batch, frames, h, w = shape
    inputs = TINY[name][1]
    torch.manual_seed(0)
    cpu_peak, cpu_skips = measure_call(tiny_models[name]["cpu"], *inputs(tiny_models[name]["cpu"], batch, frames, h, w), trace=True)
    meta_peak, meta_skips = measure_call(tiny_models[name]["meta"], *inputs(tiny_models[name]["meta"], batch, frames, h, w), trace=True)
    assert cpu_peak == meta_peak
    assert cpu_skips == meta_skips
    assert cpu_peak > 0


@pytest.mark.parametrize("name", list(TINY))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}_t{}_{}x{}".format(*s))
def test_analytic_skip_floor_equals_the_traced_skip_tensors(tiny_models, name, shape):
    batch, frames, h, w = shape
    model = tiny_models[name]["meta"]
    args, kwargs = TINY[name][1](model, batch, frames, h, w)
    with traced_skips(model) as skips:
        model(*args, **kwargs)
    assert len(skips) == len(adapter_for(model).unet.skip_layout(model, h // 8, w // 8))
    assert sum(skips.values()) == skip_floor_bytes(model, batch * frames, h // 8, w // 8, torch.float32)


def test_cpu_run_output_is_real_and_finite(tiny_models):
    model = tiny_models["svd"]["cpu"]
    args, kwargs = configs.diffusers_svd_inputs(model, 1, 3, 32, 32)
    with torch.no_grad():
        out = model(*args, **kwargs)[0]
    assert torch.isfinite(out).all() and out.std() > 0


# -- full size, against the reference figures (docs/benchmarks.md) ------------------------------

# (model, height, width, variant) -> GiB: the reference figures docs/benchmarks.md lists.
REFERENCE_PEAK_GIB = {
    ("svd", 576, 1024, "original"): 4.34,
    ("svd-xt", 576, 1024, "original"): 7.73,
    ("animatediff", 576, 1024, "original"): 4.57,
    ("svd", 512, 512, "original"): 1.93,
    ("svd-xt", 512, 512, "original"): 3.43,
    ("animatediff", 512, 512, "original"): 2.03,
    ("svd", 576, 1024, "diffusers forward chunking"): 2.50,
    ("svd-xt", 576, 1024, "diffusers forward chunking"): 4.43,
    ("animatediff", 576, 1024, "diffusers FreeNoise split (default)"): 2.90,
    ("animatediff", 576, 1024, "diffusers FreeNoise split temporal_split_size=1"): 1.76,
}
REFERENCE_FLOOR_GIB = {
    ("svd", 576, 1024): 0.78, ("svd-xt", 576, 1024): 1.39, ("animatediff", 576, 1024): 0.89,
    ("svd", 512, 512): 0.35, ("svd-xt", 512, 512): 0.62, ("animatediff", 512, 512): 0.40,
}
REFERENCE_WEIGHTS_GIB = {"svd": 2.84, "svd-xt": 2.84, "animatediff": 2.45}


@pytest.fixture(scope="module")
def full_size_rows():
    return simulate(implementations_wanted=["diffusers"])


def test_full_size_figures_agree_with_the_reference_table_within_5_percent(full_size_rows):
    rows = {(r.model, r.height, r.width, r.variant): r for r in full_size_rows}
    assert set(REFERENCE_PEAK_GIB) <= set(rows)
    for key, ref in REFERENCE_PEAK_GIB.items():
        assert rows[key].peak_bytes / GIB == pytest.approx(ref, rel=0.05), key
    for (model, h, w), ref in REFERENCE_FLOOR_GIB.items():
        assert rows[(model, h, w, "original")].skip_floor_bytes / GIB == pytest.approx(ref, rel=0.05)
    for r in full_size_rows:
        assert r.weights_bytes / GIB == pytest.approx(REFERENCE_WEIGHTS_GIB[r.model], rel=0.05)


def test_readme_tables_diffusers_rows_header_and_footnote_are_the_ones_the_command_prints(full_size_rows):
    """tests/host/test_simulate_comfyui.py checks the table's ComfyUI rows against each host."""
    ours, printed = generated_block("simulate").splitlines(), format_markdown(full_size_rows).splitlines()
    assert ours[:2] == printed[:2] and ours[-2:] == printed[-2:], "regenerate with: streamline simulate --markdown"
    assert len(ours) == 2 + 20 + 18 + 2  # 18 ComfyUI rows, checked by the host suite
    assert len(printed) == 2 + 20 + 2
    assert [line for line in ours if "| diffusers |" in line] == printed[2:-2], "regenerate with: streamline simulate --markdown"


def test_full_size_analytic_floor_is_checked_against_the_traced_run(full_size_rows):
    originals = [r for r in full_size_rows if r.variant == "original"]
    assert len(originals) == 6
    for r in originals:
        assert r.traced_skip_floor_bytes == r.skip_floor_bytes
    for r in full_size_rows:
        assert r.original_peak_bytes >= r.peak_bytes > r.skip_floor_bytes


def test_streamlined_rows_reach_the_target_of_1_5x_the_skip_floor(full_size_rows):
    streamlined = [r for r in full_size_rows if r.variant.startswith("streamlined auto (")]
    assert {(r.model, r.height) for r in streamlined} == {(m, h) for m in ("svd", "svd-xt", "animatediff") for h in (512, 576)}
    for r in streamlined:
        assert r.peak_bytes <= 1.5 * r.skip_floor_bytes, (r.model, r.height, r.x_floor)
        assert r.peak_bytes < 0.35 * r.original_peak_bytes
