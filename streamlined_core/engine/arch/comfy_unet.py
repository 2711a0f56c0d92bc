"""ComfyUI's ``openaimodel.UNetModel`` (SVD's video blocks; SD1.5 is the base AnimateDiff-Evolved uses).

Nothing here imports ComfyUI: the model is recognised by its structure and class names, and the
host's block classes and helpers are taken from the modules the running host has loaded.

Groups: a ``VideoResBlock`` is a spatial group (its 2-D ResBlock, frame-sliced) and a temporal group
(its ``time_stack`` 3-D ResBlock, pixel-sliced, both video-wide GroupNorms on full-extent statistics,
then its mixer); a ``SpatialVideoTransformer`` is a spatial group per layer (norm, ``proj_in``,
spatial block) and a temporal group per layer (temporal block over its per-pixel time context,
mixer, and for the last layer ``proj_out`` and the residual); ResBlocks, ``SpatialTransformer``,
downsamplers and the output head are spatial groups. AnimateDiff-Evolved's motion modules are in
``comfy_ade``. Layers of other types run as the host runs them, through
``forward_timestep_embed_patch`` handlers when one matches.

Stages: every layer of every block is a stage of the core loop (``stages.py``), carrying the hooks
``UNetModel._forward`` calls around it: ``transformer_options["block"]`` at a block's first layer,
``apply_control`` and the input block patches at an input block's last, ``apply_control`` and the
output block patches at an output block's first, where the concatenation and the previous block's
upsampler fuse in. A stage that a partial run skips still does the host's bookkeeping (control
entries popped, ``block``, ``block_index`` and ``transformer_index`` as the host leaves them).
"""

from __future__ import annotations

import hashlib
import inspect
import sys
from typing import Any, Callable

import torch
from torch import nn

from .. import slicing
from ..slicing import Pixels, Runner, Tokens, pixel_view
from ..stages import Pending, Stage, StageIO, StageRequest, StageSpec, UNetStages, cut_points
from ..stages import run as run_stages
from . import comfy_ade
from .comfy_common import Call, cast_affine, forward_signature


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


# sha256 of ``inspect.getsource(UNetModel._forward)`` for the host versions the stage loop reproduces.
KNOWN_FORWARDS = {
    "79c1456902b447e897844f1c98b55ed0d8bde75af876d7c20db2c7a09b1fed9b": "ComfyUI 0.3.52 - 0.3.64",
}


def forward_fingerprint(model: nn.Module) -> str:
    """sha256 of the source of the host's ``UNetModel._forward``."""
    source = inspect.getsource(type(model)._forward)
    return hashlib.sha256(source.encode()).hexdigest()


def recognises(model: nn.Module) -> bool:
    """True when the stage loop reproduces the host version's ``_forward`` (else: module-level patching)."""
    return forward_fingerprint(model) in KNOWN_FORWARDS


def variant(model: nn.Module) -> tuple:
    """What a plan depends on beyond the call's shapes (ADE's injected motion modules, its norm mode)."""
    return comfy_ade.variant(model)


def _frames(runner: Runner, name: str, call, x: torch.Tensor | list[torch.Tensor], per_item=(),
            c: Call | None = None, norms: int = 0) -> torch.Tensor:
    """A spatial group over frame slices of ``x`` (or of several inputs sliced together); under ADE's
    cross-frame mode its ``norms`` GroupNorm calls get per-video statistics."""
    inputs = x if isinstance(x, list) else [x]
    if c is not None and c.cross_frame and norms:
        return comfy_ade.cross_frame_group(runner, name, call, inputs, per_item, c.cross_frame, norms)
    return slicing.frames_group(runner, name, call, inputs, per_item)


def _group_norms(*modules: nn.Module) -> int:
    """How many GroupNorms the modules hold (each runs once per call in the host's blocks)."""
    return sum(isinstance(m, nn.GroupNorm) for module in modules for m in module.modules())


def host_module():
    """The host's ``openaimodel`` module (where its block classes live)."""
    module = sys.modules.get("comfy.ldm.modules.diffusionmodules.openaimodel")
    if module is None:
        raise RuntimeError("ComfyUI's openaimodel is not loaded")
    return module


def _video_resblock_temporal(runner: Runner, name: str, layer: nn.Module, x: torch.Tensor, c: Call) -> torch.Tensor:
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
        affine=cast_affine,
    )
    mix = lambda v, out: layer.time_mixer(x_spatial=v, x_temporal=out, image_only_indicator=c.image_only_indicator)  # noqa: E731
    return slicing.temporal_resblock(runner, name, parts, x, c.batch, c.frames, mix)


def _video_transformer(runner: Runner, name: str, tr: nn.Module, x: torch.Tensor, c: Call) -> torch.Tensor:
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


def _layer(runner: Runner, name: str, layer: nn.Module, h: torch.Tensor, c: Call, output_shape=None,
           count: bool = True) -> torch.Tensor:
    """One layer of a ``TimestepEmbedSequential``, dispatched as ``forward_timestep_embed`` does.

    ``count``: advance ``transformer_index`` after a transformer (the stage loop does; under the
    host's own loop ``forward_timestep_embed`` does it).
    """
    host = host_module()
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
    for class_type, handler in opts.get("patches", {}).get("forward_timestep_embed_patch", []):
        if isinstance(layer, class_type):
            if comfy_ade.is_motion_module(layer) and getattr(handler, "__name__", "") == "forward_timestep_embed_patch_ade":
                return comfy_ade.motion_module(runner, name, layer, h, c)
            return handler(layer, h, c.emb, c.context, opts, output_shape, c.time_context, c.frames, c.image_only_indicator)
    if isinstance(layer, host.Downsample):  # after the patch list, as forward_timestep_embed reaches it
        return _frames(runner, name, layer, h)
    return layer(h)


def _plain_transformer(layer, xs, ctx, opts):
    shape = opts.get("activations_shape")
    out = layer(xs, ctx, opts)
    opts["activations_shape"] = shape  # the host sets the full shape once per call
    return out


# -- stages --------------------------------------------------------------------------------------


def _kind(layer: nn.Module, host, first: bool) -> str:
    if first:
        return "conv_in"
    if isinstance(layer, host.TimestepBlock):
        return "res"
    if isinstance(layer, (host.SpatialTransformer, host.SpatialVideoTransformer)):
        return "attn"
    if comfy_ade.is_motion_module(layer):
        return "motion"
    if isinstance(layer, host.Downsample):
        return "down"
    return "layer"


def layer_specs(model: nn.Module) -> list[tuple[StageSpec, nn.Module | None, nn.Module | None]]:
    """Every stage of this model as it is now (ADE's motion modules included): spec, layer, upsampler."""
    host = host_module()
    out: list[tuple[StageSpec, nn.Module | None, nn.Module | None]] = [(StageSpec("prologue", "prologue", "prologue"), None, None)]

    def spec(name, section, layer, **flags):
        kind = _kind(layer, host, name == "input_blocks.0.0")
        # per-step inputs: the embedding (ResBlocks), AnimateDiff-Evolved's scheduled effects and
        # masks (motion modules), and whatever an unknown layer reads
        uses_emb = kind in ("res", "motion", "layer")
        return StageSpec(name, section, kind, uses_emb=uses_emb, **flags)

    for i, block in enumerate(model.input_blocks):
        for j, layer in enumerate(block):
            out.append((spec(f"input_blocks.{i}.{j}", "down", layer, push=j == len(block) - 1), layer, None))
    if model.middle_block is not None:
        for j, layer in enumerate(model.middle_block):
            out.append((spec(f"middle_block.{j}", "mid", layer), layer, None))
    else:
        out.append((StageSpec("middle_block", "mid", "layer"), None, None))
    last = len(model.output_blocks) - 1
    for i, block in enumerate(model.output_blocks):
        layers = list(block)
        upsampler = layers.pop() if len(layers) > 1 and isinstance(layers[-1], host.Upsample) and i < last else None
        for j, layer in enumerate(layers):
            up = upsampler is not None and j == len(layers) - 1
            out.append((spec(f"output_blocks.{i}.{j}", "up", layer, consumes=j == 0, upsamples=up), layer,
                        upsampler if up else None))
    out.append((StageSpec("out", "head", "head"), None, None))
    return out


def cuts(model: nn.Module):
    """The cut points of this model (canonical ids mapped to ``input_blocks``/``output_blocks`` names)."""
    return cut_points([s for s, _, _ in layer_specs(model)])


def stages(model: nn.Module, runner: Runner, x, timesteps=None, context=None, y=None, control=None,
           transformer_options={}, **kwargs) -> UNetStages:
    """The stage list of one ``UNetModel._forward`` call of a recognised ComfyUI version."""
    host = host_module()
    opts = transformer_options
    patches = opts.get("patches", {})
    frames = kwargs.get("num_video_frames", model.default_num_video_frames) or 1
    c = Call(None, context, opts, kwargs.get("time_context", None), frames, x.shape[0] // frames,
             kwargs.get("image_only_indicator", None))
    c.cross_frame = comfy_ade.cross_frame_length(model)

    def prologue(h: torch.Tensor, io: StageIO) -> torch.Tensor:
        opts["original_shape"] = list(x.shape)
        opts["transformer_index"] = 0
        assert (y is not None) == (model.num_classes is not None), "must specify y if and only if the model is class-conditional"
        t_emb = host.timestep_embedding(timesteps, model.model_channels, repeat_only=False).to(x.dtype)
        emb = model.time_embed(t_emb)
        for p in patches.get("emb_patch", []):
            emb = p(emb, model.model_channels, opts)
        if model.num_classes is not None:
            assert y.shape[0] == x.shape[0]
            emb = emb + model.label_emb(y)
        c.emb = emb
        return h

    def transformer_bookkeeping(layer: nn.Module) -> Callable[[], None]:
        def bypass() -> None:  # what the layer's forward and forward_timestep_embed leave behind
            if isinstance(layer, (host.SpatialTransformer, host.SpatialVideoTransformer)):
                opts["block_index"] = len(layer.transformer_blocks) - 1
                if "transformer_index" in opts:
                    opts["transformer_index"] += 1
        return bypass

    def flush(h: torch.Tensor, pending: Pending, name: str = "upsample") -> torch.Tensor:
        return _frames(runner, name, lambda xs: pending.module(xs, output_shape=pending.skip_shape), h)

    built: list[Stage] = []
    block_of = {"down": "input", "mid": "middle", "up": "output"}
    for spec, layer, upsampler in layer_specs(model):
        if spec.section == "prologue":
            built.append(Stage(spec, prologue))
            continue
        if spec.section == "head":
            def head(h: torch.Tensor, io: StageIO) -> torch.Tensor:
                h = h.type(x.dtype)
                if model.predict_codebook_ids:
                    return model.id_predictor(h)
                return _frames(runner, "out", model.out, h, (), c, _group_norms(model.out))
            built.append(Stage(spec, head))
            continue
        parts = spec.name.split(".")
        block = (block_of[spec.section], int(parts[1]) if spec.section != "mid" else 0)
        j = int(parts[-1]) if parts[-1].isdigit() else 0
        end_of_input = spec.section == "down" and spec.push
        end_of_middle = spec.section == "mid" and (model.middle_block is None or j == len(model.middle_block) - 1)
        bookkeeping = transformer_bookkeeping(layer) if layer is not None else (lambda: None)

        def bypass(block=block, j=j, spec=spec, end_of_input=end_of_input, end_of_middle=end_of_middle,
                   bookkeeping=bookkeeping) -> None:
            if j == 0:
                opts["block"] = block
                if spec.consumes:
                    _pop_control(control, "output")
            bookkeeping()
            if end_of_input:
                _pop_control(control, "input")
            if end_of_middle:
                _pop_control(control, "middle")

        if spec.consumes:
            def body(h, io, name=spec.name, layer=layer, block=block):
                opts["block"] = block
                hsp = host.apply_control(io.take_skip(), control, "output")
                pending = io.pending
                if "output_block_patch" in patches:
                    if pending is not None:  # patches see the upsampled tensor, as in the host's loop
                        h = flush(h, pending, f"output_blocks.{block[1] - 1}.upsample")
                        pending = None
                    for p in patches["output_block_patch"]:
                        h, hsp = p(h, hsp, opts)
                return _fused_first(runner, name, layer, h, hsp, pending, c, host, io.next_skip_shape)
        elif layer is None:  # a model without a middle block: only its hooks
            def body(h, io, block=block):
                opts["block"] = block
                return host.apply_control(h, control, "middle")
        else:
            def body(h, io, name=spec.name, layer=layer, block=block, j=j, end_of_input=end_of_input,
                     end_of_middle=end_of_middle):
                if j == 0:
                    opts["block"] = block
                h = _layer(runner, name, layer, h, c, io.next_skip_shape if block[0] == "output" else None)
                if end_of_input:
                    h = host.apply_control(h, control, "input")
                    for p in patches.get("input_block_patch", []):
                        h = p(h, opts)
                if end_of_middle:
                    h = host.apply_control(h, control, "middle")
                return h

        after_push = None
        if end_of_input and patches.get("input_block_patch_after_skip"):
            def after_push(h):
                for p in patches["input_block_patch_after_skip"]:
                    h = p(h, opts)
                return h
        built.append(Stage(spec, body, upsampler=upsampler, after_push=after_push, bypass=bypass))
    return UNetStages(built, flush)


def _pop_control(control, name: str) -> None:
    """Take the entry ``apply_control`` would have taken for a block that did not run."""
    if control is not None and name in control and len(control[name]) > 0:
        control[name].pop()


def _fused_first(runner, name, layer, h, skip, pending, c, host, output_shape):
    """The first layer of an output block with the pending upsampler and the concatenation fused in."""

    def cat(hs, rs):
        if pending is not None:
            hs = pending.module(hs, output_shape=pending.skip_shape)
        return torch.cat([hs, rs], dim=1)

    if isinstance(layer, host.VideoResBlock):
        spatial = lambda hs, rs, es: host.ResBlock.forward(layer, cat(hs, rs), es)  # noqa: E731
        h = slicing.frames_group(runner, f"{name}.spatial", spatial, [h, skip], [c.emb])
        skip = None  # free for the temporal group where the caller holds no other reference (module level)
        return _video_resblock_temporal(runner, f"{name}.temporal", layer, h, c)
    if isinstance(layer, host.TimestepBlock):
        return _frames(runner, name, lambda hs, rs, es: layer(cat(hs, rs), es), [h, skip], [c.emb], c, _group_norms(layer))
    # an unknown first layer: materialise the concatenation and dispatch as the host does
    h = slicing.frames_group(runner, f"{name}.concat", cat, [h, skip])
    return _layer(runner, name, layer, h, c, output_shape)


def streamlined_forward(model: nn.Module, runner: Runner, x, timesteps=None, context=None, y=None, control=None,
                        transformer_options={}, **kwargs):
    """``UNetModel._forward`` of a recognised ComfyUI version, run as stages, every group by ``runner``."""
    unet_stages = stages(model, runner, x, timesteps, context, y, control, transformer_options, **kwargs)
    return run_stages(unet_stages, x, runner.request, runner.emit)


# -- module level: the host's own loop, each layer's forward replaced for the call ------------
#
# For host versions whose ``_forward`` the stage loop does not reproduce. Each layer runs sliced as
# above, upsamplers as groups of their own (their output exists whole). The skip concatenation does not:
# a last ``output_block_patch`` entry takes the feature and the skip the host is about to concatenate
# and hands it empty tensors (zero channels) instead, so the host's ``torch.cat`` allocates nothing and
# the tensor it holds for the whole block is empty; the block's first layer, receiving that, runs on the
# feature and the skip concatenated per slice, as in the stage loop. A host that calls no such patch
# concatenates as before. Captures work (recorded through the installed forwards); running from a cut
# does not: the host's loop cannot be entered part way.


def module_level_forward(model: nn.Module, runner: Runner, x, timesteps=None, context=None, y=None, control=None,
                         transformer_options={}, **kwargs):
    """The host's own ``UNetModel._forward``, every layer's ``forward`` sliced for the duration of the call."""
    request: StageRequest | None = runner.request
    if request is not None and (request.start is not None or request.stop is not None):
        raise NotImplementedError(
            f"running the U-Net from or to a cut point needs Streamline's own stage loop, and this ComfyUI's "
            f"UNetModel._forward (sha256 {forward_fingerprint(model)[:12]}) is not a version it reproduces "
            f"({', '.join(KNOWN_FORWARDS.values())}): here Streamline slices each layer under ComfyUI's own loop, "
            f"which cannot be entered part way. Captures work; starting from a cut needs a recognised ComfyUI version"
        )
    host = host_module()
    cross = comfy_ade.cross_frame_length(model)
    installed: list[nn.Module] = []
    recorder = _CaptureRecorder(model, request) if request is not None and request.capture else None
    handed: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}  # first layer -> (feature, skip)

    def hand_over(h: torch.Tensor, hsp: torch.Tensor, opts: dict):
        """The last output block patch: keep what the host would concatenate for the block's first layer."""
        block = opts.get("block")
        if not (isinstance(block, (tuple, list)) and len(block) == 2 and block[0] == "output"
                and isinstance(block[1], int) and 0 <= block[1] < len(model.output_blocks)):
            return h, hsp
        first = model.output_blocks[block[1]][0]
        if (first not in installed or not isinstance(first, host.TimestepBlock) or h.dim() != hsp.dim()
                or h.shape[0] != hsp.shape[0] or h.shape[2:] != hsp.shape[2:] or h.shape[1] == 0):
            return h, hsp
        handed[first] = (h, hsp)
        empty = h.new_empty((h.shape[0], 0, *h.shape[2:]))
        return empty, empty

    def install(layer: nn.Module, run) -> None:
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
        signature = forward_signature(type(layer))

        def run(*args, **kw):
            a = signature.bind(layer, *args, **kw).arguments
            h = next((a[k] for k in ("x", "input_tensor", "input", "hidden_states") if k in a), None)
            if h is None:  # a layer whose forward takes (*args, **kwargs), like ComfyUI's cast ops
                h = args[0] if args else next(iter(kw.values()))
            if recorder is not None:
                recorder.entering(name, h, a.get("output_shape"))
            frames = a.get("num_video_frames") or a.get("timesteps") or 1
            opts = a.get("transformer_options")
            c = Call(a.get("emb"), a.get("context", a.get("encoder_hidden_states")), opts if opts is not None else {},
                     a.get("time_context"), frames, h.shape[0] // frames, a.get("image_only_indicator"), cross)
            kept = list(handed.pop(layer, ()))  # a host that ignored the empty pair passes the concatenation
            if kept and h.shape[1] == 0:
                # the host concatenated the empty pair: concatenate per slice here; popped into the call,
                # so that only the callee holds the feature and the skip and frees them once consumed
                out = _fused_first(runner, name, layer, kept.pop(0), kept.pop(0), None, c, host, a.get("output_shape"))
            elif comfy_ade.is_motion_module(layer):
                if a.get("attention_mask") is not None:
                    out = layer(*args, **kw)
                else:
                    out = comfy_ade.motion_module(runner, name, layer, h, c)
            else:
                out = _layer(runner, name, layer, h, c, a.get("output_shape"), count=False)
            if recorder is not None:
                recorder.left(name)
            return out
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
            if isinstance(layer, known) or comfy_ade.is_motion_module(layer) or recorder is not None:
                install(layer, call(f"{prefix}.{j}", layer))
    head = model.out

    def run_head(h):
        if recorder is not None:
            recorder.entering("out", h)
        return _frames(runner, "out", lambda xs: type(head).forward(head, xs), h, (),
                       Call(None, None, {}, None, 1, h.shape[0], None, cross), _group_norms(head))

    install(head, run_head)
    if recorder is not None:
        transformer_options = recorder.options(transformer_options)
    had_patches, patches = "patches" in transformer_options, transformer_options.get("patches")
    ours = dict(patches or {})
    ours["output_block_patch"] = [*ours.get("output_block_patch", []), hand_over]
    transformer_options["patches"] = ours  # the call's own options dict; the caller's as it was in finally
    try:
        return type(model)._forward(model, x, timesteps, context, y, control, transformer_options, **kwargs)
    finally:
        if had_patches:
            transformer_options["patches"] = patches
        else:
            transformer_options.pop("patches", None)
        handed.clear()
        for layer in installed:
            layer.__dict__.pop("forward", None)


class _CaptureRecorder:
    """Captures at cut points under the host's own loop, from what its layers and block hooks see.

    Skips are what the host appends to ``hs``: a first ``input_block_patch_after_skip`` entry
    receives exactly that tensor (kept as a copy while capturing: the host adds an output block's
    control into its skip in place). The feature at a cut is what the next layer receives (after the
    block-end hooks the host ran in between), except before an output block, whose first layer
    receives the concatenation: there a first ``output_block_patch`` entry receives the feature
    before any other patch (FreeU writes into it in place). Upsamplers are layers here: a cut before
    one records it as pending, with the shape it upsamples to.
    """

    def __init__(self, model: nn.Module, request: StageRequest) -> None:
        specs = layer_specs(model)
        self.specs = [s for s, _, _ in specs]
        self.upsamplers = {s.name: up for s, _, up in specs if up is not None}
        self.cuts = {c.after: c for c in cut_points(self.specs)}
        by_id = {c.id: c for c in self.cuts.values()}
        unknown = [w for w in request.capture if w not in by_id and w not in self.cuts]
        if unknown:
            raise KeyError(f"no cut point {unknown[0]!r} in this U-Net; cut points: {', '.join(by_id)}")
        self.wanted = {(by_id.get(w) or self.cuts[w]).after for w in request.capture}
        self.spec_of = {s.name: s for s in self.specs}
        self.captured: dict[str, Any] = {}
        self.request = request
        request.captures.append(self.captured)
        self.skips: list[torch.Tensor] = []
        self.previous: str | None = None  # the last stage layer that ran

    def options(self, transformer_options: dict) -> dict:
        """A copy of the call's options with the recorder's block hooks first in their lists."""
        options = dict(transformer_options)
        patches = dict(options.get("patches", {}))
        patches["input_block_patch_after_skip"] = [self._pushed, *patches.get("input_block_patch_after_skip", [])]
        patches["output_block_patch"] = [self._block_start, *patches.get("output_block_patch", [])]
        options["patches"] = patches
        return options

    def _pushed(self, h: torch.Tensor, transformer_options: dict) -> torch.Tensor:
        self.skips.append(h.clone())  # the host adds an output block's control into its skip in place
        return h

    def _block_start(self, h: torch.Tensor, hsp: torch.Tensor, transformer_options: dict):
        if self.previous is not None and self.previous in self.wanted and not self.spec_of[self.previous].upsamples:
            self._capture(self.previous, h, None)
        self.previous = None
        return h, hsp

    def entering(self, name: str, h: torch.Tensor, output_shape=None) -> None:
        spec = self.spec_of.get(name)
        prev = self.previous
        if prev is not None and prev in self.wanted:
            if self.spec_of[prev].upsamples:  # ``name`` is the upsampler the stage loop leaves pending
                shape = tuple(output_shape) if output_shape is not None else None
                self._capture(prev, h, Pending(self.upsamplers[prev], shape))
            else:
                self._capture(prev, h, None)
        self.previous = None
        if spec is not None and spec.consumes and self.skips:
            self.skips.pop()

    def left(self, name: str) -> None:
        if name in self.spec_of:
            self.previous = name

    def _capture(self, name: str, h: torch.Tensor, pending: Pending | None) -> None:
        cut = self.cuts[name]
        self.captured[cut.id] = self.request.keep(cut.id, h, self.skips, pending)


def context_dim(model: nn.Module) -> int:
    """Width of the cross-attention context (the first ``attn2``'s key projection input)."""
    for name, m in model.named_modules():
        if name.endswith("attn2") and getattr(m, "to_k", None) is not None:
            return m.to_k.in_features
    raise ValueError("cannot find the cross-attention width of this UNetModel")


def adm_dim(model: nn.Module) -> int:
    """Width of the class / ADM embedding input (``y``)."""
    return model.label_emb[0][0].in_features


def example_arguments(model: nn.Module, input_shape, device="meta", frames: int | None = None,
                      tokens: int = 1, transformer_options: dict | None = None,
                      dtype: torch.dtype | None = None) -> dict[str, Any]:
    """``_forward`` arguments for a latent batch of ``input_shape``, for planning: videos of ``frames``
    frames (default: one video of all items, what ComfyUI's memory estimate knows), a context of ``tokens``
    tokens, ``transformer_options`` (the sampler's, for its patches) and the compute ``dtype`` (default the
    model's; ``BaseModel._apply_model`` casts to its manual-cast dtype, timesteps to fp32). With the latent's
    frame count, the conditioning's tokens and the sampler's options these plan as the sampler's calls do
    (``planning_arguments``)."""
    n = input_shape[0]
    dtype = dtype or getattr(model, "dtype", None) or torch.float32
    arguments: dict[str, Any] = {
        "x": torch.empty((n, model.in_channels, *input_shape[2:]), device=device, dtype=dtype),
        "timesteps": torch.empty(n, device=device, dtype=torch.float32),
        "context": torch.empty(n, tokens, context_dim(model), device=device, dtype=dtype),
        "transformer_options": dict(transformer_options or {}),
        "num_video_frames": frames or n,
    }
    if model.num_classes is not None:
        arguments["y"] = torch.empty(n, adm_dim(model), device=device, dtype=dtype)
    return arguments


# What ComfyUI's sampler adds to ``transformer_options`` for each call (``calc_cond_batch``, ``CFGGuider``) and
# the wrappers it runs around ``forward``: none of them is read by ``_forward``'s structure.
PER_CALL_OPTIONS = frozenset({"cond_or_uncond", "uuids", "sigmas", "sample_sigmas", "wrappers", "callbacks"})


def replayable(arguments: dict[str, Any]) -> bool:
    """Whether a planner may replay groups it measured (``plan.GroupReplay``): not with patches, which the
    host's blocks look up by indices they advance as they run (``transformer_index``, ``block_index``)."""
    options = arguments.get("transformer_options") or {}
    return not (options.get("patches") or options.get("patches_replace"))


def planning_arguments(arguments: dict[str, Any]) -> dict[str, Any]:
    """What a plan of this call depends on: its arguments by name, without ``None``s (an absent ``control``) and
    without the sampler's per-call options, so the memory estimate's example and the calls it stands for share a
    plan. Patches (``patches``, ``patches_replace``) and any option another pack adds stay: they may change the
    forward."""
    planned = {k: v for k, v in arguments.items() if v is not None}
    options = planned.get("transformer_options")
    if isinstance(options, dict):
        planned["transformer_options"] = {k: v for k, v in options.items() if k not in PER_CALL_OPTIONS}
    return planned


SLOT = "_forward"  # the host's forward still runs every DIFFUSION_MODEL wrapper, then this
SAMPLE = "x"


def call_shape(arguments: dict) -> tuple[int, int, int, int]:
    """(batch, frames, latent height, latent width) of ComfyUI's (B*T, C, h, w) input."""
    x = arguments["x"]
    frames = arguments.get("num_video_frames") or 1
    return x.shape[0] // frames, frames, x.shape[2], x.shape[3]
