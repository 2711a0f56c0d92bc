"""Feature Slicer + Operator Grouping: run a layer group on slices of its input, merge once.

A *group* is a run of operators over one domain. Spatial groups see every batch-x-frame item
independently and are sliced along that axis (``"frames"``); temporal groups see every pixel's
time series independently and are sliced along flattened pixel positions (``"pixels"``). Each
slice runs through the whole group and is written into the group's output, so only one slice's
intermediates are alive at a time: peak = group input + group output + one slice.

Where one frame's intermediates are too many (a VAE decoder's ResBlocks at full resolution), a
spatial group is sliced along ``"tiles"``: whole frames first, then row bands inside each frame
(:func:`tile_bounds`). A band reads its input with halo rows for the convolutions it passes
through and keeps only the rows it owns; norms whose statistics span the frame run on statistics
passes over every band first (:func:`spatial_resblock`).

A normalisation whose statistics span the sliced axis cannot run per slice. :class:`GroupNormStats`
accumulates its statistics over every slice (fp32 per slice, merged in fp64 with Chan's parallel
update) and :func:`group_norm` applies them to one slice, so the output equals the unsliced one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Literal, Sequence

import torch
from torch import nn

Axis = Literal["frames", "pixels", "tiles", "tokens"]
Mode = Literal["keep", "recompute"]


def slice_bounds(length: int, slices: int) -> list[tuple[int, int]]:
    """``slices`` contiguous ranges covering ``range(length)``, sizes differing by at most one."""
    if length < 1 or slices < 1:
        raise ValueError(f"length and slices must be positive, got {length} and {slices}")
    slices = min(slices, length)
    base, extra = divmod(length, slices)
    bounds, start = [], 0
    for i in range(slices):
        stop = start + base + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def tile_bounds(items: int, rows: int, slices: int) -> list[tuple[int, int, int, int]]:
    """Slices of ``items`` frames of ``rows`` rows each, as (item start, item stop, row start, row stop):
    whole frames while ``slices <= items``; beyond, every frame in ``ceil(slices / items)`` row bands
    (at most one row each). The length of the axis is ``items * rows``; a slice's length is its rows."""
    if items < 1 or rows < 1 or slices < 1:
        raise ValueError(f"items, rows and slices must be positive, got {items}, {rows} and {slices}")
    if slices <= items:
        return [(a, b, 0, rows) for a, b in slice_bounds(items, slices)]
    bands = slice_bounds(rows, ceil_div(slices, items))
    return [(i, i + 1, r0, r1) for i in range(items) for r0, r1 in bands]


# -- exact statistics --------------------------------------------------------------------------


class GroupNormStats:
    """Per (video, group) mean and variance of a GroupNorm input, accumulated slice by slice."""

    def __init__(self, num_groups: int) -> None:
        self.num_groups = num_groups
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        """Add a slice shaped (B, C, ...) whose non-channel axes are part of the normalised extent."""
        b = x.shape[0]
        xf = x.float().reshape(b, self.num_groups, -1)
        n = xf.shape[-1]
        var, mean = torch.var_mean(xf, dim=-1, correction=0)
        mean, m2 = mean.double(), var.double() * n
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * n / total)
        self.count = total

    def mean_rstd(self, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and 1/sqrt(var + eps) per (video, group), fp32."""
        if self.mean is None:
            raise RuntimeError("no slice was added to these statistics")
        var = self.m2 / self.count
        return self.mean.float(), torch.rsqrt(var + eps).float()


def module_affine(norm: nn.GroupNorm, dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A plain torch norm's affine weight and bias in ``dtype``, as the module itself would use them."""
    weight = norm.weight.to(dtype) if norm.weight is not None else None
    bias = norm.bias.to(dtype) if norm.bias is not None else None
    return weight, bias


def group_norm(
    x: torch.Tensor,
    stats: GroupNormStats,
    eps: float,
    affine: tuple[torch.Tensor | None, torch.Tensor | None],
) -> torch.Tensor:
    """GroupNorm of one slice (B, C, ...) with statistics of the full extent, in the input dtype."""
    b, c = x.shape[:2]
    g = stats.num_groups
    mean, rstd = stats.mean_rstd(eps)
    shape = (b, g) + (1,) * (x.dim() - 1)
    y = (x.float().reshape(b, g, c // g, *x.shape[2:]) - mean.view(shape)) * rstd.view(shape)
    y = y.reshape(x.shape)
    weight, bias = affine
    view = (1, c) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.float().view(view)
    if bias is not None:
        y = y + bias.float().view(view)
    return y.to(x.dtype)


# -- running groups ----------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupEvent:
    """A group starting or ending: what the profiler and the planner listen to."""

    kind: Literal["start", "end"]
    name: str
    axis: Axis
    length: int
    slices: int
    mode: Mode
    modes: tuple[Mode, ...] = ("keep",)
    in_place: bool = False  # slices overwrite the input; otherwise the output is allocated at the first slice
    rows: int = 0  # a "tiles" group: rows per frame (its length is frames x rows)


def governing_slice(length: int, slices: int, in_place: bool, rows: int = 0) -> int:
    """The length of the slice that sets a group's peak: the first (the longest) for an in-place group;
    otherwise the second, the first that runs while the whole output is allocated. On a ``"tiles"``
    axis (``rows`` per frame) the length counts rows: a slice of f frames is f x rows long."""
    if rows:
        tiles = tile_bounds(length // rows, rows, min(slices, length))
        f0, f1, r0, r1 = tiles[0] if in_place or len(tiles) == 1 else tiles[1]
        return (f1 - f0) * (r1 - r0)
    bounds = slice_bounds(length, slices)
    a, b = bounds[0] if in_place or len(bounds) == 1 else bounds[1]
    return b - a


Decide = Callable[[str, Axis, int], tuple[int, Mode]]


def unsliced(_name: str, _axis: Axis, _length: int) -> tuple[int, Mode]:
    """Run every group whole."""
    return 1, "keep"


class Runner:
    """Runs the groups of one model call: slice counts come from ``decide``, events go to listeners.

    ``request`` (a :class:`~streamlined_core.engine.stages.StageRequest`) says what the call's stage loop
    should capture, start from or stop at; None runs a plain full forward.
    """

    def __init__(self, decide: Decide = unsliced, listeners: Iterable[Callable[[object], None]] = (),
                 request: object = None, replay: object = None) -> None:
        self.decide = decide
        self.listeners = list(listeners)
        self.request = request
        # a planner's measuring run on ``meta``: groups it measured before with the same decision are
        # replayed from their record instead of run (``plan.GroupReplay``)
        self.replay = replay

    def emit(self, event: object) -> None:
        """Send a group or stage event to every listener."""
        for listener in self.listeners:
            listener(event)

    def run(
        self,
        name: str,
        axis: Axis,
        length: int,
        body: Callable[[int, int], torch.Tensor],
        merge: "Merge",
        passes: Sequence[Callable[..., None]] = (),
        modes: tuple[Mode, ...] = ("keep",),
        rows: int = 0,
    ) -> torch.Tensor:
        """Run ``body(start, stop)`` over the slices of ``axis`` and merge the results.

        With more than one slice, each of ``passes`` first runs ``pass_(start, stop, mode)`` over
        every slice, in order (full-extent norm statistics; with ``mode == "keep"`` a pass may
        keep what it computed for ``body``). With one slice, ``body(0, length)`` runs the host's
        modules whole and ``passes`` are skipped. ``modes`` lists the modes that differ for this
        group (``("keep", "recompute")`` when a pass can keep an intermediate). On the ``"tiles"``
        axis (``rows`` rows per frame, ``length`` = frames x rows) a slice is the four bounds of
        :func:`tile_bounds`, given to ``body``, the passes and the merge in place of ``start, stop``.
        """
        slices, mode = self.decide(name, axis, length)
        slices = max(1, min(int(slices), length))
        if mode not in modes:
            mode = modes[0]
        in_place = isinstance(merge, (InPlace, TilesInPlace))
        self.emit(GroupEvent("start", name, axis, length, slices, mode, modes, in_place, rows))
        replay, key = self.replay, (name, length, slices, mode)
        if replay is not None:
            out = replay.play(key, merge)
            if out is not None:
                self.emit(GroupEvent("end", name, axis, length, slices, mode, modes, in_place, rows))
                return out
            token = replay.begin()
        bounds = tile_bounds(length // rows, rows, slices) if rows else slice_bounds(length, slices)
        if len(bounds) > 1:
            for pass_ in passes:
                for bound in bounds:
                    pass_(*bound, mode)
        if len(bounds) == 1:
            out = merge.whole(body(*bounds[0]))
        else:
            out = None
            for bound in bounds:
                part = body(*bound)
                if out is None:
                    out = merge.allocate(part)
                merge.write(out, *bound, part)
                del part
            out = merge.finish(out)
        if replay is not None:
            replay.end(key, token, out, merge)
        self.emit(GroupEvent("end", name, axis, length, slices, mode, modes, in_place, rows))
        return out


class Merge:
    """Where each slice's result goes in the group's output."""

    def whole(self, part: torch.Tensor) -> torch.Tensor:
        return part

    def allocate(self, part: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def write(self, out: torch.Tensor, start: int, stop: int, part: torch.Tensor) -> None:
        raise NotImplementedError

    def finish(self, out: torch.Tensor) -> torch.Tensor:
        return out


class Rows(Merge):
    """Slices along dim 0 (batch x frames): the output is the parts stacked along dim 0."""

    def __init__(self, length: int) -> None:
        self.length = length

    def allocate(self, part: torch.Tensor) -> torch.Tensor:
        return part.new_empty((self.length, *part.shape[1:]))

    def write(self, out: torch.Tensor, start: int, stop: int, part: torch.Tensor) -> None:
        out[start:stop].copy_(part)


class Pixels(Merge):
    """Slices along flattened pixels. Parts are (B, T, C, P); the output is (B*T, C, H, W)."""

    def __init__(self, batch: int, frames: int, height: int, width: int) -> None:
        self.batch, self.frames, self.height, self.width = batch, frames, height, width

    def whole(self, part: torch.Tensor) -> torch.Tensor:
        # (B, T, C, P), or (B, T, C, H, W) as the host's own rearrangement leaves a whole video
        b, t, c = part.shape[:3]
        return part.reshape(b * t, c, self.height, self.width)

    def allocate(self, part: torch.Tensor) -> torch.Tensor:
        b, t, c, _ = part.shape
        return part.new_empty((b * t, c, self.height, self.width))

    def write(self, out: torch.Tensor, start: int, stop: int, part: torch.Tensor) -> None:
        b, t, c, _ = part.shape
        out.view(b, t, c, self.height * self.width)[..., start:stop].copy_(part)


class Tiles(Merge):
    """Slices along ``"tiles"``: parts are (frames, C, rows, W) pieces of the (N, C, H, W) output."""

    def __init__(self, items: int, rows: int) -> None:
        self.items, self.rows = items, rows

    def allocate(self, part: torch.Tensor) -> torch.Tensor:
        n, c, _, w = part.shape
        return part.new_empty((self.items, c, self.rows, w))

    def write(self, out: torch.Tensor, f0: int, f1: int, r0: int, r1: int, part: torch.Tensor) -> None:
        out[f0:f1, :, r0:r1].copy_(part)


class TilesInPlace(Merge):
    """Tiles written over the group's input (same shape), each band held back until no later band of
    its frame reads those input rows: a band reads ``halo`` rows above its own, so a band is written
    once the band being written starts ``halo`` rows or more below its end. Whole frames go at once."""

    def __init__(self, target: torch.Tensor, halo: int) -> None:
        self.target, self.halo = target, halo
        self.pending: list[tuple[int, int, int, torch.Tensor]] = []

    def whole(self, part: torch.Tensor) -> torch.Tensor:
        self.target.copy_(part)
        return self.target

    def allocate(self, part: torch.Tensor) -> torch.Tensor:
        if part.dtype != self.target.dtype:
            raise ValueError(f"an in-place group got a {part.dtype} part for a {self.target.dtype} input")
        return self.target

    def _flush(self, keep: Callable[[int, int], bool]) -> None:
        kept = []
        for f, r0, r1, part in self.pending:
            if keep(f, r1):
                kept.append((f, r0, r1, part))
            else:
                self.target[f:f + 1, :, r0:r1].copy_(part)
        self.pending = kept

    def write(self, out: torch.Tensor, f0: int, f1: int, r0: int, r1: int, part: torch.Tensor) -> None:
        if r1 - r0 == out.shape[2]:  # whole frames: nothing of theirs is read again
            self._flush(lambda f, end: False)
            out[f0:f1].copy_(part)
            return
        # the next band of this frame reads from r1 - halo: what ends at or above that is free to go
        self._flush(lambda f, end: f == f0 and end > r1 - self.halo)
        self.pending.append((f0, r0, r1, part))

    def finish(self, out: torch.Tensor) -> torch.Tensor:
        self._flush(lambda f, end: False)
        return out


class InPlace(Merge):
    """Each slice's result overwrites the same slice of the group's input, so the group allocates no output.

    Exact when a slice's result depends only on the same slice of the input (and on statistics passes,
    which all run before the first write): true of frame-sliced spatial layers and of pixel-sliced
    temporal layers whose output has the input's shape. ``target`` must belong to the caller alone.
    Row parts are (rows, ...) along dim 0; with ``pixels=(batch, frames)`` parts are (B, T, C, P)
    pixel slices of the (B*T, C, H, W) target. With one slice the host's module runs whole and its
    output is copied over the input.
    """

    def __init__(self, target: torch.Tensor, pixels: tuple[int, int] | None = None) -> None:
        self.target, self.pixels = target, pixels

    def whole(self, part: torch.Tensor) -> torch.Tensor:
        # One slice: the host's module ran whole; its output goes over the input like a slice's would,
        # so after the group only one tensor of its size is alive whatever the slice count.
        if self.pixels and part.dim() == 5:  # a whole video in the host's (B, T, C, H, W) layout
            part = part.flatten(3)
        self.write(self.allocate(part), 0, part.shape[-1] if self.pixels else part.shape[0], part)
        return self.target

    def allocate(self, part: torch.Tensor) -> torch.Tensor:
        if part.dtype != self.target.dtype:
            raise ValueError(f"an in-place group got a {part.dtype} part for a {self.target.dtype} input")
        return self.target

    def write(self, out: torch.Tensor, start: int, stop: int, part: torch.Tensor) -> None:
        if self.pixels is None:
            out[start:stop].copy_(part)
        else:
            pixel_view(out, *self.pixels)[..., start:stop].copy_(part)


class Tokens(Merge):
    """Slices along the token axis of (B*T, HW, D) hidden states. Parts are (B*T, P, D)."""

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens

    def allocate(self, part: torch.Tensor) -> torch.Tensor:
        return part.new_empty((part.shape[0], self.tokens, part.shape[2]))

    def write(self, out: torch.Tensor, start: int, stop: int, part: torch.Tensor) -> None:
        out[:, start:stop].copy_(part)


def rows_of(value, start: int, stop: int, length: int):
    """``value[start:stop]`` when it holds one row per batch-x-frame item (also inside tuples, lists)."""
    if isinstance(value, (tuple, list)):
        return type(value)(rows_of(v, start, stop, length) for v in value)
    if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != length:
        return value  # shared by every item (or absent): not sliced
    return value[start:stop]


def one_value_items(x: torch.Tensor) -> bool:
    """Items of one value per channel (a 1x1 latent): the host's GroupNorm refuses one such item alone (a
    group of one value), though the whole batch passes."""
    return x.shape[0] > 1 and x[:1, :1].numel() == 1


def paired(a: int, b: int, n: int, single: bool) -> tuple[int, int]:
    """The items to run for items [a, b): a single item of :func:`one_value_items` runs beside a neighbour,
    whose row is dropped (the modules are per item, so the item's row is what it would be alone)."""
    if not single or b - a != 1:
        return a, b
    return (a, a + 2) if a + 1 < n else (a - 1, a + 1)  # the next item where there is one: not yet written over


def frames_group(
    runner: Runner,
    name: str,
    call: Callable[..., torch.Tensor],
    inputs: Sequence[torch.Tensor],
    per_item: Sequence = (),
    in_place: bool = False,
) -> torch.Tensor:
    """A spatial group: ``call(*input_slices, *per_item_slices)`` over batch-x-frame slices.

    ``in_place``: each slice's result overwrites the slice of ``inputs[0]`` it came from (the result
    must have its shape and dtype, and the input must belong to the caller alone)."""
    n = inputs[0].shape[0]
    single = one_value_items(inputs[0])

    def body(a: int, b: int) -> torch.Tensor:
        lo, hi = paired(a, b, n, single)
        out = call(*[x[lo:hi] for x in inputs], *[rows_of(t, lo, hi, n) for t in per_item])
        return out if (lo, hi) == (a, b) else out[a - lo:b - lo]

    return runner.run(name, "frames", n, body, InPlace(inputs[0]) if in_place else Rows(n))


def pixel_view(x: torch.Tensor, batch: int, frames: int) -> torch.Tensor:
    """(B*T, C, H, W) as (B, T, C, H*W), a view."""
    n, c, h, w = x.shape
    return x.view(batch, frames, c, h * w)


def to_video(xs: torch.Tensor) -> torch.Tensor:
    """A (B, T, C, P) pixel slice as the (B, C, T, P, 1) video a temporal Conv3d/GroupNorm expects."""
    return xs.permute(0, 2, 1, 3).unsqueeze(-1)


def host_video(x: torch.Tensor, batch: int, frames: int) -> torch.Tensor:
    """(B*T, C, H, W) as the hosts' temporal layers view it, ``(b t) c h w -> b c t h w``: the same strides as
    theirs, so the kernels the host's own modules pick (a GroupNorm's channels-last path) are the same."""
    return x.reshape(batch, frames, *x.shape[1:]).permute(0, 2, 1, 3, 4)


def from_video(v: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_video`: (B, C, T, P, 1) -> (B, T, C, P)."""
    return v.squeeze(-1).permute(0, 2, 1, 3)


@dataclass(frozen=True)
class TemporalResBlock:
    """A 3-D ResBlock over (B, C, T, H, W) whose two GroupNorms span the whole video, in parts.

    ``norm1 -> first -> norm2 -> second``, plus ``shortcut``; ``whole(v)`` is the host's own module
    on an unsliced video; ``affine(norm, like)`` gives a norm's weight and bias as the host uses them.
    """

    norm1: nn.GroupNorm
    first: Callable[[torch.Tensor], torch.Tensor]  # activation, conv, + time embedding
    norm2: nn.GroupNorm
    second: Callable[[torch.Tensor], torch.Tensor]  # activation, dropout, conv
    shortcut: Callable[[torch.Tensor], torch.Tensor]
    whole: Callable[[torch.Tensor], torch.Tensor]
    affine: Callable[[nn.Module, torch.Tensor], tuple]


def temporal_resblock(
    runner: Runner,
    name: str,
    block: TemporalResBlock,
    x: torch.Tensor,
    batch: int,
    frames: int,
    mix: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    in_place: bool = False,
) -> torch.Tensor:
    """A temporal ResBlock and its mixer ``mix(spatial, temporal)`` over pixel slices of ``x``.

    Two statistics passes: the first norm's over the input; the second norm's over the
    intermediate, which ``mode == "keep"`` stores for the body and ``"recompute"`` computes again.
    ``in_place``: each pixel slice's result overwrites that slice of ``x`` (same channels; ``x``
    belongs to the caller alone). Both passes read ``x`` before the first write.
    """
    n, c, height, width = x.shape
    pixels = height * width
    xv = pixel_view(x, batch, frames)
    stats1, stats2 = GroupNormStats(block.norm1.num_groups), GroupNormStats(block.norm2.num_groups)
    kept: dict[str, torch.Tensor] = {}
    affines: dict[int, tuple] = {}

    def affine(norm: nn.Module, like: torch.Tensor) -> tuple:
        if id(norm) not in affines:  # cast (and LoRA-patched) once per group, not once per slice
            affines[id(norm)] = block.affine(norm, like)
        return affines[id(norm)]

    def first(v: torch.Tensor) -> torch.Tensor:
        return block.first(group_norm(v, stats1, block.norm1.eps, affine(block.norm1, v)))

    def norm1_stats(a: int, b: int, mode: Mode) -> None:
        stats1.add(to_video(xv[..., a:b]))

    def norm2_stats(a: int, b: int, mode: Mode) -> None:
        h = first(to_video(xv[..., a:b]))
        stats2.add(h)
        if mode == "keep":
            if "h" not in kept:
                kept["h"] = h.new_empty((batch, h.shape[1], frames, pixels))
            kept["h"][..., a:b].copy_(h.squeeze(-1))

    def body(a: int, b: int) -> torch.Tensor:
        if b - a == pixels:  # one slice: the host's module, whole, on the host's own view of the video
            v = host_video(x, batch, frames)
            return mix(v, block.whole(v)).permute(0, 2, 1, 3, 4)
        v = to_video(xv[..., a:b])
        h = kept["h"][..., a:b].unsqueeze(-1) if "h" in kept else first(v)
        if b == pixels:
            kept.clear()  # the last slice: the kept intermediate goes before the group ends
        h = block.second(group_norm(h, stats2, block.norm2.eps, affine(block.norm2, h)))
        return from_video(mix(v, block.shortcut(v) + h))

    merge = InPlace(x, (batch, frames)) if in_place else Pixels(batch, frames, height, width)
    return runner.run(
        name, "pixels", pixels, body, merge,
        passes=[norm1_stats, norm2_stats], modes=("keep", "recompute"),
    )


@dataclass(frozen=True)
class SpatialResBlock:
    """A 2-D ResBlock over (N, C, H, W) frames whose two GroupNorms span each whole frame, in parts.

    ``norm1 -> first -> norm2 -> second``, and ``add(shortcut(x), h)``; ``whole(x)`` is the host's own
    module on whole frames; ``affine(norm, like)`` gives a norm's weight and bias as the host uses them.
    ``upsampler`` (nearest 2x, then a 3x3 convolution) runs first, fused into the group. ``halo``: the
    rows one output row reads on each side through ``first`` and ``second`` (one per 3x3 convolution).
    """

    norm1: nn.Module
    first: Callable[[torch.Tensor], torch.Tensor]  # activation, conv1
    norm2: nn.Module
    second: Callable[[torch.Tensor], torch.Tensor]  # activation, dropout, conv2
    shortcut: Callable[[torch.Tensor], torch.Tensor]  # identity, 1x1 or 3x3 convolution
    add: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (shortcut, h) -> output
    whole: Callable[[torch.Tensor], torch.Tensor]
    affine: Callable[[nn.Module, torch.Tensor], tuple]
    upsampler: Callable[[torch.Tensor], torch.Tensor] | None = None
    halo: int = 2


def conv_halo(conv: nn.Module) -> int | None:
    """Rows a stride-1 2-D convolution padded to keep its size reads on each side; None for anything else."""
    if not isinstance(conv, nn.Conv2d):
        return None
    k, s, p, d = conv.kernel_size[0], conv.stride[0], conv.padding, conv.dilation[0]
    if s != 1 or d != 1 or isinstance(p, str) or k % 2 == 0 or p[0] != k // 2 or conv.padding_mode != "zeros":
        return None
    return k // 2


def spatial_resblock(runner: Runner, name: str, block: SpatialResBlock, x: torch.Tensor,
                     in_place: bool = False) -> torch.Tensor:
    """A 2-D ResBlock (after its fused upsampler) on ``"tiles"``: whole frames, then row bands.

    A band of output rows reads the block's input with ``halo`` rows each side (the upsampler's
    input with one more, halved), runs the parts on it and keeps the rows it owns: each convolution
    sees the rows it would see on the whole frame, and zero padding only at the frame's own border.
    Two statistics passes per frame, band by band, give the GroupNorms their whole-frame statistics:
    norm1's over the block's input, norm2's over ``first``'s output. Whole frames run the host's module.
    ``in_place`` (no upsampler, output shaped as the input, which belongs to the caller alone): results
    go over the input (:class:`TilesInPlace`), each band once no later band reads its rows.
    """
    n, _, height, _ = x.shape
    scale = 2 if block.upsampler is not None else 1
    rows = height * scale
    single = block.upsampler is None and one_value_items(x)
    stats1 = [GroupNormStats(block.norm1.num_groups) for _ in range(n)]
    stats2 = [GroupNormStats(block.norm2.num_groups) for _ in range(n)]
    affines: dict[int, tuple] = {}

    def affine(norm: nn.Module, like: torch.Tensor) -> tuple:
        if id(norm) not in affines:
            affines[id(norm)] = block.affine(norm, like)
        return affines[id(norm)]

    def source(f: int, a: int, b: int) -> torch.Tensor:
        """Rows [a, b) of frame f of the block's input (the upsampler's output, computed with its halo)."""
        if block.upsampler is None:
            return x[f:f + 1, :, a:b]
        lo, hi = max(0, a - 1) // 2, min(height, ceil_div(b + 1, 2))
        return block.upsampler(x[f:f + 1, :, lo:hi])[:, :, a - 2 * lo:b - 2 * lo]

    def first(f: int, h: torch.Tensor) -> torch.Tensor:
        return block.first(group_norm(h, stats1[f], block.norm1.eps, affine(block.norm1, h)))

    def norm1_stats(f0: int, f1: int, r0: int, r1: int, mode: Mode) -> None:
        if r1 - r0 < rows:
            stats1[f0].add(source(f0, r0, r1))

    def norm2_stats(f0: int, f1: int, r0: int, r1: int, mode: Mode) -> None:
        if r1 - r0 < rows:
            a, b = max(0, r0 - 1), min(rows, r1 + 1)
            stats2[f0].add(first(f0, source(f0, a, b))[:, :, r0 - a:r1 - a])

    def body(f0: int, f1: int, r0: int, r1: int) -> torch.Tensor:
        if r1 - r0 == rows:  # whole frames: the host's modules
            lo, hi = paired(f0, f1, n, single)
            xs = x[lo:hi]
            out = block.whole(block.upsampler(xs) if block.upsampler is not None else xs)
            return out if (lo, hi) == (f0, f1) else out[f0 - lo:f1 - lo]
        a, b = max(0, r0 - block.halo), min(rows, r1 + block.halo)
        xs = source(f0, a, b)
        h = first(f0, xs)
        h = block.second(group_norm(h, stats2[f0], block.norm2.eps, affine(block.norm2, h)))[:, :, r0 - a:r1 - a]
        s0, s1 = max(a, r0 - 1), min(b, r1 + 1)  # the shortcut reads at most one row each side (3x3)
        shortcut = block.shortcut(xs[:, :, s0 - a:s1 - a])[:, :, r0 - s0:r1 - s0]
        del xs
        return block.add(shortcut, h)

    if in_place and block.upsampler is not None:
        raise ValueError("a group with a fused upsampler cannot write over its (smaller) input")
    merge = TilesInPlace(x, block.halo) if in_place else Tiles(n, rows)
    return runner.run(name, "tiles", n * rows, body, merge, passes=[norm1_stats, norm2_stats], rows=rows)


def spatial_head(runner: Runner, name: str, norm: nn.Module, rest: Callable[[torch.Tensor], torch.Tensor],
                 affine: Callable[[nn.Module, torch.Tensor], tuple], halo: int, whole: Callable[[torch.Tensor], torch.Tensor],
                 x: torch.Tensor) -> torch.Tensor:
    """A decoder's head, ``rest(norm(x))`` (GroupNorm over each whole frame, then an activation and a
    convolution reading ``halo`` rows each side), on ``"tiles"``: whole frames run ``whole``; a row band
    reads its rows with the halo, on whole-frame statistics from a pass over every band first."""
    n, _, rows, _ = x.shape
    stats = [GroupNormStats(norm.num_groups) for _ in range(n)]
    cast: list[tuple] = []

    def norm_stats(f0: int, f1: int, r0: int, r1: int, mode: Mode) -> None:
        if r1 - r0 < rows:
            stats[f0].add(x[f0:f1, :, r0:r1])

    def body(f0: int, f1: int, r0: int, r1: int) -> torch.Tensor:
        if r1 - r0 == rows:
            return whole(x[f0:f1])
        a, b = max(0, r0 - halo), min(rows, r1 + halo)
        xs = x[f0:f1, :, a:b]
        if not cast:
            cast.append(affine(norm, xs))
        return rest(group_norm(xs, stats[f0], norm.eps, cast[0]))[:, :, r0 - a:r1 - a]

    return runner.run(name, "tiles", n * rows, body, Tiles(n, rows), passes=[norm_stats], rows=rows)


def time_conv(runner: Runner, name: str, conv: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
              batch: int, frames: int) -> torch.Tensor:
    """A convolution over time alone (kernel (k, 1, 1), as in SVD's VAE head) over pixel slices, each
    holding every frame, written over ``x`` (same channels; ``x`` belongs to the caller alone)."""
    n, c, height, width = x.shape
    xv = pixel_view(x, batch, frames)

    def body(a: int, b: int) -> torch.Tensor:
        return from_video(conv(to_video(xv[..., a:b])))

    return runner.run(name, "pixels", height * width, body, InPlace(x, (batch, frames)))


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


__all__ = [
    "Axis", "GroupEvent", "GroupNormStats", "InPlace", "Merge", "Mode", "Pixels", "Rows", "Runner", "SpatialResBlock",
    "Tiles", "TilesInPlace", "Tokens", "TemporalResBlock", "ceil_div", "conv_halo", "spatial_head", "spatial_resblock",
    "tile_bounds", "time_conv", "frames_group", "temporal_resblock", "from_video", "host_video", "group_norm",
    "module_affine", "pixel_view", "rows_of", "slice_bounds", "to_video", "unsliced",
]
