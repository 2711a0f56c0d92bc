"""Architecture adapters: what the engine needs to know about each supported U-Net family.

One adapter per family. An adapter recognises its model and runs it as stages of layer groups
(``stages.py``). A U-Net adapter also names the tensors the down path hands to the up path (the skip
tensors), analytically from the module structure and as live modules whose outputs can be traced,
and lists its cut points. Later engine parts (step rehash, the VAE) add to the same adapters rather
than growing a second description of each model.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable, Iterator

import torch
from torch import nn

from ..stages import CutPoint
from . import comfy_unet, comfy_vae, comfy_wan, diffusers_animatediff, diffusers_sd_vae, diffusers_svd, diffusers_vae

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SkipTensor:
    """One skip tensor of a single batch-x-frame item: channels x height x width."""

    channels: int
    height: int
    width: int

    @property
    def numel(self) -> int:
        return self.channels * self.height * self.width


@dataclass(frozen=True)
class UNetLayout:
    """What only a U-Net has: the skip tensors its down path hands to its up path, and its cut points."""

    skip_layout: Callable[[nn.Module, int, int], list[SkipTensor]]  # per batch-x-frame item, analytically
    skip_sources: Callable[[nn.Module], list[tuple[nn.Module, Callable]]]  # modules whose outputs are skips
    cuts: Callable[[nn.Module], list[CutPoint]]  # every stage boundary, canonical ids to the host's names


@dataclass(frozen=True)
class Adapter:
    """How to read one model family, and (where the engine drives it) how to run it by groups."""

    name: str
    matches: Callable[[nn.Module], bool]
    forward: Callable | None = None  # streamlined_forward(model, runner, **the host forward's arguments)
    call_shape: Callable[[dict], tuple[int, int, int, int]] | None = None  # arguments -> (B, T, h, w)
    slot: str = "forward"  # the method the engine replaces
    sample: str = "sample"  # the argument holding the latents
    supports: Callable[[nn.Module], bool] = lambda model: True  # whether ``forward`` reproduces this host version
    variant: Callable[[nn.Module], object] = lambda model: None  # run-time state a plan depends on (injected modules)
    fallback: Callable | None = None  # the forward for host versions ``supports`` rejects (module-level slicing)
    unet: UNetLayout | None = None
    floor: Callable[[nn.Module, dict], int] | None = None  # a model that is no U-Net: its floor for a call
    floor_name: str = "skip floor"  # what the floor is called in plans and tables
    target_x_floor: float = 1.5  # the default memory target where no device budget exists, in floors
    # the arguments a plan depends on: a host's per-call bookkeeping (ComfyUI's sigmas, cond_or_uncond,
    # wrappers) left out, so its memory estimate and its calls share one plan
    planning_arguments: Callable[[dict], dict] = lambda arguments: arguments
    # whether a planner may replay a group it measured before (plan.GroupReplay): not where a host's patches
    # may carry state from one group to the next (ComfyUI's transformer_index, read by attention patches)
    replayable: Callable[[dict], bool] = lambda arguments: True


def _module_adapter(name: str, module) -> Adapter:
    return Adapter(
        name=name,
        matches=module.matches,
        forward=module.streamlined_forward,
        call_shape=module.call_shape,
        slot=getattr(module, "SLOT", "forward"),
        sample=getattr(module, "SAMPLE", "sample"),
        supports=getattr(module, "recognises", lambda model: True),
        variant=getattr(module, "variant", lambda model: None),
        fallback=getattr(module, "module_level_forward", None),
        planning_arguments=getattr(module, "planning_arguments", lambda arguments: arguments),
        replayable=getattr(module, "replayable", lambda arguments: True),
        unet=UNetLayout(module.skip_layout, module.skip_sources, module.cuts),
    )


def _decoder_adapter(name: str, module) -> Adapter:
    """A VAE decoder: run by groups, planned against its output-level floor (it has no skip tensors). Its
    least peak is about 1.5 floors (a ResBlock's half-size input, its output, a row band), so its default
    target is 1.6: a few bands per frame, not a band of two rows for the last 2%."""
    return Adapter(name=name, matches=module.matches, forward=module.streamlined_forward, call_shape=module.call_shape,
                   slot=module.SLOT, sample=module.SAMPLE, floor=module.floor_bytes, floor_name="output-level floor",
                   target_x_floor=1.6)


def _transformer_adapter(name: str, module) -> Adapter:
    """A video transformer: its blocks run on token slices, planned against the transformer floor (the residual
    stream and one self-attention's keys and values)."""
    return Adapter(name=name, matches=module.matches, forward=module.streamlined_forward, call_shape=module.call_shape,
                   slot=module.SLOT, sample=module.SAMPLE, floor=module.floor_bytes, floor_name=module.FLOOR_NAME,
                   planning_arguments=module.planning_arguments, replayable=module.replayable)


ADAPTERS: tuple[Adapter, ...] = (
    _module_adapter("diffusers-svd", diffusers_svd),
    _module_adapter("diffusers-animatediff", diffusers_animatediff),
    _module_adapter("comfyui-unet", comfy_unet),
    _decoder_adapter("diffusers-svd-vae-decoder", diffusers_vae),
    _decoder_adapter("comfyui-svd-vae-decoder", comfy_vae),
    _decoder_adapter("diffusers-sd-vae-decoder", diffusers_sd_vae),
    _transformer_adapter("comfyui-wan", comfy_wan),
)


def engine_adapter(model: nn.Module) -> Adapter:
    """The adapter that drives ``model``: its family's, or its fallback on a host version it does not reproduce."""
    adapter = adapter_for(model)
    if adapter.forward is not None and not adapter.supports(model) and adapter.fallback is not None:
        log.info("Streamline: %s's forward is not a version the stage loop reproduces%s: each layer is sliced under "
                 "the host's own loop (module level), exactly; running from a cut (Step Rehash) needs a recognised "
                 "version", type(model).__name__, _fingerprint(model))
        return module_level(adapter)
    return adapter


def _fingerprint(model: nn.Module) -> str:
    try:
        return f" (sha256 {comfy_unet.forward_fingerprint(model)[:12]})"
    except Exception:  # not a ComfyUI UNetModel
        return ""


def module_level(adapter: Adapter) -> Adapter:
    """``adapter`` driving its model through its fallback whatever the host version (the simulator's rows)."""
    if adapter.fallback is None:
        raise ValueError(f"{adapter.name} has no module-level fallback")
    return replace(adapter, name=f"{adapter.name} (module level)", forward=adapter.fallback,
                   supports=lambda model: True, fallback=None)


def adapter_for(model: object) -> Adapter:
    """The adapter for ``model``, or a ``TypeError`` naming the supported families."""
    if isinstance(model, nn.Module):
        for adapter in ADAPTERS:
            if adapter.matches(model):
                return adapter
    names = ", ".join(a.name for a in ADAPTERS)
    raise TypeError(f"unsupported model {type(model).__name__}: supported models are {names}")


def cut_points(model: nn.Module) -> list[CutPoint]:
    """Every cut point of ``model`` as it is now: canonical id, the host's layer name, what its tail needs."""
    return adapter_for(model).unet.cuts(model)


def skip_floor_bytes(model: nn.Module, items: int, latent_height: int, latent_width: int, dtype: torch.dtype) -> int:
    """Bytes of every skip tensor for ``items`` batch-x-frame items, from the module structure alone."""
    layout = adapter_for(model).unet.skip_layout(model, latent_height, latent_width)
    return items * sum(s.numel for s in layout) * torch.empty((), dtype=dtype).element_size()


@contextmanager
def traced_skips(model: nn.Module) -> Iterator[dict[int, int]]:
    """Record the storages (key -> bytes) of the skip tensors the model produces in the context.

    Only sizes are kept, never the tensors: holding them would keep every skip alive to the end of
    the forward and change the peak being measured. All skips are alive together (the up path
    still needs them), so their storage keys are distinct.
    """
    found: dict[int, int] = {}

    def record(_module, _inputs, out, pick):
        for t in pick(out):
            s = t.untyped_storage()
            found[s._cdata] = s.nbytes()

    handles = [
        module.register_forward_hook(lambda m, i, o, pick=pick: record(m, i, o, pick))
        for module, pick in adapter_for(model).unet.skip_sources(model)
    ]
    try:
        yield found
    finally:
        for h in handles:
            h.remove()


# -- shared structure helpers ------------------------------------------------------------------


def last_conv(module: nn.Module) -> nn.Module:
    """The last convolution registered inside ``module`` (its output width is the module's)."""
    convs = [m for m in module.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    if not convs:
        raise ValueError(f"{type(module).__name__} holds no convolution")
    return convs[-1]


def after_strided_convs(module: nn.Module, height: int, width: int) -> tuple[int, int]:
    """Spatial size after every strided 2-D convolution inside ``module`` (a downsampler)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d) and max(m.stride) > 1:
            height = _conv_len(height, m.kernel_size[0], m.stride[0], m.padding[0], m.dilation[0])
            width = _conv_len(width, m.kernel_size[1], m.stride[1], m.padding[1], m.dilation[1])
    return height, width


def _conv_len(n: int, k: int, s: int, p: int, d: int) -> int:
    return math.floor((n + 2 * p - d * (k - 1) - 1) / s) + 1
