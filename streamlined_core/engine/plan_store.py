"""Plans that outlive one engine: each call shape's measurements, by the model's structure.

ComfyUI makes a new engine each time the Streamline Model node runs with other settings, and a
``streamline()`` applied again replaces its handle; either way the model, and so every meta run of it,
is the one measured before. :data:`PLANS` keeps the :class:`~.plan.Measurements` of the call shapes
planned last (data only: no model, replica or closure), keyed by :func:`structure_key` of the model and
the call's shapes, and a planner made on them runs only what no earlier plan ran.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

import torch
from torch import nn


class PlanStore:
    """Measurements by the model's structure and the call's shapes, the ``max_entries`` last used."""

    def __init__(self, max_entries: int = 64) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[Any, Any] = OrderedDict()

    def get(self, key: Any) -> Any:
        found = self._entries.get(key)
        if found is not None:
            self._entries.move_to_end(key)
        return found

    def put(self, key: Any, measurements: Any) -> None:
        self._entries[key] = measurements
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


# Shared by every engine in the process: a ComfyUI node run again with other settings, or a second
# streamline() on the same model, plans a shape it has seen without a run.
PLANS = PlanStore()

# Not structure: the module's tensors and children (described apart), the engine's own patches, and ComfyUI's
# note of which weights it patched (the forward never reads it).
_SKIPPED_ATTRIBUTES = {"_parameters", "_buffers", "_modules", "_forward", "forward", "_old_forward", "_hf_hook",
                       "_streamline_handle", "_streamline_rehash", "comfy_patched_weights"}
_ABSENT = object()


def _described(value: Any, depth: int = 0) -> Any:
    """A module attribute as structure: plain values as they are, tensors by shape and dtype, other objects
    by their type (functions by their qualified name)."""
    if isinstance(value, (int, float, bool, str, type(None), torch.dtype, torch.device)):
        return repr(value)
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), str(value.dtype), value.device.type)
    if depth < 3 and isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(_described(v, depth + 1) for v in value))
    if depth < 3 and isinstance(value, dict):
        return ("dict", tuple((repr(k), _described(v, depth + 1)) for k, v in value.items()))
    if callable(value) and hasattr(value, "__qualname__"):
        return ("callable", getattr(value, "__module__", None), value.__qualname__)
    return ("object", type(value).__module__, type(value).__qualname__)


def structure_key(model: nn.Module) -> str:
    """A digest of what a meta run of ``model`` depends on: every module's class and attributes (its
    plain values: channels, heads, eps, training; other objects by type) and every parameter's and
    buffer's shape and dtype. Weights' values, and the engine's own patches on the model, are left out."""
    digest = hashlib.sha256()
    for name, module in model.named_modules():
        cls = type(module)  # an instance attribute equal to its class's (ComfyUI's loaded ``weight_function = []``) is that
        attributes = tuple((k, d) for k, v in sorted(vars(module).items()) if k not in _SKIPPED_ATTRIBUTES
                           for d in [_described(v)] if d != _described(getattr(cls, k, _ABSENT)))
        tensors = tuple((k, _described(t)) for k, t in (*module._parameters.items(), *module._buffers.items()))
        digest.update(repr((name, type(module).__module__, type(module).__qualname__, attributes, tensors)).encode())
    return digest.hexdigest()


def shape_key(value: Any) -> Any:
    """A call's arguments as a plan sees them: tensors by shape and dtype (not device: plans are measured on
    ``meta``), dicts by sorted keys, plain values as they are, other objects by their type's name."""
    if isinstance(value, torch.Tensor):
        return ("T", tuple(value.shape), value.dtype)
    if isinstance(value, dict):
        return tuple(sorted(((k, shape_key(v)) for k, v in value.items()), key=lambda item: repr(item[0])))
    if isinstance(value, (tuple, list)):
        return tuple(shape_key(v) for v in value)
    return value if isinstance(value, (int, float, str, bool, type(None))) else type(value).__name__
