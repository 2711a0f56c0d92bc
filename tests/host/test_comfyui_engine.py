"""The engine on ComfyUI's own SVD UNetModel: the owned loop equals the host's, sliced or not."""


import pytest
import torch
import torch.nn.functional as F

from streamlined_core import configs, slicing, streamline
from streamlined_core.arch import comfy_unet
from streamlined_core.slicing import Runner

TOL = 1e-5
SLICED: dict[str, int] = {}
SEEN: set[str] = set()


@pytest.fixture(scope="module")
def model(comfyui):
    m = configs.build_tiny_comfy_svd("cpu", torch.float32)
    configs.seed_weights(m, std=0.05)  # ComfyUI leaves weights uninitialised
    return m


def inputs(model, shape, seed=1):
    torch.manual_seed(seed)
    return configs.comfy_svd_inputs(model, *shape)


def record(event):
    if event.kind == "end" and event.length >= 2:
        SEEN.add(event.name)
        if event.slices >= 2:
            SLICED[event.name] = max(SLICED.get(event.name, 0), event.slices)


def compare(model, shape, slices, mode="keep", options=lambda: {}, control=lambda: None):
    args, kwargs = inputs(model, shape)
    with torch.no_grad():
        reference = model(*args, control=control(), transformer_options=options(), **kwargs)
        runner = Runner(lambda _n, _a, _l: (slices, mode), [record])
        out = comfy_unet.streamlined_forward(model, runner, *args, control=control(), transformer_options=options(), **kwargs)
    assert torch.isfinite(reference).all() and reference.std() > 0, "the comparison would prove nothing"
    return ((out - reference).abs().max() / reference.abs().max()).item()


def test_this_host_version_is_recognised(model):
    assert comfy_unet.recognises(model)


SHAPES = [(2, 3, 64, 64), (1, 1, 32, 96), (2, 13, 40, 56), (1, 5, 48, 80)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}_t{}_{}x{}".format(*s))
@pytest.mark.parametrize("slices", [1, 2, 3, 10_000])
def test_sliced_equals_the_hosts_own_loop(model, shape, slices):
    assert compare(model, shape, slices) <= TOL


@pytest.mark.parametrize("slices", [2, 10_000])
def test_recompute_mode_equals_the_hosts_own_loop(model, slices):
    assert compare(model, (2, 5, 48, 80), slices, mode="recompute") <= TOL


def test_owned_loop_keeps_every_hook_of_the_host(model):
    """Output-block patch (FreeU-style), input-block patches, emb patch and a control residual."""
    shape = (2, 3, 64, 64)
    args, _ = inputs(model, shape)
    n = args[0].shape[0]
    seen_blocks = []

    def output_patch(h, hsp, opts):
        seen_blocks.append(opts["block"])
        return h * 1.05, hsp * 0.9  # per-frame, as FreeU's scaling is

    def options():
        return {"patches": {
            "output_block_patch": [output_patch],
            "input_block_patch": [lambda h, opts: h * 1.01],
            "input_block_patch_after_skip": [lambda h, opts: h + 0.01],
            "emb_patch": [lambda emb, ch, opts: emb * 0.5],
        }}

    def control():
        gen = torch.Generator().manual_seed(3)
        # apply_control pops from the end: input blocks 0 (64@8x8) and 1; the middle (128@4x4);
        # output blocks 0 (skip 128@4x4: nothing) and 1 (skip 64@4x4).
        return {
            "input": [None, torch.randn(n, 64, 8, 8, generator=gen) * 0.1],
            "middle": [torch.randn(n, 128, 4, 4, generator=gen) * 0.1],
            "output": [None, torch.randn(n, 64, 4, 4, generator=gen) * 0.1, None],
        }

    for slices in (1, 3):
        seen_blocks.clear()
        assert compare(model, shape, slices, options=options, control=control) <= TOL
    assert ("output", 0) in seen_blocks


def test_per_slice_norm_statistics_fail_the_same_comparison(model, monkeypatch):
    monkeypatch.setattr(slicing, "group_norm", lambda x, stats, eps, affine: F.group_norm(x, stats.num_groups, affine[0], affine[1], eps))
    assert compare(model, (2, 3, 64, 64), 4) > 10 * TOL  # the equivalence tests above would fail


def test_every_group_with_an_axis_of_two_or_more_ran_with_two_or_more_slices():
    assert SEEN, "no case ran"
    assert not sorted(SEEN - set(SLICED))
    kinds = {part for name in SLICED for part in name.split(".")}
    assert {"spatial", "temporal", "input_blocks", "middle_block", "output_blocks", "out"} <= kinds


def test_streamline_patches_the_instance_and_removes_cleanly(model):
    args, kwargs = inputs(model, (2, 3, 64, 64))
    with torch.no_grad():
        reference = model(*args, **kwargs)
        with streamline(model, slices=3) as handle:
            assert "_forward" in model.__dict__
            out = model(*args, **kwargs)
        assert "_forward" not in model.__dict__ and handle._removed
    assert ((out - reference).abs().max() / reference.abs().max()).item() <= TOL
