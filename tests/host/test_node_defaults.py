"""Every node at its defaults on models of the shapes it accepts: drawn tiny SVD U-Nets (levels, ResBlocks
and attention per level, context width), built the way ComfyUI builds them, through Streamline Model, the
VRAM Profiler and the Step Rehash Sampler, and drawn latent shapes through Streamline VAE Decode on SVD's
VAE, every widget at its default. Each runs and equals the host's own result; the sampler says which cut it
took (the default, auto, takes the nearest cut that fits a U-Net where the usual one does not)."""

import logging

import pytest
import torch
from comfy_svd import LATENT_TOL, build_svd_vae, rel
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from streamlined_core.tools import configs
from streamlined_core.tools.selftest import comfy as drawn

EXAMPLES = 4  # per node; `streamline selftest exactness --profile full` draws the engine's hundreds


def defaults(cls, given_inputs):
    """Every widget input of ``cls`` not in ``given_inputs`` at its default."""
    out = {}
    spec = cls.INPUT_TYPES()
    for name, (kind, *info) in {**spec["required"], **spec.get("optional", {})}.items():
        if name in given_inputs:
            continue
        info = info[0] if info else {}
        if isinstance(kind, (list, tuple)):
            out[name] = info.get("default", kind[0])
        elif "default" in info:
            out[name] = info["default"]
    return out


def unet_configs():
    # SVD's conditioning fixes the ADM width (three 256-wide embeddings), and its model config 64 channels per
    # attention head (so at least 64 channels): everything else is drawn
    return drawn.unet_configs(st).map(lambda c: {**c, "adm_in_channels": 768, "model_channels": 64})


def svd_patcher(c):
    import comfy.model_patcher
    import comfy.supported_models

    unet_config = {**configs.TINY_COMFY_SVD_CONFIG, **drawn.unet_kwargs(c)}
    model_config = comfy.supported_models.SVD_img2vid(unet_config)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({}, "", device=torch.device("cpu"))
    configs.seed_weights_scaled(model)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def conditioning(context_dim, frames, h, w):
    gen = torch.Generator().manual_seed(1)
    extra = {"motion_bucket_id": 127, "fps": 6, "augmentation_level": 0.0,
             "concat_latent_image": torch.randn(1, 4, h, w, generator=gen)}
    positive = [[torch.randn(1, 1, context_dim, generator=gen), dict(extra)]]
    negative = [[torch.zeros(1, 1, context_dim), dict(extra, concat_latent_image=torch.zeros(1, 4, h, w))]]
    return positive, negative, {"samples": torch.zeros(frames, 4, h, w)}


SHAPES = st.tuples(st.integers(1, 4), st.integers(2, 6), st.integers(2, 6))  # frames, latent height, width
SETTINGS = dict(max_examples=EXAMPLES, database=None, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def svd_vae(comfyui):
    """ComfyUI's VAE object for SVD's VAE, seeded (ComfyUI picks SVD's VAE by its keys, with SVD's widths)."""
    return build_svd_vae(configs.seed_weights_scaled)


@pytest.fixture(scope="module")
def nodes_of(pack):
    return pack.NODE_CLASS_MAPPINGS


@pytest.mark.parametrize("name", ["StreamlineModel", "VRAMProfiler"])
@seed(29)
@settings(**SETTINGS)
@given(c=unet_configs(), shape=SHAPES)
def test_the_model_nodes_at_their_defaults_sample_as_the_host_does(nodes_of, name, c, shape):
    """Streamline Model (auto slicing, the budget the host leaves) and the VRAM Profiler, each on its own."""
    import nodes

    patcher = svd_patcher(c)
    positive, negative, latent = conditioning(c["context_dim"], *shape)

    def sample(model):
        (out,) = nodes.KSampler().sample(model, 7, 2, 2.5, "euler", "karras", positive, negative, latent, denoise=1.0)
        return out["samples"]

    reference = sample(patcher)
    node = nodes_of[name]
    (patched,) = node().patch(patcher, **defaults(node, {"model"}))
    assert rel(sample(patched), reference) <= LATENT_TOL


@seed(29)
@settings(**SETTINGS)
@given(c=unet_configs(), shape=SHAPES)
def test_the_step_rehash_sampler_at_its_defaults_runs_and_says_which_cut_it_took(nodes_of, c, shape, caplog,
                                                                                  tmp_path_factory):
    from comfy_svd import calibration_folder

    caplog.set_level(logging.INFO)
    patcher = svd_patcher(c)
    positive, negative, latent = conditioning(c["context_dim"], *shape)
    node = nodes_of["StepRehashSampler"]
    given_inputs = {"model", "seed", "steps", "cfg", "sampler_name", "scheduler", "positive", "negative",
                    "latent_image", "denoise"}
    caplog.clear()
    with calibration_folder(tmp_path_factory.mktemp("calibrations")):
        (out,) = node().sample(patcher, 7, 4, 2.5, "euler", "karras", positive, negative, latent, 1.0,
                               **defaults(node, given_inputs))
    assert torch.isfinite(out["samples"]).all()
    text = " ".join(r.getMessage() for r in caplog.records if r.getMessage().startswith("Step Rehash: "))
    assert "cut " in text, text  # the cut it took, said in the report


@seed(29)
@settings(**SETTINGS)
@given(shape=st.tuples(st.integers(1, 3), st.integers(2, 5), st.integers(2, 5)))
def test_streamline_vae_decode_at_its_defaults_decodes_as_the_host_does(nodes_of, svd_vae, shape):
    """SVD's widths (ComfyUI picks its VAE by the keys): the call shape is what is drawn."""
    vae = svd_vae
    frames, h, w = shape
    samples = {"samples": torch.randn(frames, 4, h, w, generator=torch.Generator().manual_seed(2))}
    reference = vae.decode(samples["samples"])
    node = nodes_of["StreamlineVAEDecode"]
    (images,) = node().decode(samples, vae, **defaults(node, {"samples", "vae"}))["result"]
    assert images.shape == reference.shape and rel(images, reference) <= 1e-4
