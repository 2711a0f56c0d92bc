"""The simulator's copy of ComfyUI's loading decisions against the host's own code.

On the CPU ``load_models_gpu`` turns VRAM handling off, so these tests put ComfyUI in the state it
takes on an NVIDIA card (normal VRAM, ``MIN_WEIGHT_MEMORY_RATIO`` 0, the system's reserve) with its
free-memory functions reporting a card's free memory, and load the full-size SVD-XT model ComfyUI
builds (on ``meta``: no memory) through the host's own ``load_models_gpu`` and ``ModelPatcher``.
"""

import logging
import re

import pytest
import torch

from streamlined_core.tools import configs
from streamlined_core.tools.sim import host_memory as hm
from streamlined_core.tools.sim.cards import MEMORY_USAGE_FACTOR, MODEL_SAMPLING_BYTES

META = torch.device("meta")


def comfy_svd_model():
    """ComfyUI's full-size SVD (SVD-XT shares the U-Net) as its loader builds it, fp16, on ``meta``."""
    import comfy.supported_models

    kwargs = configs.comfy_svd_unet_kwargs()
    kwargs.pop("operations")
    model_config = comfy.supported_models.SVD_img2vid(dict(kwargs, image_size=32))
    model_config.set_inference_dtype(torch.float16, None)
    return model_config.get_model({}, "", device=META)


@pytest.fixture(scope="module")
def inventory():
    return hm.Inventory.of(configs.build_diffusers_svd(), extra_bytes=MODEL_SAMPLING_BYTES)


def test_the_simulated_inventory_is_the_one_comfyui_loads(comfyui, inventory):
    import comfy.model_patcher

    patcher = comfy.model_patcher.ModelPatcher(comfy_svd_model(), load_device=META, offload_device=META)
    assert inventory.module_bytes == tuple(sorted((size for size, *_ in patcher._load_list()), reverse=True))
    assert inventory.size_bytes == patcher.model_size()


@pytest.fixture
def host_on_a_card(comfyui, monkeypatch):
    """Put ComfyUI in the state it takes on a card with ``free`` bytes free; returns a setter."""
    import comfy.model_management as mm

    monkeypatch.setattr(mm, "vram_state", mm.VRAMState.NORMAL_VRAM)
    monkeypatch.setattr(mm, "current_loaded_models", [])

    def on(card: hm.Card, ratio: float, patcher) -> None:
        def free(dev=None, torch_free_too=False):
            left = card.free_bytes - patcher.loaded_size()
            return (left, left) if torch_free_too else left

        monkeypatch.setattr(mm, "EXTRA_RESERVED_VRAM", card.reserved_bytes)
        monkeypatch.setattr(mm, "MIN_WEIGHT_MEMORY_RATIO", ratio)
        monkeypatch.setattr(mm, "get_free_memory", free)
        monkeypatch.setattr(mm, "get_total_memory", lambda dev=None, torch_total_too=False: (
            (card.total_bytes, card.total_bytes) if torch_total_too else card.total_bytes))

    return on


CARDS = [hm.Card(3), hm.Card(4), hm.Card(6), hm.Card(6, "windows", int(0.5 * hm.GIB)), hm.Card(8), hm.Card(16, "windows")]
ESTIMATES = {"SVD-XT 576x1024 25 frames, ComfyUI's own estimate": None, "1 GiB": 1.0, "0": 0.0}
CASES = [(card, estimate, 0.0) for card in CARDS for estimate in ESTIMATES] + [  # NVIDIA; and other devices' ratio
    (card, next(iter(ESTIMATES)), 0.4) for card in CARDS[1:3]]


@pytest.mark.parametrize("card, estimate, ratio", CASES, ids=lambda v: (
    f"{v.gb:g}GB-{v.system}-desktop{v.desktop_bytes / hm.GIB:g}" if isinstance(v, hm.Card)
    else {None: "host", 1.0: "1GiB", 0.0: "zero"}.get(ESTIMATES.get(v), v) if isinstance(v, str) else f"ratio{v}"))
def test_resident_weights_and_reserve_equal_the_hosts_decision(host_on_a_card, inventory, caplog, card, estimate, ratio,
                                                               monkeypatch):
    import comfy.model_management as mm
    import comfy.model_patcher

    model = comfy_svd_model()
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=META, offload_device=META)
    host_on_a_card(card, ratio, patcher)
    gib = ESTIMATES[estimate]
    if gib is None:  # what the sampler asks: both conds, and one
        monkeypatch.setattr(mm, "pytorch_attention_flash_attention", lambda: True)
        required = [model.memory_required([b * 25, 8, 72, 128]) for b in (2, 1)]
    else:
        required = [2 * gib * hm.GIB, gib * hm.GIB]
    monkeypatch.setattr(hm, "MIN_WEIGHT_MEMORY_RATIO", ratio)
    predicted = hm.load(card, inventory, required[0], required[1])

    with caplog.at_level(logging.INFO):
        mm.load_models_gpu([patcher], memory_required=required[0], minimum_memory_required=required[1])
    line = next(r.getMessage() for r in reversed(caplog.records) if r.getMessage().startswith("loaded "))
    allowed_mib = float(re.match(r"loaded (?:partially|completely) (\S+)", line).group(1))

    assert patcher.loaded_size() == predicted.resident_bytes, line
    assert allowed_mib == predicted.lowvram_model_memory / (1024 * 1024), line
    streamed = sorted((size for size, _n, m, _p in patcher._load_list() if getattr(m, "prev_comfy_cast_weights", None)
                       is not None), reverse=True)
    assert tuple(streamed) == predicted.streamed_module_bytes
    kept = card.free_bytes - allowed_mib * 1024 * 1024  # what the host keeps free of the card, from its own log
    if predicted.lowvram_model_memory > hm.LOWVRAM_FLOOR and ratio == 0.0:
        assert kept == pytest.approx(predicted.minimum_bytes, abs=1)  # the reserve predicted
    if gib is None and card.gb == 6 and card.system == "linux" and ratio == 0.0:
        assert 0 < patcher.loaded_size() < patcher.model_size()  # stock SVD-XT on a 6 GB card: mostly streamed


def test_the_simulated_estimate_is_the_hosts_formula(comfyui, monkeypatch):
    import comfy.model_management as mm

    model = comfy_svd_model()
    monkeypatch.setattr(mm, "pytorch_attention_flash_attention", lambda: True)
    for shape in ([50, 8, 72, 128], [14, 8, 64, 64], [1, 8, 9, 13]):
        area = shape[0] * shape[2] * shape[3]
        assert hm.unet_estimate(area, 2, MEMORY_USAGE_FACTOR["svd-xt"]) == model.memory_required(shape)
