"""The fixture in ComfyUI's terms without ComfyUI: the key map against diffusers' own model, the norm
epsilons, the conversion's errors, and the demo clip's conditioning."""

import math

import pytest
import torch

from streamlined_core.fixture import comfy_keys, data
from streamlined_core.fixture import demo as fixture_demo
from streamlined_core.fixture import model as fixture_model

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def meta_unet():
    """The fixture U-Net as diffusers builds it, on ``meta`` (names, shapes and norms; no weights)."""
    with torch.device("meta"):
        return diffusers.UNetSpatioTemporalConditionModel(**fixture_model.FIXTURE_UNET_KWARGS)


def test_key_map_covers_every_diffusers_key_exactly_once(meta_unet):
    mapping = comfy_keys.key_map()
    assert set(mapping) == set(meta_unet.state_dict())
    assert len(set(mapping.values())) == len(mapping)
    assert sum(".time_stack." in c for c in mapping.values()) > 0  # the temporal halves are there


def test_norm_eps_are_diffusers_eps_for_every_norm(meta_unet):
    mapping = comfy_keys.key_map()
    eps = comfy_keys.norm_eps()
    norms = {n: m for n, m in meta_unet.named_modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))}
    assert len(eps) == len(norms)
    for name, module in norms.items():
        comfy_name = mapping[f"{name}.weight"][: -len(".weight")]
        assert eps[comfy_name] == module.eps, name
    assert {1e-5, 1e-6} <= set(eps.values())  # both values occur: a single default would be wrong


def test_unet_config_matches_the_diffusers_layout():
    config = comfy_keys.comfy_unet_config()
    kw = fixture_model.FIXTURE_UNET_KWARGS
    assert config["model_channels"] == kw["block_out_channels"][0]
    assert [config["model_channels"] * m for m in config["channel_mult"]] == list(kw["block_out_channels"])
    assert config["context_dim"] == kw["cross_attention_dim"] == data.EMBED_DIM
    assert config["adm_in_channels"] == kw["projection_class_embeddings_input_dim"] == 768
    assert config["num_head_channels"] == 32 and config["num_heads"] == -1
    # up block 0 (UpBlockSpatioTemporal) has no attention: output blocks 0..2, the list's last three
    assert config["transformer_depth_output"] == [1] * 9 + [0] * 3
    assert config["transformer_depth"] == [1] * 6 + [0] * 2
    with pytest.raises(ValueError, match="num_head_channels"):
        comfy_keys.comfy_unet_config({"num_attention_heads": (1, 1, 2, 2)})


def test_conversion_names_keys_that_do_not_map_or_are_missing(meta_unet):
    state = {k: torch.empty(0) for k in meta_unet.state_dict()}
    converted = comfy_keys.diffusers_to_comfy(state)
    assert len(converted) == len(state) and all(converted[comfy_keys.key_map()[k]] is v for k, v in state.items())
    gone = "up_blocks.1.attentions.2.temporal_transformer_blocks.0.ff_in.net.2.bias"
    extra = "down_blocks.3.downsamplers.0.conv.weight"  # ComfyUI's own map names it; the model has none
    del state[gone]
    state[extra] = torch.empty(0)
    with pytest.raises(ValueError) as err:
        comfy_keys.diffusers_to_comfy(state)
    assert gone in str(err.value) and extra in str(err.value)


def test_demo_clip_is_deterministic_and_its_augmentation_is_on_the_packed_first_frame():
    a = fixture_demo.demo_clip(5, 9, 0.1)
    b = fixture_demo.demo_clip(5, 9, 0.1)
    assert torch.equal(a.augmented_first_frame, b.augmented_first_frame)
    assert a.spec.seed == data.EVAL_SEEDS[5] and a.frames.shape == (9, 3, 32, 32)
    assert torch.equal(a.first_frame, data.pack(a.frames[:1]))
    assert torch.allclose(a.augmented_first_frame - a.first_frame, 0.1 * a.aug_noise, atol=1e-6)
    assert abs(a.aug_noise.std().item() - 1) < 0.1
    assert torch.equal(a.time_ids, torch.tensor([[data.FPS - 1, a.motion_bucket_id, 0.1]]))
    assert not torch.equal(fixture_demo.demo_clip(6, 9, 0.1).aug_noise, a.aug_noise)
    assert torch.equal(fixture_demo.demo_clip(5, 9, 0.0).augmented_first_frame, a.first_frame)
    c = fixture_demo.demo_clip(5, 9, 0.1, split="calibration")  # what a calibration runs on: other clips
    assert c.spec.seed == data.CALIBRATION_SEEDS[5] and not torch.equal(c.frames, a.frames)


@pytest.mark.parametrize("kwargs, name", [
    (dict(index=-1), "index"), (dict(index=fixture_demo.CLIPS), "index"), (dict(index=1.0), "index"),
    (dict(index=0, frames=7), "frames"), (dict(index=0, frames=17), "frames"),
    (dict(index=0, augmentation_level=-0.01), "augmentation_level"),
    (dict(index=0, augmentation_level=math.nan), "augmentation_level"),
    (dict(index=0, split="train"), "split"),
])
def test_demo_clip_names_the_bad_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}="):
        fixture_demo.demo_clip(**kwargs)
