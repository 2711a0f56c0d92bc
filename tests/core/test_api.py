"""``streamline(...)``: the handle, the plan, budgets, hooks, and every bad input."""

import pytest
import torch
from contract import diffusers_svd_call

from streamlined_core import MemoryTracker, listen, stage_request, streamline
from streamlined_core.engine.arch import diffusers_svd
from streamlined_core.engine.plan import measure_groups, meta_replica, to_meta
from streamlined_core.tools import configs

SHAPE = (2, 3, 64, 96)


def seeded(model):
    return configs.seed_weights(model, std=0.1)


@pytest.fixture
def svd():
    return seeded(configs.build_tiny_diffusers_svd())


@pytest.fixture
def svd_call():
    return diffusers_svd_call(SHAPE)


def close(a, b):
    return ((a - b).abs().max() / b.abs().max()).item() <= 1e-5


def untouched(model, params):
    return (
        "forward" not in model.__dict__
        and "_streamline_handle" not in model.__dict__
        and all(p is q for p, q in zip(model.parameters(), params))
    )


def test_streamline_auto_is_exact_and_remove_restores_the_model(svd_call):
    model, args, kwargs, reference = svd_call
    params, modules = list(model.parameters()), list(model.modules())
    handle = streamline(model)
    with torch.no_grad():
        out = model(*args, **kwargs)[0]
    assert close(out, reference)
    assert handle.last_plan is not None and handle.last_plan.sliced_groups
    handle.remove()
    assert untouched(model, params) and list(model.modules()) == modules
    with torch.no_grad():
        assert torch.equal(model(*args, **kwargs)[0], reference)  # the stock forward, bit for bit
    handle.remove()  # a second remove does nothing


def test_keyword_and_positional_calls_and_return_dict(svd_call):
    model, args, kwargs, reference = svd_call
    with streamline(model, slices=3):
        with torch.no_grad():
            out = model(sample=args[0], timestep=args[1], encoder_hidden_states=args[2], added_time_ids=kwargs["added_time_ids"]).sample
    assert close(out, reference) and "forward" not in model.__dict__


def test_applying_again_replaces_the_previous_settings(svd_call):
    model, args, kwargs, reference = svd_call
    first = streamline(model, slices=2)
    second = streamline(model, slices=5)
    assert first._removed and model._streamline_handle is second
    events = []
    with listen(events.append), torch.no_grad():
        assert close(model(*args, **kwargs)[0], reference)
    assert max(e.slices for e in events if hasattr(e, "slices")) == 5
    first.remove()  # the replaced handle no longer owns anything
    assert model._streamline_handle is second
    second.remove()
    assert "forward" not in model.__dict__


def test_integer_slices_are_clamped_to_each_groups_axis(svd_call):
    model, args, kwargs, reference = svd_call
    events = []
    with streamline(model, slices=10_000), listen(events.append), torch.no_grad():
        assert close(model(*args, **kwargs)[0], reference)
    groups = [e for e in events if hasattr(e, "slices")]
    assert groups and all(e.slices == e.length for e in groups)


def test_plan_is_inspectable_and_its_prediction_is_what_the_run_measures(svd_call):
    model, args, kwargs, _ = svd_call
    handle = streamline(model)
    plan = handle.plan_for(*args, **kwargs)
    for g in plan.groups:
        assert g.axis in ("frames", "pixels") and 1 <= g.slices <= g.length and g.predicted_bytes > 0
    assert "predicted activation peak" in plan.table()
    replica, margs, mkw = meta_replica(model), to_meta(args), to_meta(kwargs)
    _, _, measured = measure_groups(lambda r: diffusers_svd.streamlined_forward(replica, r, *margs, **mkw), plan.decide)
    assert measured == plan.predicted_peak_bytes
    with MemoryTracker() as tracker:  # the real CPU run, planning excluded
        model(*args, **kwargs)
    assert tracker.peak_bytes == plan.predicted_peak_bytes
    handle.remove()


def test_listeners_and_stage_requests_reach_the_calls_of_their_block_only(svd_call):
    model, args, kwargs, reference = svd_call
    events, later = [], []
    with streamline(model, slices=3) as handle, torch.no_grad():
        with listen(events.append), stage_request(capture={"up0.0.attn", "down_blocks.0.attentions.1"}) as request:
            assert close(model(*args, **kwargs)[0], reference)
        with listen(later.append):
            model(*args, **kwargs)
        assert handle.last_plan is None  # an integer bound plans nothing
    (captured,) = request.captures  # one U-Net call, both cuts (a host layer name maps to its canonical id)
    assert set(captured) == {"up0.0.attn", "down0.1.attn"} and len(captured["down0.1.attn"].skips) == 3
    kinds = {type(e).__name__ for e in events}
    assert kinds == {"GroupEvent", "StageEvent"} and len(later) == len(events), "each block saw its own call only"
    with stage_request(start=captured["up0.0.attn"]), streamline(model, slices=3), torch.no_grad():
        assert close(model(*args, **kwargs)[0], reference)  # the tail from the captured state


def test_planner_meets_budgets_and_slices_more_for_less(svd_call):
    model, args, kwargs, reference = svd_call
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    with streamline(model, slices=1) as handle:
        unsliced = handle.plan_for(*args, **kwargs).predicted_peak_bytes
    with streamline(model, slices=10_000) as handle:
        least = handle.plan_for(*args, **kwargs).predicted_peak_bytes
    assert least < unsliced
    previous_slices = 0
    for fraction in (1.2, 0.6, 0.3, 0.05):
        budget = weights + least + int(fraction * (unsliced - least))
        with streamline(model, budget_bytes=budget) as handle:
            plan = handle.plan_for(*args, **kwargs)
            with torch.no_grad():
                assert close(model(*args, **kwargs)[0], reference)
            with MemoryTracker() as tracker:
                model(*args, **kwargs)
        assert plan.fits and plan.predicted_total_bytes <= budget and tracker.peak_bytes + weights <= budget
        total_slices = sum(g.slices for g in plan.groups)
        assert total_slices >= previous_slices
        if fraction > 1:
            assert total_slices == len(plan.groups)  # a budget above the unsliced peak slices nothing
        previous_slices = total_slices
    assert previous_slices > len(plan.groups)


def test_budget_below_the_least_reachable_peak_states_that_peak(svd_call):
    model, args, kwargs, _ = svd_call
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    handle = streamline(model, budget_bytes=weights + 1000)
    with pytest.raises(ValueError, match=r"below the least reachable peak: \d+ bytes"):
        model(*args, **kwargs)
    handle.remove()
    assert "forward" not in model.__dict__


def test_an_unreachable_budget_plans_near_the_least_peak_without_slicing_everything_to_the_end(svd_call):
    """Below the least reachable peak (e.g. a short default budget) each group slices only as far as
    brings it within 2% of that peak: the last 0.1% is not worth thousands of slices."""
    from streamlined_core.engine.api import Streamliner
    from streamlined_core.engine.arch import engine_adapter
    from streamlined_core.engine.plan import UNREACHABLE_SLACK

    model, args, kwargs, _ = svd_call
    engine = Streamliner(model, engine_adapter(model), "auto", None)
    planner = engine._planner(engine._arguments(args, kwargs))
    least = planner.least_peak()
    plan = planner.plan(least // 2)
    assert not plan.fits
    assert least <= plan.predicted_peak_bytes <= least * (1 + UNREACHABLE_SLACK)
    most = planner.plan(None)  # every group at its most slicing
    assert sum(g.slices for g in plan.groups) < sum(g.slices for g in most.groups)


def test_pipeline_targets_are_accepted():
    from diffusers import AnimateDiffPipeline, DDIMScheduler

    unet = seeded(configs.build_tiny_diffusers_animatediff())
    pipe = AnimateDiffPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet, motion_adapter=None, scheduler=DDIMScheduler())
    args, kwargs = configs.diffusers_animatediff_inputs(unet, 2, 3, 64, 64)
    with torch.no_grad():
        reference = unet(*args, **kwargs)[0]
        with streamline(pipe, slices=4):
            assert close(unet(*args, **kwargs)[0], reference)
    assert "forward" not in unet.__dict__


def test_works_under_model_cpu_offload_hooks(svd_call):
    from accelerate import cpu_offload_with_hook
    from accelerate.hooks import remove_hook_from_module

    model, args, kwargs, reference = svd_call
    _, hook = cpu_offload_with_hook(model, execution_device="cpu")
    old_forward = model._old_forward
    with streamline(model, slices=3):
        assert model._old_forward is not old_forward
        with torch.no_grad():
            assert close(model(*args, **kwargs)[0], reference)
    assert model._old_forward is old_forward
    remove_hook_from_module(model)
    with torch.no_grad():
        assert torch.equal(model(*args, **kwargs)[0], reference)


def test_works_under_layerwise_casting():
    model = seeded(configs.build_tiny_diffusers_animatediff())
    args, kwargs = configs.diffusers_animatediff_inputs(model, *SHAPE)
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    with torch.no_grad():
        reference = model(*args, **kwargs)[0]
        with streamline(model, slices=3):
            assert close(model(*args, **kwargs)[0], reference)


def test_refuses_other_diffusers_hooks_with_a_clear_message(svd):
    from diffusers.hooks import HookRegistry, ModelHook

    HookRegistry.check_if_exists_or_initialize(svd.down_blocks[0]).register_hook(ModelHook(), "some_cache")
    with pytest.raises(ValueError, match=r"hooks \['some_cache'\].*down_blocks.0"):
        streamline(svd)
    assert "forward" not in svd.__dict__ and "_streamline_handle" not in svd.__dict__


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(slices=0), ValueError, 'slices must be a positive integer or "auto", got 0'),
        (dict(slices=-2), ValueError, 'slices must be a positive integer or "auto", got -2'),
        (dict(slices=2.5), ValueError, "got 2.5"),
        (dict(slices="many"), ValueError, "got 'many'"),
        (dict(slices=True), ValueError, "got True"),
        (dict(budget_bytes=-1), ValueError, "budget_bytes must be a positive number of bytes"),
        (dict(budget_bytes=0), ValueError, "budget_bytes must be a positive number of bytes"),
        (dict(budget_bytes="8GB"), TypeError, "budget_bytes must be a number of bytes or None, got '8GB'"),
        (dict(budget_bytes=1000), ValueError, "does not even hold the weights"),
    ],
)
def test_bad_arguments_name_the_parameter_and_leave_nothing_patched(svd, kwargs, error, message):
    params = list(svd.parameters())
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        streamline(svd, **kwargs)
    assert untouched(svd, params)


def test_bad_input_keeps_the_previous_streamlining_intact(svd_call):
    model, args, kwargs, reference = svd_call
    handle = streamline(model, slices=2)
    with pytest.raises(ValueError):
        streamline(model, slices=0)
    assert model._streamline_handle is handle and not handle._removed
    handle.remove()


def test_unsupported_targets_name_what_is_accepted():
    from diffusers import UNet2DConditionModel

    image_unet = UNet2DConditionModel(**configs.TINY_SD_KWARGS)
    for target in (image_unet, torch.nn.Linear(2, 2), object(), "unet"):
        with pytest.raises(TypeError, match="UNetSpatioTemporalConditionModel.*UNetMotionModel.*ComfyUI's UNetModel"):
            streamline(target)
    assert "forward" not in image_unet.__dict__


def test_unsupported_dit_is_refused():
    from diffusers import DiTTransformer2DModel

    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=1, sample_size=8,
                                patch_size=2, norm_num_groups=4)
    with pytest.raises(TypeError, match="not a supported model"):
        streamline(dit)


def test_an_exception_inside_a_run_leaves_the_model_usable(svd_call):
    model, args, kwargs, reference = svd_call
    handle = streamline(model, slices=3)
    with pytest.raises(RuntimeError):
        model(args[0][:, :, :4], *args[1:], **kwargs)  # wrong channel count: the host's conv refuses
    with torch.no_grad():
        assert close(model(*args, **kwargs)[0], reference)
    handle.remove()
    assert "forward" not in model.__dict__


def test_another_librarys_hook_holding_state_that_cannot_be_copied_is_shared_with_the_plans_replica(svd_call):
    """Planning copies the U-Net's structure onto ``meta``; a forward hook that is a method of an object holding a
    lock (or a module, a model) cannot be deep-copied. Such hooks are shared with the replica, as plain functions
    are, and run on its calls too."""
    import threading

    model, args, kwargs, reference = svd_call

    class Counter:
        def __init__(self):
            self.lock, self.calls = threading.Lock(), 0

        def hook(self, _module, _inputs, _output):
            with self.lock:
                self.calls += 1

    counter = Counter()
    removable = model.down_blocks[0].resnets[0].spatial_res_block.conv1.register_forward_hook(counter.hook)
    try:
        with streamline(model), torch.no_grad():
            out = model(*args, **kwargs)[0]
    finally:
        removable.remove()
    assert close(out, reference) and counter.calls >= 2  # the plan's meta runs and the real call
