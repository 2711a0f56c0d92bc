"""Sliced equals unsliced on tiny real diffusers models, and the tests prove they tested something.

Each case runs the streamlined forward with every group forced to ``k`` slices (clamped to its
axis) and compares it to the stock forward of the same model: fp32, max abs difference at most
1e-5 of the output's max magnitude (BENCHMARKS.md). ``k=1`` is the control. Across the cases every
group whose axis has length >= 2 must have run with >= 2 slices (checked at the end), and a
variant with per-slice norm statistics must fail the same comparison.
"""

from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F

from streamlined_core import configs, slicing
from streamlined_core.arch import diffusers_animatediff, diffusers_svd
from streamlined_core.slicing import GroupNormStats, Runner, slice_bounds

TOL = 1e-5
SLICED: dict[str, dict[str, int]] = defaultdict(dict)  # family -> group -> most slices run (axis length >= 2)
SEEN: dict[str, set[str]] = defaultdict(set)  # family -> groups whose axis had length >= 2


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


def run(model, name, shape, slices, mode="keep"):
    fam = family(name)
    torch.manual_seed(1)
    args, kwargs = INPUTS[fam](model, *shape)

    def record(event):
        if event.kind == "end" and event.length >= 2:
            SEEN[fam].add(event.name)
            if event.slices >= 2:
                SLICED[fam][event.name] = max(SLICED[fam].get(event.name, 0), event.slices)

    with torch.no_grad():
        reference = model(*args, **kwargs)[0]
        runner = Runner(lambda _n, _a, _l: (slices, mode), [record])
        out = FORWARD[fam].streamlined_forward(model, runner, *args, **kwargs)[0]
    assert torch.isfinite(reference).all() and reference.std() > 0, "the comparison would prove nothing"
    return out, reference


def relative_error(out, reference):
    return ((out - reference).abs().max() / reference.abs().max()).item()


# (batch, frames, height, width) in pixels; latents are /8, the deepest level halves them once.
SHAPES = [
    (2, 3, 64, 64),    # CFG batch, odd frame count
    (1, 1, 32, 96),    # one frame, batch of one, non-square
    (2, 13, 40, 56),   # 13 frames; 5x7 latent: odd sizes, forwarded upsample sizes
    (1, 5, 48, 80),    # slices that do not divide 5 frames or 60 pixels
]
SLICES = [1, 2, 3, 7, 10_000]  # 1 is the control; 10_000 clamps to each axis: the most slicing


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}_t{}_{}x{}".format(*s))
@pytest.mark.parametrize("slices", SLICES)
def test_sliced_equals_unsliced(models, name, shape, slices):
    out, reference = run(models[name], name, shape, slices)
    assert out.shape == reference.shape
    assert relative_error(out, reference) <= TOL


@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: "b{}_t{}_{}x{}".format(*s))
@pytest.mark.parametrize("slices", [2, 3, 10_000])
def test_svd_temporal_resblock_recompute_mode_equals_unsliced(models, shape, slices):
    out, reference = run(models["svd"], "svd", shape, slices, mode="recompute")
    assert relative_error(out, reference) <= TOL


def per_slice_group_norm(x, stats, eps, affine):
    """The approximation the paper's released code makes: statistics of the slice alone."""
    return F.group_norm(x, stats.num_groups, affine[0], affine[1], eps)


@pytest.mark.parametrize("name", ["svd", "animatediff"])
def test_per_slice_norm_statistics_fail_the_same_comparison(models, name, monkeypatch):
    monkeypatch.setattr(slicing, "group_norm", per_slice_group_norm)
    out, reference = run(models[name], name, (2, 3, 64, 64), 4)
    assert relative_error(out, reference) > 10 * TOL  # the equivalence tests above would fail


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


def test_every_group_with_an_axis_of_two_or_more_ran_with_two_or_more_slices():
    # Runs after the equivalence cases above (file order): ask what the runs actually did.
    for fam in ("svd", "animatediff"):
        assert SEEN[fam], f"no {fam} case ran"
        missing = sorted(SEEN[fam] - set(SLICED[fam]))
        assert not missing, f"{fam} groups never sliced: {missing}"
    kinds = {part for fam in SLICED for name in SLICED[fam] for part in name.split(".")}
    assert {"spatial", "temporal", "motion_modules", "attentions", "downsamplers", "conv_out"} <= kinds
