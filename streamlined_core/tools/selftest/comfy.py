"""The ComfyUI architectures of the exactness self-test (needs ComfyUI importable): its SVD ``UNetModel``
and its SVD ``VideoDecoder``, and the ways the host computes them: the attention function its flags chose,
weights stored in fp16 or fp8 and cast per call (``comfy.ops.manual_cast``), a model partially loaded
(``ModelPatcher.load(lowvram_model_memory=...)``: the modules left out cast their weights per call), and a
``UNetModel._forward`` the engine does not recognise (the module-level path)."""

from __future__ import annotations

import torch

from .. import configs
from .archs import Arch, Config, Shape, cast_inputs, cumulative, video_shapes  # noqa: F401  (Arch: the worker)
from .contract import Subject


def unet_configs(st):
    return st.fixed_dictionaries({
        "model_channels": st.sampled_from((32, 64)),
        "mults": st.lists(st.sampled_from((1, 2)), min_size=1, max_size=2),
        "num_res_blocks": st.lists(st.integers(1, 2), min_size=3, max_size=3),
        "attention": st.lists(st.booleans(), min_size=3, max_size=3),
        "num_head_channels": st.sampled_from((16, 32)),
        "context_dim": st.sampled_from((32, 64)),
        "adm_in_channels": st.sampled_from((256, 768)),
    })


def unet_kwargs(c: Config) -> dict:
    """``UNetModel`` overrides of SVD's arguments for a drawn configuration."""
    mult = [m // c["model_channels"] for m in cumulative(c["model_channels"], c["mults"])]
    levels = len(mult)
    blocks = c["num_res_blocks"][:levels]
    depth = [int(a) for a, n in zip(c["attention"], blocks) for _ in range(n)]
    depth_out = [int(a) for a, n in zip(c["attention"], blocks) for _ in range(n + 1)]
    return dict(model_channels=c["model_channels"], channel_mult=mult, num_res_blocks=blocks, transformer_depth=depth,
                transformer_depth_output=list(reversed(depth_out)), num_head_channels=c["num_head_channels"],
                context_dim=c["context_dim"], adm_in_channels=c["adm_in_channels"])


def build_unet(c: Config, weights: str = "fp32") -> torch.nn.Module:
    """The drawn SVD ``UNetModel``, seeded; ``weights``: fp32, or fp16 / fp8 storage cast per call to fp32."""
    import comfy.ops

    if weights == "fp32":
        return configs.seed_weights_scaled(configs.build_comfy_svd("cpu", torch.float32, **unet_kwargs(c)))
    storage = {"fp16": torch.float16, "fp8": torch.float8_e4m3fn}[weights]
    model = configs.build_comfy_svd("cpu", torch.float32, **unet_kwargs(c), operations=comfy.ops.manual_cast)
    configs.seed_weights_scaled(model)
    for module in model.modules():  # the host's layers stored low, computed in fp32: cast per call
        if hasattr(module, "comfy_cast_weights"):
            module.to(storage)
    return model


def unet_subject(forward=None):
    from ...engine.arch import comfy_unet

    engine_forward = forward or comfy_unet.streamlined_forward

    def subject(model: torch.nn.Module, shape: Shape, dtype: torch.dtype) -> Subject:
        b, t, h, w = shape
        n = b * t
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(n, model.in_channels, h, w, generator=gen)
        timesteps = torch.full((n,), 0.5)
        context = torch.randn(n, 1, comfy_unet.context_dim(model), generator=gen)
        y = torch.randn(n, comfy_unet.adm_dim(model), generator=gen)
        x, context, y = cast_inputs((x, context, y), dtype)
        timesteps = timesteps.to(dtype)  # ComfyUI hands the U-Net its timesteps in the model's dtype

        return Subject(lambda: model(x, timesteps, context, y, num_video_frames=t),
                       lambda runner: engine_forward(model, runner, x, timesteps, context, y, None, {},
                                                     num_video_frames=t),
                       comfy_unet.cuts(model))

    return subject


def vae_configs(st):
    return st.fixed_dictionaries({
        "ch": st.sampled_from((32, 64)),
        "mults": st.lists(st.sampled_from((1, 2)), min_size=1, max_size=2),
        "num_res_blocks": st.integers(1, 2),
    })


def build_vae(c: Config) -> torch.nn.Module:
    from comfy.ldm.modules.temporal_ae import VideoDecoder

    mult = [m // c["ch"] for m in cumulative(c["ch"], c["mults"])]
    decoder = VideoDecoder(ch=c["ch"], out_ch=3, ch_mult=mult, num_res_blocks=c["num_res_blocks"], attn_resolutions=[],
                           in_channels=3, resolution=64, z_channels=4, dropout=0.0, video_kernel_size=[3, 1, 1],
                           alpha=0.0).eval()
    return configs.seed_weights_scaled(decoder)


def vae_subject(decoder: torch.nn.Module, shape: Shape, dtype: torch.dtype) -> Subject:
    from ...engine.arch import comfy_vae

    _, t, h, w = shape
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(t, 4, h, w, generator=gen).to(dtype)  # ComfyUI decodes a batch as one clip
    return Subject(lambda: decoder(z), lambda runner: comfy_vae.streamlined_forward(decoder, runner, z))


def unet_arch(weights: str = "fp32", forward=None, label: str = "ComfyUI SVD U-Net") -> Arch:
    # stored fp16 or fp8 weights are the point of those rows: their examples run fp32 compute only (a bf16
    # copy would convert the stored weights)
    return Arch("comfyui-svd-unet", label, unet_configs, video_shapes, lambda c: build_unet(c, weights),
                unet_subject(forward), host=True, dtypes=("fp32",) if weights != "fp32" else Arch.dtypes)


VAE = Arch("comfyui-svd-vae", "ComfyUI SVD VAE decoder", vae_configs,
           lambda st, c: video_shapes(st, c, frames=5, size=8, batch=1), build_vae, vae_subject, host=True)


def partially_loaded(model: torch.nn.Module) -> tuple[torch.nn.Module, int]:
    """``model`` loaded by ComfyUI's ``ModelPatcher`` with half its weights' bytes as the low-VRAM budget: the
    modules left out cast their weights per call. Returns the model and how many modules cast."""
    import comfy.model_management
    import comfy.model_patcher

    cpu = torch.device("cpu")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
    size = comfy.model_management.module_size(model)
    patcher.load(cpu, lowvram_model_memory=size // 2)
    cast = sum(bool(getattr(m, "comfy_cast_weights", False)) for m in model.modules())
    return model, cast


def build_animatediff(_c: Config) -> torch.nn.Module:
    """SD1.5's ``UNetModel`` with AnimateDiff-Evolved's v2 motion modules injected, seeded (full width: the
    motion modules fit SD1.5's channels). Needs ADE loaded by ComfyUI."""
    return configs.seed_weights_scaled(configs.build_comfy_animatediff("cpu", torch.float32))


def animatediff_subject(model: torch.nn.Module, shape: Shape, dtype: torch.dtype) -> Subject:
    from ...engine.arch import comfy_unet
    from ...host.comfyui import animatediff_evolved

    b, t, h, w = shape
    n = b * t
    injection = animatediff_evolved("animatediff.model_injection")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, model.in_channels, h, w, generator=gen).to(dtype)
    timesteps = torch.full((n,), 500.0).to(dtype)
    context = torch.randn(n, 77, comfy_unet.context_dim(model), generator=gen).to(dtype)

    def options():
        for module in comfy_unet.comfy_ade.motion_modules(model):
            module.set_video_length(t, t)  # ADE's sampling sets this per call
        return {"patches": {"forward_timestep_embed_patch": [injection.create_forward_timestep_embed_patch()]}}

    return Subject(lambda: model(x, timesteps, context, transformer_options=options()),
                   lambda runner: comfy_unet.streamlined_forward(model, runner, x, timesteps, context, None, None,
                                                                 options()),
                   comfy_unet.cuts(model))


ANIMATEDIFF = Arch("comfyui-ade-unet", "ComfyUI SD1.5 U-Net with AnimateDiff-Evolved v2 motion modules",
                   lambda st: st.just({"motion_model": "v2"}),
                   lambda st, c: video_shapes(st, c, frames=4, size=6), build_animatediff, animatediff_subject,
                   host=True)


# -- Wan ---------------------------------------------------------------------------------------------------


def wan_configs(st):
    return st.fixed_dictionaries({
        "dim": st.sampled_from((32, 64)),
        "num_heads": st.sampled_from((1, 2)),
        "ffn_dim": st.sampled_from((48, 96)),
        "num_layers": st.integers(1, 3),
        "model_type": st.sampled_from(("t2v", "i2v")),
        "per_frame": st.booleans(),  # per-frame timesteps (Wan 2.2 with a denoise mask): one modulation row a frame
    })


def build_wan(c: Config, weights: str = "fp32") -> torch.nn.Module:
    """The drawn ``WanModel`` (text or image to video, Wan 2.1's 16 latent channels), seeded by fan-in; ``weights``:
    fp32, or fp16 / bf16 / fp8 storage cast per call to fp32."""
    import comfy.ops

    config = {**configs.TINY_WAN_CONFIG, **{k: c[k] for k in ("dim", "num_heads", "ffn_dim", "num_layers", "model_type")},
              "in_dim": 36 if c["model_type"] == "i2v" else 16, "out_dim": 16}
    ops = {} if weights == "fp32" else {"operations": comfy.ops.manual_cast}
    model = configs.seed_weights_scaled(configs.build_comfy_wan(config, "cpu", torch.float32, **ops))
    if weights != "fp32":
        storage = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}[weights]
        for module in model.modules():  # the host's layers stored low, computed in fp32: cast per call
            if hasattr(module, "comfy_cast_weights") and module is not model.patch_embedding:
                module.to(storage)
    return model


def wan_subject(model: torch.nn.Module, shape: Shape, dtype: torch.dtype) -> Subject:
    from ...engine.arch import comfy_wan

    b, t, h, w = shape
    if model.patch_embedding.weight.dtype != torch.float32:
        model.patch_embedding.float()  # a low-precision copy: the host keeps the patch embedding in fp32
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(b, model.in_dim, t, h, w, generator=gen).to(dtype)
    per_frame = getattr(model, "_selftest_per_frame", False)
    timestep = (torch.rand(b, t, generator=gen) * 1000) if per_frame else torch.full((b,), 500.0)
    context = torch.randn(b, 5, model.text_dim, generator=gen).to(dtype)
    clip = torch.randn(b, 257, 1280, generator=gen).to(dtype) if model.model_type == "i2v" else None

    def arguments():
        return dict(x=x, timestep=timestep, context=context, clip_fea=clip, time_dim_concat=None,
                    transformer_options={})

    return Subject(lambda: model(**arguments()), lambda runner: comfy_wan.streamlined_forward(model, runner, **arguments()))


def _wan_build(weights: str = "fp32"):
    def build(c: Config) -> torch.nn.Module:
        model = build_wan(c, weights)
        model._selftest_per_frame = c["per_frame"]
        return model

    return build


def wan_arch(weights: str = "fp32", build=None, label: str | None = None) -> Arch:
    label = label or "ComfyUI Wan 2.1 / 2.2 transformer" + ("" if weights == "fp32" else f", {weights} weights")
    return Arch("comfyui-wan", label, wan_configs, lambda st, c: video_shapes(st, c, frames=5, size=9),
                build or _wan_build(weights), wan_subject, host=True,
                dtypes=("fp32",) if weights != "fp32" or build is not None else Arch.dtypes)
