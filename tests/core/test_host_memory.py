"""The simulator's copy of ComfyUI's loading rules (tests/host/test_host_memory.py holds it to the host's code)."""

import pytest
import torch
from torch import nn

from streamlined_core.tools.sim import host_memory as hm

MIB, GIB = hm.MIB, hm.GIB


def test_the_reserve_and_the_inference_minimum_follow_the_system_and_the_card():
    assert hm.Card(6).reserved_bytes == 400 * MIB
    assert hm.Card(6, "windows").reserved_bytes == 600 * MIB
    assert hm.Card(16, "windows").reserved_bytes == 700 * MIB  # more on cards over 15 GiB
    assert hm.Card(6).inference_bytes == 0.8 * GIB + 400 * MIB
    assert hm.Card(6, desktop_bytes=GIB).free_bytes == 6 * GIB - hm.CUDA_CONTEXT_BYTES - GIB
    with pytest.raises(ValueError, match="system must be one of linux, windows"):
        hm.Card(6, "macos")


def test_a_model_that_fits_loads_whole_and_one_that_does_not_loads_its_largest_modules_first():
    inv = hm.Inventory((500 * MIB, 400 * MIB, 300 * MIB, 200 * MIB, 100 * MIB), 1500 * MIB + 8000)
    card = hm.Card(4)  # 3.5 GiB free
    whole = hm.load(card, inv, memory_required=GIB)
    assert whole.resident_bytes == inv.size_bytes and whole.streamed_share == 0 and whole.cast_bytes == 0
    # keep 3.5 GiB - 750 MiB free: 750 MiB of weights allowed, 500 then 200 fit (400 does not after 500)
    part = hm.load(card, inv, memory_required=0, minimum_memory_required=card.free_bytes - 750 * MIB - 400 * MIB)
    assert part.lowvram_model_memory == 750 * MIB
    assert part.resident_bytes == 700 * MIB and part.streamed_module_bytes == (400 * MIB, 300 * MIB, 100 * MIB)
    assert part.cast_bytes == 400 * MIB and part.minimum_bytes == card.free_bytes - 750 * MIB
    assert part.free_after_bytes == card.free_bytes - 700 * MIB


def test_the_host_loads_at_least_128_mib_and_keeps_at_least_its_inference_minimum():
    inv = hm.Inventory((GIB, GIB), 2 * GIB)
    card = hm.Card(2)  # 1.5 GiB free
    tight = hm.load(card, inv, memory_required=4 * GIB)
    assert tight.lowvram_model_memory == hm.LOWVRAM_FLOOR and tight.resident_bytes == 0 and tight.streamed_share == 1.0
    loose = hm.load(card, inv, memory_required=0)  # the minimum is still minimum_inference_memory()
    assert loose.minimum_bytes == card.inference_bytes


def test_modules_no_op_casts_are_left_behind_not_streamed():
    inv = hm.Inventory((GIB, 4, 4), GIB + 8, uncast_bytes=(4, 4))
    part = hm.load(hm.Card(2), inv, memory_required=0, minimum_memory_required=hm.Card(2).free_bytes - GIB - 400 * MIB)
    assert part.resident_bytes == 8 and part.streamed_module_bytes == (GIB,)


def test_the_inventory_counts_fp32_blenders_and_buffers_outside_the_network():
    class AlphaBlender(nn.Module):
        def __init__(self):
            super().__init__()
            self.mix_factor = nn.Parameter(torch.zeros(1, dtype=torch.float16))

    model = nn.Sequential(nn.Linear(4, 4).half(), AlphaBlender(), nn.Sequential(nn.Linear(2, 2).half()))
    inv = hm.Inventory.of(model, extra_bytes=8000)
    assert inv.module_bytes == (40, 12, 4) and inv.uncast_bytes == (4,)
    assert inv.size_bytes == 40 + 12 + 4 + 8000


def test_the_hosts_estimates():
    assert hm.unet_estimate(25 * 72 * 128, 2, 2.0) == 25 * 72 * 128 * 2 * 0.01 * 2.0 * MIB
    assert hm.decode_estimate(72, 128, 2) == 2178 * 72 * 128 * 64 * 2
    assert hm.encode_estimate(576, 1024, 2) == 1767 * 576 * 1024 * 2
    assert hm.stock_decode_frames(5 * GIB, 2 * GIB) == 2 and hm.stock_decode_frames(GIB, 2 * GIB) == 1


def test_the_card_table_names_the_deciding_stage_and_what_streams():
    from streamlined_core.tools.sim.cards import CardPrediction, HostStage, format_card_markdown

    card = hm.Card(6)
    inv = hm.Inventory((2 * GIB, GIB), 3 * GIB)
    partial = hm.load(card, inv, memory_required=0, minimum_memory_required=card.free_bytes - 2.5 * GIB - 400 * MIB)
    whole = hm.load(card, hm.Inventory((GIB // 8,), GIB // 8), memory_required=GIB)
    fits = CardPrediction("SVD-XT 25 frames 576x1024", card, "streamlined", [
        HostStage("sampler (U-Net)", partial, 2 * GIB, "k<=2 frames"), HostStage("VAE decode", whole, GIB, "by groups")])
    over = CardPrediction("SVD-XT 25 frames 576x1024", card, "original", [
        HostStage("sampler (U-Net)", partial, 4 * GIB, "unsliced"), HostStage("VAE decode", whole, GIB, "in parts")])
    assert partial.resident_bytes == 2 * GIB and partial.streamed_share == pytest.approx(1 / 3)
    assert fits.fits and not over.fits and over.deciding.name == "sampler (U-Net)"
    table = format_card_markdown([fits, over])
    assert "| SVD-XT 25 frames 576x1024 | streamlined | yes | sampler (U-Net): 5.00 / 5.50 | k<=2 frames | by groups " \
           "| sampler 33% |" in table
    assert "| original | **no** | sampler (U-Net): 7.00 / 5.50 |" in table and "6 GB, Linux, desktop 0.0 GiB" in table
