"""The SD VAE's decoder run by groups (``arch/diffusers_sd_vae.py``): the contract on a tiny real decoder,
and the least single-frame peak on the full-size one (meta device)."""

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
)

from streamlined_core import streamline
from streamlined_core.engine.arch import adapter_for, diffusers_sd_vae
from streamlined_core.engine.memory import MemoryTracker
from streamlined_core.tools import configs


@pytest.fixture(scope="module")
def vae():
    return configs.seed_weights(configs.build_tiny_sd_vae(), std=0.1)


def subject(decoder, frames, height, width) -> Subject:
    torch.manual_seed(1)
    z = torch.randn(frames, 4, height, width)

    def engine(runner):
        before = z.clone()
        out = diffusers_sd_vae.streamlined_forward(decoder, runner, z)
        assert torch.equal(z, before), "the caller's latents are never written"
        return out

    return Subject(lambda: decoder(z), engine, [])


SHAPES = {"three frames, non-square": (3, 6, 10), "one frame": (1, 7, 5)}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("slices", [1, 2, 64])
def test_sliced_decode_equals_the_decoder(vae, shape, slices):
    err = check_sliced(subject(vae.decoder, *shape), slices)
    assert err <= TOL, f"{slices} slices: {err:.2e}"


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("band_rows", [1, 4])
def test_row_bands_equal_the_decoder(vae, shape, band_rows):
    coverage = Coverage()
    assert check_banded(subject(vae.decoder, *shape), band_rows, coverage) <= TOL
    resblocks = {n for n in coverage.seen if ".resnets." in n} | {"conv_out"}  # and the head
    assert set(coverage.sliced) == resblocks and "up_blocks.1.resnets.0" in resblocks  # the fused upsampler too


def test_wrong_statistics_and_missing_halos_fail(vae, monkeypatch):
    coverage = Coverage()
    assert check_sliced(subject(vae.decoder, 3, 6, 10), 2, coverage) <= TOL
    assert not coverage.never_sliced(), coverage.never_sliced()
    check_bands_fail_without_statistics_or_halos(subject(vae.decoder, 1, 7, 5), monkeypatch)
    check_per_slice_statistics_fail(subject(vae.decoder, 1, 7, 5), monkeypatch, slices=64)


def test_streamline_the_vae_decodes_the_same_and_removes_exactly(vae):
    z = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        reference = vae.decode(z).sample
        with streamline(vae) as handle:
            assert adapter_for(vae.decoder).name == "diffusers-sd-vae-decoder"
            out = vae.decode(z).sample
    assert "forward" not in vae.decoder.__dict__
    assert (out - reference).abs().max() <= TOL * reference.abs().max()
    assert "output-level floor" in handle.last_plan.table()


def test_one_full_size_frame_by_groups_is_a_fraction_of_the_stock_decode():
    vae = configs.build_sd_vae()
    z = torch.empty(1, 4, 72, 128, device="meta", dtype=torch.float16)
    with MemoryTracker() as stock:
        vae.decoder(z)
    with streamline(vae) as handle:
        plan = handle.plan_for(z)
        with MemoryTracker() as ours:
            vae.decoder(z)
    floor = diffusers_sd_vae.floor_bytes(vae.decoder, {"sample": z})
    assert ours.peak_bytes == plan.predicted_peak_bytes
    assert floor < ours.peak_bytes < stock.peak_bytes / 2, (ours.peak_bytes / floor, stock.peak_bytes / floor)
