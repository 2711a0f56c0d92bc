"""The shipped, trained fixture: its file, its layout, and that it samples what it was trained on."""

import pytest
import torch

from streamlined_core.fixture import data
from streamlined_core.fixture import model as fixture

FRAMES, SIZE = 8, 32


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shipped():
    return fixture.load_unet()


def test_the_shipped_weights_are_the_fixture_layout_in_fp16_within_20_mb():
    import json

    from safetensors import safe_open

    path = fixture.weights_path()
    assert path.stat().st_size <= fixture.MAX_FP16_BYTES
    with safe_open(str(path), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
        assert int(f.metadata()["step"]) > 0, "exported from a training run"
    config = json.loads((path.parent / "config.json").read_text())
    for key, value in fixture.FIXTURE_UNET_KWARGS.items():
        assert config[key] == (list(value) if isinstance(value, tuple) else value), key
    card = (path.parent / "MODEL_CARD.md").read_text()
    assert "not a property of SVD" in card and "License" in card


def test_the_shipped_fixture_samples_a_clip_nearer_the_truth_than_untrained_weights_and_the_mean_clip(shipped):
    """The diffusers sampler loop (SVD's guidance across frames, its time ids) on one held-out clip, a
    few steps on a CPU in seconds: the trained weights sample nearer the true clip than the same
    layout's untrained weights and than the training set's mean clip. (The quality bar itself is
    `streamline bench --fixture`, on 16 clips and 25 steps.)"""
    from streamlined_core.fixture import quality

    b = data.make_batch([data.EVAL_SEEDS[1]], FRAMES, SIZE, noise_aug_strength=fixture.SAMPLE_NOISE_AUG)
    cond = fixture.Conditioning(b.embedding, b.time_ids)

    def mse(unet):
        out = fixture.sample(unet, b.first_frame, cond, steps=8, frames=FRAMES, generator=torch.Generator().manual_seed(0))
        assert out.shape == (1, FRAMES, 4, SIZE, SIZE) and torch.isfinite(out).all()
        return float(((data.unpack(out).clamp(0, 1) - true)[:, 1:] ** 2).mean())

    true = data.unpack(b.latents).clamp(0, 1)
    trained, untrained = mse(shipped), mse(fixture.build_fixture_unet(seed=0).eval())
    mean = float(((quality.mean_clip(FRAMES, SIZE, clips=64) - true)[:, 1:] ** 2).mean())
    assert trained < 0.7 * untrained and trained < mean, (trained, untrained, mean)


def test_missing_weights_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.safetensors does not exist"):
        fixture.load_unet(tmp_path / "nothing.safetensors")


