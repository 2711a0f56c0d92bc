"""The contract (tests/contract.py) on tiny real diffusers SVD and AnimateDiff U-Nets.

Each sliced case runs the streamlined forward with every group forced to ``k`` slices (clamped to its
axis) against the stock forward of the same model; ``k=1`` is the control. Every cut point is
captured in one forward and every tail and shallow path run from it. The cases run once per module
(a fixture), so each check below holds when run alone, under ``-k`` or in any order.
"""

import pytest
import torch
import torch.nn.functional as F
from contract import TOL, Coverage, Subject, check_cuts, check_per_slice_statistics_fail, check_sliced

from streamlined_core.engine import slicing
from streamlined_core.engine.arch import cut_points, diffusers_animatediff, diffusers_svd
from streamlined_core.engine.slicing import GroupNormStats, slice_bounds
from streamlined_core.engine.stages import CutState
from streamlined_core.tools import configs


def seeded(model):
    return configs.seed_weights(model, std=0.1)


MODELS = {
    "svd": lambda: seeded(configs.build_tiny_diffusers_svd()),
    "svd-wide": lambda: seeded(configs.build_tiny_diffusers_svd(block_out_channels=(64, 96), cross_attention_dim=48)),
    "animatediff": lambda: seeded(configs.build_tiny_diffusers_animatediff()),
    "animatediff-groups": lambda: seeded(
        configs.build_diffusers_animatediff(
            "cpu", torch.float32,
            {**configs.TINY_SD_KWARGS, "block_out_channels": (48, 96), "norm_num_groups": 4, "cross_attention_dim": 24},
            {**configs.TINY_ADAPTER_KWARGS, "block_out_channels": (48, 96), "motion_norm_num_groups": 8},
        )
    ),
}
FORWARD = {"svd": diffusers_svd, "animatediff": diffusers_animatediff}
INPUTS = {"svd": configs.diffusers_svd_inputs, "animatediff": configs.diffusers_animatediff_inputs}


@pytest.fixture(scope="module")
def models():
    return {name: build() for name, build in MODELS.items()}


def family(name):
    return name.split("-")[0]


def subject(model, name, shape) -> Subject:
    fam = family(name)
    torch.manual_seed(1)
    args, kwargs = INPUTS[fam](model, *shape)

    def engine(runner):
        out = FORWARD[fam].streamlined_forward(model, runner, *args, **kwargs)
        return out if isinstance(out, CutState) else out[0]

    return Subject(lambda: model(*args, **kwargs)[0], engine, cut_points(model))


# (batch, frames, height, width) in pixels; latents are /8, the deepest level halves them once.
SHAPES = [
    (2, 3, 64, 64),    # CFG batch, odd frame count
    (1, 1, 32, 96),    # one frame, batch of one, non-square
    (2, 13, 40, 56),   # 13 frames; 5x7 latent: odd sizes, forwarded upsample sizes
    (1, 5, 48, 80),    # slices that do not divide 5 frames or 60 pixels
]
SLICES = [1, 2, 3, 7, 10_000]  # 1 is the control; 10_000 clamps to each axis: the most slicing
CASES = [(name, shape, k) for name in MODELS for shape in SHAPES for k in SLICES]


@pytest.fixture(scope="module")
def sliced(models):
    """Every sliced case's error, and per family which groups ran sliced."""
    coverage = {"svd": Coverage(), "animatediff": Coverage()}
    errors = {}
    for name, shape, k in CASES:
        errors[name, shape, k] = check_sliced(subject(models[name], name, shape), k, coverage[family(name)])
    return errors, coverage


@pytest.mark.parametrize("name, shape, slices", CASES, ids=lambda v: "b{}_t{}_{}x{}".format(*v) if isinstance(v, tuple) else str(v))
def test_sliced_equals_unsliced(sliced, name, shape, slices):
    errors, _ = sliced
    assert errors[name, shape, slices] <= TOL


@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: "b{}_t{}_{}x{}".format(*s))
@pytest.mark.parametrize("slices", [2, 3, 10_000])
def test_svd_temporal_resblock_recompute_mode_equals_unsliced(models, shape, slices):
    assert check_sliced(subject(models["svd"], "svd", shape), slices, mode="recompute") <= TOL


@pytest.mark.parametrize("name", ["svd", "animatediff"])
def test_per_slice_norm_statistics_fail_the_same_comparison(models, name, monkeypatch):
    check_per_slice_statistics_fail(subject(models[name], name, (2, 3, 64, 64)), monkeypatch)


def test_every_group_with_an_axis_of_two_or_more_ran_with_two_or_more_slices(sliced):
    _, coverage = sliced
    for fam, cov in coverage.items():
        assert cov.seen, f"no {fam} case ran"
        assert not cov.never_sliced(), f"{fam} groups never sliced: {cov.never_sliced()}"
    kinds = coverage["svd"].kinds() | coverage["animatediff"].kinds()
    assert {"spatial", "temporal", "motion_modules", "attentions", "downsamplers", "conv_out"} <= kinds


# -- cut points ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["svd", "animatediff"])
@pytest.mark.parametrize("slices", [1, 3])
def test_every_cut_captured_in_one_forward_runs_its_tail_and_shallow_path_to_the_same_output(models, name, slices):
    cuts = cut_points(models[name])
    report = check_cuts(subject(models[name], name, (2, 3, 40, 56)), slices)  # 5x7 latents: forwarded upsample sizes
    assert report.tails == report.cuts == len(cuts) >= 20
    assert report.shallow == sum(c.section in ("mid", "up") for c in cuts) >= 10


def test_controlnet_residuals_hold_sliced_and_on_every_cut(models):
    """diffusers' down and middle block residuals (what a ControlNet hands the AnimateDiff U-Net)."""
    from streamlined_core.engine.arch.diffusers_common import skip_layout
    from streamlined_core.engine.slicing import Runner

    model, shape = models["animatediff"], (2, 3, 64, 64)
    gen = torch.Generator().manual_seed(4)
    items = shape[0] * shape[1]
    layout = skip_layout(model, shape[2] // 8, shape[3] // 8)
    down = tuple(torch.randn(items, t.channels, t.height, t.width, generator=gen) * 0.1 for t in layout)
    last = layout[-1]
    mid = torch.randn(items, last.channels, last.height, last.width, generator=gen) * 0.1
    torch.manual_seed(1)
    args, kwargs = INPUTS["animatediff"](model, *shape)
    kwargs = dict(kwargs, down_block_additional_residuals=down, mid_block_additional_residual=mid)

    def engine(runner):
        out = diffusers_animatediff.streamlined_forward(model, runner, *args, **kwargs)
        return out if isinstance(out, CutState) else out[0]

    s = Subject(lambda: model(*args, **kwargs)[0], engine, cut_points(model))
    assert check_sliced(s, 3) <= TOL
    assert check_cuts(s).tails == len(s.cuts)
    with torch.no_grad():
        plain = model(*args, **{k: v for k, v in kwargs.items() if "additional" not in k})[0]
    assert (s.reference() - plain).abs().max() > 1e-3, "the residuals change the output"
    with pytest.raises(ValueError, match="down_block_additional_residuals holds 2 tensors"):
        diffusers_animatediff.streamlined_forward(model, Runner(), *args, **dict(kwargs, down_block_additional_residuals=down[:2]))


def test_cut_ids_name_the_host_layers_and_what_each_tail_needs(models):
    cuts = {c.id: c for c in cut_points(configs.build_diffusers_svd("meta"))}  # the full-size layout
    assert len(cuts) == 42  # 18 down, 3 middle, 21 up
    assert cuts["up0.0.attn"].after == "up_blocks.3.attentions.0" and cuts["up0.0.attn"].shallow == (
        "conv_in", "down_blocks.0.resnets.0", "down_blocks.0.attentions.0")
    assert cuts["up0.1.res"].shallow == ("conv_in",)
    assert not cuts["up0.2.attn"].fresh and "replays" in cuts["up0.2.attn"].label
    assert cuts["up0.1.attn"].fresh and cuts["up0.1.attn"].skips == 1
    motion = {c.id: c for c in cut_points(models["animatediff"])}  # two levels in the tiny config
    assert motion["up0.0.motion"].after == "up_blocks.1.motion_modules.0"
    assert motion["down1.1.motion"].after == "down_blocks.1.motion_modules.1" and motion["mid.0.motion"]


def test_group_norm_statistics_merge_stably_across_uneven_slices():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 5, 37) * 3 + 1000.0  # a large mean: E[x^2] - E[x]^2 would lose it
    stats = GroupNormStats(4)
    for a, b in slice_bounds(37, 6):
        stats.add(x[..., a:b])
    weight, bias = torch.randn(8), torch.randn(8)
    truth = F.group_norm(x.double(), 4, weight.double(), bias.double(), 1e-5)
    native_error = (F.group_norm(x, 4, weight, bias, 1e-5) - truth).abs().max().item()
    for a, b in slice_bounds(37, 6):
        got = slicing.group_norm(x[..., a:b], stats, 1e-5, (weight, bias))
        # as close to the fp64 truth as torch's own fp32 kernel is (the input's own rounding dominates)
        assert (got - truth[..., a:b]).abs().max().item() <= 1.5 * native_error + 1e-6


def test_slice_bounds_cover_the_axis_without_overlap():
    for length in (1, 2, 5, 13, 28, 9216):
        for k in (1, 2, 3, 7, 28, 100_000):
            bounds = slice_bounds(length, k)
            assert bounds[0][0] == 0 and bounds[-1][1] == length
            assert all(b0[1] == b1[0] for b0, b1 in zip(bounds, bounds[1:]))
            sizes = [b - a for a, b in bounds]
            assert len(bounds) == min(k, length) and max(sizes) - min(sizes) <= 1
