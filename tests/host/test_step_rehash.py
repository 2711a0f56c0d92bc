"""The Step Rehash Sampler and Guider on a real ComfyUI: KSampler runs on a tiny SVD, against plain sampling."""

import logging

import pytest
import torch
from comfy_svd import LATENT_TOL, build_svd, calibration_folder, conditioning, ksample, rehash_options, rehash_report, rel

from streamlined_core.tools.selftest.comfy_graph import controlnet

STEPS = 5


@pytest.fixture(scope="module")
def svd(comfyui):
    return build_svd()


@pytest.fixture
def folder(pack, tmp_path):
    with calibration_folder(tmp_path):
        yield tmp_path


options = rehash_options
report = rehash_report


def rehash_sample(pack, model, sampler="euler", steps=STEPS, frames=3, h=8, w=12, **kw):
    positive, negative, latent = conditioning(frames, h, w)
    node = pack.NODE_CLASS_MAPPINGS["StepRehashSampler"]()
    (out,) = node.sample(model, 7, steps, 2.5, sampler, "karras", positive, negative, latent, 1.0, **options(**kw))
    return out["samples"]


def plain_sample(model, sampler="euler", steps=STEPS):
    return ksample(model, steps=steps, sampler=sampler)


def test_every_step_key_equals_the_plain_ksampler_bit_for_bit(pack, svd, caplog):
    caplog.set_level(logging.INFO)
    reference = plain_sample(svd)
    out = rehash_sample(pack, svd, interval=1)
    assert torch.equal(out, reference)
    assert "5 of 5 steps ran the whole U-Net" in report(caplog)


def test_reuse_steps_run_and_are_reported_and_the_model_is_left_as_it_was(pack, svd, caplog):
    caplog.set_level(logging.INFO)
    patches = dict(svd.object_patches)
    wrappers = {k: dict(v) for k, v in svd.wrappers.items()}
    reference = plain_sample(svd)
    out = rehash_sample(pack, svd, interval=2)
    text = report(caplog)
    assert "3 of 5 steps ran the whole U-Net (0, 2, 4), 2 reused the cached feature (1, 3)" in text
    assert "2 of 5 U-Net calls ran only the shallow path" in text  # cond and uncond batched: one call a step
    assert torch.isfinite(out).all() and not torch.equal(out, reference)
    assert rel(out, reference) < 0.5, "a reuse step is an approximation of the full step, not noise"
    assert svd.object_patches == patches and {k: dict(v) for k, v in svd.wrappers.items()} == wrappers
    assert torch.equal(plain_sample(svd), reference), "the MODEL that came in samples as before"


def test_cond_and_uncond_batched_at_key_steps_and_apart_at_reuse_steps_share_the_cache(pack, svd):
    """ComfyUI batches cond and uncond when its estimate lets it; force apart on some steps only."""
    import comfy.patcher_extension as pe

    base = svd.model
    state = {"apart": False}
    host = base.memory_required
    base.memory_required = lambda input_shape, cond_shapes={}: 1e30 if state["apart"] else host(input_shape, cond_shapes)
    try:
        batched = rehash_sample(pack, svd, interval=2)
        for apart_on in ("reuse", "key"):
            model = svd.clone()
            rows = []

            def flip(executor, *args, apart_on=apart_on, **kwargs):
                callback = args[5]

                def on_step(i, *rest):
                    state["apart"] = ((i + 1) % 2 == 1) == (apart_on == "reuse")
                    return callback(i, *rest)
                state["apart"] = apart_on == "key"
                return executor(*args[:5], on_step, *args[6:], **kwargs)

            model.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, "flip", flip)
            model.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "rows",
                                       lambda ex, x, *a, **k: rows.append(x.shape[0]) or ex(x, *a, **k))
            out = rehash_sample(pack, model, interval=2)
            assert set(rows) == {3, 6}, f"some calls batched both conds and some ran one ({apart_on} steps apart)"
            assert rel(out, batched) <= 1e-5
    finally:
        del base.memory_required
        state["apart"] = False


def test_uncond_first_or_cond_first_batches_give_the_same_result(pack, svd):
    """ComfyUI batches uncond first; a pack that lists the conds the other way round puts cond first."""
    import comfy.patcher_extension as pe

    def run(reverse):
        model, firsts, positive = svd.clone(), [], set()

        def conds_order(ex, m, conds, *a):
            positive.add(conds[0][0]["uuid"])  # ComfyUI lists the positive conds first
            return ex(m, conds[::-1], *a)[::-1] if reverse else ex(m, conds, *a)

        model.add_wrapper_with_key(pe.WrappersMP.CALC_COND_BATCH, "order", conds_order)
        model.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "order", lambda ex, *a, **k: firsts.append(
            a[5]["uuids"][0]) or ex(*a, **k))
        out = rehash_sample(pack, model, interval=2)
        (uuid,) = positive
        return out, {f == uuid for f in firsts}

    reference, usual = run(False)
    out, swapped = run(True)
    assert usual == {False} and swapped == {True}, "uncond's rows first, then cond's rows first"
    assert rel(out, reference) <= 1e-5


CALLS_PER_STEP = {"heun": [2, 2, 2, 2, 1], "dpm_2": [2, 2, 2, 2, 1], "dpmpp_2s_ancestral": [2, 2, 2, 2, 1],
                  "uni_pc": [1, 1, 1, 1, 1]}  # the last step's later evaluation is skipped at sigma 0


@pytest.mark.parametrize("sampler", list(CALLS_PER_STEP))
def test_multi_evaluation_and_multistep_samplers_count_sampler_steps(pack, svd, sampler, caplog):
    """k-diffusion calls back after a step's first model call: the later ones (heun's at the next step's
    sigma) still belong to that step."""
    import comfy.patcher_extension as pe

    caplog.set_level(logging.INFO)
    context = __import__(f"{pack.__name__}.streamlined_core.engine.context", fromlist=["current"])
    reference = plain_sample(svd, sampler)
    assert torch.equal(rehash_sample(pack, svd, sampler, interval=1), reference)
    steps, model = [], svd.clone()
    model.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "steps", lambda ex, *a, **k: (
        ex(*a, **k), steps.append(context.current().rehash.controller.state.records[-1].step))[0])
    out = rehash_sample(pack, model, sampler, interval=2)
    text = report(caplog)
    assert "3 of 5 steps ran the whole U-Net (0, 2, 4), 2 reused the cached feature (1, 3)" in text, text
    assert [steps.count(i) for i in range(STEPS)] == CALLS_PER_STEP[sampler] and steps == sorted(steps), steps
    assert torch.isfinite(out).all() and rel(out, reference) < 0.5


def test_an_interrupted_run_frees_the_cache_and_leaves_the_model(pack, svd, caplog):
    import gc
    import weakref

    import comfy.model_management as mm
    import comfy.patcher_extension as pe

    caplog.set_level(logging.INFO)
    context = __import__(f"{pack.__name__}.streamlined_core.engine.context", fromlist=["current"])
    reference = plain_sample(svd)
    model = svd.clone()
    cached = []

    def interrupt(executor, *args, **kwargs):
        callback = args[5]

        def on_step(i, *rest):
            callback(i, *rest)
            if i == 1:
                state = context.current().rehash.controller.state
                cached.extend(weakref.ref(c.h) for c in state.cache.values())
                raise mm.InterruptProcessingException()
        return executor(*args[:5], on_step, *args[6:], **kwargs)

    model.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, "interrupt", interrupt)
    with pytest.raises(mm.InterruptProcessingException):
        rehash_sample(pack, model, interval=2)
    gc.collect()
    assert cached and all(ref() is None for ref in cached), "the cached features were freed"
    assert "ended early" in report(caplog)
    assert context.current() is None
    assert torch.equal(plain_sample(svd), reference)


def test_after_streamline_model_it_equals_the_pass_through_engine(pack, svd):
    reference = rehash_sample(pack, svd, interval=2)
    (streamlined,) = pack.NODE_CLASS_MAPPINGS["StreamlineModel"]().patch(svd, "upper bound", 3, 0.0, "all")
    out = rehash_sample(pack, streamlined, interval=2)
    assert rel(out, reference) <= LATENT_TOL


def test_the_guider_counts_the_sub_schedule_it_receives(pack, svd, caplog):
    from comfy_extras import nodes_custom_sampler as custom

    caplog.set_level(logging.INFO)
    positive, negative, latent = conditioning(3, 8, 12)
    (sigmas,) = custom.BasicScheduler().get_sigmas(svd, "karras", 8, 1.0)
    (_high, low) = custom.SplitSigmas().get_sigmas(sigmas, 3)
    (guider,) = pack.NODE_CLASS_MAPPINGS["StepRehashGuider"]().get_guider(svd, positive, negative, 2.5,
                                                                          **options(interval=2))
    (noise,) = custom.RandomNoise().get_noise(7)
    (sampler,) = custom.KSamplerSelect().get_sampler("euler")
    out, _ = custom.SamplerCustomAdvanced().sample(noise, guider, sampler, low, latent)
    assert torch.isfinite(out["samples"]).all()
    assert "3 of 5 steps ran the whole U-Net (0, 2, 4)" in report(caplog)


def test_start_and_end_percent_and_the_reuse_limit(pack, svd, caplog):
    """Steps whose sigma lies outside start_percent..end_percent (ComfyUI's percent_to_sigma) run whole."""
    from comfy_extras import nodes_custom_sampler as custom

    caplog.set_level(logging.INFO)
    rehash_sample(pack, svd, steps=9, interval=9)
    assert "2 of 9 steps ran the whole U-Net (0, 8)" in report(caplog)
    rehash_sample(pack, svd, steps=9, interval=9, max_consecutive_reuses=2)
    assert "4 of 9 steps ran the whole U-Net (0, 3, 6, 8)" in report(caplog)
    (sigmas,) = custom.BasicScheduler().get_sigmas(svd, "karras", 9, 1.0)
    sampling = svd.get_model_object("model_sampling")
    for start, end in ((0.0, 0.5), (0.3, 1.0), (0.2, 0.7)):
        hi, lo = float(sampling.percent_to_sigma(start)), float(sampling.percent_to_sigma(end))
        whole = sorted({0, 8} | {i for i in range(9) if not lo <= float(sigmas[i]) <= hi})
        assert 2 < len(whole) < 9, "the range makes some steps whole, not all"
        rehash_sample(pack, svd, steps=9, interval=9, start_percent=start, end_percent=end)
        text = report(caplog)
        assert f"{len(whole)} of 9 steps ran the whole U-Net" in text, (start, end, whole, text)
        reused = [i for i in range(9) if i not in whole]
        assert f"{len(reused)} reused" in text


def test_the_first_run_calibrates_and_later_runs_use_the_calibration(pack, svd, folder, caplog):
    caplog.set_level(logging.INFO)
    reference = plain_sample(svd)
    first = rehash_sample(pack, svd, schedule="target key steps", key_steps=3)
    assert torch.equal(first, reference), "a calibrating run computes every step"
    text = report(caplog)
    assert "this run calibrates" in text and "saved" in text
    files = sorted(p.name for p in folder.iterdir())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".safetensors")
    rehash_sample(pack, svd, schedule="target key steps", key_steps=3)
    text = report(caplog)
    assert "found for this model and setting" in text and "3 of 5 steps ran the whole U-Net" in text
    rehash_sample(pack, svd, schedule="gamma", gamma=1.0)
    assert "5 of 5 steps ran the whole U-Net" in report(caplog)
    # chosen from the list: made for 5 steps, refused for 6 unless overridden
    with pytest.raises(ValueError, match="steps: made for 5, used with 6.*override_calibration"):
        rehash_sample(pack, svd, steps=6, schedule="target key steps", key_steps=3, calibration=files[0])
    rehash_sample(pack, svd, steps=6, schedule="target key steps", key_steps=3, calibration=files[0],
                  override_calibration=True)
    assert "key steps by target key steps" in report(caplog)


def test_bad_inputs_get_clear_errors(pack, svd, folder):
    with pytest.raises(ValueError, match="cut must be auto or one of up0.0.res, up0.0.attn, up0.1.res, up0.1.attn"):
        rehash_sample(pack, svd, cut="up0.2.attn")
    with pytest.raises(ValueError, match="start_percent and end_percent"):
        rehash_sample(pack, svd, start_percent=0.8, end_percent=0.2)
    with pytest.raises(ValueError, match="calibration='../../etc/passwd': not in"):
        rehash_sample(pack, svd, schedule="gamma", calibration="../../etc/passwd")


def test_the_default_cut_on_a_unet_with_one_resblock_per_level_is_the_nearest_that_fits(pack, svd, caplog):
    """The tiny SVD has one ResBlock per level: its last up block is two units, and the default cut, up0.1.attn,
    is its last layer (a reuse step from there only replays the last key step). At its default (auto) the node
    takes the nearest cut whose tail takes fresh input, up0.0.attn, says so, and samples exactly as with that cut
    chosen; chosen explicitly, up0.1.attn is refused, naming the widget and what fits."""
    caplog.set_level(logging.INFO)
    chosen = rehash_sample(pack, svd, cut="up0.0.attn")
    out = rehash_sample(pack, svd, cut="auto")
    text = report(caplog)
    assert "cut up0.0.attn (auto: up0.1.attn replays the last full step's output" in text
    assert "after up0.0.attn" in text
    assert torch.equal(out, chosen)
    assert pack.NODE_CLASS_MAPPINGS["StepRehashSampler"].INPUT_TYPES()["required"]["cut"][1]["default"] == "auto"
    with pytest.raises(ValueError, match="cut='up0.1.attn' replays the last full step's output.*choose auto"):
        rehash_sample(pack, svd, cut="up0.1.attn")


def test_nodes_are_registered_with_tooltips(pack):
    import nodes

    for name in ("StepRehashSampler", "StepRehashGuider"):
        cls = pack.NODE_CLASS_MAPPINGS[name]
        assert name in pack.NODE_DISPLAY_NAME_MAPPINGS
        inputs = cls.INPUT_TYPES()["required"]
        for key in ("schedule", "key_steps", "gamma", "interval", "cut", "calibration", "start_percent",
                    "end_percent", "max_consecutive_reuses", "override_calibration"):
            assert "tooltip" in inputs[key][1], key
    sampler_inputs = pack.NODE_CLASS_MAPPINGS["StepRehashSampler"].INPUT_TYPES()["required"]
    assert list(nodes.KSampler.INPUT_TYPES()["required"]) == list(sampler_inputs)[:10], "KSampler's inputs first"
    assert pack.NODE_CLASS_MAPPINGS["StepRehashSampler"].RETURN_TYPES == nodes.KSampler.RETURN_TYPES


def test_streamline_model_and_the_vram_profiler_before_it_in_either_order(pack, svd):
    """The timeline marks each step key or reuse; the output is the pass-through engine's."""
    import sys

    reference = rehash_sample(pack, svd, interval=2)
    profiler = pack.NODE_CLASS_MAPPINGS["VRAMProfiler"]()
    streamline = pack.NODE_CLASS_MAPPINGS["StreamlineModel"]()
    history = sys.modules[pack.__name__ + ".nodes.vram_profiler"]._HISTORY
    for order in ("profiler first", "streamline first"):
        if order == "profiler first":
            (model,) = streamline.patch(profiler.patch(svd, "group", 0, order)[0], "upper bound", 3, 0.0, "all")
        else:
            (model,) = profiler.patch(streamline.patch(svd, "upper bound", 3, 0.0, "all")[0], "group", 0, order)
        out = rehash_sample(pack, model, interval=2)
        doc = list(history.values())[-1]
        assert doc["label"] == order
        assert [s.get("rehash") for s in doc["steps"]] == ["key", "reuse", "key", "reuse", "key"]
        assert rel(out, reference) <= LATENT_TOL


def test_freeu_runs_on_key_and_reuse_steps(pack, svd, caplog):
    """FreeU's output-block patch runs in every call's tail: key-only equals FreeU's own graph bit for bit."""
    from comfy_extras.nodes_freelunch import FreeU

    caplog.set_level(logging.INFO)
    (freeu,) = FreeU().patch(svd, 1.3, 1.4, 0.9, 0.2)
    reference = plain_sample(freeu)
    assert not torch.equal(reference, plain_sample(svd)), "FreeU changes the output"
    assert torch.equal(rehash_sample(pack, freeu, interval=1), reference)
    out = rehash_sample(pack, freeu, interval=2)
    assert "2 reused the cached feature (1, 3)" in report(caplog)
    assert torch.isfinite(out).all() and rel(out, reference) < 0.5


def test_the_model_is_unpatched_once_comfyui_unloads_it(pack, svd):
    import comfy.model_management

    rehash_sample(pack, svd, interval=2)
    comfy.model_management.unload_all_models()
    unet = svd.get_model_object("diffusion_model")
    assert getattr(unet._forward, "__func__", None) is type(unet)._forward
    assert not [n for n, m in unet.named_modules() if m._forward_hooks], "no forward hook was left behind"


# -- a reuse step fed its own step's capture equals the full step, with what users put around it --------


def same_step_reuse(pack, model, errors):
    """At every key call, also run the call as a reuse step from the feature it just captured."""
    import comfy.patcher_extension as pe

    context = __import__(f"{pack.__name__}.streamlined_core.engine.context", fromlist=["current"])

    def twice(executor, *args, **kwargs):
        run = context.current().rehash
        fresh = lambda: [a if i != 4 or a is None else {k: list(v) for k, v in a.items()}  # noqa: E731
                         for i, a in enumerate(args)]  # apply_control pops what it adds
        before = dict(run._at_next)  # the step clock as the call found it: the repeat must see the same
        full = executor(*fresh(), **kwargs)
        if run.mode != "rehash":  # a run that calibrates computes every step whole
            return full
        state = run.controller.state
        step = state.records[-1].step  # the step the call just ran as
        if step in state._keys and step < state.steps - 1:
            state._keys.discard(step)
            after, run._at_next = run._at_next, before
            try:
                reused = executor(*fresh(), **kwargs)
                assert state.records[-1].step == step
            finally:
                state._keys.add(step)
                run._at_next = after
            errors.append(rel(reused, full))
        return full

    clone = model.clone()
    clone.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "twice", twice)
    return clone


@pytest.mark.parametrize("around", ["nothing", "ControlNet", "FreeU", "Streamline Model"])
def test_a_reuse_step_from_its_own_steps_capture_equals_the_full_step(pack, svd, around):
    from comfy_extras.nodes_freelunch import FreeU

    model, calls = svd, None
    positive, negative, latent = conditioning(3, 8, 12)
    if around == "ControlNet":
        (positive, negative), calls = controlnet((positive, negative))
    elif around == "FreeU":
        (model,) = FreeU().patch(svd, 1.3, 1.4, 0.9, 0.2)
    elif around == "Streamline Model":
        (model,) = pack.NODE_CLASS_MAPPINGS["StreamlineModel"]().patch(svd, "upper bound", 3, 0.0, "all")
    errors = []
    node = pack.NODE_CLASS_MAPPINGS["StepRehashSampler"]()
    for cut in ("up0.0.res", "up0.0.attn"):  # the tiny U-Net's fresh cuts of its last up block
        node.sample(same_step_reuse(pack, model, errors), 7, STEPS, 2.5, "euler", "karras", positive, negative, latent,
                    1.0, **options(interval=2, cut=cut))
    assert len(errors) == 2 * 2 and max(errors) <= 1e-5, errors  # key steps 0 and 2 of 0, 2, 4, at each cut
    if calls is not None:
        assert len(calls) == 2 * STEPS, "the ControlNet ran at every step, reuse steps included"


# -- what users combine, pairwise --------------------------------------------------------------------

FACTORS = {
    "sampler": ["euler", "heun", "dpm_2", "dpmpp_2s_ancestral", "uni_pc"],
    "conds": ["batched", "apart at reuse steps", "apart at key steps"],
    "with": ["nothing", "ControlNet", "FreeU"],
    "streamline": ["plain", "Streamline Model"],
    "profiler": ["no profiler", "VRAM Profiler"],
    "schedule": ["uniform interval", "target key steps"],
}


def pairwise_cases() -> list[tuple]:
    """Every pair of factor values in at least one case (allpairspy's covering array)."""
    from allpairspy import AllPairs

    return [tuple(case) for case in AllPairs(list(FACTORS.values()))]


@pytest.mark.parametrize("case", pairwise_cases(), ids=lambda c: ", ".join(c))
def test_combinations_pairwise(pack, svd, folder, case, caplog):
    """Each case: every key call also run as a reuse step from its own capture (equal within 1e-5), the
    key steps the run reports, no branch without its cached feature, the profiler's marks."""
    import sys

    import comfy.patcher_extension as pe
    from comfy_extras.nodes_freelunch import FreeU

    sampler, conds, around, streamline, profiler, schedule = case
    caplog.set_level(logging.INFO)
    context = sys.modules[pack.__name__ + ".streamlined_core.engine.context"]
    positive, negative, latent = conditioning(3, 8, 12)
    model, calls = svd, None
    if around == "ControlNet":
        (positive, negative), calls = controlnet((positive, negative))
    elif around == "FreeU":
        (model,) = FreeU().patch(model, 1.3, 1.4, 0.9, 0.2)
    if profiler == "VRAM Profiler":
        (model,) = pack.NODE_CLASS_MAPPINGS["VRAMProfiler"]().patch(model, "step", 0, ", ".join(case))
    if streamline == "Streamline Model":
        (model,) = pack.NODE_CLASS_MAPPINGS["StreamlineModel"]().patch(model, "upper bound", 3, 0.0, "all")

    base, host = svd.model, svd.model.memory_required
    state = {"apart": False, "calls": []}
    model = model.clone()
    if conds != "batched":
        def flip(executor, *args, **kwargs):  # ComfyUI runs conds apart where its estimate says both do not fit
            callback = args[5]

            def apart(step):
                run = context.current().rehash
                if run.mode != "rehash":  # a calibrating run: batched at some steps, apart at others
                    return step % 2 == (conds == "apart at key steps")
                return run.controller.state.is_key(step) == (conds == "apart at key steps")

            def on_step(i, *rest):
                state["apart"] = apart(i + 1)
                return callback(i, *rest)
            state["apart"] = conds == "apart at key steps"
            return executor(*args[:5], on_step, *args[6:], **kwargs)

        model.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, "flip", flip)
        base.memory_required = lambda s, cond_shapes={}: 1e30 if state["apart"] else host(s, cond_shapes)
    model.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "rows",
                               lambda ex, x, *a, **k: state["calls"].append(x.shape[0]) or ex(x, *a, **k))
    errors = []
    node = pack.NODE_CLASS_MAPPINGS["StepRehashSampler"]()
    try:
        runs = 2 if schedule == "target key steps" else 1  # the first run calibrates
        for _ in range(runs):
            state["calls"].clear()
            (out,) = node.sample(same_step_reuse(pack, model, errors), 7, STEPS, 2.5, sampler, "karras", positive,
                                 negative, latent, 1.0, **options(schedule=schedule, key_steps=3, interval=2))
    finally:
        base.__dict__.pop("memory_required", None)
    text = report(caplog)
    assert "3 of 5 steps ran the whole U-Net" in text and "no cached feature" not in text, text
    assert errors and max(errors) <= 1e-5, errors
    assert torch.isfinite(out["samples"]).all()
    if conds != "batched":
        assert {3, 6} <= set(state["calls"]), "some calls ran one cond, some both"
    if profiler == "VRAM Profiler":
        doc = list(sys.modules[pack.__name__ + ".nodes.vram_profiler"]._HISTORY.values())[-1]
        marks = [s.get("rehash") for s in doc["steps"]]
        assert marks.count("key") == 3 and marks.count("reuse") == 2, marks
        assert [s["step"] for s in doc["steps"]] == list(range(STEPS))


def test_a_sampler_that_corrects_at_the_next_sigma_is_learnt_and_reported(pack, svd, caplog):
    """A heun-like sampler under another name: its first correction counts as the next step's (said in the
    report); from the second step on, steps are counted as for heun."""
    import comfy.k_diffusion.sampling as k
    import comfy.patcher_extension as pe
    import comfy.samplers
    from comfy_extras import nodes_custom_sampler as custom

    caplog.set_level(logging.INFO)
    context = __import__(f"{pack.__name__}.streamlined_core.engine.context", fromlist=["current"])
    positive, negative, latent = conditioning(3, 8, 12)

    def my_corrector(model, x, sigmas, extra_args=None, callback=None, disable=None):
        return k.sample_heun(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable)

    steps, model = [], svd.clone()
    model.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "steps", lambda ex, *a, **kw: (
        ex(*a, **kw), steps.append(context.current().rehash.controller.state.records[-1].step))[0])
    (guider,) = pack.NODE_CLASS_MAPPINGS["StepRehashGuider"]().get_guider(model, positive, negative, 2.5,
                                                                          **options(interval=2))
    (sigmas,) = custom.BasicScheduler().get_sigmas(svd, "karras", STEPS, 1.0)
    (noise,) = custom.RandomNoise().get_noise(7)
    custom.SamplerCustomAdvanced().sample(noise, guider, comfy.samplers.KSAMPLER(my_corrector), sigmas, latent)
    text = report(caplog)
    assert "evaluates at the next step's sigma within a step (as heun does); until step 1 that call counted as the " \
           "next step's" in text, text
    assert [steps.count(i) for i in range(STEPS)] == [1, 3, 2, 2, 1], steps


def test_start_and_end_steps_sample_a_sub_schedule(pack, svd, caplog):
    """KSamplerAdvanced's start and end steps, sampled as KSamplerAdvanced samples them: steps 2 to 6 of 8."""
    import sys

    import comfy.sample

    caplog.set_level(logging.INFO)
    step_rehash = sys.modules[pack.__name__ + ".nodes.step_rehash"]
    model = step_rehash.with_rehash(svd, step_rehash.RehashOptions(**options(interval=2), sampler="euler",
                                                                   scheduler="karras"))
    positive, negative, latent = conditioning(3, 8, 12)
    noise = torch.randn(latent["samples"].shape, generator=torch.Generator().manual_seed(7))
    out = comfy.sample.sample(model, noise, 8, 2.5, "euler", "karras", positive, negative, latent["samples"],
                              start_step=2, last_step=6)
    assert torch.isfinite(out).all()
    assert "3 of 4 steps ran the whole U-Net (0, 2-3), 1 reused the cached feature (1)" in report(caplog)


def test_comfyuis_own_context_windows_keep_one_cache_per_window(pack, svd, caplog):
    """Context Windows (Manual) over SVD's frames: each window has its own cached feature per cond."""
    import sys

    import comfy.context_windows as cw
    import comfy.patcher_extension as pe
    from comfy_extras.nodes_context_windows import ContextWindowsManualNode

    caplog.set_level(logging.INFO)
    windowed = ContextWindowsManualNode.execute(svd, 4, 2, cw.ContextSchedules.STATIC_STANDARD, 1, False,
                                                cw.ContextFuseMethods.PYRAMID, 0)
    windowed = windowed[0] if isinstance(windowed, tuple) else windowed.result[0]
    context = sys.modules[pack.__name__ + ".streamlined_core.engine.context"]
    windows, cached = set(), []

    def watch(executor, *args, **kwargs):
        window = args[5].get("context_window")
        windows.add(None if window is None else tuple(window.index_list))
        out = executor(*args, **kwargs)
        cached.append(len(context.current().rehash.controller.state.cache))
        return out

    model = windowed.clone()
    model.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "watch", watch)
    out = rehash_sample(pack, model, frames=6, interval=2)
    assert len(windows) == 2 and None not in windows, windows
    assert max(cached) == 2 * len(windows), "one cached feature per window and cond"
    text = report(caplog)
    assert "2 reused the cached feature (1, 3)" in text and "no cached feature" not in text, text
    assert torch.isfinite(out).all()


def test_guidance_that_calls_the_model_again_at_a_steps_sigma_is_not_taken_for_heun(pack, svd, caplog):
    """Perturbed-Attention Guidance calls the model once more per step, at the same sigma."""
    from comfy_extras.nodes_pag import PerturbedAttentionGuidance

    caplog.set_level(logging.INFO)
    node = PerturbedAttentionGuidance
    pag = node.execute(svd, 3.0).result[0] if hasattr(node, "execute") else node().patch(svd, 3.0)[0]  # V3 or V1
    rehash_sample(pack, pag, interval=2)
    text = report(caplog)
    assert "3 of 5 steps ran the whole U-Net (0, 2, 4), 2 reused" in text and "as heun does" not in text, text


def test_a_calibration_that_cannot_be_written_is_reported_and_the_run_kept(pack, svd, folder, caplog, monkeypatch):
    import sys

    caplog.set_level(logging.INFO)
    rehash = sys.modules[pack.__name__ + ".streamlined_core.features.rehash"]

    def no_space(self, path, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rehash.Calibration, "save", no_space)
    out = rehash_sample(pack, svd, schedule="target key steps", key_steps=3)
    assert torch.equal(out, plain_sample(svd))
    assert "the calibration was not saved (OSError: [Errno 28] No space left on device)" in report(caplog)
    assert not list(folder.iterdir())


def test_a_reuse_step_reads_the_cache_within_three_of_the_packs_frames(pack, svd):
    """Step Rehash is one hook: from the DIFFUSION_MODEL wrapper chain to the read of the cached feature, a
    reuse step passes through the engine's forward, the run's controller and the run's state, nothing more
    of the pack (traced with sys.setprofile)."""
    import sys
    from pathlib import Path

    import comfy.patcher_extension as pe

    root = Path(pack.__file__).resolve().parent
    ours = (str(root / "streamlined_core"), str(root / "nodes"))  # a host under build/ is not the pack
    state = sys.modules[f"{pack.__name__}.streamlined_core.features.rehash.state"]
    read = state.RehashState.request.__code__
    reuses = []

    def probe(executor, *args, **kwargs):
        return executor(*args, **kwargs)

    def trace(frame, event, arg):
        if event == "return" and frame.f_code is read and arg is not None and arg[1] == "reuse":
            chain, f = [], frame
            while f is not None and f.f_code is not probe.__code__:
                if f.f_code.co_filename.startswith(ours):
                    chain.append(f.f_code.co_qualname)
                f = f.f_back
            reuses.append((chain, f is not None))

    model = svd.clone()
    model.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "probe", probe)
    sys.setprofile(trace)
    try:
        rehash_sample(pack, model, interval=2)
    finally:
        sys.setprofile(None)
    assert len(reuses) == 2 and all(found for _, found in reuses), reuses  # steps 1 and 3, under the probe
    for chain, _ in reuses:
        assert chain == ["RehashState.request", "ComfyRehash.before", "Streamliner.__call__"], chain
