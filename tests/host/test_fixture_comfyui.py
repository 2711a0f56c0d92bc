"""The fixture model inside a real ComfyUI: the key map and configuration against ComfyUI's own model
and model detection, the converted model's forward against diffusers', ComfyUI's KSampler against the
diffusers sampling loop, the demo nodes' outputs and errors, and the CPU demo workflow run end to end.
"""

import asyncio
import inspect
import json
import logging
import re
import sys
from pathlib import Path

import pytest
import torch
from comfy_svd import calibration_folder, rehash_report
from workflow import api_prompt, object_info

from streamlined_core.fixture import comfy_keys, data
from streamlined_core.fixture import demo as fixture_demo
from streamlined_core.fixture import model as fixture_model
from streamlined_core.tools import configs

pytest.importorskip("diffusers")  # the reference side of every comparison

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = {"KSampler": ROOT / "example_workflows" / "streamline_demo_cpu.json",
             "StepRehashSampler": ROOT / "example_workflows" / "streamline_demo_cpu_step_rehash.json"}
TEMPORAL = ("time_stack", "time_mixer", "time_pos_embed")
# The conversion is checked in fp64, both sides, because ComfyUI's fp32 forward is itself less exact
# than diffusers' on trained weights: its spatial transformers hand their output on in channels-last
# layout, and torch's CPU GroupNorm loses accuracy on that layout when a group's mean dwarfs its
# spread (the fixture's time embedding adds ~20 to channels that vary by ~0.4). Measured on the
# shipped weights: one ResBlock norm 2.2e-4 from its fp64 value, the whole fp32 call 1.5e-4 from
# diffusers', while diffusers' fp32 call is 7.6e-7 from fp64. In fp64 the two sides differ only where
# ComfyUI's glue stays in fp32 (the timestep and the added time ids): measured 3e-8 for one call.
# ComfyUI's default ResBlock eps (1e-5, where the fixture has diffusers' 1e-6) makes a difference the
# forward test shows above CALL_TOL.
CALL_TOL = 1e-6
# Four Euler steps from sigma 700 with CFG, ComfyUI against diffusers, both U-Nets in fp64 and both
# sampling loops in fp32 as they are: they differ by fp32 rounding in the loops and by the Karras
# sigmas (ComfyUI evaluates the same formula in fp32, diffusers in fp64: up to ~4e-6 apart).
SAMPLE_TOL = 3e-5


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.fixture(scope="module")
def demo(pack):
    """The pack's demo node module, as ComfyUI loaded it."""
    return sys.modules[f"{pack.__name__}.nodes.demo"]


@pytest.fixture(scope="module")
def seeded_weights(tmp_path_factory):
    """A fixture state dict with seeded values, its time mixers drawn from [-2, 2] (a swapped blend shows)."""
    unet = configs.seed_weights_scaled(fixture_model.build_fixture_unet(), seed=3)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if name.endswith("mix_factor"):
                p.copy_(torch.rand(p.shape, generator=gen) * 4 - 2)
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("fixture_weights") / "seeded.safetensors"
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(path))
    return path


def extras(comfyui, *files):
    """Load stock comfy_extras node modules the way ComfyUI's start-up loads them.

    ComfyUI's main.py imports its ``utils`` package before ``nodes`` puts ``comfy/`` (with its
    ``utils.py``) first on ``sys.path``; some extras import ``server``, which needs that package.
    """
    import importlib

    import nodes

    if not hasattr(sys.modules.get("utils"), "__path__"):
        sys.modules.pop("utils", None)
        sys.path.insert(0, str(comfyui))
        try:
            importlib.import_module("utils.install_util")
        finally:
            sys.path.remove(str(comfyui))
    for name in files:
        loaded = nodes.load_custom_node(str(Path(comfyui) / "comfy_extras" / name), module_parent="comfy_extras")
        loaded = asyncio.run(loaded) if inspect.iscoroutine(loaded) else loaded
        assert loaded, name


# -- keys, configuration, norms ---------------------------------------------------------------------


def test_converted_weights_fit_comfyuis_svd_unet_and_its_model_detection(demo):
    import comfy.model_detection
    import comfy.utils

    patcher = demo.load_fixture_model()
    unet = patcher.model.diffusion_model
    comfy_state = unet.state_dict()
    diffusers_state = fixture_model.load_state_dict()
    converted = comfy_keys.diffusers_to_comfy(diffusers_state)
    assert set(converted) == set(comfy_state)
    for d, c in comfy_keys.key_map().items():
        assert diffusers_state[d].shape == comfy_state[c].shape, (d, c)
        assert torch.equal(comfy_state[c], diffusers_state[d].float()), (d, c)  # loaded, not left uninitialised

    config = comfy_keys.comfy_unet_config()
    detected = comfy.model_detection.detect_unet_config(converted, "")
    heads = {"num_heads", "num_head_channels"}
    assert detected == {k: v for k, v in config.items() if k not in heads}
    assert {k: patcher.model.model_config.unet_config[k] for k in heads} == {k: config[k] for k in heads}
    assert unet.input_blocks[1][1].transformer_blocks[0].attn1.heads == 1  # diffusers' heads (1, 2, 2, 2)
    assert unet.middle_block[1].transformer_blocks[0].attn1.heads == 2

    # The image U-Net's part agrees with ComfyUI's own diffusers map (which has SVD's ResBlocks one level up).
    spatial = {re.sub(r"(resnets\.\d+)\.", r"\1.spatial_res_block.", d): c
               for d, c in comfy.utils.unet_to_diffusers(config).items()}
    ours = comfy_keys.key_map()
    non_temporal = {d: c for d, c in ours.items() if not any(t in c for t in TEMPORAL)}
    assert non_temporal and all(spatial.get(d) == c for d, c in non_temporal.items())


def test_every_norm_has_the_eps_of_its_diffusers_module(demo):
    unet = demo.load_fixture_model().model.diffusion_model
    mapping = comfy_keys.key_map()
    reference = fixture_model.build_fixture_unet()
    checked = 0
    for name, module in reference.named_modules():
        if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            counterpart = unet.get_submodule(mapping[f"{name}.weight"][: -len(".weight")])
            assert isinstance(counterpart, type(module)), name
            assert counterpart.eps == module.eps, name
            checked += 1
    norms = [m for m in unet.modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))]
    assert checked == len(norms) > 0


# -- one U-Net call ---------------------------------------------------------------------------------


def comfy_call_inputs(base_model, x, first, embedding, ids):
    """Two clips' inputs as ComfyUI batches them: each clip's conds from SVD_img2vid.extra_conds (encode_adm
    for the ids, the first frame repeated per frame), processed for its frames, then concatenated."""
    b, t = x.shape[:2]
    per_clip = []
    for i in range(b):
        conds = base_model.extra_conds(
            noise=x[i], concat_latent_image=first[i:i + 1], cross_attn=embedding[i:i + 1], fps=data.FPS,
            motion_bucket_id=float(ids[i, 1]), augmentation_level=float(ids[i, 2]), device=torch.device("cpu"),
        )
        assert float(ids[i, 0]) == data.FPS - 1  # encode_adm takes fps and subtracts 1, as diffusers' pipeline
        per_clip.append({k: v.process_cond(t, area=None) for k, v in conds.items()})
    return {k: per_clip[0][k].concat([c[k] for c in per_clip[1:]]) for k in per_clip[0]}


@pytest.mark.parametrize("weights", ["shipped", "seeded"])
def test_comfyui_forward_equals_diffusers_forward(demo, seeded_weights, weights):
    path = None if weights == "shipped" else seeded_weights
    f64 = torch.float64
    reference = fixture_model.load_unet(path, dtype=f64)
    base = demo.load_fixture_model(path, dtype=f64).model
    assert base.get_dtype() == f64 and next(base.diffusion_model.parameters()).dtype == f64
    gen = torch.Generator().manual_seed(0)
    b, t, h, w = 2, 3, 32, 32
    x = (torch.randn(b, t, 4, h, w, generator=gen) * 2).to(f64)
    first = torch.randn(b, 4, h, w, generator=gen).to(f64)
    embedding = torch.randn(b, data.TOKENS, data.EMBED_DIM, generator=gen).to(f64)
    ids = torch.tensor([[data.FPS - 1, 100.0, 0.02], [data.FPS - 1, 30.0, 0.1]], dtype=f64)
    sigma = torch.tensor([3.0, 0.5], dtype=f64)
    cond = fixture_model.Conditioning(embedding, ids)
    kw = comfy_call_inputs(base, x, first, embedding, ids)
    assert kw["y"].shape == (b * t, 768) and kw["c_concat"].shape == (b * t, 4, h, w) and kw["num_video_frames"] == t

    c_in = (1 / (sigma**2 + 1).sqrt()).repeat_interleave(t).view(-1, 1, 1, 1)
    xc = torch.cat([x.flatten(0, 1) * c_in, kw["c_concat"]], dim=1)
    timestep = base.model_sampling.timestep(sigma.repeat_interleave(t)).float()  # as ComfyUI hands it on
    y = kw["y"].to(f64)  # as apply_model casts it

    def raw():
        return base.diffusion_model(xc, timestep, context=kw["c_crossattn"], y=y, num_video_frames=t)

    with torch.no_grad():
        want_raw = fixture_model.model_output(reference, x, sigma, first, cond)
        want = fixture_model.denoise(reference, x, sigma, first, cond)
        got_raw = raw().view(b, t, 4, h, w)
        got = base.apply_model(x.flatten(0, 1), sigma.repeat_interleave(t), **kw).view(b, t, 4, h, w)
    assert want_raw.std() > 0.1
    assert rel(got_raw, want_raw) <= CALL_TOL
    assert rel(got, want) <= CALL_TOL

    # The tolerance sees a real difference: ComfyUI's default ResBlock eps.
    norms = [m for n, m in base.diffusion_model.named_modules() if n.endswith(("in_layers.0", "out_layers.0"))]
    saved = [m.eps for m in norms]
    try:
        for m in norms:
            m.eps = 1e-5
        with torch.no_grad():
            wrong = rel(raw().view(b, t, 4, h, w), want_raw)
        assert wrong > CALL_TOL
    finally:
        for m, eps in zip(norms, saved):
            m.eps = eps


# -- sampling ---------------------------------------------------------------------------------------


def test_comfyui_karras_sigmas_are_diffusers_svd_sigmas_up_to_fp32_rounding(demo):
    import comfy.samplers

    sampling = demo.load_fixture_model().get_model_object("model_sampling")
    for steps in (4, 25):
        comfy_sigmas = comfy.samplers.calculate_sigmas(sampling, "karras", steps).double()
        diffusers_sigmas = fixture_model.karras_sigmas(steps).double()
        exact = fixture_model.rho_schedule(steps)
        assert comfy_sigmas.shape == diffusers_sigmas.shape == (steps + 1,) and comfy_sigmas[-1] == 0
        # both are Karras et al.'s rho=7 schedule over SVD's [0.002, 700]; ComfyUI evaluates it in fp32
        assert ((comfy_sigmas - exact).abs()[:-1] / exact[:-1]).max() < 1e-5
        assert ((diffusers_sigmas - exact).abs()[:-1] / exact[:-1]).max() < 1e-6
        other = comfy.samplers.calculate_sigmas(sampling, "normal", steps).double()
        assert ((other - exact).abs()[:-1] / exact[:-1]).max() > 1e-2  # the scheduler choice matters


def test_ksampler_on_the_demo_model_equals_the_diffusers_sampling_loop(demo):
    import comfy.sample
    from comfy_extras.nodes_video_model import VideoLinearCFGGuidance

    import nodes

    frames, steps, seed, level = 8, 4, 1234, 0.02
    model, positive, negative, latent, _ = demo.StreamlineDemoLoader().load(3, frames, level)
    model = demo.load_fixture_model(dtype=torch.float64)  # the demo's U-Net in fp64 (see CALL_TOL)
    (guided,) = VideoLinearCFGGuidance().patch(model, 1.0)
    (out,) = nodes.KSampler().sample(guided, seed, steps, 3.0, "euler", "karras", positive, negative, latent, denoise=1.0)

    clip = fixture_demo.demo_clip(3, frames, level)
    # Both sides condition on the same augmented first frame: the diffusers loop adds
    # time_ids[:, 2] * aug_noise to the clean frame, the node handed ComfyUI that frame.
    augmented = clip.first_frame + clip.time_ids[:, 2].view(-1, 1, 1, 1) * clip.aug_noise
    assert torch.equal(positive[0][1]["concat_latent_image"], augmented)
    assert not torch.equal(augmented, clip.first_frame)
    noise = comfy.sample.prepare_noise(latent["samples"], seed)  # what KSampler drew
    want = fixture_model.sample(
        fixture_model.load_unet(dtype=torch.float64), clip.first_frame,
        fixture_model.Conditioning(clip.embedding, clip.time_ids),
        steps=steps, frames=frames, min_guidance_scale=1.0, max_guidance_scale=3.0,
        noise=noise.unsqueeze(0), aug_noise=clip.aug_noise,
    )[0]
    got = out["samples"]
    assert got.shape == (frames, 4, 32, 32) and torch.isfinite(got).all() and want.std() > 0.1
    assert rel(got, want) <= SAMPLE_TOL


# -- the demo nodes ---------------------------------------------------------------------------------


def test_demo_loader_outputs_what_svd_img2vid_conditioning_builds(demo):
    model, positive, negative, latent, true_clip = demo.StreamlineDemoLoader().load(7, 10, 0.05)
    clip = fixture_demo.demo_clip(7, 10, 0.05)
    [[embedding, extra]] = positive
    [[zeros, extra_negative]] = negative
    assert torch.equal(embedding, clip.embedding) and embedding.shape == (1, data.TOKENS, data.EMBED_DIM)
    assert extra["fps"] == data.FPS and extra["augmentation_level"] == 0.05
    assert extra["motion_bucket_id"] == data.motion_bucket_id(clip.spec)
    assert extra["concat_latent_image"].shape == (1, 4, 32, 32)
    assert torch.equal(zeros, torch.zeros_like(embedding)) and not extra_negative["concat_latent_image"].any()
    assert {k: v for k, v in extra_negative.items() if k != "concat_latent_image"} == \
        {k: v for k, v in extra.items() if k != "concat_latent_image"}
    assert torch.equal(latent["samples"], torch.zeros(10, 4, 32, 32))
    assert true_clip.shape == (10, 32, 32, 3) and torch.equal(true_clip, clip.frames.permute(0, 2, 3, 1))
    base = model.model
    assert base.latent_format.scale_factor == 1.0
    assert torch.equal(base.process_latent_in(latent["samples"] + 1), latent["samples"] + 1)
    # ComfyUI's live preview (latent @ factors + bias into [-1, 1]) shows the true colours
    packed = data.pack(clip.frames)
    factors = torch.tensor(base.latent_format.latent_rgb_factors)
    preview = torch.einsum("tchw,cr->thwr", packed, factors) + torch.tensor(base.latent_format.latent_rgb_factors_bias)
    assert torch.allclose((preview + 1) / 2, true_clip, atol=1e-5)


def test_demo_frames_unpack_latents_exactly_and_clamp(demo):
    clip = fixture_demo.demo_clip(2, 8, 0.0)
    (frames,) = demo.StreamlineDemoFrames().frames({"samples": data.pack(clip.frames)})
    assert frames.shape == (8, 32, 32, 3) and torch.allclose(frames, clip.frames.permute(0, 2, 3, 1), atol=1e-6)
    (loud,) = demo.StreamlineDemoFrames().frames({"samples": 100 * torch.randn(2, 4, 32, 32)})
    assert loud.min() == 0 and loud.max() == 1


@pytest.mark.parametrize("kwargs, widget", [
    (dict(clip_seed=-1), "clip_seed"), (dict(clip_seed=fixture_demo.CLIPS), "clip_seed"),
    (dict(clip_seed=1.5), "clip_seed"), (dict(frames=7), "frames"), (dict(frames=17), "frames"),
    (dict(augmentation_level=-0.1), "augmentation_level"), (dict(augmentation_level=float("nan")), "augmentation_level"),
])
def test_demo_loader_names_the_bad_widget(demo, kwargs, widget):
    args = {"clip_seed": 0, "frames": 8, "augmentation_level": 0.02, **kwargs}
    with pytest.raises(ValueError, match=f"^{widget}="):
        demo.StreamlineDemoLoader().load(**args)


def test_demo_frames_names_its_input_for_a_latent_that_is_not_the_demo_models(demo):
    with pytest.raises(ValueError, match="^samples: .*got \\(2, 16, 32, 32\\)"):
        demo.StreamlineDemoFrames().frames({"samples": torch.zeros(2, 16, 32, 32)})


def test_a_missing_weights_file_is_named(demo, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        demo.load_fixture_model(tmp_path / "nothing.safetensors")


# -- the CPU demo workflow ----------------------------------------------------------------------------


def execute(prompt: dict) -> dict:
    """Run an API prompt through the node classes, each node once its inputs exist: id -> its outputs."""
    import nodes

    done: dict = {}
    while len(done) < len(prompt):
        ready = [i for i, n in prompt.items() if i not in done and all(
            v[0] in done for v in n["inputs"].values() if isinstance(v, list))]
        assert ready, "the workflow has a cycle"
        for i in ready:
            cls = nodes.NODE_CLASS_MAPPINGS[prompt[i]["class_type"]]
            kwargs = {k: done[v[0]][v[1]] if isinstance(v, list) else v for k, v in prompt[i]["inputs"].items()}
            done[i] = getattr(cls(), cls.FUNCTION)(**kwargs)
    return done


@pytest.mark.parametrize("sampler_type", list(WORKFLOWS))
def test_cpu_demo_workflow_runs_through_the_real_nodes(comfyui, pack, tmp_path, sampler_type, caplog):
    import execution
    import folder_paths

    import nodes

    extras(comfyui, "nodes_video_model.py", "nodes_images.py")
    workflow = json.loads(WORKFLOWS[sampler_type].read_text())
    types = {n["type"] for n in workflow["nodes"]}
    assert {"StreamlineDemoLoader", "StreamlineModel", "VRAMProfiler", "VideoLinearCFGGuidance", sampler_type,
            "StreamlineDemoFrames", "SaveAnimatedWEBP"} <= types
    used = {t: nodes.NODE_CLASS_MAPPINGS[t] for t in types if t in nodes.NODE_CLASS_MAPPINGS}
    prompt = api_prompt(workflow, object_info(used))
    [sampler] = [n for n in prompt.values() if n["class_type"] == sampler_type]
    assert (sampler["inputs"]["steps"], sampler["inputs"]["cfg"], sampler["inputs"]["sampler_name"],
            sampler["inputs"]["scheduler"]) == (25, 3.0, "euler", "karras")
    valid = asyncio.run(execution.validate_prompt("streamline-demo", prompt, None))
    assert valid[0], valid  # ComfyUI's own validation: types, ranges, combo values, an output node

    # Fewer steps and frames keep it fast; Streamline Model still plans and runs its sliced groups.
    [loader] = [n for n in prompt.values() if n["class_type"] == "StreamlineDemoLoader"]
    assert loader["inputs"]["frames"] == data.DEFAULT_FRAMES
    sampler["inputs"]["steps"] = 2 if sampler_type == "KSampler" else 3
    loader["inputs"]["frames"] = data.MIN_FRAMES
    previous = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(tmp_path))
    caplog.set_level(logging.INFO)
    profiler = sys.modules[f"{pack.__name__}.nodes.vram_profiler"]
    [label] = [n["inputs"]["label"] for n in prompt.values() if n["class_type"] == "VRAMProfiler"]
    recorded_before = sum(h["label"] == label for h in profiler.history())
    try:
        with calibration_folder(tmp_path / "calibrations"):
            outputs = execute(prompt)
            if sampler_type == "StepRehashSampler":  # the first run calibrated; the second uses the calibration
                assert "this run calibrates" in rehash_report(caplog)
                assert len(list((tmp_path / "calibrations").glob("*.json"))) == 1
                outputs = execute(prompt)
                text = rehash_report(caplog)
                assert "found for this model and setting" in text, text
                assert "2 of 3 steps ran the whole U-Net (0, 2), 1 reused the cached feature (1)" in text, text
    finally:
        folder_paths.set_output_directory(previous)
    # The VRAM Profiler in the demo recorded every run (so a first run fills the memory panel), step by step.
    runs = [h for h in profiler.history() if h["label"] == label]
    assert len(runs) - recorded_before == (1 if sampler_type == "KSampler" else 2), runs
    assert runs[0]["steps"] == sampler["inputs"]["steps"] and runs[0]["peak_bytes"] > 0, runs[0]
    frames_id = next(i for i, n in prompt.items() if n["class_type"] == "StreamlineDemoFrames")
    (frames,) = outputs[frames_id]
    n_frames = data.MIN_FRAMES
    assert frames.shape == (n_frames, 32, 32, 3) and 0 <= frames.min() and frames.max() <= 1 and frames.std() > 0
    saved = sorted(tmp_path.glob("*.webp"))
    assert len(saved) == (2 if sampler_type == "KSampler" else 4), saved  # the Step Rehash graph ran twice
    from PIL import Image

    for path in saved:
        with Image.open(path) as image:
            assert image.n_frames == n_frames and image.size == (256, 256)
