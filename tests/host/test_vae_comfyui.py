"""SVD's VAE decoder on ComfyUI's own classes (``arch/comfy_vae.py``): the contract against the host's
``VideoDecoder.forward`` on tiny real decoders, and ``streamline()`` on one."""

import pytest
import torch
from comfy_svd import build_svd_vae
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
from streamlined_core.engine.arch import adapter_for, comfy_vae
from streamlined_core.tools import configs


@pytest.fixture(scope="module")
def decoder(comfyui):
    from comfy.ldm.modules.temporal_ae import VideoDecoder

    torch.manual_seed(0)
    # SVD's decoder config (comfy/sd.py) at two levels of 32 and 64 channels
    d = VideoDecoder(ch=32, out_ch=3, ch_mult=[1, 2], num_res_blocks=2, attn_resolutions=[], in_channels=3,
                     resolution=64, z_channels=4, dropout=0.0, video_kernel_size=[3, 1, 1], alpha=0.0).eval()
    return configs.seed_weights(d, std=0.1)  # ComfyUI leaves weights uninitialised


def subject(decoder, n, height, width, timesteps=None) -> Subject:
    torch.manual_seed(1)
    z = torch.randn(n, 4, height, width)
    extra = {} if timesteps is None else {"timesteps": timesteps}

    def engine(runner):
        before = z.clone()
        out = comfy_vae.streamlined_forward(decoder, runner, z, **extra)
        assert torch.equal(z, before), "the caller's latents are never written"
        return out

    return Subject(lambda: decoder(z, **extra), engine, [])


SHAPES = {  # (latent frames, height, width, timesteps)
    "one clip, odd frames, non-square": (5, 6, 10, None),
    "one frame": (1, 8, 8, None),
    "seven frames, odd sizes": (7, 5, 7, None),
}
# (ComfyUI decodes a batch as one clip: its Decoder hands ``timesteps`` to the middle AttnBlock too,
# which takes no such argument, so the host has no multi-clip decode to compare with.)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("slices", [1, 2, 3, 64])
def test_sliced_decode_equals_the_hosts_decoder(decoder, shape, slices):
    err = check_sliced(subject(decoder, *shape), slices)
    assert err <= TOL, f"{slices} slices: {err:.2e}"


def test_every_group_ran_sliced_and_statistics_per_slice_fail(decoder, monkeypatch):
    coverage = Coverage()
    for mode in ("keep", "recompute"):
        assert check_sliced(subject(decoder, 5, 6, 10), 3, coverage, mode) <= TOL
    assert not coverage.never_sliced(), coverage.never_sliced()
    assert {"conv_in", "attn_1", "spatial", "temporal", "conv_out", "time_mix_conv"} <= coverage.kinds()
    assert "up.0.block.0.spatial" in coverage.sliced  # the level-1 upsampler fused into it
    check_per_slice_statistics_fail(subject(decoder, 5, 6, 10), monkeypatch)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("band_rows", [1, 5])
def test_row_bands_equal_the_hosts_decoder(decoder, shape, band_rows):
    coverage = Coverage()
    err = check_banded(subject(decoder, *shape), band_rows, coverage)
    assert err <= TOL, f"bands of {band_rows} rows: {err:.2e}"
    resblocks = {n for n in coverage.seen if n.endswith(".spatial")} | {"conv_out"}  # and the head
    assert set(coverage.sliced) == resblocks and "up.0.block.0.spatial" in resblocks


def test_row_bands_fail_with_per_band_statistics_or_without_halos(decoder, monkeypatch):
    check_bands_fail_without_statistics_or_halos(subject(decoder, 5, 6, 10), monkeypatch)


def test_streamline_the_decoder_and_remove_it(decoder):
    assert adapter_for(decoder).name == "comfyui-svd-vae-decoder"
    z = torch.randn(5, 4, 6, 10)
    with torch.no_grad():
        reference = decoder(z)
        with streamline(decoder) as handle:
            out = decoder(z)
        assert "forward" not in decoder.__dict__
    assert (out - reference).abs().max() <= TOL * reference.abs().max()
    assert handle.last_plan.sliced_groups and "output-level floor" in handle.last_plan.table()


def test_bad_timesteps_are_named(decoder):
    with pytest.raises(ValueError, match="timesteps=4 does not divide the 6 latent frames"):
        comfy_vae.streamlined_forward(decoder, None, torch.randn(6, 4, 4, 4), timesteps=4)


@pytest.fixture(scope="module")
def svd_vae(comfyui):
    vae = build_svd_vae()
    assert type(vae.first_stage_model.decoder).__name__ == "VideoDecoder"
    return vae


def decode_node(pack):
    return pack.NODE_CLASS_MAPPINGS["StreamlineVAEDecode"]()


def test_the_node_decodes_every_frame_as_one_clip_like_the_hosts_whole_decode(pack, svd_vae, caplog):
    import logging

    torch.manual_seed(2)
    latent = {"samples": torch.randn(5, 4, 6, 10)}
    decoder = svd_vae.first_stage_model.decoder
    with torch.no_grad():  # the host's decode of the whole batch at once, as ComfyUI does when it fits
        whole = svd_vae.process_output(svd_vae.first_stage_model.decode(
            latent["samples"].to(svd_vae.vae_dtype).to(svd_vae.device)).to(svd_vae.output_device).float()).movedim(1, -1)
    with caplog.at_level(logging.INFO):
        out = decode_node(pack).decode(latent, svd_vae, 0.0)
    (images,) = out["result"]
    assert images.shape == (5, 48, 80, 3) and images.dtype == torch.float32
    assert (images - whole).abs().max() <= 1e-5
    assert "forward" not in decoder.__dict__, "the VAE's decoder is restored"
    (text,) = out["ui"]["text"]
    assert "5 frames as one clip" in text and "predicted activation peak" in text
    assert any("Streamline VAE Decode: 5 frames" in r.getMessage() for r in caplog.records)


def test_the_node_publishes_the_decodes_timeline_to_the_vram_panel(pack, svd_vae):
    from importlib import import_module

    profiler_node = import_module(pack.__name__ + ".nodes.vram_profiler")
    latent = {"samples": torch.randn(5, 4, 6, 10)}
    pack.NODE_CLASS_MAPPINGS["StreamlineVAEDecode"]().decode(latent, svd_vae, 0.0)
    newest = profiler_node.history()[0]
    assert newest["label"] == "decode" and newest["prompt_id"].endswith(":decode") and newest["steps"] == 1
    doc = profiler_node.timeline(newest["prompt_id"])
    groups = [e for e in doc["events"] if e["kind"] == "group"]
    assert {"conv_in", "up.0.block.0.spatial", "conv_out.time_mix_conv"} <= {e["name"] for e in groups}
    assert all(e["predicted"] is not None for e in groups) and doc["predicted_peak_bytes"] > 0


def test_the_hosts_batched_decode_cuts_the_clip_where_the_node_does_not(pack, svd_vae):
    """ComfyUI's VAE Decode in two parts (what a small card gets) differs from the whole-clip decode; the node does not."""
    torch.manual_seed(3)
    latent = torch.randn(6, 4, 6, 10)
    z = latent.to(svd_vae.vae_dtype)
    with torch.no_grad():
        whole = svd_vae.first_stage_model.decode(z)
        parts = torch.cat([svd_vae.first_stage_model.decode(z[:3]), svd_vae.first_stage_model.decode(z[3:])])
    (images,) = decode_node(pack).decode({"samples": latent}, svd_vae, 0.0)["result"]
    ours = images.movedim(-1, 1) * 2 - 1  # undo process_output; compared with the whole decode clamped alike
    assert (parts - whole).abs().max() > 100 * (ours - whole.clamp(-1, 1)).abs().max()


def test_the_node_refuses_a_budget_below_the_least_peak_and_names_it(pack, svd_vae):
    with pytest.raises(ValueError, match="vram_budget_gb=0.01 does not even hold the weights|vram_budget_gb=.*least reachable"):
        decode_node(pack).decode({"samples": torch.randn(3, 4, 6, 10)}, svd_vae, 0.01)
    assert "forward" not in svd_vae.first_stage_model.decoder.__dict__


def test_the_node_decodes_other_vaes_with_the_hosts_decode_and_says_so(pack, comfyui):
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    # the SD VAE (AnimateDiff's), at the size comfy/sd.py builds from its keys
    config = {'double_z': True, 'z_channels': 4, 'resolution': 256, 'in_channels': 3, 'out_ch': 3, 'ch': 128,
              'ch_mult': [1, 2, 4, 4], 'num_res_blocks': 2, 'attn_resolutions': [], 'dropout': 0.0}
    model = configs.seed_weights(AutoencoderKL(ddconfig=config, embed_dim=4), std=0.02)
    vae = comfy.sd.VAE(sd=model.state_dict())
    out = decode_node(pack).decode({"samples": torch.randn(2, 4, 8, 8)}, vae, 0.0)
    assert "not SVD's temporal decoder" in out["ui"]["text"][0]
    assert out["result"][0].shape[0] == 2


def test_the_default_budget_plans_the_decode_for_what_comfyui_can_leave_free(pack, svd_vae, monkeypatch):
    """vram_budget_gb=0 on a small card (the host's free-memory functions patched): the decode is planned for the
    room ComfyUI can leave with the VAE loaded, less its reserve, down to its least-memory plan; the node says so,
    with its floor; the frames equal the whole decode."""
    import re

    import comfy.model_management as mm

    torch.manual_seed(4)
    latent = torch.randn(5, 4, 6, 10)
    z = latent.to(svd_vae.vae_dtype).to(svd_vae.device)
    with torch.no_grad():
        whole = svd_vae.process_output(svd_vae.first_stage_model.decode(z).to(svd_vae.output_device).float()).movedim(1, -1)
    handle = streamline(svd_vae.first_stage_model.decoder)
    try:
        planner = handle.planner_for(z)
        least, floor, stock = planner.least_peak(), planner.skip_floor_bytes, planner.unsliced_peak()
        least_plan = planner.plan(least)  # every group at its most slicing where it must, measured
    finally:
        handle.remove()
    monkeypatch.setattr(mm, "is_device_cpu", lambda device: False)
    monkeypatch.setattr(mm, "current_loaded_models", [])
    base = svd_vae.patcher.model_size() + mm.extra_reserved_memory()
    for room, short in (((least + stock) // 2, False), (least // 3, True)):
        def free(dev=None, torch_free_too=False, card=base + room):  # what is loaded takes its share of the card
            f = card - sum(m.model_loaded_memory() for m in mm.current_loaded_models)
            return (f, f) if torch_free_too else f

        monkeypatch.setattr(mm, "get_free_memory", free)
        out = decode_node(pack).decode({"samples": latent}, svd_vae, 0.0)
        (images,), (text,) = out["result"], out["ui"]["text"]
        assert (images - whole).abs().max() <= 1e-5
        assert "ComfyUI's free memory before loading" in text and "its floor of" in text, text
        x = float(re.search(r"([\d.]+)x its floor", text).group(1))
        if short:  # the least-memory plan
            assert x == pytest.approx(least_plan.predicted_peak_bytes / floor, abs=0.01), text
        else:
            assert least / floor - 0.01 <= x <= room / floor + 0.01 and "unsliced" not in text, text
    assert "forward" not in svd_vae.first_stage_model.decoder.__dict__
