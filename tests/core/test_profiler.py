"""The VRAM profiler's recorder on hand-made event sequences (CPU: the tracker), its bounds, its JSON,
step indices from sigmas, and the diffusers context manager on a streamlined tiny U-Net."""

import json
import math

import pytest
import torch

from streamlined_core.features import profiler
from streamlined_core.features.profiler import Recorder, Timeline, step_index

MB = 1 << 20


def alloc(mb):
    return torch.empty(mb * MB, dtype=torch.uint8)


def test_each_step_and_group_peak_is_where_its_memory_was_live():
    with Recorder("cpu", granularity="group", label="hand-made") as rec:
        for step, sigma in enumerate((10.0, 5.0)):
            rec.call(step, sigma, ["uncond", "cond"])
            a = alloc(4 + step)
            rec.group("down")
            b = alloc(8)
            del b
            rec.group("up")
            del a
    tl = rec.timeline
    assert tl.source == "tracker" and tl.baseline_bytes == 0
    assert [s.step for s in tl.steps] == [0, 1] and [s.sigma for s in tl.steps] == [10.0, 5.0]
    groups = [e for e in tl.events if e.kind == "group"]
    assert [(e.step, e.name, e.peak // MB) for e in groups] == [(0, "down", 4), (0, "up", 12), (1, "down", 5), (1, "up", 13)]
    assert [s.peak // MB for s in tl.steps] == [12, 13]
    assert tl.peak_bytes == 13 * MB and tl.peak_step == 1 and tl.peak_name == "up"
    assert tl.steps[0].conds == ["uncond", "cond"] and tl.steps[0].calls == 1
    assert tl.group_peaks()["up"]["measured"] == 13 * MB
    assert "step 1, up" in tl.summary()


def test_step_granularity_records_no_group_events_and_the_same_step_peaks():
    with Recorder("cpu", granularity="step") as rec:
        rec.call(0, 1.0)
        a = alloc(3)
        rec.group("down")  # ignored at step granularity
        del a
    tl = rec.timeline
    assert not [e for e in tl.events if e.kind == "group"]
    assert tl.steps[0].peak == 3 * MB == tl.peak_bytes


def test_several_calls_of_one_step_are_one_step():
    with Recorder("cpu") as rec:
        rec.call(0, 2.0, ["cond"])
        rec.call(0, 2.0, ["uncond"])
        rec.call(1, 1.0, ["cond"])
    assert [(s.step, s.calls, s.conds) for s in rec.timeline.steps] == [(0, 2, ["cond", "uncond"]), (1, 1, ["cond"])]


def test_long_runs_stay_bounded_and_keep_the_peak_and_every_step():
    with Recorder("cpu", granularity="group", max_events=40) as rec:
        for step in range(12):
            rec.call(step, 1.0 / (step + 1))
            x = alloc(20 if step == 3 else 1)
            for g in range(5):
                rec.group(f"g{g}")
            del x
    tl = rec.timeline
    assert len(tl.events) <= 40 and tl.dropped_events > 0
    assert len(tl.steps) == 12
    assert {e.step for e in tl.events if e.kind == "step_end"} == set(range(12)), "step events stay"
    assert [e.name for e in tl.events if e.step == 11 and e.kind == "group"] == ["g0", "g1", "g2", "g3", "g4"]
    assert tl.peak_bytes == 20 * MB and tl.peak_step == 3 and tl.peak_name == "g0"
    assert tl.steps[3].peak == 20 * MB


def test_when_only_step_events_are_left_the_oldest_go_and_every_step_summary_stays():
    with Recorder("cpu", max_events=20) as rec:
        for step in range(50):
            rec.call(step, 1.0)
    tl = rec.timeline
    assert len(tl.events) <= 20 and len(tl.steps) == 50
    assert tl.events[0].kind == "run_start" and tl.events[-1].kind == "run_end"


def test_json_round_trip_and_schema():
    with Recorder("cpu", granularity="group", label="rt") as rec:
        rec.call(0, 3.0)
        x = alloc(2)
        rec.group("mid", predicted=5 * MB)
        del x
    doc = json.loads(json.dumps(rec.timeline.to_json()))
    assert doc["schema"] == profiler.SCHEMA and doc["activation_peak_bytes"] == 2 * MB
    back = Timeline.from_json(doc)
    assert back == rec.timeline
    assert back.group_peaks()["mid"] == {"measured": 2 * MB, "predicted": 5 * MB}
    with pytest.raises(ValueError, match="expected schema"):
        Timeline.from_json({**doc, "schema": "other/9"})


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="granularity='layer': expected one of step, group"):
        Recorder("cpu", granularity="layer")
    with pytest.raises(ValueError, match="max_events=3"):
        Recorder("cpu", max_events=3)


def test_the_tracker_is_left_when_the_run_raises():
    from streamlined_core.engine import memory

    with pytest.raises(RuntimeError, match="boom"):
        with Recorder("cpu") as rec:
            rec.call(0, 1.0)
            raise RuntimeError("boom")
    assert not memory._ACTIVE
    assert rec.timeline.events[-1].kind == "run_end"


@pytest.mark.parametrize("sigma, expected", [(14.6, 0), (1.0, 2), (0.5, 2), (3.0, 1), (0.03, 3), (99.0, 0)])
def test_step_index_from_sigma(sigma, expected):
    schedule = [14.6, 4.0, 1.0, 0.03, 0.0]
    assert step_index(sigma, schedule) == expected


def test_profile_a_streamlined_diffusers_unet_with_predicted_group_peaks():
    from diffusers import UNetSpatioTemporalConditionModel

    from streamlined_core import streamline
    from streamlined_core.tools import configs

    torch.manual_seed(0)
    unet = UNetSpatioTemporalConditionModel(**configs.TINY_SVD_KWARGS).eval()
    frames = 3
    x = torch.randn(1, frames, 8, 16, 16)
    ehs = torch.randn(1, 1, configs.TINY_SVD_KWARGS["cross_attention_dim"])
    ids = torch.tensor([[6.0, 127.0, 0.02]])
    with streamline(unet), torch.no_grad():  # planned: each group has a predicted peak
        with profiler.profile(unet, granularity="group", label="tiny") as rec:
            for t in (0.8, 0.4):
                unet(x, torch.tensor(t), ehs, ids)
    tl = rec.timeline
    assert [s.step for s in tl.steps] == [0, 1] and tl.steps[0].sigma == pytest.approx(math.exp(4 * 0.8))
    groups = tl.group_peaks()
    assert groups and all(g["measured"] > 0 for g in groups.values())
    assert any(g["predicted"] for g in groups.values()), "Streamline's plan is beside the measurement"
    assert tl.peak_bytes == max(s.peak for s in tl.steps) > 0


@pytest.mark.parametrize("streamlined", [False, True])
def test_the_call_level_tracker_records_the_op_level_peaks_of_a_unet(streamlined):
    """The profiler's tracker counts per torch call; on the U-Net its step and group peaks are the op level's."""
    from diffusers import UNetSpatioTemporalConditionModel

    from streamlined_core import streamline
    from streamlined_core.tools import configs

    torch.manual_seed(0)
    unet = UNetSpatioTemporalConditionModel(**configs.TINY_SVD_KWARGS).eval()
    x = torch.randn(2, 5, 8, 12, 16)
    ehs = torch.randn(2, 1, configs.TINY_SVD_KWARGS["cross_attention_dim"])
    ids = torch.tensor([[6.0, 127.0, 0.02]] * 2)
    timesteps = [torch.tensor(t) for t in (0.8, 0.4)]  # torch.tensor's storage is seen by the call level only
    peaks = {}
    handle = streamline(unet) if streamlined else None
    try:
        for level in ("op", "call"):
            with torch.no_grad(), profiler.profile(unet, granularity="group", tracker_level=level) as rec:
                for t in timesteps:
                    unet(x, t, ehs, ids)
            peaks[level] = ([s.peak for s in rec.timeline.steps],
                            {k: g["measured"] for k, g in rec.timeline.group_peaks().items()})
    finally:
        if handle is not None:
            handle.remove()
    assert len(peaks["op"][1]) >= 4
    assert peaks["call"] == peaks["op"]
