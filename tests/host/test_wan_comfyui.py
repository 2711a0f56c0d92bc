"""Wan 2.1 and 2.2 (ComfyUI's WanModel) through Streamline Model on a real ComfyUI: every call equal to the host's own
``_forward`` in ComfyUI's own sampling (flow matching, shift 8), with per-frame timesteps, other packs' block
patches, weights as users load them (stored low and cast per call, partially loaded, LoRA-patched); the transformer
floor by hand; the simulator's Wan rows."""

import logging

import pytest
import torch
from contract import pack_module

from streamlined_core.tools.selftest.comfy_graph import LATENT_TOL, build_wan, ksample_wan, rel


def streamline_model(pack, model, slicing="upper bound", max_slices=3, budget=0.0):
    (patched,) = pack.NODE_CLASS_MAPPINGS["StreamlineModel"]().patch(model, slicing, max_slices, budget, "all")
    return patched


class WanProbe:
    """Sits where the engine sits (the ``_forward`` object patch, inside every wrapper): each call runs the host's
    own ``_forward`` and the engine on the same inputs and records the error, the groups sliced and the timestep's
    shape."""

    def __init__(self, pack, patched):
        self.engine = patched.object_patches["diffusion_model._forward"]
        self.listen = pack_module(pack, "engine.context").listen
        self.errors, self.sliced, self.timesteps = [], set(), []
        patched.add_object_patch("diffusion_model._forward", self)

    def __call__(self, x, timestep, context, clip_fea=None, time_dim_concat=None, transformer_options={}, **kwargs):
        wan = self.engine.unet
        with torch.no_grad():
            reference = type(wan)._forward(wan, x, timestep, context, clip_fea, time_dim_concat,
                                           dict(transformer_options), **kwargs)
        events = []
        with self.listen(events.append):
            out = self.engine(x, timestep, context, clip_fea, time_dim_concat, transformer_options, **kwargs)
        self.errors.append(rel(out, reference))
        self.sliced |= {e.name for e in events if type(e).__name__ == "GroupEvent" and e.slices > 1}
        self.timesteps.append(tuple(timestep.shape))
        return out


@pytest.mark.parametrize("kind", ["wan2.1-t2v", "wan2.1-i2v", "wan2.2-5b"])
def test_ksampler_through_streamline_model_equals_the_plain_model(pack, kind):
    model = build_wan(kind)
    reference = ksample_wan(model)
    patched = streamline_model(pack, model)
    probe = WanProbe(pack, patched)
    out = ksample_wan(patched)
    assert torch.isfinite(reference).all() and reference.std() > 0
    assert len(probe.errors) >= 2 and max(probe.errors) <= 1e-5, probe.errors
    assert {"blocks.0", "blocks.0.self_attn.kv", "blocks.1", "blocks.1.self_attn.kv"} <= probe.sliced
    assert rel(out, reference) <= LATENT_TOL
    assert torch.equal(ksample_wan(model), reference)  # the MODEL that came in is untouched
    wan = model.get_model_object("diffusion_model")
    assert getattr(wan._forward, "__func__", None) is type(wan)._forward  # ComfyUI restored the host's own


def test_auto_slicing_plans_along_tokens_and_says_so(pack, caplog):
    model = build_wan("wan2.1-t2v")
    reference = ksample_wan(model, frames=3)
    patched = streamline_model(pack, model, "auto")
    probe = WanProbe(pack, patched)
    with caplog.at_level(logging.INFO):
        out = ksample_wan(patched, frames=3)
    assert rel(out, reference) <= LATENT_TOL and max(probe.errors) <= 1e-5
    assert probe.sliced, "auto planned nothing sliced at 1.5x the transformer floor"
    assert any("tokens" in r.getMessage() and "predicted activation peak" in r.getMessage() for r in caplog.records)


def test_per_frame_timesteps_slice_the_modulation_with_the_tokens(pack):
    """Wan 2.2 5B with a denoise mask: one timestep per latent frame, so ``e`` has a row per frame and the host's
    ``repeat_e`` maps tokens to rows by the sequence length. Three slices of 5 frames x 15 tokens cut frames apart."""
    model = build_wan("wan2.2-5b")
    mask = torch.ones(1, 1, 5, 6, 10)
    mask[:, :, :2] = 0.25
    reference = ksample_wan(model, noise_mask=mask)
    patched = streamline_model(pack, model, max_slices=4)
    probe = WanProbe(pack, patched)
    out = ksample_wan(patched, noise_mask=mask)
    assert all(len(shape) == 2 and shape[1] == 5 for shape in probe.timesteps), probe.timesteps  # per frame
    assert max(probe.errors) <= 1e-5 and rel(out, reference) <= LATENT_TOL
    assert {"blocks.0", "blocks.1"} <= probe.sliced


def test_a_block_part_on_a_slice_with_the_whole_modulation_is_wrong(pack):
    """The trap the modulation's slicing avoids: each slice mapping ``e``'s rows by its own length (the host's
    ``repeat_e`` on the slice). It must fail the same comparison."""
    wan_module = pack_module(pack, "engine.arch.comfy_wan")
    model = build_wan("wan2.2-5b")
    mask = torch.ones(1, 1, 5, 6, 10)
    mask[:, :, :2] = 0.25
    patched = streamline_model(pack, model, max_slices=4)
    probe = WanProbe(pack, patched)
    original = wan_module.modulation_of
    wan_module.modulation_of = wan_module.modulation_of_the_slice
    try:
        ksample_wan(patched, noise_mask=mask, steps=1)
    except RuntimeError as e:  # 0.3.52's repeat_e refuses a slice whose length is no multiple of the frame count
        assert "must match the size of tensor" in str(e)
        assert not probe.errors, "the engine ran before: the refusal came from somewhere else"
        wan_module.modulation_of = original
        ksample_wan(patched, noise_mask=mask, steps=1)  # the right mapping runs the same call
        assert max(probe.errors) <= 1e-5
        return
    finally:
        wan_module.modulation_of = original
    assert max(probe.errors) > 1e-2, probe.errors  # 0.3.64's repeat_e maps it, silently wrong


def test_another_packs_block_patch_wraps_the_sliced_block(pack):
    """A ``patches_replace["dit"]`` block patch (the hook other packs use) still runs around every block, and the
    output equals the patched model without Streamline Model."""
    model = build_wan("wan2.1-t2v")
    calls = []

    def patch(args, extra):
        calls.append(args["img"].shape)
        out = extra["original_block"](args)
        return {"img": out["img"] * 0.9 + 0.1 * args["img"]}

    with_patch = model.clone()
    for i in range(2):
        with_patch.set_model_patch_replace(patch, "dit", "double_block", i)
    reference = ksample_wan(with_patch)
    seen = len(calls)
    patched = streamline_model(pack, with_patch)
    probe = WanProbe(pack, patched)
    out = ksample_wan(patched)
    assert seen > 0 and len(calls) >= 3 * seen  # the plain run, and the probe's reference and engine runs
    assert max(probe.errors) <= 1e-5 and rel(out, reference) <= LATENT_TOL
    assert {"blocks.0", "blocks.1"} <= probe.sliced


@pytest.mark.parametrize("storage", [torch.float16, torch.bfloat16, torch.float8_e4m3fn], ids=["fp16", "bf16", "fp8"])
def test_weights_stored_low_and_cast_per_call(pack, storage):
    model = build_wan("wan2.1-t2v", weight_dtype=storage, manual_cast=torch.float32)
    wan = model.get_model_object("diffusion_model")
    assert wan.blocks[0].ffn[0].weight.dtype == storage and wan.blocks[0].ffn[0].comfy_cast_weights
    reference = ksample_wan(model)
    patched = streamline_model(pack, model)
    probe = WanProbe(pack, patched)
    out = ksample_wan(patched)
    assert max(probe.errors) <= 1e-5 and rel(out, reference) <= LATENT_TOL and probe.sliced


def test_a_lora_patch(pack):
    """A LoRA (the 4-step distillation LoRAs users add are LoRAs) on the attention and feed-forward weights: ComfyUI
    patches the weights; the sliced blocks call the same modules. (Partial loading, where modules cast their weights
    per call, is a weight path of ``streamline selftest exactness``: tests/host/test_selftest_comfyui.py.)"""
    model = build_wan("wan2.1-t2v")
    wan = model.get_model_object("diffusion_model")
    gen = torch.Generator().manual_seed(3)
    lora = {f"diffusion_model.blocks.{i}.{name}.weight":
            (0.5 * torch.randn(wan.get_submodule(f"blocks.{i}.{name}").weight.shape, generator=gen),)
            for i in range(2) for name in ("self_attn.q", "cross_attn.k", "ffn.0")}
    lora_model = model.clone()
    assert len(lora_model.add_patches(lora, 1.0)) == len(lora)
    reference = ksample_wan(lora_model)
    assert rel(reference, ksample_wan(model)) > 1e-2  # the patch changes the output
    patched = streamline_model(pack, lora_model)
    probe = WanProbe(pack, patched)
    assert rel(ksample_wan(patched), reference) <= LATENT_TOL and max(probe.errors) <= 1e-5 and probe.sliced


def test_groups_other_than_all_are_refused_on_wan(pack):
    model = build_wan("wan2.1-t2v")
    node = pack.NODE_CLASS_MAPPINGS["StreamlineModel"]()
    with pytest.raises(ValueError, match="groups='spatial' .* Wan's blocks are sliced along tokens: set groups to all"):
        node.patch(model, "auto", 8, 0.0, "spatial")


# -- the transformer floor and the simulator's rows ---------------------------------------------------------


def test_the_transformer_floor_is_the_hand_count(comfyui):
    """3 x B x tokens x dim in the activation dtype; tokens = latent frames x (H/2) x (W/2) after padding, plus the
    frames time_dim_concat adds and one frame of reference_latent tokens."""
    from streamlined_core.engine.arch import comfy_wan
    from streamlined_core.tools import configs

    wan14 = configs.build_comfy_wan(configs.WAN_CONFIGS["wan2.1-14b"])
    (x, _, _), _ = configs.comfy_wan_inputs(wan14, 2, 81, 480, 832)
    assert tuple(x.shape) == (2, 16, 21, 60, 104)
    assert comfy_wan.tokens(wan14, {"x": x}) == 21 * 30 * 52 == 32760
    assert comfy_wan.floor_bytes(wan14, {"x": x}) == 3 * 2 * 32760 * 5120 * 2 == 2_012_774_400
    wan5 = configs.build_comfy_wan(configs.WAN_CONFIGS["wan2.2-5b"])
    (x, _, _), _ = configs.comfy_wan_inputs(wan5, 1, 121, 704, 1280, vae_scale=16)
    assert tuple(x.shape) == (1, 48, 31, 44, 80)
    assert comfy_wan.floor_bytes(wan5, {"x": x}) == 3 * 1 * (31 * 22 * 40) * 3072 * 2
    odd = torch.empty(1, 16, 3, 7, 9, device="meta", dtype=torch.float32)  # padded to 8 x 10: 4 x 5 tokens a frame
    assert comfy_wan.floor_bytes(wan14, {"x": odd}) == 3 * (3 * 4 * 5) * 5120 * 4
    extra = torch.empty(1, 16, 2, 7, 9, device="meta")
    assert comfy_wan.tokens(wan14, {"x": odd, "time_dim_concat": extra}) == (3 + 2) * 20


def test_the_simulated_wan_rows_reach_1_5x_the_transformer_floor(comfyui):
    """Wan 2.1 1.3B at 832x480, 81 frames (the other models' rows: ``streamline simulate --model wan``); the docs'
    table holds the rows the command prints."""
    from readme import generated_block

    from streamlined_core.tools.sim.wan import format_markdown, wan_rows

    rows = wan_rows(["wan2.1-1.3b"], sizes=[(832, 480)])
    block = generated_block("wan")
    if f"of {rows[0].host}'s WanModel" in block:  # the table's host (ComfyUI 0.3.52's self-attention peaks higher)
        for line in format_markdown(rows).splitlines()[2:6]:
            assert line in block, line
    assert [(r.storage, r.batch) for r in rows] == [("bf16", 2), ("bf16", 1), ("fp8", 2), ("fp8", 1)]
    for r in rows:
        assert r.tokens == 32760 and r.peak_bytes <= 1.5 * r.floor_bytes, r
        assert r.original_peak_bytes > 4 * r.floor_bytes  # the unmodified model: its feed-forward's inner width
    assert rows[2].weights_bytes < 0.55 * rows[0].weights_bytes  # fp8 storage


# -- the variants: sliced exactly, or untouched and said ------------------------------------------------------


def tiny_wan_kwargs(**overrides):
    import comfy.ops

    return dict(patch_size=(1, 2, 2), text_len=8, in_dim=16, dim=32, ffn_dim=64, freq_dim=16, text_dim=24, out_dim=16,
                num_heads=2, num_layers=2, operations=comfy.ops.disable_weight_init, dtype=torch.float32) | overrides


def run_both(pack, model, *args, **kwargs):
    """The model's own forward and the engine's (3 slices a group) on the same call: the error and the groups sliced."""
    from streamlined_core.tools import configs

    api = pack_module(pack, "engine.api")
    arch = pack_module(pack, "engine.arch")
    context = pack_module(pack, "engine.context")
    configs.seed_weights_scaled(model)
    events = []
    with torch.no_grad():
        reference = model(*args, **kwargs)
        with context.listen(events.append):
            out = api.Streamliner(model, arch.engine_adapter(model), 3, None)(*args, **kwargs)
    sliced = {e.name for e in events if type(e).__name__ == "GroupEvent" and e.slices > 1}
    return rel(out, reference), sliced


VARIANT_INPUTS = {
    "vace": lambda x: dict(vace_context=torch.randn(1, 1, 32, *x.shape[2:]), vace_strength=[0.7]),
    "camera": lambda x: dict(camera_conditions=torch.randn(1, 24, x.shape[2], 8 * x.shape[3], 8 * x.shape[4])),
    "reference_latent": lambda x: dict(reference_latent=torch.randn(1, 16, *x.shape[3:])),
    "time_dim_concat": lambda x: dict(time_dim_concat=torch.randn(1, 16, 2, *x.shape[3:])),
}


@pytest.mark.parametrize("variant", list(VARIANT_INPUTS))
def test_vace_camera_and_token_layout_inputs_are_sliced_exactly(pack, variant):
    """VACE (its VACE blocks keep the first block's input: the blocks' outputs are never written over it), camera
    control, and the plain model's inputs that change the token layout: ``reference_latent`` through ``ref_conv`` (one
    frame of tokens in front), ``time_dim_concat`` as Phantom uses it (frames appended)."""
    import comfy.ldm.wan.model as wan

    model = {"vace": lambda: wan.VaceWanModel(**tiny_wan_kwargs(vace_layers=1, vace_in_dim=32)),
             "camera": lambda: wan.CameraWanModel(**tiny_wan_kwargs(model_type="camera_2.2", in_dim_control_adapter=24)),
             "reference_latent": lambda: wan.WanModel(**tiny_wan_kwargs(in_dim_ref_conv=16)),
             "time_dim_concat": lambda: wan.WanModel(**tiny_wan_kwargs())}[variant]()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 16, 3, 6, 10, generator=gen)
    error, sliced = run_both(pack, model, x, torch.tensor([500.0]), torch.randn(1, 8, 24, generator=gen),
                             **VARIANT_INPUTS[variant](x))
    assert error <= 1e-5
    assert {"blocks.0", "blocks.0.self_attn.kv", "blocks.1", "blocks.1.self_attn.kv"} <= sliced


def test_the_other_wan_models_run_untouched_and_say_so(pack, caplog):
    """S2V, HuMo and Animate (audio and face inputs, blocks of their own) are not sliced: their calls run ComfyUI's
    own code, and the log names the model. A host without them has no other WanModel class."""
    import comfy.ldm.wan.model as wan

    wan_module = pack_module(pack, "engine.arch.comfy_wan")
    others = sorted({c.__name__ for c in all_subclasses(wan.WanModel)} - set(wan_module.SLICED_MODELS))
    if not hasattr(wan, "HumoWanModel"):
        assert others == [], others
        return
    assert {"HumoWanModel", "WanModel_S2V"} <= set(others)
    model = wan.HumoWanModel(**tiny_wan_kwargs(dim=1536, num_heads=12))  # its audio projection is 1536 wide
    with caplog.at_level(logging.INFO):
        error, sliced = run_both(pack, model, torch.randn(1, 16, 2, 4, 4), torch.tensor([500.0]), torch.randn(1, 8, 24))
    assert error == 0.0 and not sliced
    assert any("HumoWanModel is not a Wan model Streamline slices" in r.getMessage() for r in caplog.records)


def all_subclasses(cls):
    import comfy.ldm.wan.model  # noqa: F401 (and the modules built on it that ComfyUI loaded)

    found = set()
    for sub in cls.__subclasses__():
        found |= {sub} | all_subclasses(sub)
    return found


def test_a_typed_budget_this_latent_cannot_meet_is_refused_before_the_first_step(pack):
    model = build_wan("wan2.1-t2v")
    patched = streamline_model(pack, model, "auto", budget=0.00016)  # the tiny weights (0.00015 GiB) and a little
    with pytest.raises(ValueError, match=r"vram_budget_gb=0\.000\d+ cannot be met for this latent \(5 frames at 6x10, "
                                         r"both conds batched\): the least budget that works is"):
        ksample_wan(patched)


def test_another_attention_gets_every_query_and_options_added_to_the_block_args_are_taken(pack, caplog):
    """An ``optimized_attention_override`` (sparse masks, attention capture) may assume queries and keys cover the
    same tokens: the blocks then run whole, said in the log. A block patch that adds ``transformer_options`` to the
    block's arguments (step caches do) on an image-to-video model: 0.3.52's cross-attention takes none, and gets
    none."""
    model = build_wan("wan2.1-i2v")
    seen = []

    def override(func, *args, **kwargs):
        seen.append(args[0].shape[1])
        return func(*args, **kwargs)

    overridden = model.clone()
    overridden.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = override
    reference = ksample_wan(overridden)
    patched = streamline_model(pack, overridden)
    probe = WanProbe(pack, patched)
    with caplog.at_level(logging.INFO):
        out = ksample_wan(patched)
    assert rel(out, reference) <= LATENT_TOL and not probe.sliced
    assert any("optimized_attention_override" in r.getMessage() and "run whole" in r.getMessage()
               for r in caplog.records)

    def with_options(args, extra):
        return extra["original_block"]({**args, "transformer_options": args.get("transformer_options", {})})

    adding = model.clone()
    for i in range(2):
        adding.set_model_patch_replace(with_options, "dit", "double_block", i)
    reference = ksample_wan(adding)
    patched = streamline_model(pack, adding)
    probe = WanProbe(pack, patched)
    assert rel(ksample_wan(patched), reference) <= LATENT_TOL and max(probe.errors) <= 1e-5 and probe.sliced
