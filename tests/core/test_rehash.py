"""Step Rehash: Algorithm 1 on hand-made maps, reuse steps against full steps on the real model classes,
calibration files, removal, and the cache's lifetime."""

from __future__ import annotations

import gc
import json
import logging
import weakref

import pytest
import torch

from streamlined_core import stage_request, streamline
from streamlined_core.features.profiler import Timeline, profile
from streamlined_core.features.rehash import (
    LAST_UP_BLOCK,
    RehashConfig,
    Schedule,
    calibrate,
    fingerprint,
    interval_key_steps,
    key_steps_for_count,
    key_steps_for_gamma,
    rehash,
    similarity_map,
)
from streamlined_core.fixture import data
from streamlined_core.fixture import model as fixture
from streamlined_core.tools import configs

pytestmark = pytest.mark.usefixtures("one_thread")


# -- Algorithm 1 ---------------------------------------------------------------------------------------


def decay(n: int, rate: float) -> torch.Tensor:
    i = torch.arange(n, dtype=torch.float64)
    return 1 - rate * (i[:, None] - i[None, :]).abs()


def test_key_steps_walk_from_the_last_key_step():
    assert key_steps_for_gamma(decay(10, 0.1), 0.75) == [0, 3, 6, 9]  # 0.7 < 0.75 three steps after each key
    assert key_steps_for_gamma(decay(10, 0.1), 0.8) == [0, 3, 6, 9]  # at gamma: still reused
    assert key_steps_for_gamma(decay(11, 0.1), 0.75) == [0, 3, 6, 9, 10]  # the last step is always key


def test_key_steps_at_the_extremes():
    n = 7
    all_similar, none_similar = torch.ones(n, n), torch.eye(n)
    assert key_steps_for_gamma(all_similar, 1.0) == [0, n - 1]
    assert key_steps_for_gamma(all_similar, 0.0) == [0, n - 1]
    assert key_steps_for_gamma(none_similar, 0.5) == list(range(n))
    assert key_steps_for_gamma(none_similar, 0.0) == [0, n - 1]  # 0 is not below gamma 0
    assert key_steps_for_gamma(torch.full((n, n), 0.999), 1.0) == list(range(n))
    assert key_steps_for_gamma(torch.ones(1, 1), 0.9) == [0]


def test_key_steps_by_count_never_exceed_it_and_take_the_strictest_threshold():
    m = decay(10, 0.1)
    for count in range(2, 11):
        keys, gamma = key_steps_for_count(m, count)
        assert len(keys) <= count and keys[0] == 0 and keys[-1] == 9
        assert key_steps_for_gamma(m, gamma) == keys
    assert key_steps_for_count(m, 10)[0] == list(range(10))
    assert key_steps_for_count(m, 2)[0] == [0, 9]
    assert key_steps_for_count(m, 5)[0] == [0, 3, 6, 9]  # 5 is not reachable on this map: 4 is the closest below
    # ties: every threshold in (0.7, 0.8] gives [0, 3, 6, 9]; the highest (0.8) is taken
    assert key_steps_for_count(decay(10, 0.1), 4) == ([0, 3, 6, 9], pytest.approx(0.8))


def test_key_step_arguments_are_checked():
    with pytest.raises(ValueError, match="count=1"):
        key_steps_for_count(decay(5, 0.1), 1)
    with pytest.raises(ValueError, match="gamma="):
        key_steps_for_gamma(decay(5, 0.1), float("nan"))
    with pytest.raises(ValueError, match="square"):
        key_steps_for_gamma(torch.ones(3, 4), 0.5)
    assert interval_key_steps(25, 2) == list(range(0, 25, 2))
    assert len(interval_key_steps(25, 2)) == 13
    assert interval_key_steps(10, 4) == [0, 4, 8, 9]
    with pytest.raises(ValueError, match="interval="):
        RehashConfig(interval=0)
    with pytest.raises(ValueError, match="exactly one of"):
        RehashConfig()
    with pytest.raises(ValueError, match="schedule= too"):
        RehashConfig(key_steps=[0, 3], gamma=0.9)


def test_similarity_map_is_cosine_averaged_over_rows():
    f = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [0.0, 1.0]]])  # (steps 2, rows 2, positions 2)
    m = similarity_map(f)
    assert m[0, 0] == pytest.approx(1.0) and m[1, 1] == pytest.approx(1.0)
    assert m[0, 1] == pytest.approx((2**-0.5 + 1.0) / 2)


# -- the fixture model, driven as SVD's pipeline drives it --------------------------------------------


@pytest.fixture(scope="module")
def unet():
    return fixture.load_unet()


@pytest.fixture(scope="module")
def batch():
    b = data.make_batch([data.CALIBRATION_SEEDS.start], 8, data.DEFAULT_SIZE, noise_aug_strength=fixture.SAMPLE_NOISE_AUG)
    return b.first_frame, fixture.Conditioning(b.embedding, b.time_ids)


def sample(unet, batch, scheduler, steps=4):
    first, cond = batch
    return fixture.sample(unet, first, cond, steps=steps, frames=5, generator=torch.Generator().manual_seed(0),
                          scheduler=scheduler)


def test_every_step_key_equals_plain_sampling_bit_for_bit(unet, batch):
    scheduler = fixture.make_scheduler()
    plain = sample(unet, batch, scheduler)
    with rehash(unet, RehashConfig(interval=1), scheduler=scheduler) as handle:
        assert torch.equal(sample(unet, batch, scheduler), plain)
    assert [r.kind for r in handle.last_run.records] == ["key"] * 4
    with streamline(unet, slices=2):  # streamlined: the same, through the sliced groups
        streamlined = sample(unet, batch, scheduler)
        with rehash(unet, RehashConfig(key_steps=[0, 1, 2, 3]), scheduler=scheduler):
            assert torch.equal(sample(unet, batch, scheduler), streamlined)


def test_reuse_steps_run_the_tail_and_report_it(unet, batch, caplog):
    scheduler = fixture.make_scheduler()
    plain = sample(unet, batch, scheduler, steps=6)
    with caplog.at_level(logging.INFO, logger="streamlined_core.features.rehash"):
        with rehash(unet, RehashConfig(key_steps=[0, 3]), scheduler=scheduler) as handle:
            out = sample(unet, batch, scheduler, steps=6)
    run = handle.last_run
    assert [r.kind for r in run.records] == ["key", "reuse", "reuse", "key", "reuse", "key"]
    assert "3 of 6 steps ran the whole U-Net (0, 3, 5), 3 reused the cached feature (1-2, 4)" in caplog.text
    assert run.cache_peak_bytes > 0 and not run.cache
    assert not torch.equal(out, plain) and torch.isfinite(out).all()  # reuse steps changed the result


class _Loop:
    """One U-Net call per step on the same inputs: a reuse step is fed the capture of the step before,
    made from the same inputs, so it must equal a full step."""

    def __init__(self, unet, args, kwargs, steps):
        self.unet, self.args, self.kwargs, self.steps = unet, args, kwargs, steps
        self.scheduler = fixture.make_scheduler()

    def __call__(self):
        self.scheduler.set_timesteps(self.steps)
        outs = []
        for t in self.scheduler.timesteps:
            with torch.no_grad():
                outs.append(self.unet(*self.args, **self.kwargs)[0])
            latents = self.scheduler.scale_model_input(torch.zeros_like(outs[-1]), t)
            self.scheduler.step(outs[-1], t, latents)  # steps counted; its result unused
        return outs


@pytest.mark.parametrize("cut", LAST_UP_BLOCK[:5])
def test_a_reuse_step_fed_its_own_steps_capture_equals_a_full_step(cut):
    model = configs.seed_weights(configs.build_tiny_diffusers_svd("cpu", torch.float32), std=0.05)
    args, kwargs = configs.diffusers_svd_inputs(model, 1, 3, 40, 24)  # batch 1, odd frames, non-square
    loop = _Loop(model, args, kwargs, 3)
    with torch.no_grad():
        full = model(*args, **kwargs)[0]
    with rehash(model, RehashConfig(key_steps=[0], cut=cut, replay=cut == "up0.2.res"), scheduler=loop.scheduler) as h:
        key, reuse, _last = loop()
    assert [r.kind for r in h.last_run.records] == ["key", "reuse", "key"]
    assert torch.equal(key, full)  # the key step is the model's own forward
    assert torch.allclose(reuse, full, rtol=0, atol=1e-5 * float(full.abs().max()))
    with streamline(model, slices=2):  # sliced: the tail runs the same sliced groups as a full step
        with torch.no_grad():
            sliced = model(*args, **kwargs)[0]
        with rehash(model, RehashConfig(key_steps=[0], cut=cut, replay=cut == "up0.2.res"), scheduler=loop.scheduler):
            key, reuse, _last = loop()
    assert torch.equal(key, sliced) and torch.equal(reuse, sliced)


def test_a_cut_before_a_pending_upsampler_captures_through_the_stage_loop():
    """Where the stage loop leaves an upsampler pending at the cut, a key step runs the stage loop (not
    the model's own forward, whose hooks cannot see the state there): within rounding of it."""
    model = configs.seed_weights(configs.build_tiny_diffusers_svd("cpu", torch.float32), std=0.05)
    args, kwargs = configs.diffusers_svd_inputs(model, 1, 3, 40, 24)
    from streamlined_core.engine.arch import cut_points

    cut = [c for c in cut_points(model) if c.section == "up" and c.level == 1][-1]  # before up_blocks.2's upsampler
    loop = _Loop(model, args, kwargs, 3)
    with torch.no_grad():
        full = model(*args, **kwargs)[0]
    with rehash(model, RehashConfig(key_steps=[0], cut=cut.id), scheduler=loop.scheduler) as h:
        assert model._streamline_handle._upsample_at(frozenset({cut.id}))  # the stage loop runs its key steps
        key, reuse, _last = loop()
    assert [r.kind for r in h.last_run.records] == ["key", "reuse", "key"]
    for out in (key, reuse):
        assert torch.allclose(out, full, rtol=0, atol=1e-5 * float(full.abs().max()))


def test_a_cut_before_an_attention_equals_the_cut_after_it(unet, batch):
    """SVD's spatio-temporal attention takes no per-step input: recomputed on the cached feature it gives
    the cached result, so the cut before it and the cut after it sample the same clips."""
    scheduler = fixture.make_scheduler()
    outs = []
    for cut in ("up0.1.res", "up0.1.attn"):
        with rehash(unet, RehashConfig(key_steps=[0, 2], cut=cut), scheduler=scheduler):
            outs.append(sample(unet, batch, scheduler))
    assert torch.equal(*outs)


def test_animatediff_reuse_step_equals_a_full_step():
    model = configs.seed_weights(configs.build_tiny_diffusers_animatediff("cpu", torch.float32), std=0.05)
    args, kwargs = configs.diffusers_animatediff_inputs(model, 1, 3, 40, 24)
    loop = _Loop(model, args, kwargs, 3)
    with torch.no_grad():
        full = model(*args, **kwargs)[0]
    cut = next(c.id for c in __import__("streamlined_core.engine.arch", fromlist=["cut_points"]).cut_points(model)
               if c.section == "up" and c.level == 0 and c.fresh)
    with rehash(model, RehashConfig(key_steps=[0], cut=cut), scheduler=loop.scheduler) as h:
        key, reuse, _last = loop()
    assert [r.kind for r in h.last_run.records] == ["key", "reuse", "key"]
    assert torch.equal(key, full)
    assert torch.allclose(reuse, full, rtol=0, atol=1e-5 * float(full.abs().max()))


def test_bad_cuts_are_refused_by_name(unet, batch):
    scheduler = fixture.make_scheduler()
    with rehash(unet, RehashConfig(interval=2, cut="down0.0.res"), scheduler=scheduler):
        with pytest.raises(ValueError, match="cut='down0.0.res'.*middle or up path"):
            sample(unet, batch, scheduler)
    with rehash(unet, RehashConfig(interval=2, cut="up0.2.attn"), scheduler=scheduler):
        with pytest.raises(ValueError, match="replay=True"):
            sample(unet, batch, scheduler)
    assert "forward" not in unet.__dict__ and "step" not in scheduler.__dict__


# -- removal, composition, the cache's lifetime ---------------------------------------------------------


def test_remove_restores_unet_and_scheduler_in_either_order(unet, batch):
    scheduler = fixture.make_scheduler()
    unet_keys, sched_keys = set(unet.__dict__), set(scheduler.__dict__)
    plain = sample(unet, batch, scheduler)
    cfg = RehashConfig(key_steps=[0, 2])
    for order in ("rehash first", "streamline first"):
        if order == "rehash first":
            r = rehash(unet, cfg, scheduler=scheduler)
            s = streamline(unet, slices=2)
        else:
            s = streamline(unet, slices=2)
            r = rehash(unet, cfg, scheduler=scheduler)
        sample(unet, batch, scheduler)
        assert [x.kind for x in r.last_run.records] == ["key", "reuse", "key", "key"]
        s.remove()  # rehash keeps working without the streamline handle
        sample(unet, batch, scheduler)
        assert [x.kind for x in r.last_run.records] == ["key", "reuse", "key", "key"]
        r.remove()
        r.remove()
        assert set(unet.__dict__) == unet_keys and set(scheduler.__dict__) == sched_keys, order
        assert torch.equal(sample(unet, batch, scheduler), plain)


def test_applying_again_and_removing_in_any_order_leaves_nothing_behind(unet, batch):
    scheduler = fixture.make_scheduler()
    unet_dict = {k: id(v) for k, v in unet.__dict__.items()}
    sched_keys = set(scheduler.__dict__)  # its schedule tensors change with every run; its methods must not
    first = rehash(unet, RehashConfig(interval=2), scheduler=scheduler)
    second = rehash(unet, RehashConfig(key_steps=[0, 1]), scheduler=scheduler)  # replaces the first, clock and all
    sample(unet, batch, scheduler)
    assert first.last_run is None and [r.kind for r in second.last_run.records] == ["key", "key", "reuse", "key"]
    s = streamline(unet, slices=2)
    second.remove()  # Step Rehash first, then the streamline handle
    assert unet.__dict__.get("_streamline_handle") is s
    s.remove()
    first.remove()
    calibrate(unet, lambda: sample(unet, batch, scheduler, steps=2), positions=16, scheduler=scheduler)
    assert {k: id(v) for k, v in unet.__dict__.items()} == unet_dict
    assert set(scheduler.__dict__) == sched_keys and "step" not in sched_keys and "set_timesteps" not in sched_keys


def test_the_cache_is_freed_after_a_run_and_after_an_exception_inside_one(unet, batch):
    scheduler = fixture.make_scheduler()
    handle = rehash(unet, RehashConfig(key_steps=[0, 3]), scheduler=scheduler)
    seen = []
    original = handle._attached.make_run

    def watch(steps):
        run = original(steps)
        store = run.state.store

        def store_and_watch(branches, request):
            store(branches, request)
            seen.extend(weakref.ref(run.state.cache[b].h) for b in branches)
        run.state.store = store_and_watch
        return run

    handle._attached.make_run = watch
    try:
        sample(unet, batch, scheduler, steps=5)
        gc.collect()
        assert seen and all(ref() is None for ref in seen)
        assert handle._attached.run is None and not handle.last_run.cache

        seen.clear()
        calls = [0]

        def fail_on_third_call(_module, _args):
            calls[0] += 1
            if calls[0] == 3:
                raise RuntimeError("out of memory (simulated by a forward pre-hook)")

        hook = unet.conv_in.register_forward_pre_hook(fail_on_third_call)
        try:
            with pytest.raises(RuntimeError, match="simulated"):
                sample(unet, batch, scheduler, steps=5)
        finally:
            hook.remove()
        gc.collect()
        assert seen and all(ref() is None for ref in seen)
        assert handle._attached.run is None and not handle.last_run.finished
        sample(unet, batch, scheduler, steps=5)  # the next run starts clean
        assert handle.last_run.finished and len(handle.last_run.records) == 5
    finally:
        handle.remove()


def test_profiler_marks_key_and_reuse_steps(unet, batch):
    scheduler = fixture.make_scheduler()
    with rehash(unet, RehashConfig(key_steps=[0, 2]), scheduler=scheduler):
        with profile(unet, granularity="step") as rec:
            sample(unet, batch, scheduler)
    tl = Timeline.from_json(json.loads(json.dumps(rec.timeline.to_json())))
    assert [s.rehash for s in tl.steps] == ["key", "reuse", "key", "key"]


def test_stage_request_and_rehash_on_one_unet_is_an_error(unet, batch):
    scheduler = fixture.make_scheduler()
    with rehash(unet, RehashConfig(interval=2), scheduler=scheduler):
        with stage_request(capture={"up0.0.attn"}):
            with pytest.raises(ValueError, match="stage_request"):
                sample(unet, batch, scheduler)


def test_the_planner_keeps_the_cached_feature_out_of_the_budget(unet):
    from streamlined_core.engine.memory import weights_bytes

    scheduler = fixture.make_scheduler()
    args = (torch.zeros(2, 5, 8, 32, 32), torch.tensor(0.5))
    kwargs = dict(encoder_hidden_states=torch.zeros(2, 1, 64), added_time_ids=torch.zeros(2, 3))
    weights = weights_bytes(unet)
    with streamline(unet) as probe:
        unsliced = probe.unsliced_peak_bytes(*args, **kwargs)
        least = probe.least_total_bytes(probe._arguments(args, kwargs)) - weights
    budget = weights + unsliced  # fits unsliced, until the cache takes its share
    with streamline(unet, budget_bytes=budget) as s, rehash(unet, RehashConfig(interval=2), scheduler=scheduler) as r:
        arguments = s._arguments(args, kwargs)
        reserved = s.reserved_bytes(arguments, r)
        # the feature after up_blocks.3.attentions.0, (2 x 5 frames, 32 channels, 32 x 32) fp32, and the copy a
        # reuse step starts from
        assert reserved == 2 * (2 * 5 * 32 * 32 * 32 * 4)
        plain, kept = s._plan(arguments), s._plan(arguments, r)
        assert kept.predicted_peak_bytes + reserved <= budget - weights < plain.predicted_peak_bytes + reserved
    tight = weights + least + reserved // 2  # the plan alone fits; with the cache it cannot
    with streamline(unet, budget_bytes=tight) as s, rehash(unet, RehashConfig(interval=2), scheduler=scheduler) as r:
        arguments = s._arguments(args, kwargs)
        assert s._plan(arguments).fits
        with pytest.raises(ValueError, match="budget_bytes=.*kept for Step Rehash's cached feature"):
            s._plan(arguments, r)


# -- calibration and schedule files --------------------------------------------------------------------


@pytest.fixture(scope="module")
def calibration(unet, batch):
    scheduler = fixture.make_scheduler()
    return calibrate(unet, lambda: sample(unet, batch, scheduler, steps=6), positions=256, scheduler=scheduler)


def test_calibration_measures_every_cut(calibration, unet):
    assert set(calibration.maps) == set(LAST_UP_BLOCK)
    for m in calibration.maps.values():
        assert m.shape == (6, 6)
        assert torch.allclose(torch.diagonal(m), torch.ones(6), atol=1e-5)
        assert torch.allclose(m, m.T, atol=1e-6)
    assert calibration.made_for == {"model": fingerprint(unet), "steps": 6, "sampler": "EulerDiscreteScheduler",
                                    "scheduler": "karras", "denoise": 1.0}
    sched = calibration.schedule("up0.0.attn", count=4)
    assert len(sched.key_steps) <= 4 and sched.key_steps == key_steps_for_gamma(calibration.maps["up0.0.attn"], sched.gamma)
    assert "forward" not in unet.__dict__ and "_streamline_rehash" not in unet.__dict__


def test_calibration_cap_is_a_clear_error(unet, batch):
    scheduler = fixture.make_scheduler()
    with pytest.raises(MemoryError, match="cap of"):
        calibrate(unet, lambda: sample(unet, batch, scheduler, steps=2), positions=256, cap_bytes=1000,
                  scheduler=scheduler)
    assert "forward" not in unet.__dict__ and "step" not in scheduler.__dict__


def test_fingerprint_follows_the_weights():
    a = fixture.build_fixture_unet(seed=0)
    b = fixture.build_fixture_unet(seed=0)
    assert fingerprint(a) == fingerprint(b) == fingerprint(b.half())
    with torch.no_grad():
        for p in a.parameters():
            p.add_(1e-2)  # like a LoRA merged into every weight
    assert fingerprint(a) != fingerprint(b)


def test_schedule_files_round_trip_and_bad_files_are_named(calibration, unet, batch, tmp_path):
    json_path, maps_path = calibration.save(tmp_path / "s", cut="up0.1.res", count=4)
    assert json_path.name == "s.json" and maps_path.name == "s.safetensors"
    loaded = Schedule.load(json_path)
    assert loaded.key_steps == calibration.schedule("up0.1.res", count=4).key_steps
    assert set(loaded.maps) == set(LAST_UP_BLOCK)
    assert RehashConfig(schedule=json_path, cut="up0.0.attn", count=3).schedule.cut == "up0.0.attn"

    scheduler = fixture.make_scheduler()
    with rehash(unet, RehashConfig(schedule=json_path), scheduler=scheduler) as h:
        sample(unet, batch, scheduler, steps=6)
    assert [r.step for r in h.last_run.records if r.kind == "key"] == loaded.key_steps
    with rehash(unet, RehashConfig(schedule=json_path), scheduler=scheduler):
        with pytest.raises(ValueError, match="steps: made for 6, used with 4"):
            sample(unet, batch, scheduler, steps=4)
    other = fixture.build_fixture_unet(seed=1)
    with rehash(other, RehashConfig(schedule=json_path), scheduler=scheduler):
        with pytest.raises(ValueError, match="model: made for"):
            sample(other, batch, scheduler, steps=6)
    with rehash(other, RehashConfig(schedule=json_path, override=True), scheduler=scheduler) as h:
        sample(other, batch, scheduler, steps=6)
    assert h.last_run.finished

    with pytest.raises(FileNotFoundError, match="no such file"):
        Schedule.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        RehashConfig(schedule=tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="format"):
        Schedule.load(tmp_path / "other.json")
    doc = json.loads(json_path.read_text())
    (tmp_path / "keys.json").write_text(json.dumps({**doc, "key_steps": [1, 3], "maps": None}))
    with pytest.raises(ValueError, match="rise strictly from 0"):
        Schedule.load(tmp_path / "keys.json")
    (tmp_path / "nomaps.json").write_text(json.dumps({**doc, "maps": "gone.safetensors"}))
    with pytest.raises(FileNotFoundError, match="gone.safetensors"):
        Schedule.load(tmp_path / "nomaps.json")
    (tmp_path / "broken.safetensors").write_bytes(maps_path.read_bytes()[:100])
    (tmp_path / "broken.json").write_text(json.dumps({**doc, "maps": "broken.safetensors"}))
    with pytest.raises(ValueError, match="damaged"):
        Schedule.load(tmp_path / "broken.json")
    with pytest.raises(ValueError, match="cut='up1.0.res'"):
        RehashConfig(schedule=json_path, cut="up1.0.res")


# -- the field's whole-step reuse, as the bench runs it ------------------------------------------------


def test_whole_step_reuse_computing_every_step_is_plain_sampling(unet, batch):
    from streamlined_core.tools.bench.rehash import WholeStepReuse

    scheduler = fixture.make_scheduler()
    plain = sample(unet, batch, scheduler)
    for options in (dict(key_steps=range(4)), dict(threshold=0.0)):  # nothing below a threshold of 0
        wrapper = WholeStepReuse(unet, scheduler, 4, **options)
        try:
            assert torch.equal(sample(wrapper, batch, scheduler), plain)
        finally:
            wrapper.restore()
        assert wrapper.full == 4 and "step" not in scheduler.__dict__
    wrapper = WholeStepReuse(unet, scheduler, 4, key_steps=[0, 2, 3])
    try:
        out = sample(wrapper, batch, scheduler)
    finally:
        wrapper.restore()
    assert wrapper.full == 3 and not torch.equal(out, plain)


def test_a_call_carrying_several_branches_caches_each_and_reuse_calls_join_them_in_their_own_order():
    """A host may batch guidance branches at a key step and run them apart (or the other way round) later."""
    from streamlined_core.engine.stages import CutState
    from streamlined_core.features.rehash import RehashState

    run = RehashState("up0.0.attn", 3, [0, 2])
    request, kind = run.request(0, ["uncond", "cond"])
    assert kind == "key" and request.capture == {"up0.0.attn"}
    h = torch.arange(24.0).reshape(4, 6)  # rows: 2 of uncond, then 2 of cond
    request.captures.append({"up0.0.attn": CutState("up0.0.attn", h, [], None)})
    run.store(["uncond", "cond"], request)
    assert run.cache_bytes == h.numel() * 4
    alone, kind = run.request(1, ["cond"])
    assert kind == "reuse" and torch.equal(alone.start.h, h[2:])
    swapped, _ = run.request(1, ["cond", "uncond"])
    assert torch.equal(swapped.start.h, torch.cat([h[2:], h[:2]]))
    unknown, kind = run.request(1, ["cond", "area"])
    assert kind == "key (no cache)" and unknown.start is None
    assert [(r.step, r.kind, r.calls) for r in run.records] == [(0, "key", 1), (1, "key (no cache)", 3)]
    uneven = run.request(2, ["a", "b", "c"])[0]
    uneven.captures.append({"up0.0.attn": CutState("up0.0.attn", h, [], None)})
    with pytest.raises(ValueError, match="4 rows carries 3 branches"):
        run.store(["a", "b", "c"], uneven)


def test_the_bench_chooses_the_most_accurate_unbeaten_cut_and_the_cheaper_of_equals():
    from streamlined_core.tools.bench.rehash import Row, choose_default

    def row(setting, time, db, method="rehash"):
        return Row(method, setting, 13, time, db, 0.0, time)

    a, b, c = row("a", 0.67, 58.0), row("b", 0.57, 52.0), row("c", 0.60, 52.0)
    rival = row("replay, 16", 0.64, 69.0)
    assert choose_default([("a", a), ("b", b), ("c", c)], [a, b, c, rival]) == "b"  # a is beaten; b is cheaper than c
    assert choose_default([("a", a), ("b", b)], [a, b]) == "a"  # nothing beats a: the most accurate
    assert choose_default([("a", a)], [a, rival]) == "a"  # every candidate beaten: still the most accurate
    pab = row("pab", 0.10, 90.0, method="pab")  # timed end to end: not compared
    assert choose_default([("a", a), ("b", b)], [a, b, pab]) == "a"
    failed = Row("easycache (ComfyUI node)", "raised", 0, None, None, None, None, error="RuntimeError: x")
    assert choose_default([("a", a), ("b", b)], [a, b, failed]) == "a"  # a setting that raised beats nothing


def test_the_comfyui_bench_reads_whether_the_node_saved_its_calibration():
    from streamlined_core.tools.bench.rehash_comfyui import _saved_calibration

    saved = ("no calibration for this model and setting in /tmp/x: this run calibrates; calibrated on this run and "
             "saved abc-25steps-euler-karras.json in /tmp/x; the next runs with this model and setting use it")
    assert _saved_calibration(saved) == "saved as abc-25steps-euler-karras.json"
    for text in ("the calibration was not saved (ValueError: bad)", "nothing saved (use interval, or fewer frames)"):
        assert _saved_calibration(text) == f"not saved: {text}"
