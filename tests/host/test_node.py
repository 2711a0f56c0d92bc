"""The Streamline Model node on a real ComfyUI: KSampler runs, equality, clean restoration."""

import re

import pytest
import torch
from comfy_svd import LATENT_TOL, build_svd, conditioning, ksample, rel
from contract import ComfyProbe, pack_module


@pytest.fixture(scope="module")
def svd_patcher(comfyui):
    return build_svd()


def checked(patcher):
    """Every streamlined U-Net call against the host's own ``_forward`` on the same inputs (the contract's probe)."""
    return ComfyProbe(patcher).errors




def node(pack):
    return pack.NODE_CLASS_MAPPINGS["StreamlineModel"]()




@pytest.mark.parametrize("frames", [1, 3, 5])
def test_ksampler_through_streamline_model_equals_the_plain_model(pack, svd_patcher, frames):
    reference = ksample(svd_patcher, frames)
    (patched,) = node(pack).patch(svd_patcher, "upper bound", 3, 0.0, "all")
    errors = checked(patched)
    out = ksample(patched, frames)
    assert torch.isfinite(reference).all() and reference.std() > 0
    assert len(errors) >= 2 and max(errors) <= 1e-5
    assert rel(out, reference) <= LATENT_TOL
    again = ksample(svd_patcher, frames)  # the original MODEL elsewhere in the graph is untouched
    assert torch.equal(again, reference)
    unet = svd_patcher.get_model_object("diffusion_model")
    assert getattr(unet._forward, "__func__", None) is type(unet)._forward  # ComfyUI restored the host's own


def test_auto_slicing_and_group_choices_are_exact(pack, svd_patcher):
    reference = ksample(svd_patcher)
    for slicing, groups in (("auto", "all"), ("upper bound", "spatial"), ("upper bound", "temporal")):
        (patched,) = node(pack).patch(svd_patcher, slicing, 4, 0.0, groups)
        errors = checked(patched)
        assert rel(ksample(patched), reference) <= LATENT_TOL
        assert errors and max(errors) <= 1e-5


def test_memory_estimate_is_lowered_during_the_run_and_restored_after(pack, svd_patcher):
    import comfy.patcher_extension as pe

    base = svd_patcher.model
    seen = {}

    def spy(executor, *args, **kwargs):
        seen["during"] = base.memory_required([6, 4, 8, 12])
        return executor(*args, **kwargs)

    host = base.memory_required([6, 4, 8, 12])
    (patched,) = node(pack).patch(svd_patcher, "auto", 8, 0.0, "all")
    patched.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, "spy", spy)  # runs inside ours
    ksample(patched)
    assert 0 < seen["during"] < host
    assert "memory_required" not in base.__dict__ and base.memory_required([6, 4, 8, 12]) == host


def test_memory_estimate_is_restored_after_a_run_that_raises_and_another_packs_estimate_is_kept(pack, svd_patcher):
    import comfy.patcher_extension as pe

    base = svd_patcher.model
    reference = ksample(svd_patcher)

    def other_pack_estimate(input_shape, cond_shapes={}):
        return 123.0

    base.memory_required = other_pack_estimate
    try:
        (patched,) = node(pack).patch(svd_patcher, "auto", 8, 0.0, "all")

        def boom(executor, *args, **kwargs):
            raise RuntimeError("interrupted")

        patched.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "boom", boom)
        with pytest.raises(RuntimeError, match="interrupted"):
            ksample(patched)
        assert base.__dict__["memory_required"] is other_pack_estimate
    finally:
        del base.memory_required
    assert torch.equal(ksample(svd_patcher), reference)  # the plain model samples as before the failed run


def test_a_second_streamline_model_replaces_the_first(pack, svd_patcher):
    import comfy.patcher_extension as pe

    (first,) = node(pack).patch(svd_patcher, "upper bound", 2, 0.0, "all")
    (second,) = node(pack).patch(first, "upper bound", 5, 0.0, "all")
    assert len(second.get_wrappers(pe.WrappersMP.OUTER_SAMPLE, "streamline")) == 1
    assert second.object_patches["diffusion_model._forward"].slices == 5
    errors = checked(second)
    assert rel(ksample(second), ksample(svd_patcher)) <= LATENT_TOL and max(errors) <= 1e-5


def test_unsupported_models_and_bad_inputs_get_clear_errors(pack, svd_patcher, comfyui):
    import comfy.model_patcher
    import comfy.supported_models

    flux = comfy.supported_models.Flux({
        "image_model": "flux", "in_channels": 16, "patch_size": 2, "out_channels": 16, "vec_in_dim": 32, "context_in_dim": 32,
        "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1, "axes_dim": [16, 8, 8],
        "theta": 10000, "qkv_bias": True, "guidance_embed": False})
    flux.set_inference_dtype(torch.float32, None)
    image_model = comfy.model_patcher.ModelPatcher(flux.get_model({}, "", device=torch.device("cpu")),
                                                   torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(ValueError, match="SVD and SVD-XT, and SD1.5 / SDXL models animated by AnimateDiff-Evolved.*Flux"):
        node(pack).patch(image_model, "auto", 8, 0.0, "all")
    for args, message in ((("sometimes", 8, 0.0, "all"), "slicing must be"), (("auto", 8, -1.0, "all"), "vram_budget_gb"),
                          (("auto", 8, 0.0, "pixels"), "groups must be"), (("upper bound", 0, 0.0, "all"), "max_slices")):
        with pytest.raises(ValueError, match=message):
            node(pack).patch(svd_patcher, *args)


def test_node_is_registered_with_a_display_name_and_a_tooltip_on_every_input(pack):
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["StreamlineModel"] == "Streamline Model"
    cls = pack.NODE_CLASS_MAPPINGS["StreamlineModel"]
    inputs = cls.INPUT_TYPES()["required"]
    assert list(inputs) == ["model", "slicing", "max_slices", "vram_budget_gb", "groups"]
    assert all(spec[1].get("tooltip") for spec in inputs.values())
    assert cls.RETURN_TYPES == ("MODEL",) and cls.DESCRIPTION


# -- works with: each against the same graph without Streamline Model ----------------------------


def ksample_advanced(model, frames=3, h=8, w=12):
    """KSamplerAdvanced running steps 1-3 of 3: split sampling, a sub-schedule."""
    import nodes

    positive, negative, latent = conditioning(frames, h, w)
    (out,) = nodes.KSamplerAdvanced().sample(model, "enable", 7, 3, 2.5, "euler", "karras", positive, negative, latent,
                                             1, 3, "disable")
    return out["samples"]


def custom_advanced(model, frames=3, h=8, w=12):
    """SamplerCustomAdvanced with RandomNoise, CFGGuider, KSamplerSelect and BasicScheduler."""
    from comfy_extras import nodes_custom_sampler as custom

    positive, negative, latent = conditioning(frames, h, w)
    (noise,) = custom.RandomNoise().get_noise(7)
    (guider,) = custom.CFGGuider().get_guider(model, positive, negative, 2.5)
    (sampler,) = custom.KSamplerSelect().get_sampler("euler")
    (sigmas,) = custom.BasicScheduler().get_sigmas(model, "karras", 2, 1.0)
    out, _denoised = custom.SamplerCustomAdvanced().sample(noise, guider, sampler, sigmas, latent)
    return out["samples"]


def linear_cfg(model):
    from comfy_extras.nodes_video_model import VideoLinearCFGGuidance

    return VideoLinearCFGGuidance().patch(model, 1.0)[0]


def lora(model):
    """A LoRA (low-rank on a temporal attention projection; full diffs on convs and on video-wide norms)."""
    import comfy.lora
    import comfy.sd

    gen = torch.Generator().manual_seed(5)
    state = model.model.state_dict()
    weights = {
        "input_blocks.1.0.in_layers.2": None, "input_blocks.1.0.time_stack.in_layers.0": None,
        "input_blocks.1.0.time_stack.out_layers.0": None, "output_blocks.2.0.time_stack.in_layers.0": None,
        "out.0": None, "middle_block.1.time_stack.0.attn1.to_q": 4,
    }
    lora_sd = {}
    for name, rank in weights.items():
        key = "lora_unet_" + name.replace(".", "_")
        weight = state[f"diffusion_model.{name}.weight"]
        if rank is None:
            lora_sd[f"{key}.diff"] = torch.randn(weight.shape, generator=gen) * 0.05
            lora_sd[f"{key}.diff_b"] = torch.randn(weight.shape[0], generator=gen) * 0.05
        else:
            lora_sd[f"{key}.lora_up.weight"] = torch.randn(weight.shape[0], rank, generator=gen) * 0.05
            lora_sd[f"{key}.lora_down.weight"] = torch.randn(rank, weight.shape[1], generator=gen) * 0.05
    patched, _clip = comfy.sd.load_lora_for_models(model, None, lora_sd, 1.0, 0)
    assert len(patched.patches) == len(weights) * 2 - 1, "every LoRA weight found its layer"
    return patched


RUNS = {
    "KSamplerAdvanced": (lambda m: m, ksample_advanced),
    "SamplerCustomAdvanced": (lambda m: m, custom_advanced),
    "VideoLinearCFGGuidance": (linear_cfg, ksample),
    "LoRA": (lora, ksample),
}


@pytest.mark.parametrize("run", list(RUNS))
def test_works_with(pack, svd_patcher, run):
    prepare, sample = RUNS[run]
    model = prepare(svd_patcher)
    reference = sample(model)
    (patched,) = node(pack).patch(model, "upper bound", 3, 0.0, "all")
    errors = checked(patched)
    out = sample(patched)
    assert torch.isfinite(reference).all() and reference.std() > 0
    assert errors and max(errors) <= 1e-5
    assert rel(out, reference) <= LATENT_TOL


def test_works_with_cast_weights_and_lora_on_them(pack):
    """Weights stored in fp16 and cast per layer at run time (ComfyUI's manual-cast ops, the path its
    low-VRAM loading takes), with a LoRA on top: norm affines come through ComfyUI's own casting."""
    model = lora(build_svd(torch.float16, torch.float32))
    unet = model.get_model_object("diffusion_model")
    assert unet.input_blocks[1][0].time_stack.in_layers[0].comfy_cast_weights
    reference = ksample(model)
    (patched,) = node(pack).patch(model, "upper bound", 3, 0.0, "all")
    errors = checked(patched)
    assert rel(ksample(patched), reference) <= LATENT_TOL and max(errors) <= 1e-5


def test_conds_run_separately_when_memory_is_short(pack, svd_patcher):
    """ComfyUI runs cond and uncond one at a time when its estimate says both do not fit."""
    import comfy.patcher_extension as pe

    base = svd_patcher.model
    base.memory_required = lambda input_shape, cond_shapes={}: 1e30
    try:
        reference = ksample(svd_patcher)
        (patched,) = node(pack).patch(svd_patcher, "upper bound", 3, 0.0, "all")
        errors = checked(patched)
        batches = []
        patched.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "batches",
                                  lambda ex, x, *a, **k: batches.append(x.shape[0]) or ex(x, *a, **k))
        out = ksample(patched)
    finally:
        del base.memory_required
    assert batches and set(batches) == {3}, "one cond per call"
    assert rel(out, reference) <= LATENT_TOL and max(errors) <= 1e-5


def test_an_unrecognised_host_version_falls_back_to_module_level_slicing(pack, svd_patcher, monkeypatch):
    import sys

    packs_comfy_unet = sys.modules[pack.NODE_CLASS_MAPPINGS["StreamlineModel"].__module__].comfy_unet
    monkeypatch.setattr(packs_comfy_unet, "KNOWN_FORWARDS", {})  # as on a ComfyUI version released after this pack
    reference = ksample(svd_patcher, 5)
    (patched,) = node(pack).patch(svd_patcher, "upper bound", 3, 0.0, "all")
    assert patched.object_patches["diffusion_model._forward"].adapter.forward is packs_comfy_unet.module_level_forward
    errors = checked(patched)
    assert rel(ksample(patched, 5), reference) <= LATENT_TOL and max(errors) <= 1e-5


# -- per-run context and budgets ----------------------------------------------------------------



def test_two_clones_of_one_streamlined_model_see_only_their_own_runs_events(pack, svd_patcher):
    import comfy.patcher_extension as pe

    context = pack_module(pack, "engine.context")
    (streamlined,) = node(pack).patch(svd_patcher, "upper bound", 3, 0.0, "all")
    engine = streamlined.object_patches["diffusion_model._forward"]
    assert not hasattr(engine, "listeners") and not hasattr(engine, "last_plan"), "the shared engine holds configuration only"
    events = {"a": [], "b": []}
    clones = {}
    for key in events:
        clone = streamlined.clone()

        def listening(executor, *args, key=key, **kwargs):
            with context.listen(events[key].append):
                return executor(*args, **kwargs)

        clone.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, "listen", listening)
        clones[key] = clone
    assert clones["a"].object_patches["diffusion_model._forward"] is clones["b"].object_patches["diffusion_model._forward"]
    ksample(clones["a"], frames=3)
    seen_by_a = len(events["a"])
    ksample(clones["b"], frames=5)
    assert seen_by_a > 0 and len(events["a"]) == seen_by_a, "b's run reached a's listener"
    items = lambda evs: {e.length for e in evs if type(e).__name__ == "GroupEvent" and e.axis == "frames"}  # noqa: E731
    assert items(events["a"]) == {6} and items(events["b"]) == {10}  # 2 conds x frames
    assert context.current() is None, "each run's context was left when it ended"


def calls_counted(patcher):
    import comfy.patcher_extension as pe

    calls = []
    patcher.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "count", lambda ex, *a, **k: calls.append(1) or ex(*a, **k))
    return calls


def test_a_typed_budget_this_latent_cannot_meet_is_refused_before_the_first_step(pack, svd_patcher):
    from streamlined_core.engine.memory import GIB, weights_bytes

    weights = weights_bytes(svd_patcher.get_model_object("diffusion_model"))
    budget_gb = weights * 1.001 / GIB  # holds the weights, not the least activation peak
    (patched,) = node(pack).patch(svd_patcher, "auto", 8, budget_gb, "all")
    calls = calls_counted(patched)
    with pytest.raises(ValueError, match=r"vram_budget_gb=[0-9.e-]+ cannot be met for this latent \(3 frames at 8x12.*"
                                         r"least budget that works is [0-9.]+ GiB"):
        ksample(patched, frames=3)
    assert not calls, "refused before the first step"
    assert "memory_required" not in svd_patcher.model.__dict__


def test_a_typed_budget_below_the_weights_is_refused_when_the_node_runs(pack, svd_patcher):
    with pytest.raises(ValueError, match=r"vram_budget_gb=[0-9.e-]+ does not even hold the weights"):
        node(pack).patch(svd_patcher, "auto", 8, 1e-6, "all")


def test_the_default_budget_on_a_card_too_small_plans_the_least_peak_and_warns_once(pack, svd_patcher, small_card, caplog):
    """vram_budget_gb=0 on a device where ComfyUI leaves less than the least reachable peak free (SVD-XT on a 4 GB
    card): the run goes ahead at the least-memory plan, with one warning, as ComfyUI streams weights."""
    import logging

    import comfy.model_management as mm

    reference = ksample(svd_patcher)
    (patched,) = node(pack).patch(svd_patcher, "auto", 8, 0.0, "all")
    errors = checked(patched)
    small_card(mm.extra_reserved_memory() + 1024)
    with caplog.at_level(logging.WARNING):
        out = ksample(patched)
    short = [r for r in caplog.records if "short of the least-memory plan" in r.getMessage()]
    assert len(short) == 1 and rel(out, reference) <= LATENT_TOL and max(errors) <= 1e-5


@pytest.fixture
def small_card(monkeypatch):
    """ComfyUI as on a card with ``free`` bytes free (its free-memory functions patched; the device is
    not the CPU for them): returns a setter."""
    import comfy.model_management as mm

    monkeypatch.setattr(mm, "is_device_cpu", lambda device: False)

    def set_free(free: int) -> None:
        monkeypatch.setattr(mm, "get_free_memory", lambda dev=None, torch_free_too=False: (free, free) if torch_free_too else free)

    return set_free


def test_the_default_budget_plans_for_what_comfyui_leaves_free_as_it_runs(pack, svd_patcher, small_card, caplog):
    """At vram_budget_gb=0 on a small card: each call planned for the host's free memory less its reserve, down
    to the least-memory plan; the log says so; the output is the plain model's."""
    import logging

    import comfy.model_management as mm

    from streamlined_core.engine.arch import comfy_unet

    frames = 3
    reference = ksample(svd_patcher, frames)
    (patched,) = node(pack).patch(svd_patcher, "auto", 8, 0.0, "all")
    engine = patched.object_patches["diffusion_model._forward"]
    arguments = comfy_unet.example_arguments(engine.unet, (2 * frames, 4, 8, 12), frames=frames)
    planner = engine.planner_for(**arguments)
    least, whole = planner.least_peak(), planner.unsliced_peak()
    reserve = mm.extra_reserved_memory()
    for activations, short in (((least + whole) // 2, False), (least // 2, True)):
        small_card(reserve + activations)
        caplog.clear()
        with caplog.at_level(logging.INFO):
            out = ksample(patched, frames)
        assert rel(out, reference) <= LATENT_TOL
        planned = [r.getMessage() for r in caplog.records if "of activations (ComfyUI's free memory at run time" in
                   r.getMessage()]
        assert planned, "the log names the budget and where it came from"
        warned = any("short of the least-memory plan" in r.getMessage() for r in caplog.records)
        assert warned == short
        assert all(": unsliced," not in line for line in planned), planned  # below the unsliced peak: sliced
        for line in planned:
            budget = _bytes(re.search(r"for ([\d.]+ [MG]iB) of activations", line).group(1))
            peak = _bytes(re.search(r"predicted activation peak ([\d.]+ [MG]iB)", line).group(1))
            assert peak <= max(budget, least) * 1.01 + 2e3, line  # printed to 0.001 MiB
            assert budget <= max(activations, least) + 2e3, line


def _bytes(text: str) -> float:
    number, unit = text.split()
    return float(number) * (1024**3 if unit == "GiB" else 1024**2)


def test_the_memory_estimate_on_a_device_is_the_plan_for_the_room_weights_leave(pack, svd_patcher, small_card):
    """Before loading, the host is told the smaller of its own estimate and the plan for the room every weight
    resident would leave: on a small card, the least-memory plan's peak."""
    import comfy.model_management as mm
    import comfy.patcher_extension as pe

    from streamlined_core.engine.arch import comfy_unet

    (patched,) = node(pack).patch(svd_patcher, "auto", 8, 0.0, "all")
    engine = patched.object_patches["diffusion_model._forward"]
    base = patched.model
    shape = [6, 4, 8, 12]
    arguments = comfy_unet.example_arguments(engine.unet, shape, frames=3)  # both conds: two videos of 3 frames
    least = engine.planner_for(**arguments).least_peak()
    host = base.memory_required(shape)
    seen = {}

    def spy(executor, *args, **kwargs):
        seen["estimate"] = base.memory_required(shape)
        return executor(*args, **kwargs)

    patched.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, "test-spy", spy)
    loaded = sum(m.model_loaded_memory() for m in mm.current_loaded_models if m.device == patched.load_device)
    small_card(mm.extra_reserved_memory() + patched.model_size() - loaded + least // 3)  # the room: a third of least
    ksample(patched, 3)
    assert seen["estimate"] == engine.planned_peak(arguments, 0) < host
    assert seen["estimate"] <= least * 1.05
    assert "memory_required" not in base.__dict__


def test_the_sampler_calls_and_the_estimate_for_them_share_one_plan_on_the_cpu(pack, svd_patcher, caplog):
    """On the CPU ComfyUI loads every weight whatever its estimate before loading: that estimate is left as the
    host's, unplanned, and the log says so once; the sampler's batching estimate (both conds: two videos of the
    latent's frames, the conditioning's context) and its calls plan once, on one planner."""
    import logging

    (patched,) = node(pack).patch(svd_patcher, "auto", 8, 0.0, "all")
    engine = patched.object_patches["diffusion_model._forward"]
    with caplog.at_level(logging.INFO):
        out = ksample(patched, 3)
    assert rel(out, ksample(svd_patcher, 3)) <= LATENT_TOL
    assert len(engine._planners) == 1, list(engine._planners)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("its estimate before loading is left as it is, unplanned" in m for m in messages) == 1
    assert sum(m.startswith("streamline: planned in") for m in messages) == 1, messages


def test_the_estimates_before_loading_on_a_device_plan_the_calls_shapes(pack, svd_patcher, small_card):
    """On a device the estimates before loading are planned (both conds, and one cond: ComfyUI's minimum), with the
    calls' shapes: the calls plan on the first one's planner, so two planners in all, not three."""
    import comfy.model_management as mm

    (patched,) = node(pack).patch(svd_patcher, "auto", 8, 0.0, "all")
    engine = patched.object_patches["diffusion_model._forward"]
    small_card(mm.extra_reserved_memory() + 64 * 1024**3)  # room for everything
    calls = []
    planner = engine._planner

    def counted(arguments):
        calls.append(arguments["x"].device.type)
        return planner(arguments)

    engine._planner = counted
    try:
        out = ksample(patched, 3)
    finally:
        del engine._planner
    assert rel(out, ksample(svd_patcher, 3)) <= LATENT_TOL
    assert "cpu" in calls and "meta" in calls  # the calls' own planner lookups and the estimates'
    shapes = sorted(dict(key[0])["x"][1] for key in engine._planners)
    channels = engine.unet.in_channels  # the latent and SVD's concatenated first frame
    assert shapes == [(3, channels, 8, 12), (6, channels, 8, 12)], shapes
