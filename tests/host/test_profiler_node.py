"""The VRAM Profiler node on a real ComfyUI: KSampler runs recorded per step and per group, with and
without Streamline Model, without changing what they measure, a bounded history, and the model
restored afterwards."""

import logging
import re

import pytest
import torch
from comfy_svd import build_svd, ksample


@pytest.fixture(scope="module")
def svd_patcher(comfyui):
    return build_svd()


def module(pack):
    import sys

    return sys.modules[pack.__name__ + ".nodes.vram_profiler"]


def profiled(pack, model, granularity="step", label="", snapshot_steps=0):
    (out,) = pack.NODE_CLASS_MAPPINGS["VRAMProfiler"]().patch(model, granularity, snapshot_steps, label)
    return out


def streamlined(pack, model):
    (out,) = pack.NODE_CLASS_MAPPINGS["StreamlineModel"]().patch(model, "auto", 8, 0.0, "all")  # planned
    return out


def latest(pack):
    history = module(pack)._HISTORY
    return list(history.values())[-1]


def assert_restored(pack, patcher):
    import sys

    import comfy.patcher_extension as pe

    context = sys.modules[pack.__name__ + ".streamlined_core.engine.context"]  # the pack's own copy of the core
    assert not patcher.get_wrappers(pe.WrappersMP.OUTER_SAMPLE, module(pack).KEY)
    unet = patcher.get_model_object("diffusion_model")
    hooked = [n for n, m in unet.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    assert not hooked, hooked
    assert "patches" not in patcher.model_options.get("transformer_options", {})
    assert context.current() is None


def test_a_run_is_recorded_per_step_with_its_peak_and_logged(pack, svd_patcher, caplog):
    caplog.set_level(logging.INFO)
    ksample(profiled(pack, svd_patcher, label="plain"), steps=3)
    doc = latest(pack)
    assert doc["schema"] == "streamline.timeline/1" and doc["label"] == "plain" and doc["source"] == "tracker"
    assert [s["step"] for s in doc["steps"]] == [0, 1, 2]
    assert all(s["peak"] > 0 and s["calls"] >= 1 and set(s["conds"]) == {"cond", "uncond"} for s in doc["steps"])
    assert doc["peak_bytes"] == max(s["peak"] for s in doc["steps"]) and doc["peak_step"] in (0, 1, 2)
    assert doc["weights_bytes"] > 0 and doc["weights_on_device_bytes"] == doc["weights_bytes"]
    assert not doc["partial_load"]
    assert doc["snapshot"] == {"why_not": "snapshot_steps is 0"}
    assert any("VRAM Profiler [plain]: peak" in r.getMessage() for r in caplog.records)
    assert_restored(pack, svd_patcher)


def test_recording_the_host_blocks_changes_neither_the_output_nor_the_peak(pack, svd_patcher):
    """Without Streamline, group granularity hooks the last layer of each host block for the call only:
    the sampled latents are bitwise equal and an outside tracker sees the same peak."""
    from streamlined_core.engine.memory import MemoryTracker

    with MemoryTracker() as alone:
        plain = ksample(svd_patcher)
    with MemoryTracker() as watched:
        recorded = ksample(profiled(pack, svd_patcher, "group"))
    assert torch.equal(plain, recorded)
    assert watched.peak_bytes == alone.peak_bytes
    doc = latest(pack)
    groups = [e["name"] for e in doc["events"] if e["kind"] == "group" and e["step"] == 0]
    unet = svd_patcher.get_model_object("diffusion_model")
    expected = ([f"input_blocks.{i}" for i in range(len(unet.input_blocks))] + ["middle_block"]
                + [f"output_blocks.{i}" for i in range(len(unet.output_blocks))] + ["out"])
    assert groups[: len(expected)] == expected
    assert max(e["peak"] for e in doc["events"] if e["kind"] == "group") <= doc["peak_bytes"]
    assert_restored(pack, svd_patcher)


@pytest.mark.parametrize("order", ["profiler after Streamline", "profiler before Streamline"])
def test_streamlined_groups_are_recorded_with_the_plans_prediction(pack, svd_patcher, order):
    if order == "profiler after Streamline":
        model = profiled(pack, streamlined(pack, svd_patcher), "group", label="streamlined")
    else:
        model = streamlined(pack, profiled(pack, svd_patcher, "group", label="streamlined"))
    out = ksample(model)
    assert torch.isfinite(out).all()
    doc = latest(pack)
    groups = [e for e in doc["events"] if e["kind"] == "group"]
    host_block = re.compile(r"^((input|output)_blocks\.\d+|middle_block)$")  # Streamline names its head "out" too
    assert groups and not [e["name"] for e in groups if host_block.match(e["name"])], "Streamline's groups, not the host's blocks"
    assert all(e["predicted"] is not None for e in groups)
    assert doc["streamline"]["predicted_peak_bytes"] > 0 and doc["predicted_peak_bytes"] > 0
    assert_restored(pack, svd_patcher)


def test_the_history_stays_bounded_and_keeps_the_newest(pack, svd_patcher):
    from streamlined_core.features.profiler import Timeline

    mod = module(pack)
    ksample(profiled(pack, svd_patcher), steps=1)
    template = Timeline.from_json(latest(pack))
    for i in range(mod.HISTORY_LIMIT + 5):
        template.prompt_id = f"bounded-{i}"
        mod.publish(template)
    assert len(mod._HISTORY) == mod.HISTORY_LIMIT
    ids = [h["prompt_id"] for h in mod.history()]
    assert ids[0] == f"bounded-{mod.HISTORY_LIMIT + 4}" and "bounded-0" not in ids


def test_a_run_that_raises_is_still_recorded_and_restores_everything(pack, svd_patcher):
    import comfy.patcher_extension as pe

    model = profiled(pack, svd_patcher, label="raises")

    def boom(executor, *args, **kwargs):
        raise RuntimeError("interrupted inside the U-Net")

    model.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "test.boom", boom)
    before = len(module(pack)._HISTORY)
    with pytest.raises(RuntimeError, match="interrupted"):
        ksample(model)
    assert latest(pack)["label"] == "raises" and len(module(pack)._HISTORY) >= min(before + 1, module(pack).HISTORY_LIMIT)
    assert_restored(pack, svd_patcher)


def test_bad_inputs_get_clear_errors(pack, svd_patcher, comfyui):
    node = pack.NODE_CLASS_MAPPINGS["VRAMProfiler"]()
    with pytest.raises(ValueError, match="granularity must be one of step, group"):
        node.patch(svd_patcher, "layer", 0, "")
    with pytest.raises(ValueError, match="snapshot_steps must be 0 or a positive integer"):
        node.patch(svd_patcher, "step", -1, "")
    info = pack.NODE_CLASS_MAPPINGS["VRAMProfiler"].INPUT_TYPES()["required"]
    assert all(spec[1].get("tooltip") for spec in info.values())
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["VRAMProfiler"] == "VRAM Profiler"


def test_an_sd15_image_model_is_recorded_by_its_blocks(pack, sd15_patcher):
    """Any UNetModel, not only video ones: SD1.5 images at group granularity, the host's blocks as groups."""
    import nodes

    gen = torch.Generator().manual_seed(3)
    positive = [[torch.randn(1, 2, 768, generator=gen), {}]]
    negative = [[torch.zeros(1, 2, 768), {}]]
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    model = profiled(pack, sd15_patcher, "group", label="sd15")
    nodes.KSampler().sample(model, 1, 2, 7.0, "euler", "normal", positive, negative, latent, denoise=1.0)
    doc = latest(pack)
    assert doc["label"] == "sd15" and len(doc["steps"]) == 2
    names = {e["name"] for e in doc["events"] if e["kind"] == "group"}
    assert {"input_blocks.0", "middle_block", "output_blocks.11"} <= names
    assert_restored(pack, sd15_patcher)


def test_a_wan_model_is_recorded_by_its_blocks_and_by_streamlines_groups(pack):
    """Wan: without Streamline, the host's blocks and head are the groups; streamlined, each block's two groups
    (its keys and values, then the rest by query slices), each with the plan's prediction."""
    from streamlined_core.tools.selftest.comfy_graph import build_wan, ksample_wan

    model = build_wan("wan2.1-t2v")
    plain = ksample_wan(model)
    recorded = ksample_wan(profiled(pack, model, "group", label="wan"))
    assert torch.equal(plain, recorded)
    names = list(dict.fromkeys(e["name"] for e in latest(pack)["events"] if e["kind"] == "group"))
    assert names == ["blocks.0", "blocks.1", "head"], names
    assert_restored(pack, model)
    ksample_wan(profiled(pack, streamlined(pack, model), "group", label="wan streamlined"))
    doc = latest(pack)
    groups = [e for e in doc["events"] if e["kind"] == "group"]
    assert list(dict.fromkeys(e["name"] for e in groups)) == ["blocks.0.self_attn.kv", "blocks.0",
                                                              "blocks.1.self_attn.kv", "blocks.1"]
    assert all(e["predicted"] is not None for e in groups) and doc["predicted_peak_bytes"] > 0
    assert_restored(pack, model)
