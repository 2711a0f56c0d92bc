"""``streamline bench --rehash --comfyui``: ComfyUI's own EasyCache node and the Step Rehash Sampler on the
fixture model inside the host, each scored against KSampler at full compute from the same seed."""

import json
import math

import pytest
import torch

from streamlined_core.features.rehash import LAST_UP_BLOCK, interval_key_steps
from streamlined_core.tools.bench.rehash import DEEPCACHE_CUT
from streamlined_core.tools.bench.rehash_comfyui import EASYCACHE_NODE, bench_rehash_comfyui, format_markdown
from streamlined_core.tools.cli import main

STEPS = 8
# Given shares (each cut's reuse step as a share of a full forward), so that U-Net time can be checked exactly.
SHARES = {cut: 0.1 * (i + 1) for i, cut in enumerate(LAST_UP_BLOCK)}
NEVER, AT_ONCE = 0.0, 3.0  # EasyCache thresholds: never skips; skips whenever its rule may (the widget's maximum)


@pytest.fixture(scope="module")
def result(comfyui, pack):
    import os

    import folder_paths

    threads = torch.get_num_threads()
    r = bench_rehash_comfyui(comfyui, clips=1, steps=STEPS, threads=1, shares=SHARES, shares_from="given",
                             thresholds=(NEVER, AT_ONCE))
    assert torch.get_num_threads() == threads  # restored
    # The node's calibration folder is models/streamline_rehash again; the bench's own is gone.
    [folder], _ = folder_paths.folder_names_and_paths["streamline_rehash"]
    assert folder == os.path.join(folder_paths.models_dir, "streamline_rehash")
    return r


def _ratio(full: int, share: float) -> float:
    return (full + (STEPS - full) * share) / STEPS


def test_ksampler_at_full_compute_is_the_reference_and_reproducible(result):
    full = result.rows[0]
    assert (full.method, full.full_steps, full.error, full.split) == ("full", STEPS, None, "comfyui")
    import comfy.model_management as mm

    assert result.host.startswith("ComfyUI 0.3.") and result.shares_from == "given"
    assert result.device == str(mm.get_torch_device())
    # EasyCache that never skips runs KSampler again: identical to the reference, every step counted
    never = next(r for r in result.rows if r.setting.endswith(f"reuse_threshold {NEVER}"))
    assert never.error is None and never.full_steps == STEPS and never.psnr_db is None and never.centroid_px == 0


def test_the_step_rehash_samplers_defaults_reuse_steps_from_its_own_calibration(result):
    d = result.default()
    assert d.method == "rehash" and d.error is None and "up0.1.attn" in d.setting
    assert 0 < d.full_steps < STEPS and f"{d.full_steps} key steps (0" in d.setting  # counted == reported
    assert d.unet_time_ratio == pytest.approx(_ratio(d.full_steps, SHARES["up0.1.attn"]))
    assert math.isfinite(d.psnr_db) and d.psnr_db > 10 and d.centroid_px >= 0
    assert result.calibration.startswith("saved as ") and result.calibration.endswith(f"-{STEPS}steps-euler-karras.json")


def test_deepcaches_setting_runs_every_other_step_as_counted_at_the_middle_block(result):
    [row] = [r for r in result.rows if r.method == "deepcache"]
    assert row.error is None and DEEPCACHE_CUT in row.setting
    assert row.full_steps == len(interval_key_steps(STEPS, 2))
    assert row.unet_time_ratio == pytest.approx(_ratio(row.full_steps, SHARES[DEEPCACHE_CUT]))
    assert row.psnr_db is not None  # it reused steps, so it differs from full compute


def test_comfyuis_own_easycache_node_is_run_and_its_outcome_reported(result):
    never, at_once = [r for r in result.rows if r.method == EASYCACHE_NODE]
    assert never.setting.endswith(f"reuse_threshold {NEVER}") and at_once.setting.endswith(f"reuse_threshold {AT_ONCE}")
    # Where its rule skips, ComfyUI 0.3.52 to 0.3.64 raise on a model whose input carries concatenated channels
    # (SVD's first frame) with cond and uncond batched; a host that runs it must show skipped steps.
    if at_once.error is not None:
        assert at_once.error.startswith("RuntimeError") and "must match the size" in at_once.error
    else:
        assert at_once.full_steps < STEPS and at_once.unet_time_ratio == pytest.approx(at_once.full_steps / STEPS)


def test_the_table_shows_every_row_failures_and_the_targets(result):
    text = format_markdown(result)
    where = "CPU" if result.device == "cpu" else result.device
    assert text.count("\n| ") == len(result.rows) and f"| wall time ({where}) |" in text and result.host in text
    for row in result.rows:
        assert f"| {row.setting} |" in text
        if row.error is not None:
            assert f"raised {row.error}" in text
    checks = result.checks()
    ran = [r for r in result.rows if r.method == EASYCACHE_NODE and r.error is None]  # the never-skipping one
    assert all(ok is not None for ok in checks.values()) and ran
    for name, ok in checks.items():
        assert f"- {name}: {'holds' if ok else 'does not hold'}" in text


def test_the_command_prints_the_rows_inside_comfyui(comfyui, pack, capsys):
    assert main(["bench", "--rehash", "--comfyui", str(comfyui), "--comfyui-only", "--quick", "--config", "tiny",
                 "--clips", "1", "--steps", "6", "--threads", str(torch.get_num_threads()), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["split"] for r in rows} == {"comfyui"}
    assert [r["method"] for r in rows] == ["full", "rehash", "deepcache", EASYCACHE_NODE]
    assert sum(r["default"] for r in rows) == 1 and rows[1]["default"]
    for r in rows:
        assert {"method", "setting", "full_steps", "unet_time_ratio", "psnr_db", "default", "error"} <= set(r)
