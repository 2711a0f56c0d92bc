"""What ``streamline(...)`` and the nodes accept: targets, slice counts, budgets, hooks; each refusal names
the argument as the user typed it and what would be accepted."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

from torch import nn

from .arch import Adapter, engine_adapter
from .memory import GIB

if TYPE_CHECKING:
    from .api import StreamlineHandle

SUPPORTED_HOOKS = ("layerwise_casting", "peft_autocast_disable")


def check_slices(slices: Any) -> int | Literal["auto"]:
    if slices == "auto":
        return "auto"
    if isinstance(slices, bool) or not isinstance(slices, int) or slices < 1:
        raise ValueError(f'slices must be a positive integer or "auto", got {slices!r}')
    return slices


def check_budget(budget_bytes: Any) -> int | None:
    if budget_bytes is None:
        return None
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, (int, float)) or not math.isfinite(budget_bytes):
        raise TypeError(f"budget_bytes must be a number of bytes or None, got {budget_bytes!r}")
    if budget_bytes <= 0:
        raise ValueError(f"budget_bytes must be a positive number of bytes (device memory, weights included), got {budget_bytes!r}")
    return int(budget_bytes)


SUPPORTED = ("diffusers' UNetSpatioTemporalConditionModel (SVD, SVD-XT) and UNetMotionModel (AnimateDiff), "
             "ComfyUI's UNetModel (SVD, and SD1.5 / SDXL under AnimateDiff-Evolved) and WanModel (Wan 2.1, 2.2), SVD's VAE "
             "(AutoencoderKLTemporalDecoder: its temporal decoder) and the SD VAE (AutoencoderKL: its decoder)")


def resolve_unet(target: Any) -> tuple[nn.Module, Adapter]:
    unet = target if isinstance(target, nn.Module) else getattr(target, "unet", None)
    if type(unet).__name__ in ("AutoencoderKLTemporalDecoder", "AutoencoderKL"):
        unet = unet.decoder  # pipe.vae: the decoder is what runs by groups
    if hasattr(unet, "_orig_mod") and type(unet).__name__ == "OptimizedModule":
        name = "target" if unet is target else "target.unet"
        raise TypeError(f"{name} is already compiled by torch.compile ({type(unet._orig_mod).__name__} inside "
                        f"an OptimizedModule): its compiled graphs would not see the slicing. Apply streamline() to "
                        f"the model first, then compile it: streamline(model); model = torch.compile(model)")
    if not isinstance(unet, nn.Module):
        raise TypeError(f"target must be a video U-Net or a pipeline holding one as .unet, or SVD's VAE ({SUPPORTED}), "
                        f"got {type(target).__name__}")
    try:
        return unet, engine_adapter(unet)
    except TypeError:
        raise TypeError(f"target {type(unet).__name__} is not a supported model: streamline() accepts {SUPPORTED}") from None


def amount(nbytes: float, unit: float) -> str:
    """Bytes as the user typed them: whole bytes, or a number of ``unit`` (GiB for the node)."""
    return f"{int(nbytes)}" if unit == 1 else f"{nbytes / unit:g}"


def check_weights(budget_bytes: int | None, weights: int, name: str = "budget_bytes", unit: float = 1) -> None:
    """Refuse a budget that does not even hold the weights (``name`` and ``unit`` as the user typed it)."""
    if budget_bytes is not None and budget_bytes <= weights:
        raise ValueError(
            f"{name}={amount(budget_bytes, unit)} does not even hold the weights ({amount(weights, unit)}"
            f"{' bytes' if unit == 1 else ''}, {weights / GIB:.2f} GiB): the budget is total device memory, weights included"
        )


def check_hooks(unet: nn.Module, slot: str, ours: "StreamlineHandle | None" = None) -> None:
    for name, module in unet.named_modules():
        registry = getattr(module, "_diffusers_hook", None)
        hooks = [h for h in getattr(registry, "hooks", {}) if h not in SUPPORTED_HOOKS]
        if hooks:
            raise ValueError(
                f"streamline() cannot run under diffusers hooks {hooks} (on {name or 'the U-Net'}): remove them first; "
                f"layerwise casting and model CPU offload are supported"
            )
    foreign = slot in unet.__dict__ and (ours is None or unet.__dict__[slot] != ours._forward)
    if foreign and "_hf_hook" not in unet.__dict__:
        raise ValueError(
            f"{type(unet).__name__}.{slot} is already replaced on this instance by another library; "
            f"streamline() would hide it. Remove that patch first"
        )
