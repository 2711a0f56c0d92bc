"""AnimateDiff-Evolved inside ComfyUI's ``UNetModel``: motion modules and cross-frame GroupNorms.

ADE injects ``VanillaTemporalModule``s into the blocks while the model is loaded, so they are found
at run time. A motion module is a temporal group: GroupNorm (per frame, or per video in ADE's
cross-frame mode), ``proj_in``, temporal transformer blocks over each pixel's frames, ``proj_out``,
residual, then ADE's effect blend; every step but the norm sees pixels independently, so it is
sliced along pixels with the norm on full-extent statistics. ADE's cross-frame GroupNorm mode (v1,
PIA, v2 without ``apply_v2_properly``) makes every U-Net GroupNorm span all frames of a video;
frame-sliced groups then collect each norm's per-video statistics in passes before running their
slices.

Nothing here imports ComfyUI or ADE: modules are recognised by class names and the attributes the
sliced path uses (an ADE version without them runs its modules whole).
"""

from __future__ import annotations

import math
import sys
from contextlib import contextmanager

import torch
from torch import nn

from .. import slicing
from ..slicing import Pixels, Runner
from .comfy_common import Call, cast_affine, forward_signature


def is_motion_module(layer: nn.Module) -> bool:
    """An ADE ``VanillaTemporalModule`` (found at run time: ADE injects it while the model is loaded)."""
    transformer = getattr(layer, "temporal_transformer", None)
    return type(layer).__name__ == "VanillaTemporalModule" and type(transformer).__name__ == "TemporalTransformer3DModel"


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


def cross_frame_length(model: nn.Module) -> int | None:
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


def cross_frame_group(runner: Runner, name: str, call, inputs, per_item, frames: int, norms: int) -> torch.Tensor:
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
            affines[id(norm)] = cast_affine(norm, x)
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
    parameters = forward_signature(type(blocks[0])).parameters
    return all(a in parameters for a in _MOTION_API["block"])


def motion_module(runner: Runner, name: str, mm: nn.Module, x: torch.Tensor, c: Call) -> torch.Tensor:
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
            affine.append(cast_affine(tt.norm, xs))
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
