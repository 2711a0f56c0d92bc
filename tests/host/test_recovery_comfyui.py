"""Out of memory inside Streamline Model's U-Net calls and Streamline VAE Decode's decode, in a real ComfyUI:
the call runs again, once, at the least-memory plan, the log (and the decode node's text) says so, and the
output is the same; a second failure raises the device's own error type naming vram_budget_gb, and the model
and the VAE are restored. The fault is the real ``torch.OutOfMemoryError``, raised by one of the host's layers
on a real (not meta) call."""

import logging

import pytest
import torch
from comfy_svd import LATENT_TOL, build_svd, build_svd_vae, ksample, rel
from contract import out_of_memory


@pytest.fixture(scope="module")
def svd_patcher(comfyui):
    return build_svd()


@pytest.fixture(scope="module")
def reference(svd_patcher):
    return ksample(svd_patcher)


def retried(caplog):
    return [r.getMessage() for r in caplog.records if "retrying once at the least-memory plan" in r.getMessage()]


def test_streamline_model_retries_a_call_that_ran_out_of_memory_and_samples_the_same(pack, svd_patcher, reference,
                                                                                      caplog):
    (patched,) = pack.NODE_CLASS_MAPPINGS["StreamlineModel"]().patch(svd_patcher, "auto", 8, 0.0, "all")
    unet = svd_patcher.get_model_object("diffusion_model")
    hook, count = out_of_memory(unet.input_blocks[1][0].in_layers[2], 1)
    caplog.set_level(logging.INFO)
    try:
        out = ksample(patched)
    finally:
        hook.remove()
    assert count[0] == 1 and rel(out, reference) <= LATENT_TOL
    (said,) = retried(caplog)
    assert "UNetModel for input" in said and "predicted activation peak" in said


def test_streamline_model_raises_the_devices_error_naming_the_budget_when_the_retry_runs_out_too(pack, svd_patcher,
                                                                                                 reference):
    (patched,) = pack.NODE_CLASS_MAPPINGS["StreamlineModel"]().patch(svd_patcher, "auto", 8, 0.0, "all")
    unet = svd_patcher.get_model_object("diffusion_model")
    hook, count = out_of_memory(unet.input_blocks[1][0].in_layers[2], 2)
    try:
        with pytest.raises(torch.OutOfMemoryError, match="again at the least-memory plan.*vram_budget_gb"):
            ksample(patched)
    finally:
        hook.remove()
    assert count[0] == 2
    assert torch.equal(ksample(svd_patcher), reference)  # the MODEL that came in, as before
    assert getattr(unet._forward, "__func__", None) is type(unet)._forward  # loading it unpatched the clone
    assert rel(ksample(patched), reference) <= LATENT_TOL  # and the streamlined MODEL runs again


@pytest.fixture(scope="module")
def svd_vae(comfyui):
    return build_svd_vae()


def test_streamline_vae_decode_retries_once_then_raises_naming_the_budget(pack, svd_vae, caplog):
    torch.manual_seed(2)
    latent = {"samples": torch.randn(3, 4, 3, 2)}
    node = pack.NODE_CLASS_MAPPINGS["StreamlineVAEDecode"]()
    decoder = svd_vae.first_stage_model.decoder
    (reference,) = node.decode(latent, svd_vae, 0.0)["result"]
    caplog.set_level(logging.INFO)
    hook, count = out_of_memory(decoder.mid.block_1.conv1, 1)
    try:
        out = node.decode(latent, svd_vae, 0.0)
    finally:
        hook.remove()
    (images,) = out["result"]
    assert count[0] == 1 and (images - reference).abs().max() <= 1e-5
    assert "ran out of memory once and decoded again at the least-memory plan" in out["ui"]["text"][0]
    (said,) = retried(caplog)
    assert "VideoDecoder for input" in said
    hook, count = out_of_memory(decoder.mid.block_1.conv1, 2)
    try:
        with pytest.raises(torch.OutOfMemoryError, match="again at the least-memory plan.*vram_budget_gb"):
            node.decode(latent, svd_vae, 0.0)
    finally:
        hook.remove()
    assert count[0] == 2
    assert "forward" not in decoder.__dict__, "the VAE's decoder is restored"
