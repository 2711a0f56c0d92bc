"""The tracker's counting rules (docs/benchmarks.md, Peak memory), one hand-made op sequence per rule."""

import pytest
import torch
import torch.nn.functional as F

from streamlined_core.engine.memory import LEVELS, MemoryTracker, attention_lse_bytes

DEVICES = ["cpu", "meta"]


@pytest.mark.parametrize("device", DEVICES)
def test_linear_forward_counts_only_its_output(device):
    linear = torch.nn.Linear(256, 128, device=device)
    x = torch.ones(4, 256, device=device)
    with MemoryTracker() as t:
        y = linear(x)
    assert t.peak_bytes == 4 * 128 * 4  # not the 256x128 weight exposed through a transposed view
    assert t.current_bytes == y.untyped_storage().nbytes()


@pytest.mark.parametrize("device", DEVICES)
def test_linear_without_bias_on_3d_input_counts_only_its_output(device):
    linear = torch.nn.Linear(64, 32, bias=False, device=device)
    x = torch.ones(2, 5, 64, device=device)
    with MemoryTracker() as t:
        linear(x)
    assert t.peak_bytes == 2 * 5 * 32 * 4


@pytest.mark.parametrize("device", DEVICES)
def test_views_and_inplace_ops_add_nothing(device):
    with MemoryTracker() as t:
        a = torch.zeros(1000, device=device)  # 4000 bytes, created in the region
        b = a.view(10, 100).transpose(0, 1)
        b.mul_(2).add_(1)
        c = a[10:20].unsqueeze(0)
        a.relu_()
    assert t.peak_bytes == 4000
    assert c.untyped_storage().nbytes() == 4000


@pytest.mark.parametrize("device", DEVICES)
def test_storages_from_before_the_region_never_count(device):
    weight = torch.ones(512, 512, device=device)
    with MemoryTracker() as t:
        v = weight.t()
        weight.add_(1)
        w = weight.view(-1)[:10]
        s = weight.sum()  # a new 4-byte storage
    assert t.peak_bytes == 4
    assert v.data_ptr() == weight.data_ptr() and w.numel() == 10 and s.numel() == 1


@pytest.mark.parametrize("device", DEVICES)
def test_a_freed_storage_stops_counting(device):
    with MemoryTracker() as t:
        a = torch.ones(1000, device=device)
        b = a * 2  # 4000 + 4000 alive
        del a
        c = b + 1  # a freed: 4000 + 4000 again
        del b, c
        d = torch.ones(10, device=device)
    assert t.peak_bytes == 8000
    assert t.current_bytes == 40
    assert d.numel() == 10


@pytest.mark.parametrize("device", DEVICES)
def test_attention_counts_output_and_log_sum_exp_only(device):
    q = torch.randn(2, 4, 512, 32, device=device)
    k = torch.randn(2, 4, 256, 32, device=device)
    v = torch.randn(2, 4, 256, 16, device=device)
    with MemoryTracker() as t:
        out = F.scaled_dot_product_attention(q, k, v)
    out_bytes = 2 * 4 * 512 * 16 * 4
    lse_bytes = 2 * 4 * 512 * 4  # fp32, one per query row; the 512x256 matrix never counts
    assert attention_lse_bytes(q) == lse_bytes
    assert t.peak_bytes == out_bytes + lse_bytes
    assert t.current_bytes == out_bytes  # the log-sum-exp is gone after the call
    assert out.shape == (2, 4, 512, 16)


@pytest.mark.parametrize("device", DEVICES)
def test_per_device_peaks_include_the_attention_log_sum_exp(device):
    q = torch.randn(2, 4, 512, 32, device=device)
    k = torch.randn(2, 4, 256, 32, device=device)
    v = torch.randn(2, 4, 256, 16, device=device)
    with MemoryTracker() as t:
        F.scaled_dot_product_attention(q, k, v)
    assert t.peak_bytes == 2 * 4 * 512 * 16 * 4 + attention_lse_bytes(q)
    assert t.peak_bytes_by_device == {device: t.peak_bytes}


def test_the_log_sum_exp_counts_on_the_query_device_only():
    q, k, v = (torch.randn(1, 2, 64, 8, device="meta") for _ in range(3))
    with MemoryTracker() as t:
        on_cpu = torch.ones(1000)  # 4000 bytes on the CPU, alive during the attention call
        F.scaled_dot_product_attention(q, k, v)
    out_bytes, lse_bytes = 1 * 2 * 64 * 8 * 4, attention_lse_bytes(q)
    assert t.peak_bytes_by_device == {"cpu": 4000, "meta": out_bytes + lse_bytes}
    assert t.peak_bytes == 4000 + out_bytes + lse_bytes and on_cpu.numel() == 1000


def test_attention_on_cpu_still_computes_the_real_result():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    expected = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1) @ v
    with MemoryTracker():
        out = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_the_output_counts_until_the_region_ends_and_the_region_has_no_grad(device):
    linear = torch.nn.Linear(8, 8, device=device)
    with MemoryTracker() as t:
        assert not torch.is_grad_enabled()
        out = linear(torch.ones(3, 8, device=device, requires_grad=True))
    assert torch.is_grad_enabled()
    assert t.peak_bytes == 3 * 8 * 4 + 3 * 8 * 4  # the input was created in the region too
    assert t.current_bytes == 3 * 8 * 4  # ... and freed; the output is still alive
    assert not out.requires_grad


def test_device_filter_counts_only_the_named_device():
    with MemoryTracker(devices={"meta"}) as t:
        torch.ones(100)
        keep = torch.ones(50, device="meta")
    assert t.peak_bytes == 200 and keep.numel() == 50
    assert t.peak_bytes_by_device == {"meta": 200}


def test_marks_record_a_timeline_of_live_bytes_and_peaks():
    seen = []
    with MemoryTracker(on_event=seen.append) as t:
        a = torch.ones(100, device="meta")
        t.mark("first")
        b = torch.ones(300, device="meta")
        del b
        t.mark("second")
    assert [(e.label, e.live_bytes, e.peak_bytes) for e in t.events] == [("first", 400, 400), ("second", 400, 1600)]
    assert seen == t.events and a.numel() == 100


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("device", DEVICES)
def test_both_levels_count_new_storage_and_skip_views_inplace_ops_and_old_storage(device, level):
    weight = torch.ones(64, 32, device=device)
    with MemoryTracker(level=level) as t:
        x = torch.ones(2, 5, 64, device=device)  # 2560 bytes
        y = F.linear(x, weight.t())  # 3-d input: a view of a storage made inside the call; 1280 bytes
        y.mul_(2)
        z = y.to(torch.float32).view(-1)[:3]
        w = weight.t().contiguous()  # a copy of an old storage: new, 8192 bytes
        del w
    assert t.peak_bytes == 2560 + 1280 + 8192
    assert t.current_bytes == 2560 + 1280 and z.numel() == 3


def test_the_call_level_misses_only_temporaries_inside_one_call():
    x = torch.randn(4, 32, 8, 8)
    with MemoryTracker(level="op") as op:
        F.group_norm(x, 8)
    with MemoryTracker(level="call") as call:
        F.group_norm(x, 8)
    out = 4 * 32 * 8 * 8 * 4
    assert call.peak_bytes == out
    assert op.peak_bytes == out + 2 * 4 * 8 * 4  # native_group_norm's mean and rstd, one per group


def test_an_unknown_level_is_named():
    with pytest.raises(ValueError, match="level='fast'.*op, call"):
        MemoryTracker(level="fast")


@pytest.fixture
def meta_kernels():
    """The shared cache, emptied before and restored after (cached figures must equal uncached ones)."""
    from streamlined_core.engine.memory import META_KERNELS

    META_KERNELS.clear()
    yield META_KERNELS
    META_KERNELS.enabled = True
    META_KERNELS.clear()


def _tracked_peak(call) -> int:
    with MemoryTracker() as t:
        call()
    return t.peak_bytes


def test_meta_kernel_cache_never_caches_an_undeclared_view(meta_kernels):
    """``F.linear`` on 3-d input ends in ``aten._unsafe_view`` of the product: a view its schema does not
    declare. Made fresh from the cache it would count the product twice."""
    linear = torch.nn.Linear(64, 32, bias=False, device="meta")
    x = torch.ones(2, 5, 64, device="meta")
    peaks = [_tracked_peak(lambda: linear(x)) for _ in range(3)]  # the second and third from the cache
    assert peaks == [2 * 5 * 32 * 4] * 3
    assert meta_kernels._plain[torch.ops.aten._unsafe_view.default] is False
    assert meta_kernels.hits > 0


def test_meta_kernel_cache_leaves_views_inplace_ops_and_other_devices_to_their_kernels(meta_kernels):
    """(The cache serves the op-level tracker's region.)"""
    with MemoryTracker():
        for device in DEVICES:
            a = torch.zeros(8, 8, device=device)
            a.t().add_(1)
            (a + 1).sum()
    assert meta_kernels._plain[torch.ops.aten.t.default] is False
    assert meta_kernels._plain[torch.ops.aten.add_.Tensor] is False
    assert meta_kernels.misses == 2  # add and sum on meta; nothing on the CPU was looked up
    with MemoryTracker():
        b = torch.zeros(8, 8, device="meta")
        assert (b + 1).shape == (8, 8) and meta_kernels.hits == 1


def test_a_planned_and_sliced_unet_measures_the_same_with_the_meta_kernel_cache(meta_kernels):
    """The whole planner on a real U-Net class, cached against every kernel run: same plan, same peaks."""
    from streamlined_core.engine.api import streamline
    from streamlined_core.tools import configs

    def plan_and_measure():
        model = configs.build_tiny_diffusers_svd("meta", torch.float16)
        handle = streamline(model)  # planned for 1.5x the skip floor: every measurement pass of the planner
        args, kwargs = configs.diffusers_svd_inputs(model, 2, 5, 40, 24)
        peak = _tracked_peak(lambda: model(*args, **kwargs))
        plan = handle.last_plan
        groups = [(g.name, g.slices, g.mode, g.predicted_bytes) for g in plan.groups]
        return peak, plan.predicted_peak_bytes, plan.describe(), groups

    cached = plan_and_measure()
    assert meta_kernels.hits > 10 * meta_kernels.misses
    meta_kernels.enabled = False
    assert plan_and_measure() == cached


def test_meta_kernel_cache_leaves_subclasses_sparse_outputs_and_other_modes_to_their_kernels(meta_kernels):
    from torch.testing._internal.two_tensor import TwoTensor
    from torch.utils.flop_counter import FlopCounterMode

    y = torch.zeros(3, 3, device="meta")
    with MemoryTracker():
        assert torch.zeros_like(y, layout=torch.sparse_coo).layout == torch.sparse_coo
        pair = TwoTensor(y, y.clone())
        assert [type(pair + 1) for _ in range(2)] == [TwoTensor, TwoTensor]
    a = torch.zeros(64, 64, device="meta")
    with FlopCounterMode(display=False) as flops, MemoryTracker():
        for _ in range(3):
            a @ a
    assert flops.get_total_flops() == 3 * 2 * 64**3  # every product seen by the counter beneath
