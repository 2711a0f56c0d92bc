"""Streamline Model and the Step Rehash Sampler with AnimateDiff-Evolved on a real ComfyUI: a full-width
SD1.5 U-Net at a tiny latent size, motion models generated here and injected by ADE while it samples."""

import logging

import pytest
import torch
from comfy_svd import rehash_options, rehash_report
from contract import ComfyProbe, Coverage

from streamlined_core.engine.arch import comfy_unet

STEP_TOL = 1e-5  # every U-Net call, against the host's own _forward on the same inputs
LATENT_TOL = 1e-4  # final latents after two euler steps


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def node(pack):
    return pack.NODE_CLASS_MAPPINGS["StreamlineModel"]()


def masks():
    """Scale and effect multivals as masks varying over pixels: scale masks and effect masks get sliced."""
    ramp = torch.linspace(0.5, 1.5, 16)
    return {"scale_multival": (ramp[:, None] * ramp.flip(0)[None, :])[None],
            "effect_multival": 0.5 + 0.5 * ramp[None, :, None].expand(1, 16, 16)}


def evolved(ade, model, motion_model, context_length=None, multivals=False):
    """Load Motion Model -> Apply AnimateDiff Model -> (Context Options) -> Use Evolved Sampling."""
    (loaded,) = ade["ADE_LoadAnimateDiffModel"]().load_motion_model(motion_model)
    (m_models,) = ade["ADE_ApplyAnimateDiffModelSimple"]().apply_motion_model(loaded, **(masks() if multivals else {}))
    context = None
    if context_length:
        (context,) = ade["ADE_StandardStaticContextOptions"]().create_options(context_length, 2)
    (out,) = ade["ADE_UseEvolvedSampling"]().use_evolved_sampling(model, "autoselect", m_models, context)
    return out


def ksample(model, frames, h=8, w=8):
    import nodes

    gen = torch.Generator().manual_seed(1)
    positive = [[torch.randn(1, 2, 768, generator=gen), {}]]
    negative = [[torch.zeros(1, 2, 768), {}]]
    latent = {"samples": torch.zeros(frames, 4, h, w)}
    (out,) = nodes.KSampler().sample(model, 7, 2, 7.0, "euler", "normal", positive, negative, latent, denoise=1.0)
    return out["samples"]


def observe(unet):
    """What was active in a U-Net call: ADE's norm mode, its injected modules, masks in use."""
    modules = comfy_unet.comfy_ade.motion_modules(unet)
    return {
        "cross_frame": comfy_unet.comfy_ade.cross_frame_norms(),
        "motion_modules": len(modules),
        "masked": bool(modules) and all(
            isinstance(m.effect, torch.Tensor) and isinstance(m.temporal_transformer.raw_scale_masks[0], torch.Tensor)
            for m in modules),
    }


def probe(patched, coverage=None, **options):
    check = ComfyProbe(patched, coverage, **options)
    check.observe = observe
    return check


def assert_nothing_left(model):
    """Once ComfyUI unloads the patched clone (it keeps it loaded until another model needs the memory)."""
    import comfy.model_management

    assert torch.nn.GroupNorm.forward.__module__.startswith("torch")
    assert "memory_required" not in model.model.__dict__
    comfy.model_management.unload_all_models()
    unet = model.get_model_object("diffusion_model")
    assert getattr(unet._forward, "__func__", None) is type(unet)._forward
    assert not comfy_unet.comfy_ade.motion_modules(unet), "ADE ejects its motion modules after sampling"
    assert not [name for name, m in unet.named_modules() if "forward" in m.__dict__]


def free_u(model):
    """FreeU's output-block patch (V2 normalises by each item's spatial range: NaN at 1x1 latents)."""
    from comfy_extras.nodes_freelunch import FreeU

    return FreeU().patch(model, 1.3, 1.4, 0.9, 0.2)[0]


CASES = {
    # motion model, frames, context length, where Streamline Model goes, masks as multivals, FreeU, cut contract
    "v2_5_frames_freeu": ("v2", 5, None, "after", False, True, False),
    "v1_cross_frame_3_frames": ("v1", 3, None, "before", False, False, True),
    "v2_7_frames_context_windows_of_4_scale_and_effect_masks": ("v2", 7, 4, "after", True, False, False),
    "v2_2_frames_freeu_node_defaults": ("v2", 2, None, "after", False, True, True),
}
UPPER_BOUND = ("upper bound", 3, 0.0, "all")


def settings(pack, case):
    """The node's widgets: every one at its default in the defaults case, else every group at 3 slices."""
    if not case.endswith("node_defaults"):
        return UPPER_BOUND
    spec = pack.NODE_CLASS_MAPPINGS["StreamlineModel"].INPUT_TYPES()["required"]
    return tuple(spec[name][1]["default"] for name in ("slicing", "max_slices", "vram_budget_gb", "groups"))


@pytest.fixture(scope="module")
def runs(pack, ade, motion_models, sd15_patcher):
    """Every case once: the plain graph, the graph through Streamline Model under the contract probe."""
    coverage, results = Coverage(), {}
    for case, (version, frames, context, order, multivals, freeu, cuts) in CASES.items():
        base = free_u(sd15_patcher) if freeu else sd15_patcher
        reference = ksample(evolved(ade, base, motion_models[version], context, multivals), frames)
        if order == "after":
            (patched,) = node(pack).patch(evolved(ade, base, motion_models[version], context, multivals), *settings(pack, case))
        else:
            (streamlined,) = node(pack).patch(base, *settings(pack, case))
            patched = evolved(ade, streamlined, motion_models[version], context, multivals)
        check = probe(patched, coverage, cuts=cuts)
        out = ksample(patched, frames)
        assert_nothing_left(sd15_patcher)
        again = ksample(evolved(ade, base, motion_models[version], context, multivals), frames)
        results[case] = (reference, out, check, again)
    return results, coverage


@pytest.mark.parametrize("case", list(CASES))
def test_evolved_sampling_through_streamline_model_equals_the_plain_graph(runs, case):
    version, frames, context, order, multivals, freeu, cuts = CASES[case]
    reference, out, check, again = runs[0][case]
    assert torch.isfinite(reference).all() and reference.std() > 0, "the comparison would prove nothing"
    assert len(check.errors) >= 2 and max(check.errors) <= STEP_TOL
    assert rel(out, reference) <= LATENT_TOL
    assert min(c["motion_modules"] for c in check.calls) == (21 if version == "v2" else 20)  # 8 down, 12 up, a mid block in v2
    assert all(c["cross_frame"] for c in check.calls) == (version == "v1")
    assert all(c["masked"] for c in check.calls) == multivals, "scale and effect masks were in use in every call"
    assert torch.equal(again, reference)


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][6]])
def test_every_cut_with_motion_modules_runs_its_tail_and_shallow_path_to_the_same_output(runs, case):
    (report,) = runs[0][case][2].reports
    assert report.tails == report.cuts >= 50 and report.shallow >= 30


def test_every_group_of_the_animatediff_model_ran_sliced(runs):
    coverage = runs[1]
    assert coverage.seen, "no case ran"
    assert not coverage.never_sliced()
    assert sum(name.endswith(".motion") for name in coverage.sliced) >= 15  # those at 2x2 latents and up
    assert {"input_blocks", "middle_block", "output_blocks", "out", "motion"} <= coverage.kinds()


def test_a_run_that_raises_inside_a_cross_frame_slice_restores_everything(pack, ade, motion_models, sd15_patcher):
    import comfy.ops

    torch_forward = torch.nn.GroupNorm.__dict__["forward"]
    cast_forward = comfy.ops.disable_weight_init.GroupNorm.__dict__["forward_comfy_cast_weights"]
    (streamlined,) = node(pack).patch(sd15_patcher, "upper bound", 3, 0.0, "all")
    patched = evolved(ade, streamlined, motion_models["v1"])
    seen = []

    def interrupt(q, k, v, extra_options):
        seen.append(torch.nn.GroupNorm.forward.__qualname__)
        if len(seen) > 3:  # inside a sliced spatial transformer, under our norms
            raise RuntimeError("interrupted")
        return q, k, v

    patched.set_model_attn1_patch(interrupt)
    with pytest.raises(RuntimeError, match="interrupted"):
        ksample(patched, 3)
    assert any("norm_forward" in name for name in seen), "the interruption came inside a cross-frame slice"
    assert torch.nn.GroupNorm.__dict__["forward"] is torch_forward
    assert comfy.ops.disable_weight_init.GroupNorm.__dict__["forward_comfy_cast_weights"] is cast_forward
    assert_nothing_left(sd15_patcher)


@pytest.mark.parametrize("version, frames, freeu", [("v2", 5, False), ("v1", 3, True)], ids=["v2", "v1_cross_frame_freeu"])
def test_an_unrecognised_host_version_falls_back_to_module_level_slicing(pack, ade, motion_models, sd15_patcher, monkeypatch,
                                                                         version, frames, freeu):
    """Each output block's first layer concatenates per slice (under ADE's cross-frame norms too), after
    FreeU's output block patch has seen the feature and the skip."""
    import sys

    packs_comfy_unet = sys.modules[pack.NODE_CLASS_MAPPINGS["StreamlineModel"].__module__].comfy_unet
    monkeypatch.setattr(packs_comfy_unet, "KNOWN_FORWARDS", {})  # as on a ComfyUI version released after this pack
    handed = []
    fused = packs_comfy_unet._fused_first
    monkeypatch.setattr(packs_comfy_unet, "_fused_first", lambda runner, name, *rest: handed.append(name) or fused(runner, name, *rest))
    base = free_u(sd15_patcher) if freeu else sd15_patcher
    reference = ksample(evolved(ade, base, motion_models[version]), frames)
    (patched,) = node(pack).patch(evolved(ade, base, motion_models[version]), "upper bound", 3, 0.0, "all")
    assert patched.object_patches["diffusion_model._forward"].adapter.forward is packs_comfy_unet.module_level_forward
    coverage = Coverage()
    check = probe(patched, coverage, fallback_captures=True)
    out = ksample(patched, frames)
    assert max(check.errors) <= STEP_TOL and rel(out, reference) <= LATENT_TOL
    assert all(c["cross_frame"] for c in check.calls) == (version == "v1")
    assert {f"output_blocks.{i}.0" for i in range(12)} <= set(handed)
    assert {f"output_blocks.{i}.0" for i in range(12)} <= set(coverage.sliced)
    assert check.captures_compared >= 50  # the fallback's captures equal the stage loop's at every cut
    assert_nothing_left(sd15_patcher)


# -- Step Rehash Sampler with Use Evolved Sampling ------------------------------------------------

REHASH_STEPS = 3


def rehash_sample(pack, model, frames, **kw):
    import nodes

    gen = torch.Generator().manual_seed(1)
    positive = [[torch.randn(1, 2, 768, generator=gen), {}]]
    negative = [[torch.zeros(1, 2, 768), {}]]
    latent = {"samples": torch.zeros(frames, 4, 8, 8)}
    if not kw:
        (out,) = nodes.KSampler().sample(model, 7, REHASH_STEPS, 7.0, "euler", "normal", positive, negative, latent, 1.0)
        return out["samples"]
    (out,) = pack.NODE_CLASS_MAPPINGS["StepRehashSampler"]().sample(model, 7, REHASH_STEPS, 7.0, "euler", "normal", positive,
                                                                    negative, latent, 1.0, **rehash_options(**kw))
    return out["samples"]


@pytest.mark.parametrize("context", [None, 4], ids=["whole clip", "context windows of 4"])
def test_evolved_sampling_keeps_one_cache_per_window_and_guidance_branch(pack, ade, motion_models, sd15_patcher,
                                                                           context, caplog):
    import comfy.patcher_extension as pe

    caplog.set_level(logging.INFO)
    frames = 6
    model = evolved(ade, sd15_patcher, motion_models["v2"], context)
    reference = rehash_sample(pack, model, frames)
    assert torch.equal(rehash_sample(pack, model, frames, interval=1), reference), "every step key: the plain graph"
    context_module = __import__(f"{pack.__name__}.streamlined_core.engine.context", fromlist=["current"])
    windows, branches = set(), []

    def watch(executor, *args, **kwargs):
        options = args[5]
        sub = (options.get("ad_params") or {}).get("sub_idxs")
        windows.add(None if sub is None else tuple(sub))
        out = executor(*args, **kwargs)
        branches.append(set(context_module.current().rehash.controller.state.cache))
        return out

    watched = model.clone()
    watched.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "watch", watch)
    out = rehash_sample(pack, watched, frames, interval=2)
    text = rehash_report(caplog)
    assert "reused the cached feature (1)" in text and "no cached feature" not in text, text
    expected_windows = 1 if context is None else 2
    assert len(windows) == expected_windows, windows
    assert max(len(b) for b in branches) == 2 * expected_windows, "one cached feature per window and cond"
    assert torch.isfinite(out).all() and not torch.equal(out, reference)
