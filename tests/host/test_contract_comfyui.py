"""The contract (tests/contract.py) on ComfyUI's own SVD UNetModel: the stage loop against the host's
``_forward``, with and without the host's hooks; the module-level fallback's captures."""

import pytest
import torch
from contract import TOL, Coverage, Subject, check_cuts, check_per_slice_statistics_fail, check_sliced, forced, same_state

from streamlined_core import streamline
from streamlined_core.engine.arch import comfy_unet, cut_points
from streamlined_core.engine.slicing import Runner
from streamlined_core.engine.stages import StageEvent, StageRequest
from streamlined_core.tools import configs


@pytest.fixture(scope="module")
def model(comfyui):
    m = configs.build_tiny_comfy_svd("cpu", torch.float32)
    configs.seed_weights(m, std=0.05)  # ComfyUI leaves weights uninitialised
    return m


def no_hooks():
    return {}, None


def hooks(n):
    """Output-block patch (FreeU-style), input-block patches, emb patch, a control residual per place,
    and an attention patch that records the block indices the host's attention sees."""
    seen = []

    def output_patch(h, hsp, opts):
        return h * 1.05, hsp * 0.9  # per-frame, as FreeU's scaling is

    def record(q, k, v, extra):
        seen.append((extra["block"], extra.get("block_index"), extra.get("transformer_index")))
        return q, k, v

    def make():
        options = {"patches": {
            "output_block_patch": [output_patch],
            "input_block_patch": [lambda h, opts: h * 1.01],
            "input_block_patch_after_skip": [lambda h, opts: h + 0.01],
            "emb_patch": [lambda emb, ch, opts: emb * 0.5],
            "attn1_patch": [record],
        }}
        gen = torch.Generator().manual_seed(3)
        # apply_control pops from the end: input blocks 0 (64@8x8) and 1; the middle (128@4x4);
        # output blocks 0 (skip 128@4x4: nothing) and 1 (skip 64@4x4).
        control = {
            "input": [None, torch.randn(n, 64, 8, 8, generator=gen) * 0.1],
            "middle": [torch.randn(n, 128, 4, 4, generator=gen) * 0.1],
            "output": [None, torch.randn(n, 64, 4, 4, generator=gen) * 0.1, None],
        }
        return options, control

    return make, seen


def subject(model, shape, extras=no_hooks, forward=comfy_unet.streamlined_forward, seed=1):
    torch.manual_seed(seed)
    args, kwargs = configs.comfy_svd_inputs(model, *shape)

    def reference():
        options, control = extras()
        return model(*args, control=control, transformer_options=options, **kwargs)

    def engine(runner):
        options, control = extras()
        return forward(model, runner, *args, control=control, transformer_options=options, **kwargs)

    return Subject(reference, engine, comfy_unet.cuts(model))


def test_this_host_version_is_recognised(model):
    assert comfy_unet.recognises(model)


SHAPES = [(2, 3, 64, 64), (1, 1, 32, 96), (2, 13, 40, 56), (1, 5, 48, 80)]
CASES = [(shape, k) for shape in SHAPES for k in (1, 2, 3, 10_000)]


@pytest.fixture(scope="module")
def sliced(model):
    coverage = Coverage()
    errors = {case: check_sliced(subject(model, case[0]), case[1], coverage) for case in CASES}
    return errors, coverage


@pytest.mark.parametrize("shape, slices", CASES, ids=lambda v: "b{}_t{}_{}x{}".format(*v) if isinstance(v, tuple) else str(v))
def test_sliced_equals_the_hosts_own_loop(sliced, shape, slices):
    assert sliced[0][shape, slices] <= TOL


def test_every_group_with_an_axis_of_two_or_more_ran_with_two_or_more_slices(sliced):
    coverage = sliced[1]
    assert coverage.seen and not coverage.never_sliced()
    assert {"spatial", "temporal", "input_blocks", "middle_block", "output_blocks", "out"} <= coverage.kinds()


@pytest.mark.parametrize("slices", [2, 10_000])
def test_recompute_mode_equals_the_hosts_own_loop(model, slices):
    assert check_sliced(subject(model, (2, 5, 48, 80)), slices, mode="recompute") <= TOL


def test_per_slice_norm_statistics_fail_the_same_comparison(model, monkeypatch):
    check_per_slice_statistics_fail(subject(model, (2, 3, 64, 64)), monkeypatch)


@pytest.mark.parametrize("slices", [1, 3])
def test_every_hook_of_the_host_holds_sliced_and_on_every_cut(model, slices):
    """emb, input and output block patches, control at every place, block indices for attention patches."""
    shape = (2, 3, 64, 64)
    make, seen = hooks(shape[0] * shape[1])
    s = subject(model, shape, make)
    assert check_sliced(s, slices) <= TOL
    report = check_cuts(s, slices)
    assert report.tails == report.cuts == len(s.cuts) and report.shallow > 0
    assert seen and {b[0][0] for b in seen} == {"input", "middle", "output"}


def test_a_forward_timestep_embed_patch_on_downsample_runs_as_in_the_hosts_loop(model):
    """The host consults the patch list before it calls a Downsample; so does the stage loop."""
    import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel

    calls = []

    def handler(layer, x, emb, context, opts, output_shape, time_context, frames, image_only_indicator):
        calls.append(opts["block"])
        return layer(x) * 1.1

    def extras():
        return {"patches": {"forward_timestep_embed_patch": [(openaimodel.Downsample, handler)]}}, None

    assert check_sliced(subject(model, (2, 3, 64, 64), extras), 3) <= TOL
    assert calls == [("input", 2)] * 2, "once in the host's loop, once in the stage loop"


def test_skipped_stages_leave_block_indices_and_control_as_the_host_would(model):
    """Every attention call of a tail (and of a shallow path) sees the block, block index and transformer
    index it sees in the full forward; control entries line up (a wrong pop changes the output)."""
    shape = (2, 3, 64, 64)
    make, seen = hooks(shape[0] * shape[1])
    s = subject(model, shape, make)
    stage = {}

    def where(event):
        if isinstance(event, StageEvent) and event.kind == "start":
            stage["now"] = event.name

    def recorded(request):
        seen.clear()
        out = s.engine(Runner(listeners=[where], request=request))
        return out, list(seen)

    full_events = []

    def tagged(request):
        full_events.clear()

        def listen(event):
            where(event)
            if isinstance(event, StageEvent) and event.kind == "end":
                full_events.append((event.name, len(seen)))
        seen.clear()
        s.engine(Runner(listeners=[listen], request=request))
        return list(seen)

    request = StageRequest(capture=frozenset(c.id for c in s.cuts))
    with torch.no_grad():
        full = tagged(request)
        ends = dict(full_events)  # stage name -> attention calls made up to its end
        for cut in s.cuts:
            state = request.captures[0][cut.id]
            _, tail = recorded(StageRequest(start=state))
            assert tail == full[ends[cut.after]:], cut.id
            if cut.section in ("mid", "up") and cut.shallow:
                _, both = recorded(StageRequest(start=state, recompute_skips=True))
                assert both == full[:ends[cut.shallow[-1]]] + full[ends[cut.after]:], cut.id
    assert {b[0][0] for b in full} == {"input", "middle", "output"}  # attention in every part was recorded


def test_cut_ids_match_diffusers_for_the_full_size_svd(comfyui):
    comfy = {c.id: c.after for c in comfy_unet.cuts(configs.build_comfy_svd("meta"))}
    diffusers = {c.id: c.after for c in cut_points(configs.build_diffusers_svd("meta"))}
    assert set(comfy) == set(diffusers) and len(comfy) == 42
    assert comfy["up0.0.attn"] == "output_blocks.9.1" and diffusers["up0.0.attn"] == "up_blocks.3.attentions.0"
    assert comfy["down0.down"] == "input_blocks.3.0" and comfy["mid.0.attn"] == "middle_block.1"
    assert comfy["up3.2.res"] == "output_blocks.2.0"  # its upsampler (output_blocks.2.1) fuses into the next unit


@pytest.mark.parametrize("with_hooks", [False, True], ids=["plain", "hooks"])
def test_module_level_fallback_captures_equal_the_stage_loops_and_refuses_to_start_from_a_cut(model, with_hooks):
    """Also under the host's hooks: FreeU-style output patches write into the feature, an after-skip
    patch (Deep Shrink's) changes the feature but not the skip, control adds in place."""
    shape = (2, 3, 64, 64)
    ids = frozenset(c.id for c in comfy_unet.cuts(model))
    owned, fallback = StageRequest(capture=ids), StageRequest(capture=ids)
    extras = hooks(shape[0] * shape[1])[0] if with_hooks else no_hooks
    if with_hooks:
        plain = extras

        def extras():
            options, control = plain()

            def in_place(h, hsp, opts):  # FreeU writes into half of the feature's channels
                h[:, : h.shape[1] // 2] *= 1.2
                return h, hsp
            options["patches"]["output_block_patch"] = [in_place, *options["patches"]["output_block_patch"]]
            return options, control
    s = subject(model, shape, extras)
    m = subject(model, shape, extras, forward=comfy_unet.module_level_forward)
    with torch.no_grad():
        out = s.engine(Runner(request=owned))
        assert torch.equal(m.engine(Runner(request=fallback)), out)
        assert set(fallback.captures[0]) == ids
        for cut in ids:
            assert same_state(fallback.captures[0][cut], owned.captures[0][cut]), cut
        with pytest.raises(NotImplementedError, match="cannot be entered part way"):
            m.engine(Runner(request=StageRequest(start=owned.captures[0]["up0.0.attn"])))
    assert not [name for name, mod in model.named_modules() if "forward" in mod.__dict__]


def test_streamline_patches_the_instance_and_removes_cleanly(model):
    args, kwargs = configs.comfy_svd_inputs(model, 2, 3, 64, 64)
    with torch.no_grad():
        reference = model(*args, **kwargs)
        with streamline(model, slices=3) as handle:
            assert "_forward" in model.__dict__
            out = model(*args, **kwargs)
        assert "_forward" not in model.__dict__ and handle._removed
        assert torch.equal(model(*args, **kwargs), reference)
    assert ((out - reference).abs().max() / reference.abs().max()).item() <= TOL


# -- the module-level fallback sliced: the host's own loop, each concatenation handed to its first layer --

# one frame on a non-square latent; odd frames on an odd latent (the upsampler follows output_shape);
# a batch of three on a 3x9 latent; with 3 and 7 slices most slices are uneven
FALLBACK_CASES = [(shape, k) for shape in [(1, 1, 32, 96), (2, 13, 40, 56), (3, 5, 24, 72)] for k in (3, 7, 10_000)]


def handed_over(monkeypatch, wrong: bool = False) -> list[str]:
    """Record which layers ran on a handed-over feature and skip (``wrong``: pair each slice of the feature
    with another frame's skip, the mistake a per-slice concatenation can make)."""
    calls = []
    fused = comfy_unet._fused_first

    def recording(runner, name, layer, h, skip, *rest):
        calls.append(name)
        return fused(runner, name, layer, h, skip.roll(1, 0) if wrong else skip, *rest)

    monkeypatch.setattr(comfy_unet, "_fused_first", recording)
    return calls


@pytest.mark.parametrize("shape, slices", FALLBACK_CASES, ids=lambda v: "b{}_t{}_{}x{}".format(*v) if isinstance(v, tuple) else str(v))
def test_module_level_fallback_sliced_equals_the_hosts_own_loop(model, monkeypatch, shape, slices):
    """No output block's concatenation exists whole: each first layer concatenates per slice."""
    calls, coverage = handed_over(monkeypatch), Coverage()
    assert check_sliced(subject(model, shape, forward=comfy_unet.module_level_forward), slices, coverage) <= TOL
    assert calls == [f"output_blocks.{i}.0" for i in range(len(model.output_blocks))]
    assert coverage.seen and not coverage.never_sliced()
    assert not [name for name, mod in model.named_modules() if "forward" in mod.__dict__]


@pytest.mark.parametrize("slices", [1, 3])
def test_module_level_fallback_sliced_holds_every_hook_of_the_host(model, monkeypatch, slices):
    """Output block patches (FreeU-style, one writing into the feature in place) see the feature and the
    skip before the hand-over; control, input block and emb patches as in the host's loop."""
    shape = (2, 3, 64, 64)
    plain = hooks(shape[0] * shape[1])[0]

    def extras():
        options, control = plain()

        def in_place(h, hsp, opts):
            h[:, : h.shape[1] // 2] *= 1.2
            return h, hsp
        options["patches"]["output_block_patch"] = [in_place, *options["patches"]["output_block_patch"]]
        return options, control

    calls = handed_over(monkeypatch)
    s = subject(model, shape, extras, forward=comfy_unet.module_level_forward)
    assert check_sliced(s, slices) <= TOL
    assert len(calls) == len(model.output_blocks)
    args, kwargs = configs.comfy_svd_inputs(model, *shape)
    options, control = extras()
    patches, lists = options["patches"], {k: list(v) for k, v in options["patches"].items()}
    bare = {}
    with torch.no_grad():  # the caller's options come back as they were
        comfy_unet.module_level_forward(model, forced(slices), *args, control=control, transformer_options=options, **kwargs)
        comfy_unet.module_level_forward(model, forced(slices), *args, transformer_options=bare, **kwargs)
    assert options["patches"] is patches and {k: list(v) for k, v in patches.items()} == lists
    assert "patches" not in bare


def test_module_level_fallback_with_skips_paired_to_the_wrong_frames_fails_the_same_comparison(model, monkeypatch):
    handed_over(monkeypatch, wrong=True)
    assert check_sliced(subject(model, (2, 13, 40, 56), forward=comfy_unet.module_level_forward), 3) > 10 * TOL


def test_module_level_fallback_leaves_the_concatenation_to_the_host_when_the_first_layer_is_not_its_own(model, monkeypatch):
    """A first layer another library replaced: the host concatenates and calls it, as before."""
    calls = handed_over(monkeypatch)
    first = model.output_blocks[1][0]
    seen = []

    def replaced(x, emb, *args):  # what a library patching this instance would install
        seen.append(x.shape[1])
        return type(first).forward(first, x, emb, *args)

    first.forward = replaced
    try:
        assert check_sliced(subject(model, (2, 3, 64, 64), forward=comfy_unet.module_level_forward), 3) <= TOL
    finally:
        del first.forward
    assert calls == [f"output_blocks.{i}.0" for i in range(len(model.output_blocks)) if i != 1]
    assert seen and set(seen) == {first.channels}  # the whole concatenation, twice (reference, engine)


# A shrunk failure of `streamline selftest exactness --profile full`: two videos at a 2x1 latent, unsliced. The
# temporal ResBlocks then run the host's own module whole; given the video in a layout of other strides than
# the host's rearrangement gives, the host's GroupNorm took its other kernel, and its groups of a handful of
# values turned that rounding into 0.24 of the output's magnitude. One slice must be the host's output, bitwise.
SHRUNK = {"model_channels": 32, "mults": [2], "num_res_blocks": [2, 1, 1], "attention": [True, False, False],
          "num_head_channels": 16, "context_dim": 32, "adm_in_channels": 256}


@pytest.mark.parametrize("shape", [(2, 3, 2, 1), (2, 3, 4, 1), (1, 2, 3, 2)], ids=lambda s: "b{}_t{}_{}x{}".format(*s))
def test_one_slice_is_the_hosts_own_output_bitwise(comfyui, shape):
    from streamlined_core.tools.selftest import comfy as selftest_comfy

    model = selftest_comfy.build_unet(SHRUNK)
    one = selftest_comfy.unet_subject()(model, shape, torch.float32)
    with torch.no_grad():
        assert torch.equal(one.engine(forced(1)), one.reference())


def test_a_call_retried_after_running_out_of_memory_gets_the_control_and_options_it_came_with(model):
    """The first attempt pops control residuals and writes options before it runs out of memory (at the output
    head, after every block): the retry at the least-memory plan must see them as the call had them."""
    make, _seen = hooks(6)
    args, kwargs = configs.comfy_svd_inputs(model, 2, 3, 64, 64)
    failures = [1]

    def out_of_memory(_module, inputs):
        if inputs[0].device.type != "meta" and failures[0]:
            failures[0] -= 1
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    with torch.no_grad():
        options, control = make()
        reference = model(*args, control=control, transformer_options=options, **kwargs)
        hook = model.out[2].register_forward_pre_hook(out_of_memory)
        try:
            with streamline(model, slices=2):
                options, control = make()
                out = model(*args, control=control, transformer_options=options, **kwargs)
        finally:
            hook.remove()
    assert failures == [0]
    assert ((out - reference).abs().max() / reference.abs().max()).item() <= TOL
