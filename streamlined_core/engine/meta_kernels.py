"""The meta kernel cache: a ``meta`` op's outputs made from what it returned for the same arguments' metadata.

It serves the op-level tracker's region (``memory.py``), where a sliced U-Net's planning runs hundreds of
thousands of ops, the same shapes slice after slice and pass after pass.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
from torch.utils._pytree import tree_flatten


def storage_of(t: torch.Tensor):
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse, nested, functional wrappers
        return None


def tensors_in(tree: Any) -> list[torch.Tensor]:
    """The tensors in an op's arguments or results: tensors, and lists, tuples and dicts of them."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    found: list[torch.Tensor] = []
    _collect(tree, found)
    return found


def _collect(tree: Any, found: list[torch.Tensor]) -> None:
    # aten ops take and return tensors, scalars and (nested) lists and tuples of them; pytree's general
    # flatten costs several times this per op, and the tracker runs it twice for every op.
    if isinstance(tree, torch.Tensor):
        found.append(tree)
    elif isinstance(tree, (list, tuple)):
        for x in tree:
            _collect(x, found)
    elif isinstance(tree, dict):
        for x in tree.values():
            _collect(x, found)
    elif not isinstance(tree, (int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout,
                               torch.memory_format, slice)):
        leaves, _ = tree_flatten(tree)  # anything else pytree knows
        found.extend(x for x in leaves if isinstance(x, torch.Tensor))


def input_keys(inputs: tuple[Any, dict]) -> set[int]:
    """Storage keys of the tensors among an op's ``(args, kwargs)``."""
    args, kwargs = inputs
    keys = set()
    for t in (*tensors_in(args), *tensors_in(kwargs)):
        s = storage_of(t)
        if s is not None:
            keys.add(s._cdata)
    return keys


class _Uncacheable(Exception):
    pass


_SCALARS = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)  # subclasses with their own dispatch are never cached
_SCALAR_TYPES = frozenset(_SCALARS)


class MetaKernelCache:
    """What a ``meta`` kernel returns depends only on its arguments' metadata: remember it.

    Most meta kernels are Python (``torch._refs``, ``torch._meta_registrations``): about 250 us an op,
    and a sliced U-Net's planning runs hundreds of thousands of ops, the same shapes slice after slice
    and pass after pass. An op whose tensor arguments are all on ``meta`` and that neither mutates nor
    returns a view (its schema says so) is run once per distinct key (the op, each tensor's shape,
    strides and dtype, every other argument with its type, the default dtype); afterwards its outputs
    are made directly with ``torch.empty_strided``. An output is remembered only where that gives the
    same tensor: same shape, strides, dtype, a fresh storage of the same size. Views (declared, or
    found sharing an argument's storage: such an op is never cached again), in-place and ``out=``
    ops, ops given a generator object, tensor subclasses, sparse outputs, anything off ``meta``, and
    every op while a dispatch mode other than a tracker's is active beneath always run their kernel.
    ``hits`` and ``misses`` count what it did; ``clear()`` empties it, as does reaching
    ``max_entries`` (a full-size SVD's planning makes a few thousand); with ``enabled`` false every op
    runs its kernel.
    """

    def __init__(self, max_entries: int = 50_000) -> None:
        self.enabled = True
        self.max_entries = max_entries
        self._outputs: dict[tuple, Any] = {}
        self._plain: dict[Any, bool] = {}  # op -> neither mutates nor aliases
        self.hits = self.misses = 0

    def clear(self) -> None:
        self._outputs.clear()
        self.hits = self.misses = 0

    def call(self, func, args: tuple, kwargs: dict, fresh: list | None = None) -> Any:
        """``func(*args, **kwargs)``, or outputs made as it returned before (then ``fresh[0]`` is set)."""
        if not self.enabled:
            return func(*args, **kwargs)
        plain = self._plain.get(func)
        if plain is None:
            schema = getattr(func, "_schema", None)
            plain = self._plain[func] = schema is not None and not schema.is_mutable and all(
                r.alias_info is None for r in schema.returns)
        if not plain or not _only_trackers_below():
            return func(*args, **kwargs)
        try:
            meta = [False]
            key = (func, torch.get_default_dtype(), self._key(args, meta), self._key(kwargs, meta))
        except _Uncacheable:
            return func(*args, **kwargs)
        if not meta[0]:
            return func(*args, **kwargs)
        spec = self._outputs.get(key)
        if spec is not None:
            self.hits += 1
            if fresh is not None:
                fresh[0] = True
            return self._make(spec)
        self.misses += 1
        out = func(*args, **kwargs)
        outputs = [storage_of(t) for t in tensors_in(out)]
        if None in outputs:  # sparse, nested: nothing to remember
            return out
        keys = [st._cdata for st in outputs]
        if not input_keys((args, kwargs)).isdisjoint(keys):
            # A view its schema does not declare (``aten._unsafe_view``, for one): never cached.
            self._plain[func] = False
            return out
        if len(set(keys)) != len(keys):  # outputs sharing a storage
            return out
        spec = self._spec(out)
        if spec is not None:
            if len(self._outputs) >= self.max_entries:
                self._outputs.clear()  # a long-lived process planning ever new shapes starts over
            self._outputs[key] = spec
        return out

    def _key(self, value: Any, meta: list) -> Any:
        """The cache key of an op's ``args`` or ``kwargs``; plain tensors and scalars (the common case, by exact
        type) and a tuple or list of them take the short way to the same key ``_any`` gives."""
        cls = type(value)
        if cls is tuple or cls is list:
            return (cls, tuple([self._item(v, meta) for v in value]))
        return self._item(value, meta)

    def _item(self, value: Any, meta: list) -> Any:
        cls = type(value)
        if cls in _PLAIN_TENSORS:
            if not value.is_meta or value.layout is not torch.strided:
                raise _Uncacheable
            meta[0] = True
            return ("t", tuple(value.shape), value.stride(), value.dtype)
        if cls in _SCALAR_TYPES:
            return (cls, value)
        return self._any(value, meta)

    def _any(self, value: Any, meta: list) -> Any:
        if isinstance(value, torch.Tensor):
            if type(value) not in _PLAIN_TENSORS or value.device.type != "meta" or value.layout != torch.strided:
                raise _Uncacheable
            meta[0] = True
            return ("t", tuple(value.shape), value.stride(), value.dtype)
        if isinstance(value, _SCALARS):
            return (type(value), value)
        if isinstance(value, (list, tuple)):
            return (type(value), tuple(self._key(v, meta) for v in value))
        if isinstance(value, dict):
            return tuple((k, self._key(v, meta)) for k, v in value.items())
        raise _Uncacheable  # a generator, a SymInt, anything else

    @staticmethod
    def _spec(out: Any) -> Any:
        if isinstance(out, torch.Tensor):
            if (type(out) is not torch.Tensor or out.device.type != "meta" or out.layout != torch.strided
                    or out.storage_offset() != 0 or out.requires_grad):
                return None
            shape, stride = tuple(out.shape), out.stride()
            made = torch.empty_strided(shape, stride, dtype=out.dtype, device="meta")
            if made.untyped_storage().nbytes() != out.untyped_storage().nbytes():
                return None
            return (shape, stride, out.dtype)
        if isinstance(out, (tuple, list)) and out and all(isinstance(t, torch.Tensor) for t in out):
            specs = [MetaKernelCache._spec(t) for t in out]
            return None if None in specs else (type(out), specs)
        return None

    @staticmethod
    def _make(spec: Any) -> Any:
        if isinstance(spec[0], type):
            kind, specs = spec
            return kind(torch.empty_strided(s, st, dtype=d, device="meta") for s, st, d in specs)
        shape, stride, dtype = spec
        return torch.empty_strided(shape, stride, dtype=dtype, device="meta")


TRACKER_MODES: tuple[type, ...] = ()  # the op-level tracker's dispatch mode (memory.py sets it)


def _only_trackers_below() -> bool:
    """Whether every dispatch mode under the current one is a tracker's: another mode (a FLOP counter,
    for one) must see each real op, never an ``empty_strided`` in its place."""
    if not _dispatch_stack_length():  # the common case: the tracker's mode alone (popped while it runs)
        return True
    return all(isinstance(m, TRACKER_MODES) for m in _get_current_dispatch_mode_stack())


_dispatch_stack_length = torch._C._len_torch_dispatch_stack


# The planner, the simulator and every op-level tracker share one cache.
META_KERNELS = MetaKernelCache()
