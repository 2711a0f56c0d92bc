"""ComfyUI's attention on ``meta`` runs as PyTorch SDPA; on every other device it is the host's own.

Planning and simulation run the host's modules on ``meta`` and model attention as a memory-efficient
kernel, output plus fp32 log-sum-exp (what :class:`~streamlined_core.engine.memory.MemoryTracker` counts
for ``scaled_dot_product_attention``), whatever attention function the user chose (docs/how-it-works.md,
principle 6). ComfyUI picks that function once, when ``comfy.ldm.modules.attention`` is imported,
from its flags: sub-quadratic (its CPU default) and split attention size their chunks from
``model_management.get_free_memory(query.device)``, which fails on ``meta``; xformers,
SageAttention and flash-attention have no meta kernels.

The chosen function is reached under several names: the globals of ``comfy.ldm.modules.attention``
(``optimized_attention``, ``optimized_attention_masked``, the ``attention_*`` functions, the
registry of newer versions), every module that imported one by name (``from
comfy.ldm.modules.attention import optimized_attention``; AnimateDiff-Evolved's
``utils_motion.optimized_attention_mm``), and instance attributes bound when a module was built
(AnimateDiff-Evolved's ``CrossAttentionMM.actual_attention``, the VAE's
``AttnBlock.optimized_attention``). Inside :func:`sdpa_on_meta` each of those names holds a
dispatcher that looks at the query's device: on ``meta`` it calls ComfyUI's PyTorch attention
(below any ``optimized_attention_override`` of ``transformer_options``, which may be another
backend), anywhere else the function that was there, with the same arguments. So a real run in
another thread runs exactly what it ran before. Module-level names are swapped when the first such
region opens and restored when the last one closes; instance attributes of the modules a region
names are swapped for that region. ComfyUI itself is never imported here: without it loaded there
is nothing to swap.
"""

from __future__ import annotations

import functools
import sys
import threading
import types
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from torch import nn

UNET_ATTENTION = "comfy.ldm.modules.attention"
VAE_ATTENTION = "comfy.ldm.modules.diffusionmodules.model"
# Entry points with the signature (q, k, v, heads, mask=None, ...) in the U-Net's attention module.
UNET_NAMES = ("optimized_attention", "optimized_attention_masked", "attention_basic", "attention_sub_quad",
              "attention_split", "attention_xformers", "attention_sage", "attention_flash", "attention_pytorch")
# The VAE's (q, k, v) entry points; its ``pytorch_attention`` is what they become on meta.
VAE_NAMES = ("normal_attention", "xformers_attention")

_QKV = (("q", "query"), ("k", "key"), ("v", "value"))


def _on_meta(host: Callable, meta: Callable) -> Callable:
    """``host`` for queries on a real device; ``meta`` (same arguments) for queries on ``meta``."""

    @functools.wraps(host)
    def attention(*args: Any, **kwargs: Any) -> Any:
        query = args[0] if args else kwargs.get("q", kwargs.get("query"))
        if getattr(getattr(query, "device", None), "type", None) != "meta":
            return host(*args, **kwargs)
        args = list(args)
        for names in _QKV[len(args):]:  # q, k, v passed by keyword, under either family's names
            name = next((n for n in names if n in kwargs), None)
            if name is None:
                break
            args.append(kwargs.pop(name))
        return meta(*args, **kwargs)

    return attention


class _Swaps:
    """Names rebound to dispatchers, restorable exactly: (namespace, key, original, dispatcher)."""

    def __init__(self) -> None:
        self.entries: list[tuple[dict, Any, Any, Callable]] = []

    def swap(self, namespace: dict, dispatchers: dict[int, tuple[Any, Callable]]) -> None:
        for key in [key for key, value in namespace.items() if id(value) in dispatchers]:
            value = namespace[key]
            found = dispatchers[id(value)]
            if found[0] is value:
                namespace[key] = found[1]
                self.entries.append((namespace, key, value, found[1]))

    def restore(self) -> None:
        for namespace, key, original, dispatcher in reversed(self.entries):
            if namespace.get(key) is dispatcher:  # a name rebound since by someone else keeps theirs
                namespace[key] = original
        self.entries.clear()


_LOCK = threading.Lock()
_open = 0  # regions open, in every thread
_module_swaps = _Swaps()
_dispatchers: dict[int, tuple[Any, Callable]] = {}  # id(host function) -> (host function, dispatcher)


def _host_dispatchers() -> dict[int, tuple[Any, Callable]]:
    found: dict[int, tuple[Any, Callable]] = {}
    unet = sys.modules.get(UNET_ATTENTION)
    if unet is not None and callable(getattr(unet, "attention_pytorch", None)):
        pytorch = unet.attention_pytorch
        meta = getattr(pytorch, "__wrapped__", pytorch)  # below wrap_attn's per-run override
        hosts = [getattr(unet, name, None) for name in UNET_NAMES]
        hosts += list(getattr(unet, "REGISTERED_ATTENTION_FUNCTIONS", {}).values())
        for host in hosts:
            if callable(host) and host is not meta:
                found[id(host)] = (host, _on_meta(host, meta))
    vae = sys.modules.get(VAE_ATTENTION)
    if vae is not None and callable(getattr(vae, "pytorch_attention", None)):
        for host in (getattr(vae, name, None) for name in VAE_NAMES):
            if callable(host):
                found[id(host)] = (host, _on_meta(host, vae.pytorch_attention))
    return found


def _namespaces() -> Iterator[dict]:
    for module in list(sys.modules.values()):
        if isinstance(module, types.ModuleType):
            yield vars(module)
    unet = sys.modules.get(UNET_ATTENTION)
    registry = getattr(unet, "REGISTERED_ATTENTION_FUNCTIONS", None)
    if isinstance(registry, dict):
        yield registry


@contextmanager
def sdpa_on_meta(*modules: nn.Module) -> Iterator[None]:
    """While open, every ComfyUI attention entry point (and those bound on ``modules``) runs PyTorch
    SDPA for queries on ``meta``; everything is restored exactly on exit."""
    global _open
    with _LOCK:
        if _open == 0:
            try:
                _dispatchers.update(_host_dispatchers())
                if _dispatchers:
                    for namespace in _namespaces():
                        _module_swaps.swap(namespace, _dispatchers)
            except BaseException:
                _module_swaps.restore()
                _dispatchers.clear()
                raise
        _open += 1
        dispatchers = dict(_dispatchers)
    instance_swaps = _Swaps()
    try:
        if dispatchers:
            for module in modules:
                for sub in module.modules():
                    instance_swaps.swap(vars(sub), dispatchers)
        yield
    finally:
        instance_swaps.restore()
        with _LOCK:
            _open -= 1
            if _open == 0:
                _module_swaps.restore()
                _dispatchers.clear()
