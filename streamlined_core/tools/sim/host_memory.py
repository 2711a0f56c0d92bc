"""What ComfyUI keeps on the card: its own loading decisions (0.3.64, the reference host), predicted.

ComfyUI does not hold every weight on a small card. Before a model runs, ``load_models_gpu`` decides
how many of its weights stay resident from the free memory and the model's memory estimate, and
streams the rest per call. Read from the host's code:

* ``comfy/model_management.py``
  - ``extra_reserved_memory()``: ``EXTRA_RESERVED_VRAM``, 400 MiB on Linux, 600 MiB on Windows (and
    100 MiB more there on cards over 15 GiB), kept free for other applications.
  - ``minimum_inference_memory()``: 0.8 GiB plus that reserve, the least it keeps free to run in.
  - ``load_models_gpu(models, memory_required, minimum_memory_required)``: with ``extra`` the reserve
    and ``inference`` the minimum above, ``minimum = max(inference, minimum_memory_required + extra)``
    (``memory_required + extra`` where no minimum is given); in the normal and low VRAM states the
    weights it may load are ``max(128 MiB, free - minimum, min(free * MIN_WEIGHT_MEMORY_RATIO, free -
    inference))``, ``MIN_WEIGHT_MEMORY_RATIO`` 0 on NVIDIA (0.4 on other devices).
  - ``LoadedModel.model_load`` -> ``ModelPatcher.partially_load`` -> ``ModelPatcher.load``
    (``comfy/model_patcher.py``): the whole model when it fits (``model_size()``, every parameter and
    buffer), else its modules largest first, each one that still fits below that amount loaded, the
    others left in system memory with ``comfy_cast_weights`` set.
* ``comfy/ops.py`` ``cast_bias_weight``: a streamed module's weight is copied to the device for each
  call and freed after it: its bytes add to the activations while the module runs.
* ``comfy/sampler_helpers.py`` ``estimate_memory``: the sampler asks ``model.memory_required`` for
  the latent batch twice over (both conds) and once (the minimum); ``comfy/samplers.py``
  ``calc_cond_batch`` batches cond and uncond only when ``memory_required(batch) * 1.5`` is below
  the free memory at that step, else it runs them one after the other.
* ``comfy/model_base.py`` ``BaseModel.memory_required``: with flash attention (NVIDIA, PyTorch's
  attention) ``frames x latent area x dtype size x 0.01 x memory_usage_factor`` MiB (SVD: 2.0, SD1.5:
  1.0); ``comfy/sd.py`` ``VAE``: ``memory_used_decode`` ``2178 x latent area x 64 x dtype size``
  bytes and ``memory_used_encode`` ``1767 x pixel area x dtype size`` bytes, and the stock decode
  takes ``free // memory_used_decode`` latent frames at a time, each part decoded as a clip of its own.

The CUDA context and whatever a desktop already holds are not the host's: they are assumptions,
shown beside every prediction. Newer ComfyUI with dynamic VRAM (``comfy-aimdo``) faults weights in
on demand instead of deciding a resident set up front: the activation side of this prediction holds
there, the resident and streamed shares are then the allocator's, not this table's.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterable

from torch import nn

MIB = 1024**2
GIB = 1024**3
CUDA_CONTEXT_BYTES = int(0.5 * GIB)  # a CUDA context with cuDNN and cuBLAS loaded (an assumption)
LOWVRAM_FLOOR = 128 * MIB  # load_models_gpu's least weight memory
INFERENCE_BASE = GIB * 0.8  # minimum_inference_memory() without the reserve (a float, as the host has it)
RESERVE_BYTES = {"linux": 400 * MIB, "windows": 600 * MIB}
MIN_WEIGHT_MEMORY_RATIO = 0.0  # NVIDIA
SYSTEMS = tuple(RESERVE_BYTES)


@dataclass(frozen=True)
class Card:
    """A card and what sits on it before ComfyUI loads anything: the assumptions of a prediction."""

    gb: float  # memory as sold, in GiB
    system: str = "linux"
    desktop_bytes: int = 0  # what a desktop, a browser, other programs already hold
    context_bytes: int = CUDA_CONTEXT_BYTES

    def __post_init__(self) -> None:
        if self.system not in RESERVE_BYTES:
            raise ValueError(f"system must be one of {', '.join(SYSTEMS)}, got {self.system!r}")

    @property
    def total_bytes(self) -> int:
        return int(self.gb * GIB)

    @property
    def reserved_bytes(self) -> int:
        """``extra_reserved_memory()`` on this card."""
        extra = RESERVE_BYTES[self.system]
        if self.system == "windows" and self.total_bytes / MIB > 15 * 1024:
            extra += 100 * MIB
        return extra

    @property
    def inference_bytes(self) -> float:
        """``minimum_inference_memory()``."""
        return INFERENCE_BASE + self.reserved_bytes

    @property
    def free_bytes(self) -> int:
        """What ``get_free_memory`` reports with no model loaded: the card less the context and the desktop."""
        return self.total_bytes - self.context_bytes - self.desktop_bytes

    def describe(self) -> str:
        return (f"{self.gb:g} GB, {self.system.capitalize()}, desktop {self.desktop_bytes / GIB:.1f} GiB, "
                f"CUDA context {self.context_bytes / GIB:.1f} GiB")


@dataclass(frozen=True)
class Inventory:
    """A model as ``ModelPatcher.load`` sees it: the sizes of the modules it loads or streams one by one
    (``_load_list``), and ``model_size()``."""

    module_bytes: tuple[int, ...]
    size_bytes: int
    uncast_bytes: tuple[int, ...] = ()  # those of them no ComfyUI op casts: never streamed, left behind if they do not fit

    @classmethod
    def of(cls, model: nn.Module, extra_bytes: int = 0, fp32_modules: Iterable[str] = ("AlphaBlender",)) -> "Inventory":
        """The inventory of ``model`` as the host stores it: modules whose class is in ``fp32_modules``
        keep fp32 parameters (ComfyUI's ``AlphaBlender.mix_factor`` is a plain parameter no op casts),
        and ``extra_bytes`` are buffers outside the network that ``model_size()`` counts (the
        model-sampling schedule)."""
        sizes, uncast = [], []
        for module in model.modules():
            has_own = any(True for _ in module.parameters(recurse=False))
            has_child = any(True for child in module.children() for _ in child.parameters())
            if has_own and not has_child:  # _load_list: modules holding parameters, none in a child
                sizes.append(_state_bytes(module, fp32_modules))
                if type(module).__name__ in fp32_modules:
                    uncast.append(sizes[-1])
        return cls(tuple(sorted(sizes, reverse=True)), _state_bytes(model, fp32_modules) + extra_bytes,
                   tuple(sorted(uncast, reverse=True)))

    def __add__(self, other: "Inventory") -> "Inventory":
        return Inventory(tuple(sorted(self.module_bytes + other.module_bytes, reverse=True)), self.size_bytes + other.size_bytes,
                         tuple(sorted(self.uncast_bytes + other.uncast_bytes, reverse=True)))


def _state_bytes(model: nn.Module, fp32_modules: Iterable[str]) -> int:
    """``module_size()``: every tensor of the state dict, fp32 in the modules the host keeps in fp32."""
    fp32 = {name for name, m in model.named_modules() if type(m).__name__ in fp32_modules}
    total = 0
    for key, tensor in model.state_dict(keep_vars=True).items():
        owner = key.rpartition(".")[0]
        size = 4 if owner in fp32 and tensor.is_floating_point() else tensor.element_size()
        total += tensor.nelement() * size
    return total


@dataclass(frozen=True)
class Load:
    """One ``load_models_gpu`` decision: what it may load, what it loads, what it keeps free."""

    free_bytes: int  # free memory before the load
    minimum_bytes: float  # the memory it keeps free for inference (``minimum_memory_required``)
    lowvram_model_memory: float  # the weight memory it allows
    resident_bytes: int  # weights loaded on the device
    streamed_module_bytes: tuple[int, ...]  # modules left in system memory, cast per call
    size_bytes: int

    @property
    def streamed_bytes(self) -> int:
        return self.size_bytes - self.resident_bytes

    @property
    def streamed_share(self) -> float:
        return self.streamed_bytes / self.size_bytes if self.size_bytes else 0.0

    @property
    def cast_bytes(self) -> int:
        """The largest streamed module: its weight sits on the device while it runs."""
        return max(self.streamed_module_bytes, default=0)

    @property
    def free_after_bytes(self) -> int:
        return self.free_bytes - self.resident_bytes


def lowvram_model_memory(free: int, minimum: float, card: Card) -> float:
    """``load_models_gpu``'s weight memory for a model with nothing loaded yet (normal VRAM state)."""
    amount = max(LOWVRAM_FLOOR, free - minimum, min(free * MIN_WEIGHT_MEMORY_RATIO, free - card.inference_bytes))
    return max(0.1, amount)


def load(card: Card, inventory: Inventory, memory_required: float, minimum_memory_required: float | None = None,
         free: int | None = None) -> Load:
    """What ComfyUI loads of ``inventory`` with ``free`` bytes free (default: the whole card's free memory)."""
    free = card.free_bytes if free is None else free
    extra, inference = card.reserved_bytes, card.inference_bytes
    if minimum_memory_required is None:
        minimum = max(inference, memory_required + extra)
    else:
        minimum = max(inference, minimum_memory_required + extra)
    allowed = lowvram_model_memory(free, minimum, card)
    if allowed > inventory.size_bytes:  # partially_load: the whole model
        return Load(free, minimum, allowed, inventory.size_bytes, (), inventory.size_bytes)
    loaded, streamed = 0, []
    uncast = Counter(inventory.uncast_bytes)
    for size in inventory.module_bytes:  # largest first, as ModelPatcher.load sorts them
        if loaded + size < allowed:
            loaded += size
        elif uncast[size]:  # no cast path: the host leaves it where it is
            uncast[size] -= 1
        else:
            streamed.append(size)
    if not streamed:  # every module fits below the amount: "loaded completely"
        return Load(free, minimum, allowed, loaded, (), inventory.size_bytes)
    return Load(free, minimum, allowed, loaded, tuple(streamed), inventory.size_bytes)


def unet_estimate(frames_x_area: int, dtype_size: int, memory_usage_factor: float) -> float:
    """``BaseModel.memory_required`` with flash attention: bytes for ``frames x latent height x width``."""
    return frames_x_area * dtype_size * 0.01 * memory_usage_factor * MIB


def decode_estimate(latent_h: int, latent_w: int, dtype_size: int) -> int:
    """``VAE.memory_used_decode`` of SD's and SVD's VAEs: bytes per latent frame."""
    return 2178 * latent_h * latent_w * 64 * dtype_size


def encode_estimate(height: int, width: int, dtype_size: int) -> int:
    """``VAE.memory_used_encode`` of SD's and SVD's VAEs: bytes per image."""
    return 1767 * height * width * dtype_size


def stock_decode_frames(free_after: int, per_frame: int) -> int:
    """How many latent frames ComfyUI's VAE Decode takes at a time: ``max(1, int(free / memory_used))``."""
    return max(1, int(free_after / per_frame))
