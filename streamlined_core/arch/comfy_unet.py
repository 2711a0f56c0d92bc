"""ComfyUI's ``openaimodel.UNetModel`` (SVD's video blocks; SD1.5 is the base AnimateDiff-Evolved uses).

Nothing here imports ComfyUI: the model is recognised by its structure and class names, and the
host's block classes and helpers are taken from the modules the running host has loaded.

Groups: a ``VideoResBlock`` is a spatial group (its 2-D ResBlock, frame-sliced) and a temporal group
(its ``time_stack`` 3-D ResBlock, pixel-sliced, both video-wide GroupNorms on full-extent statistics,
then its mixer); a ``SpatialVideoTransformer`` is a spatial group per layer (norm, ``proj_in``,
spatial block) and a temporal group per layer (temporal block over its per-pixel time context,
mixer, and for the last layer ``proj_out`` and the residual); ResBlocks, ``SpatialTransformer``,
downsamplers and the output head are spatial groups. Layers of other types run as the host runs
them, through ``forward_timestep_embed_patch`` handlers when one matches.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import math
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .. import slicing
from ..slicing import Pixels, Runner, Tokens, pixel_view


def matches(model: nn.Module) -> bool:
    """True for ComfyUI's ``UNetModel``."""
    return (
        type(model).__name__ == "UNetModel"
        and type(model).__module__.startswith("comfy.")
        and hasattr(model, "input_blocks")
        and hasattr(model, "output_blocks")
    )


def skip_layout(model: nn.Module, height: int, width: int):
    """Skip tensors per batch-x-frame item: one per input block (``hs`` in ``UNetModel._forward``)."""
    from . import SkipTensor, after_strided_convs, last_conv

    layout = []
    for block in model.input_blocks:
        first = block[0]
        height, width = after_strided_convs(first, height, width)
        channels = first.out_channels if isinstance(first, nn.modules.conv._ConvNd) else last_conv(first).out_channels
        layout.append(SkipTensor(channels, height, width))
    return layout


def skip_sources(model: nn.Module) -> list[tuple[nn.Module, Callable]]:
    """The last layer of each input block: ``forward_timestep_embed`` calls layers, not the block."""
    return [(block[-1], lambda out: [out]) for block in model.input_blocks]


# -- running by groups -------------------------------------------------------------------------
#
# The loop below is ``UNetModel._forward`` of the ComfyUI versions in KNOWN_FORWARDS, with every
# hook it calls (emb_patch, input/middle/output block patches, apply_control,
# transformer_options["block"], ["transformer_index"], forward_timestep_embed_patch), the layers
# of each block run as groups, and each output block's upsampler fused into the next block's
# first group together with the skip concatenation.

# sha256 of ``inspect.getsource(UNetModel._forward)`` for the host versions this loop reproduces.
KNOWN_FORWARDS = {
    "79c1456902b447e897844f1c98b55ed0d8bde75af876d7c20db2c7a09b1fed9b": "ComfyUI 0.3.52 - 0.3.64",
}


def forward_fingerprint(model: nn.Module) -> str:
    """sha256 of the source of the host's ``UNetModel._forward``."""
    source = inspect.getsource(type(model)._forward)
    return hashlib.sha256(source.encode()).hexdigest()


def recognises(model: nn.Module) -> bool:
    """True when this loop reproduces the host version's ``_forward`` (else: module-level patching)."""
    return forward_fingerprint(model) in KNOWN_FORWARDS


def norm_affine(norm: nn.Module, like: torch.Tensor):
    """A ComfyUI norm's affine parameters the way its own forward gets them (cast, LoRA-patched)."""
    ops = sys.modules.get("comfy.ops")
    cast = getattr(ops, "cast_bias_weight", None)
    patched = getattr(norm, "comfy_cast_weights", False) or getattr(norm, "weight_function", None) or getattr(norm, "bias_function", None)
    if cast is not None and patched:
        out = cast(norm, like)
        return out[0], out[1]
    return slicing.norm_affine(norm, like.dtype)


@dataclass
class _Call:
    emb: torch.Tensor
    context: Any
    transformer_options: dict
    time_context: Any
    frames: int
    batch: int
    image_only_indicator: Any
    cross_frame: int | None = None  # AnimateDiff-Evolved's cross-frame GroupNorm mode: frames per video


def _frames(runner: Runner, name: str, call, x: torch.Tensor | list[torch.Tensor], per_item=(),
            c: _Call | None = None, norms: int = 0) -> torch.Tensor:
    """A spatial group over frame slices of ``x`` (or of several inputs sliced together); under ADE's
    cross-frame mode its ``norms`` GroupNorm calls get per-video statistics."""
    inputs = x if isinstance(x, list) else [x]
    if c is not None and c.cross_frame and norms:
        return _cross_frame_group(runner, name, call, inputs, per_item, c.cross_frame, norms)
    return slicing.frames_group(runner, name, call, inputs, per_item)


def _group_norms(*modules: nn.Module) -> int:
    """How many GroupNorms the modules hold (each runs once per call in the host's blocks)."""
    return sum(isinstance(m, nn.GroupNorm) for module in modules for m in module.modules())


# -- AnimateDiff-Evolved ---------------------------------------------------------------------
#
# ADE injects ``VanillaTemporalModule``s into the blocks while the model is loaded. A motion module
# is a temporal group: GroupNorm (per frame, or per video in ADE's cross-frame mode), ``proj_in``,
# temporal transformer blocks over each pixel's frames, ``proj_out``, residual, then ADE's effect
# blend; every step but the norm sees pixels independently, so it is sliced along pixels with the
# norm on full-extent statistics. ADE's cross-frame GroupNorm mode (v1, PIA, v2 without
# ``apply_v2_properly``) makes every U-Net GroupNorm span all frames of a video; frame-sliced
# groups then collect each norm's per-video statistics in passes before running their slices.


def is_motion_module(layer: nn.Module) -> bool:
    """An ADE ``VanillaTemporalModule`` (found at run time: ADE injects it while the model is loaded)."""
    return type(layer).__name__ == "VanillaTemporalModule" and type(getattr(layer, "temporal_transformer", None)).__name__ == "TemporalTransformer3DModel"


def motion_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if is_motion_module(m)]


def cross_frame_norms() -> bool:
    """Whether ADE's cross-frame GroupNorm mode is active; other GroupNorm patches are refused."""
    forward = torch.nn.GroupNorm.forward
    if getattr(forward, "__module__", "").split(".")[0] == "torch":
        return False
    if "groupnorm_mm" in getattr(forward, "__qualname__", ""):
        return True
    raise NotImplementedError(
        f"torch.nn.GroupNorm.forward is replaced by {getattr(forward, '__module__', '?')}."
        f"{getattr(forward, '__qualname__', '?')}, which Streamline does not know: it cannot keep that "
        f"norm's statistics exact on slices"
    )


def variant(model: nn.Module) -> tuple:
    """What a plan depends on beyond the call's shapes: injected motion modules and their frames, the norm mode."""
    lengths = tuple(m.video_length for m in motion_modules(model))
    forward = torch.nn.GroupNorm.forward
    return lengths, f"{getattr(forward, '__module__', '')}.{getattr(forward, '__qualname__', '')}"


def _cross_frame_length(model: nn.Module) -> int | None:
    """Frames per video that ADE's cross-frame GroupNorms span in this call (its motion modules'), or None."""
    if not cross_frame_norms():
        return None
    modules = motion_modules(model)
    if not modules:
        raise NotImplementedError("a cross-frame GroupNorm mode is active but the model holds no motion module")
    return modules[0].video_length


class _Collected(Exception):
    """Ends a statistics pass once the norm it collects for has seen its slice."""


def _video_pieces(a: int, b: int, frames: int) -> list[tuple[int, int, int]]:
    """Rows [a, b) of a (videos x frames) batch as (video, start, stop), positions relative to ``a``."""
    pieces, r = [], a
    while r < b:
        v = r // frames
        stop = min(b, (v + 1) * frames)
        pieces.append((v, r - a, stop - a))
        r = stop
    return pieces


@contextmanager
def _group_norms_call(forward):
    """Route every GroupNorm call (torch's and ComfyUI's casting one) to ``forward(norm, x)``."""
    ops = sys.modules.get("comfy.ops")
    casting = getattr(getattr(ops, "disable_weight_init", None), "GroupNorm", None)
    saved = torch.nn.GroupNorm.__dict__["forward"], casting.__dict__.get("forward_comfy_cast_weights") if casting else None
    torch.nn.GroupNorm.forward = forward
    if saved[1] is not None:
        casting.forward_comfy_cast_weights = forward
    try:
        yield
    finally:
        torch.nn.GroupNorm.forward = saved[0]
        if saved[1] is not None:
            casting.forward_comfy_cast_weights = saved[1]


def _cross_frame_group(runner: Runner, name: str, call, inputs, per_item, frames: int, norms: int) -> torch.Tensor:
    """A frame-sliced group whose ``norms`` GroupNorm calls each span their video's frames (ADE cross-frame)."""
    n = inputs[0].shape[0]
    stats: list[dict[int, slicing.GroupNormStats]] = []  # per norm call in order: per video
    affines: dict[int, tuple] = {}
    state = {"index": 0, "collect": -1, "start": 0}

    def norm_forward(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        i = state["index"]
        state["index"] += 1
        pieces = _video_pieces(state["start"], state["start"] + x.shape[0], frames)
        if i == state["collect"]:
            per_video = stats[i]
            for v, a, b in pieces:
                per_video.setdefault(v, slicing.GroupNormStats(norm.num_groups)).add(x[a:b].movedim(0, 1)[None])
            raise _Collected
        if i >= len(stats):
            raise RuntimeError(f"{name}: GroupNorm call {i + 1} of a group expected to make {norms}")
        if id(norm) not in affines:
            affines[id(norm)] = norm_affine(norm, x)
        out = [slicing.group_norm(x[a:b].movedim(0, 1)[None], stats[i][v], norm.eps, affines[id(norm)])[0].movedim(0, 1)
               for v, a, b in pieces]
        return out[0] if len(out) == 1 else torch.cat(out)

    def run_slice(a: int, b: int) -> torch.Tensor:
        state.update(index=0, start=a)
        with _group_norms_call(norm_forward):
            return call(*[x[a:b] for x in inputs], *[slicing.rows_of(t, a, b, n) for t in per_item])

    def collect(index: int):
        def pass_(a: int, b: int, mode) -> None:
            if index == len(stats):
                stats.append({})
            state["collect"] = index
            try:
                run_slice(a, b)
            except _Collected:
                pass
            finally:
                state["collect"] = -1
        return pass_

    def body(a: int, b: int) -> torch.Tensor:
        if b - a == n:  # one slice: the host's modules whole, under the host's own norms
            return call(*inputs, *per_item)
        return run_slice(a, b)

    return runner.run(name, "frames", n, body, slicing.Rows(n), passes=[collect(i) for i in range(norms)])


_MOTION_API = {
    "module": ("video_length", "effect", "view_options", "get_effect_mask", "should_handle_img_features",
               "should_handle_camera_features"),
    "transformer": ("video_length", "norm", "proj_in", "proj_out", "transformer_blocks", "get_scale_masks",
                    "get_cameractrl_effect"),
    "block": ("video_length", "scale_masks", "cameractrl_effect", "view_options", "mm_kwargs", "transformer_options"),
}


def _known_motion_module(mm: nn.Module) -> bool:
    """Whether this ADE version's motion module has every attribute and argument the sliced path uses."""
    tt = mm.temporal_transformer
    if not all(hasattr(mm, a) for a in _MOTION_API["module"]) or not all(hasattr(tt, a) for a in _MOTION_API["transformer"]):
        return False
    blocks = list(tt.transformer_blocks)
    if not blocks:
        return True
    parameters = _forward_signature(type(blocks[0])).parameters
    return all(a in parameters for a in _MOTION_API["block"])


def _motion_module(runner: Runner, name: str, mm: nn.Module, x: torch.Tensor, c: _Call) -> torch.Tensor:
    """An ADE motion module over pixel slices, exactly as ``VanillaTemporalModule.forward`` computes it."""
    tt = mm.temporal_transformer
    opts = c.transformer_options
    n, ch, height, width = x.shape
    frames = mm.video_length
    whole = lambda: mm(x, c.context, transformer_options=opts)  # noqa: E731
    if not _known_motion_module(mm):
        return whole()  # an ADE version whose motion module this code does not know
    effect = mm.effect
    exotic = (mm.should_handle_img_features() or mm.should_handle_camera_features()
              or (effect is not None and not isinstance(effect, torch.Tensor) and math.isclose(effect, 0.0)))
    if exotic or n % frames or len(tt.transformer_blocks) == 0:
        return whole()  # AnimateLCM-I2V, CameraCtrl, a disabled module: the host's module, whole
    videos, pixels = n // frames, height * width
    effect_mask = mm.get_effect_mask(x) if isinstance(effect, torch.Tensor) else effect
    scale_masks = tt.get_scale_masks(x)
    camera = tt.get_cameractrl_effect(x)
    xp = x.view(n, ch, pixels)
    stats = slicing.GroupNormStats(tt.norm.num_groups)
    affine: list[tuple] = []

    def video(xs: torch.Tensor) -> torch.Tensor:  # (n, C, p) as the statistics' extent: frame or video
        return xs.view(videos, frames, ch, -1).transpose(1, 2) if c.cross_frame else xs

    def per_pixel_rows(mask, a: int, b: int):  # (videos*HW, T, 1) attention-batch rows of pixels a:b
        if not isinstance(mask, torch.Tensor):
            return mask
        return mask.view(-1, pixels, *mask.shape[1:])[:, a:b].flatten(0, 1)

    def norm_stats(a: int, b: int, mode) -> None:
        stats.add(video(xp[..., a:b]))

    def body(a: int, b: int) -> torch.Tensor:
        xs = xp[..., a:b]
        if b - a == pixels:
            out = whole()
            return out.view(videos, frames, ch, pixels)
        if not affine:
            affine.append(norm_affine(tt.norm, xs))
        h = slicing.group_norm(video(xs), stats, tt.norm.eps, affine[0])
        h = (h.transpose(1, 2).reshape(n, ch, -1) if c.cross_frame else h).transpose(1, 2)
        h = tt.proj_in(h).to(h.dtype)
        masks = [per_pixel_rows(m, a, b) for m in scale_masks]
        for block in tt.transformer_blocks:
            h = block(h, encoder_hidden_states=c.context, attention_mask=None, video_length=tt.video_length,
                      scale_masks=masks, cameractrl_effect=per_pixel_rows(camera, a, b), view_options=mm.view_options,
                      mm_kwargs=None, transformer_options=opts)
        out = tt.proj_out(h).transpose(1, 2) + xs
        if effect is not None:
            e = effect_mask.view(n, 1, pixels)[..., a:b] if isinstance(effect_mask, torch.Tensor) else effect_mask
            out = xs * (1.0 - e) + out * e
        return out.view(videos, frames, ch, b - a)

    return runner.run(f"{name}.motion", "pixels", pixels, body, Pixels(videos, frames, height, width), passes=[norm_stats])


def _video_resblock_temporal(runner: Runner, name: str, layer: nn.Module, x: torch.Tensor, c: _Call) -> torch.Tensor:
    ts = layer.time_stack
    emb_bt = c.emb.reshape(c.batch, c.frames, *c.emb.shape[1:])
    cache: dict[str, Any] = {}

    def first(h: torch.Tensor) -> torch.Tensor:
        h = ts.in_layers[2](ts.in_layers[1](h))
        if ts.skip_t_emb:
            return h
        if "emb" not in cache:  # ResBlock._forward's time embedding, once per group
            e = ts.emb_layers(emb_bt).type(h.dtype)
            while e.dim() < h.dim():
                e = e[..., None]
            cache["emb"] = e.movedim(1, 2) if ts.exchange_temb_dims else e
        return h + cache["emb"]

    parts = slicing.TemporalResBlock(
        norm1=ts.in_layers[0],
        first=first,
        norm2=ts.out_layers[0],
        second=lambda h: ts.out_layers[1:](h),
        shortcut=ts.skip_connection,
        whole=lambda v: ts(v, emb_bt),
        affine=norm_affine,
    )
    mix = lambda v, out: layer.time_mixer(x_spatial=v, x_temporal=out, image_only_indicator=c.image_only_indicator)  # noqa: E731
    return slicing.temporal_resblock(runner, name, parts, x, c.batch, c.frames, mix)


def _video_transformer(runner: Runner, name: str, tr: nn.Module, x: torch.Tensor, c: _Call) -> torch.Tensor:
    from einops import rearrange, repeat

    n, ch, height, width = x.shape
    pixels = height * width
    opts = c.transformer_options
    opts["activations_shape"] = list(x.shape)
    spatial_context = c.context
    time_context = c.time_context
    if tr.use_spatial_context:
        if time_context is None:
            time_context = c.context
        first = time_context[:: c.frames]
    elif time_context is not None:
        first = time_context
    else:
        first = None
    host = sys.modules[type(tr).__module__]
    positions = repeat(torch.arange(c.frames, device=x.device), "t -> b t", b=n // c.frames)
    t_emb = host.timestep_embedding(rearrange(positions, "b t -> (b t)"), tr.in_channels, repeat_only=False,
                                    max_period=tr.max_time_embed_period)
    emb = None
    layers = list(zip(tr.transformer_blocks, tr.time_stack))
    h = x
    for i, (block, mix_block) in enumerate(layers):
        last = i == len(layers) - 1
        if i == 0:
            def spatial(xs, ctx, block=block, i=i):
                hs = tr.norm(xs)
                if not tr.use_linear:
                    hs = tr.proj_in(hs)
                hs = rearrange(hs, "b c h w -> b (h w) c")
                if tr.use_linear:
                    hs = tr.proj_in(hs)
                opts["block_index"] = i
                return block(hs, context=ctx, transformer_options=opts)
        else:
            def spatial(hs, ctx, block=block, i=i):
                opts["block_index"] = i
                return block(hs, context=ctx, transformer_options=opts)

        h = _frames(runner, f"{name}.spatial{'' if i == 0 else f'.{i}'}", spatial, h, [spatial_context])
        if emb is None:
            emb = tr.time_pos_embed(t_emb.to(h.dtype))[:, None, :]
        dim = h.shape[-1]
        hv = h.view(c.batch, c.frames, pixels, dim)

        def temporal(a, b, mix_block=mix_block, last=last, hv=hv, i=i):
            p = b - a
            hs = hv[:, :, a:b].reshape(n, p, dim)
            mix = rearrange(hs + emb, "(b t) s c -> (b s) t c", t=c.frames)
            tc = None
            if first is not None:
                tc = repeat(first, "b ... -> b n ...", n=p).flatten(0, 1)
                if tc.dim() == 2:
                    tc = tc[:, None]
            opts["block_index"] = i
            mix = mix_block(mix, context=tc, transformer_options=opts)
            mix = rearrange(mix, "(b s) t c -> (b t) s c", s=p, t=c.frames)
            hs = tr.time_mixer(x_spatial=hs, x_temporal=mix, image_only_indicator=c.image_only_indicator)
            if not last:
                return hs
            if tr.use_linear:
                hs = tr.proj_out(hs)
            out = hs.view(c.batch, c.frames, p, -1).permute(0, 1, 3, 2)
            if not tr.use_linear:
                out = tr.proj_out(out.reshape(n, -1, p, 1)).view(c.batch, c.frames, -1, p)
            return out + pixel_view(x, c.batch, c.frames)[..., a:b]

        merge = Pixels(c.batch, c.frames, height, width) if last else Tokens(pixels)
        h = runner.run(f"{name}.temporal{'' if i == 0 else f'.{i}'}", "pixels", pixels, temporal, merge)
        del hv
    return h


def _layer(runner: Runner, name: str, layer: nn.Module, h: torch.Tensor, c: _Call, output_shape=None,
           count: bool = True) -> torch.Tensor:
    """One layer of a ``TimestepEmbedSequential``, as ``forward_timestep_embed`` dispatches it.

    ``count``: advance ``transformer_index`` after a transformer (the owned loop does; under the
    host's own loop ``forward_timestep_embed`` does it).
    """
    host = _host_module(layer)
    opts = c.transformer_options
    if isinstance(layer, host.VideoResBlock):
        h = _frames(runner, f"{name}.spatial", lambda xs, es: host.ResBlock.forward(layer, xs, es), h, [c.emb])
        return _video_resblock_temporal(runner, f"{name}.temporal", layer, h, c)
    if isinstance(layer, host.TimestepBlock):
        return _frames(runner, name, lambda xs, es: layer(xs, es), h, [c.emb], c, _group_norms(layer))
    if isinstance(layer, host.SpatialVideoTransformer):
        h = _video_transformer(runner, name, layer, h, c)
        if count and "transformer_index" in opts:
            opts["transformer_index"] += 1
        return h
    if isinstance(layer, host.SpatialTransformer):
        opts["activations_shape"] = list(h.shape)
        out = _frames(runner, name, lambda xs, ctx: _plain_transformer(layer, xs, ctx, opts), h, [c.context], c,
                      _group_norms(layer))
        if count and "transformer_index" in opts:
            opts["transformer_index"] += 1
        return out
    if isinstance(layer, host.Upsample):
        return _frames(runner, name, lambda xs: layer(xs, output_shape=output_shape), h)
    if isinstance(layer, host.Downsample):
        return _frames(runner, name, layer, h)
    for class_type, handler in opts.get("patches", {}).get("forward_timestep_embed_patch", []):
        if isinstance(layer, class_type):
            if is_motion_module(layer) and getattr(handler, "__name__", "") == "forward_timestep_embed_patch_ade":
                return _motion_module(runner, name, layer, h, c)
            return handler(layer, h, c.emb, c.context, opts, output_shape, c.time_context, c.frames, c.image_only_indicator)
    return layer(h)


# -- module level: the host's own loop, each layer's forward replaced for the call ------------
#
# For host versions whose ``_forward`` the owned loop does not reproduce. Each layer runs sliced as
# above, but the skip concatenations and upsamplers run whole, so the peak is higher.


def module_level_forward(model: nn.Module, runner: Runner, x, timesteps=None, context=None, y=None, control=None,
                         transformer_options={}, **kwargs):
    """The host's own ``UNetModel._forward``, every layer's ``forward`` sliced for the duration of the call."""
    host = _host_module(model)
    cross = _cross_frame_length(model)
    installed: list[nn.Module] = []

    def install(name: str, layer: nn.Module, run) -> None:
        if "forward" in layer.__dict__:
            return  # another library replaced this layer's forward: leave it to run as it is

        def forward(*args, **kw):
            del layer.__dict__["forward"]  # the host's class forward, for calls made inside the slices
            try:
                return run(*args, **kw)
            finally:
                layer.__dict__["forward"] = forward

        layer.__dict__["forward"] = forward
        installed.append(layer)

    def call(name: str, layer: nn.Module):
        signature = _forward_signature(type(layer))

        def run(*args, **kw):
            a = signature.bind(layer, *args, **kw).arguments
            h = a.get("x", a.get("input_tensor"))
            frames = a.get("num_video_frames") or a.get("timesteps") or 1
            opts = a.get("transformer_options")
            c = _Call(a.get("emb"), a.get("context", a.get("encoder_hidden_states")), opts if opts is not None else {},
                      a.get("time_context"), frames, h.shape[0] // frames, a.get("image_only_indicator"), cross)
            if is_motion_module(layer):
                if a.get("attention_mask") is not None:
                    return layer(*args, **kw)
                return _motion_module(runner, name, layer, h, c)
            return _layer(runner, name, layer, h, c, a.get("output_shape"), count=False)
        return run

    blocks = [("input_blocks", b) for b in model.input_blocks] + [("middle_block", model.middle_block)]
    blocks += [("output_blocks", b) for b in model.output_blocks]
    index = {"input_blocks": 0, "middle_block": 0, "output_blocks": 0}
    known = (host.TimestepBlock, host.SpatialTransformer, host.SpatialVideoTransformer, host.Upsample, host.Downsample)
    for kind, block in blocks:
        if block is None:
            continue
        prefix = kind if kind == "middle_block" else f"{kind}.{index[kind]}"
        index[kind] += 1
        for j, layer in enumerate(block):
            if isinstance(layer, known) or is_motion_module(layer):
                install(f"{prefix}.{j}", layer, call(f"{prefix}.{j}", layer))
    head = model.out
    install("out", head, lambda h: _frames(runner, "out", lambda xs: type(head).forward(head, xs), h, (),
                                           _Call(None, None, {}, None, 1, h.shape[0], None, cross), _group_norms(head)))
    try:
        return type(model)._forward(model, x, timesteps, context, y, control, transformer_options, **kwargs)
    finally:
        for layer in installed:
            layer.__dict__.pop("forward", None)


@functools.lru_cache(maxsize=None)
def _forward_signature(cls: type) -> inspect.Signature:
    return inspect.signature(cls.forward)


def _plain_transformer(layer, xs, ctx, opts):
    shape = opts.get("activations_shape")
    out = layer(xs, ctx, opts)
    opts["activations_shape"] = shape  # the host sets the full shape once per call
    return out


def _host_module(layer: nn.Module):
    """The ``openaimodel`` module of the host (where its block classes live)."""
    module = sys.modules.get("comfy.ldm.modules.diffusionmodules.openaimodel")
    if module is None:
        raise RuntimeError("ComfyUI's openaimodel is not loaded")
    return module


def streamlined_forward(model: nn.Module, runner: Runner, x, timesteps=None, context=None, y=None, control=None,
                        transformer_options={}, **kwargs):
    """``UNetModel._forward`` of a recognised ComfyUI version, every block run by ``runner``."""
    host = _host_module(model)
    transformer_options["original_shape"] = list(x.shape)
    transformer_options["transformer_index"] = 0
    patches = transformer_options.get("patches", {})
    frames = kwargs.get("num_video_frames", model.default_num_video_frames) or 1
    c = _Call(None, context, transformer_options, kwargs.get("time_context", None), frames, x.shape[0] // frames,
              kwargs.get("image_only_indicator", None))
    c.cross_frame = _cross_frame_length(model)
    assert (y is not None) == (model.num_classes is not None), "must specify y if and only if the model is class-conditional"

    t_emb = host.timestep_embedding(timesteps, model.model_channels, repeat_only=False).to(x.dtype)
    emb = model.time_embed(t_emb)
    for p in patches.get("emb_patch", []):
        emb = p(emb, model.model_channels, transformer_options)
    if model.num_classes is not None:
        assert y.shape[0] == x.shape[0]
        emb = emb + model.label_emb(y)
    c.emb = emb

    hs = []
    h = x
    for i, module in enumerate(model.input_blocks):
        transformer_options["block"] = ("input", i)
        for j, layer in enumerate(module):
            h = _layer(runner, f"input_blocks.{i}.{j}", layer, h, c)
        h = host.apply_control(h, control, "input")
        for p in patches.get("input_block_patch", []):
            h = p(h, transformer_options)
        hs.append(h)
        for p in patches.get("input_block_patch_after_skip", []):
            h = p(h, transformer_options)

    transformer_options["block"] = ("middle", 0)
    if model.middle_block is not None:
        for j, layer in enumerate(model.middle_block):
            h = _layer(runner, f"middle_block.{j}", layer, h, c)
    h = host.apply_control(h, control, "middle")

    pending = None  # the previous output block's upsampler, with the shape it was to produce
    for i, module in enumerate(model.output_blocks):
        transformer_options["block"] = ("output", i)
        hsp = hs.pop()
        hsp = host.apply_control(hsp, control, "output")
        if "output_block_patch" in patches:
            if pending is not None:  # patches see the upsampled tensor, as in the host's loop
                h = _frames(runner, f"output_blocks.{i - 1}.upsample", lambda xs: pending[0](xs, output_shape=pending[1]), h)
                pending = None
            for p in patches["output_block_patch"]:
                h, hsp = p(h, hsp, transformer_options)
        output_shape = hs[-1].shape if hs else None
        layers = list(module)
        upsampler = layers.pop() if layers and isinstance(layers[-1], host.Upsample) and hs else None
        h = _fused_first(runner, f"output_blocks.{i}.0", layers[0], h, hsp, pending, c, host)
        del hsp
        pending = None
        for j, layer in enumerate(layers[1:], 1):
            h = _layer(runner, f"output_blocks.{i}.{j}", layer, h, c, output_shape)
        if upsampler is not None:
            pending = (upsampler, output_shape)
    if pending is not None:
        h = _frames(runner, "upsample", lambda xs: pending[0](xs, output_shape=pending[1]), h)
    h = h.type(x.dtype)
    if model.predict_codebook_ids:
        return model.id_predictor(h)
    return _frames(runner, "out", model.out, h, (), c, _group_norms(model.out))


def _fused_first(runner, name, layer, h, skip, pending, c, host):
    """The first layer of an output block with the pending upsampler and the concatenation fused in."""

    def cat(hs, rs):
        if pending is not None:
            hs = pending[0](hs, output_shape=pending[1])
        return torch.cat([hs, rs], dim=1)

    if isinstance(layer, host.VideoResBlock):
        spatial = lambda hs, rs, es: host.ResBlock.forward(layer, cat(hs, rs), es)  # noqa: E731
        h = slicing.frames_group(runner, f"{name}.spatial", spatial, [h, skip], [c.emb])
        return _video_resblock_temporal(runner, f"{name}.temporal", layer, h, c)
    if isinstance(layer, host.TimestepBlock):
        return _frames(runner, name, lambda hs, rs, es: layer(cat(hs, rs), es), [h, skip], [c.emb], c, _group_norms(layer))
    # an unknown first layer: materialise the concatenation and dispatch as the host does
    h = slicing.frames_group(runner, f"{name}.concat", cat, [h, skip])
    return _layer(runner, name, layer, h, c)


def context_dim(model: nn.Module) -> int:
    """Width of the cross-attention context (the first ``attn2``'s key projection input)."""
    for name, m in model.named_modules():
        if name.endswith("attn2") and getattr(m, "to_k", None) is not None:
            return m.to_k.in_features
    raise ValueError("cannot find the cross-attention width of this UNetModel")


def adm_dim(model: nn.Module) -> int:
    """Width of the class / ADM embedding input (``y``)."""
    return model.label_emb[0][0].in_features


def example_arguments(model: nn.Module, input_shape, device="meta") -> dict[str, Any]:
    """``_forward`` arguments for a latent batch of ``input_shape`` (one video of all items), for planning."""
    n = input_shape[0]
    dtype = getattr(model, "dtype", None) or torch.float32
    arguments: dict[str, Any] = {
        "x": torch.empty((n, model.in_channels, *input_shape[2:]), device=device, dtype=dtype),
        "timesteps": torch.empty(n, device=device, dtype=dtype),
        "context": torch.empty(n, 1, context_dim(model), device=device, dtype=dtype),
        "transformer_options": {},
        "num_video_frames": n,
    }
    if model.num_classes is not None:
        arguments["y"] = torch.empty(n, adm_dim(model), device=device, dtype=dtype)
    return arguments


SLOT = "_forward"  # the host's forward still runs every DIFFUSION_MODEL wrapper, then this
SAMPLE = "x"


def call_shape(arguments: dict) -> tuple[int, int, int, int]:
    """(batch, frames, latent height, latent width) of ComfyUI's (B*T, C, h, w) input."""
    x = arguments["x"]
    frames = arguments.get("num_video_frames") or 1
    return x.shape[0] // frames, frames, x.shape[2], x.shape[3]
