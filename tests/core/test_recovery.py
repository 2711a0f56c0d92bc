"""Out of memory inside a sliced call: the call runs again, once, at the least-memory plan, says so, and gives
the same output; a second failure is the device's own error type, naming the budget argument. The fault is
the real ``torch.OutOfMemoryError``, raised by a layer of the real diffusers U-Net on a real (not meta) call."""

import logging

import pytest
import torch
from contract import diffusers_svd_call, out_of_memory, rel

from streamlined_core import listen, streamline
from streamlined_core.engine.context import run_context
from streamlined_core.engine.slicing import GroupEvent

SHAPE = (1, 5, 64, 96)


@pytest.fixture
def svd_call():
    return diffusers_svd_call(SHAPE)


def test_one_out_of_memory_error_is_retried_at_the_least_memory_plan_with_the_same_output(svd_call, caplog):
    model, args, kwargs, reference = svd_call
    handle = streamline(model, budget_bytes=sum(p.numel() * 4 for p in model.parameters()) + 2**30)  # unsliced
    least = handle.plan_within(handle.bind(*args, **kwargs), 0)
    hook, count = out_of_memory(model.down_blocks[0].resnets[0].spatial_res_block.conv1, 1)
    events = []
    caplog.set_level(logging.WARNING)
    try:
        with torch.no_grad(), run_context() as ctx, listen(events.append):
            out = model(*args, **kwargs)[0]
    finally:
        hook.remove()
        handle.remove()
    assert count[0] == 1 and rel(out, reference) <= 1e-5
    (said,) = [r.getMessage() for r in caplog.records if "out of memory" in r.getMessage()]
    assert "retrying once at the least-memory plan" in said and "UNetSpatioTemporalConditionModel" in said
    assert ctx.recovered == [said]
    # the retry ran the least-memory plan, from the first group on
    starts = [e for e in events if isinstance(e, GroupEvent) and e.kind == "start"]
    retry = starts[[e.name for e in starts].index(starts[0].name, 1):]
    assert retry and [e.slices for e in retry] == [max(1, min(least.decide(e.name, e.axis, e.length)[0], e.length))
                                                   for e in retry]
    assert least.predicted_peak_bytes < ctx.plans[0].predicted_peak_bytes


def test_a_second_out_of_memory_error_is_the_devices_own_naming_the_budget_and_leaves_the_model_usable(svd_call):
    model, args, kwargs, reference = svd_call
    params = list(model.parameters())
    handle = streamline(model)
    hook, count = out_of_memory(model.down_blocks[0].resnets[0].spatial_res_block.conv1, 2)
    try:
        with torch.no_grad(), pytest.raises(torch.OutOfMemoryError, match="again at the least-memory plan.*budget_bytes"):
            model(*args, **kwargs)
    finally:
        hook.remove()
    assert count[0] == 2
    with torch.no_grad():
        assert rel(model(*args, **kwargs)[0], reference) <= 1e-5  # the next run is correct
    handle.remove()
    assert "forward" not in model.__dict__ and all(p is q for p, q in zip(model.parameters(), params))


def test_other_errors_are_not_retried(svd_call):
    model, args, kwargs, _ = svd_call
    handle = streamline(model, slices=2)
    calls = [0]

    def hook(_module, inputs):
        if inputs[0].device.type != "meta":
            calls[0] += 1
            raise RuntimeError("not a memory error")

    removable = model.down_blocks[0].resnets[0].spatial_res_block.conv1.register_forward_pre_hook(hook)
    try:
        with torch.no_grad(), pytest.raises(RuntimeError, match="not a memory error"):
            model(*args, **kwargs)
    finally:
        removable.remove()
        handle.remove()
    assert calls[0] == 1
