"""SVD's temporal VAE decoder run by groups (``arch/diffusers_vae.py``): the contract on tiny real decoders,
and what the groups hold on a full-size one (meta device)."""

import pytest
import torch
from contract import (
    TOL,
    Coverage,
    Subject,
    check_banded,
    check_bands_fail_without_statistics_or_halos,
    check_per_slice_statistics_fail,
    check_sliced,
    forced,
)

from streamlined_core import streamline
from streamlined_core.engine import slicing
from streamlined_core.engine.arch import diffusers_vae
from streamlined_core.engine.memory import MemoryTracker
from streamlined_core.engine.slicing import GroupEvent, Runner, governing_slice, tile_bounds
from streamlined_core.tools import configs


@pytest.fixture(scope="module")
def vae():
    return configs.seed_weights(configs.build_tiny_svd_vae(), std=0.1)


def subject(decoder, batch, frames, height, width, dtype=torch.float32) -> Subject:
    torch.manual_seed(1)
    z = torch.randn(batch * frames, 4, height, width, dtype=dtype)
    ioi = torch.zeros(batch, frames, dtype=dtype)

    def engine(runner):
        before = z.clone()
        out = diffusers_vae.streamlined_forward(decoder, runner, z, ioi, num_frames=frames)
        assert torch.equal(z, before), "the caller's latents are never written"
        return out

    return Subject(lambda: decoder(z, image_only_indicator=ioi, num_frames=frames), engine, [])


SHAPES = {  # (batch, frames, latent height, latent width)
    "odd frames, non-square": (1, 5, 6, 10),
    "one frame": (1, 1, 8, 8),
    "two videos": (2, 3, 5, 7),
}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("slices", [1, 2, 3, 64])
def test_sliced_decode_equals_the_decoder(vae, shape, slices):
    err = check_sliced(subject(vae.decoder, *shape), slices)
    assert err <= TOL, f"{slices} slices: {err:.2e}"


def test_every_group_ran_sliced_in_both_modes(vae):
    coverage = Coverage()
    for mode in ("keep", "recompute"):
        for slices in (2, 3):
            assert check_sliced(subject(vae.decoder, 1, 5, 6, 10), slices, coverage, mode) <= TOL
    assert not coverage.never_sliced(), coverage.never_sliced()
    kinds = coverage.kinds()
    assert {"conv_in", "attentions", "spatial", "temporal", "conv_out", "time_conv_out"} <= kinds, kinds
    # the upsampler is fused into the first spatial group of the block after it
    assert "up_blocks.1.resnets.0.spatial" in coverage.sliced


def test_per_slice_statistics_fail(vae, monkeypatch):
    check_per_slice_statistics_fail(subject(vae.decoder, 1, 5, 6, 10), monkeypatch)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("band_rows", [1, 2, 5])
def test_row_bands_equal_the_decoder(vae, shape, band_rows):
    """The ResBlocks that allocate their output, in row bands (1 row; 2; 5, uneven) of every frame alone."""
    coverage = Coverage()
    err = check_banded(subject(vae.decoder, *shape), band_rows, coverage)
    assert err <= TOL, f"bands of {band_rows} rows: {err:.2e}"
    # every 2-D ResBlock, the one with the upsampler fused in (up_blocks.1.resnets.0, 64 -> 32) among them
    resblocks = {name for name in coverage.seen if name.endswith(".spatial")} | {"conv_out"}  # and the head
    assert set(coverage.sliced) == resblocks and "up_blocks.1.resnets.0.spatial" in resblocks


def test_row_bands_fail_with_per_band_statistics_or_without_halos(vae, monkeypatch):
    check_bands_fail_without_statistics_or_halos(subject(vae.decoder, 1, 5, 6, 10), monkeypatch)


@pytest.mark.parametrize("band_rows", [1, 3])
def test_a_resblock_without_an_upsampler_in_row_bands_equals_its_forward(band_rows):
    """The band path with no upsampler fused (a width change alone), on diffusers' ResnetBlock2D."""
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(0)
    res = configs.seed_weights(ResnetBlock2D(in_channels=32, out_channels=16, temb_channels=None, groups=8), std=0.2).eval()
    x = torch.randn(3, 32, 7, 9)
    parts = diffusers_vae.tiled_parts(res, None)
    coverage = Coverage()
    runner = Runner(lambda _n, axis, length: (-(-length // band_rows), "keep"), [coverage.record])
    with torch.no_grad():
        reference = res(x, None)
        out = slicing.spatial_resblock(runner, "res", parts, x)
    assert coverage.sliced["res"] > 3  # more slices than frames: bands
    assert (out - reference).abs().max() <= TOL * reference.abs().max()


def test_tiles_are_whole_frames_then_row_bands():
    assert tile_bounds(5, 12, 1) == [(0, 5, 0, 12)]
    assert tile_bounds(5, 12, 2) == [(0, 3, 0, 12), (3, 5, 0, 12)]
    assert tile_bounds(2, 5, 5) == [(0, 1, 0, 2), (0, 1, 2, 4), (0, 1, 4, 5), (1, 2, 0, 2), (1, 2, 2, 4), (1, 2, 4, 5)]
    assert tile_bounds(2, 3, 60) == [(f, f + 1, r, r + 1) for f in range(2) for r in range(3)]
    assert governing_slice(5 * 12, 2, False, rows=12) == 2 * 12  # the second slice: two frames
    assert governing_slice(2 * 5, 5, False, rows=5) == 2  # bands of 2, 2, 1 rows
    with pytest.raises(ValueError, match="must be positive"):
        tile_bounds(0, 4, 1)


def test_half_precision_stays_within_the_fp32_reference_error(vae):
    """fp16 (docs/benchmarks.md): the sliced decode's error against fp32 is at most 1.5x the stock decode's plus 1e-3."""
    half = configs.build_tiny_svd_vae(dtype=torch.bfloat16)
    half.load_state_dict(vae.state_dict())
    reference = subject(vae.decoder, 1, 5, 6, 10).reference().float()
    low = subject(half.decoder, 1, 5, 6, 10, torch.bfloat16)
    with torch.no_grad():
        stock = low.reference().float()
        ours = low.engine(forced(3)).float()
    scale = reference.abs().max()
    assert (ours - reference).abs().max() <= 1.5 * (stock - reference).abs().max() + 1e-3 * scale


def test_bad_arguments_are_named(vae):
    z = torch.randn(6, 4, 4, 4)
    with pytest.raises(ValueError, match="num_frames=4 does not divide the 6 latent frames"):
        diffusers_vae.streamlined_forward(vae.decoder, forced(1), z, torch.zeros(1, 4), num_frames=4)
    with pytest.raises(ValueError, match=r"sample must be \(batch x frames"):
        diffusers_vae.streamlined_forward(vae.decoder, forced(1), z[None], torch.zeros(1, 6), num_frames=6)


def test_a_sliced_resblock_holds_one_tensor_of_its_level():
    """On the meta device at a size where activations dwarf everything else: a same-width ResBlock
    written in place holds its input and one slice; the upsampler fused into the next group never
    exists whole; the decode's peak is a fraction of the stock decoder's."""
    decoder = configs.build_svd_vae(block_out_channels=(64, 128), down_block_types=("DownEncoderBlock2D",) * 2).decoder
    frames, h, w = 6, 32, 48
    z = torch.empty(frames, 4, h, w, device="meta", dtype=torch.float16)
    ioi = torch.zeros(1, frames, device="meta", dtype=torch.float16)
    with MemoryTracker() as stock:
        decoder(z, image_only_indicator=ioi, num_frames=frames)
    peaks = {}

    def listen(event):
        if isinstance(event, GroupEvent):
            peaks[event.name] = tracker.mark(event.name).peak_bytes if event.kind == "end" else tracker.mark("")

    with MemoryTracker() as tracker:
        runner = Runner(lambda _n, axis, _l: (frames if axis == "frames" else 48, "recompute"), [listen])
        out = diffusers_vae.streamlined_forward(decoder, runner, z, ioi, num_frames=frames)
    assert out.shape == (frames, 3, 2 * h, 2 * w)
    top = frames * 64 * (2 * h) * (2 * w) * 2  # one 64-channel tensor of every frame at full size, fp16
    frame = top // frames
    last = "up_blocks.1.resnets.1"  # same width (64 -> 64), full size
    assert top < peaks[f"{last}.spatial"] <= top + 4 * frame < 2 * top  # not in place: 2 * top and more
    assert top < peaks[f"{last}.temporal"] <= top + frame  # 48 pixel slices
    upsampled = frames * 128 * (2 * h) * (2 * w) * 2  # what an unfused upsampler would allocate
    fused = peaks["up_blocks.1.resnets.0.spatial"]  # 48 tiles: 8 row bands per frame
    assert fused < upsampled + top
    assert tracker.peak_bytes < stock.peak_bytes / 3
    # the fused group's input (half size, 128 channels) + its output + one band, against one whole frame
    with MemoryTracker() as tracker:
        runner = Runner(lambda _n, axis, _l: (frames if axis in ("frames", "tiles") else 48, "recompute"), [listen])
        diffusers_vae.streamlined_forward(decoder, runner, z, ioi, num_frames=frames)
    held = top // 2 + top  # the 128-channel input at a quarter of the pixels + the output
    whole_frames = peaks["up_blocks.1.resnets.0.spatial"]
    assert held < fused < held + 3 * frame, (fused - held) / frame  # a band's fp32 norm temporaries included
    assert fused < whole_frames - frame, (fused - held) / frame


def test_streamline_the_vae_decodes_the_same_and_removes_exactly(vae):
    from streamlined_core import streamline

    z = torch.randn(5, 4, 6, 10)
    state = {k: v.clone() for k, v in vae.state_dict().items()}
    with torch.no_grad():
        reference = vae.decode(z, num_frames=5).sample
        with streamline(vae, slices=3) as handle:  # pipe.vae: its decoder runs by groups
            out = vae.decode(z, num_frames=5).sample
            assert "forward" in vae.decoder.__dict__
        assert (out - reference).abs().max() <= TOL * reference.abs().max()
        assert "forward" not in vae.decoder.__dict__ and not hasattr(vae.decoder, "_streamline_handle")
        assert all(torch.equal(v, state[k]) for k, v in vae.state_dict().items())
        handle = streamline(vae)  # planned: the least slicing that reaches 1.6x the output-level floor
        out = vae.decode(z, num_frames=5).sample
        handle.remove()
    assert (out - reference).abs().max() <= TOL * reference.abs().max()
    assert "output-level floor" in handle.last_plan.table()
    assert handle.last_plan.sliced_groups


def test_streamline_names_what_it_accepts():
    from diffusers import AutoencoderTiny

    from streamlined_core import streamline

    with pytest.raises(TypeError, match="is not a supported model.*AutoencoderKLTemporalDecoder.*AutoencoderKL"):
        streamline(AutoencoderTiny(encoder_block_out_channels=(8,), decoder_block_out_channels=(8,),
                                   num_encoder_blocks=(1,), num_decoder_blocks=(1,)))


def test_the_profiler_records_the_decode_by_groups_and_by_blocks(vae):
    """``profile(pipe.vae)``: each decoder call is a step marked "decode", with the decoder's groups as events
    and the plan's predicted peak beside each, or the decoder's own blocks when it is not streamlined."""
    from streamlined_core.features.profiler import profile

    z = torch.randn(5, 4, 6, 10)
    with torch.no_grad():
        with streamline(vae), profile(vae, granularity="group") as rec:
            vae.decode(z, num_frames=5)
        with profile(vae, granularity="group") as plain:
            vae.decode(z, num_frames=5)
    tl = rec.timeline
    assert tl.label == "decode" and [s.conds for s in tl.steps] == [["decode"]]
    groups = [e for e in tl.events if e.kind == "group"]
    names = {e.name for e in groups}
    assert {"conv_in", "up_blocks.1.resnets.0.spatial", "up_blocks.1.resnets.0.temporal", "conv_out", "time_conv_out"} <= names
    assert all(e.predicted is not None for e in groups) and tl.predicted_peak_bytes > 0
    assert [s.conds for s in plain.timeline.steps] == [["decode"]]
    assert {e.name for e in plain.timeline.events if e.kind == "group"} >= {"mid_block", "up_blocks.0", "up_blocks.1"}
    assert "forward" not in vae.decoder.__dict__ and not vae.decoder._forward_pre_hooks
