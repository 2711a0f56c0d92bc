"""Token slicing of a transformer block whose only mixing across tokens is self-attention's.

In a video transformer block (Wan's, and LTX-Video's and HunyuanVideo's single-stream blocks alike) every
operation but self-attention's mixing of keys and values is local along tokens: norms over channels, their
modulation, the projections, the rotary embedding, cross-attention (each query attends to the context on its
own), the feed-forward. So a block runs exactly as two groups along ``"tokens"``:

1. ``{name}.self_attn.kv``: the keys and values of every token, slice by slice, into one (2, B, L, dim) tensor;
2. ``{name}``: per query slice, attention of the slice against all of them and the rest of the block,
   written over the block's input when nothing reads that input afterwards, else into a new output.

The block's peak is then its input, the keys and values, and one slice's intermediates: the transformer
floor (3 x B x L x dim) plus a slice. An adapter says what a slice computes (:func:`attention_block`'s
``keys_values`` and ``rest``); this module owns the slicing.
"""

from __future__ import annotations

from typing import Callable

import torch

from .slicing import InPlace, Merge, Runner, Tokens


class TokensInPlace(InPlace):
    """Each token slice's result written over the same tokens of the block's input (B, L, dim): exact, since every
    slice reads only its own tokens of the input (the keys and values of all of them are computed first)."""

    def whole(self, part: torch.Tensor) -> torch.Tensor:
        self.allocate(part).copy_(part)
        return self.target

    def write(self, out: torch.Tensor, start: int, stop: int, part: torch.Tensor) -> None:
        out[:, start:stop].copy_(part)


class KeysValues(Merge):
    """Parts are (keys, values) pairs of (B, s, dim); the output is one (2, B, L, dim) tensor (keys, values).
    Run whole, the pair itself is the output."""

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens

    def whole(self, part):
        return part

    def allocate(self, part):
        k, _ = part
        return k.new_empty((2, k.shape[0], self.tokens, k.shape[2]))

    def write(self, out, start: int, stop: int, part) -> None:
        out[0, :, start:stop].copy_(part[0])
        out[1, :, start:stop].copy_(part[1])


KeysValuesOf = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]  # tokens a:z -> their keys, values
Rest = Callable[[int, int, torch.Tensor, torch.Tensor], torch.Tensor]  # tokens a:z, all keys, all values -> output


def attention_block(runner: Runner, name: str, x: torch.Tensor, keys_values: KeysValuesOf, rest: Rest,
                    in_place: bool) -> torch.Tensor:
    """A block over the tokens of ``x`` (B, L, dim) as its two groups (module docstring). ``in_place``: nothing
    reads ``x`` after the block, so the output is written over it."""
    length = x.shape[1]
    kv = runner.run(f"{name}.self_attn.kv", "tokens", length, keys_values, KeysValues(length))
    return runner.run(name, "tokens", length, lambda a, z: rest(a, z, kv[0], kv[1]),
                      TokensInPlace(x) if in_place else Tokens(length))
