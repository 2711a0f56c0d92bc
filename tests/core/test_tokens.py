"""Token slicing of a transformer block (engine/tokens.py) on a plain PyTorch block: every slicing equals the block
run whole, in place or not; attention of each slice against its own keys alone (no whole-sequence keys) does not."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from streamlined_core.engine.slicing import Runner
from streamlined_core.engine.tokens import attention_block


class Block(nn.Module):
    """Pre-norm self-attention and feed-forward, with a rotary-like per-token phase: local but for attention."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.ffn = nn.Sequential(nn.Linear(dim, 3 * dim), nn.GELU(), nn.Linear(3 * dim, dim))

    def heads_of(self, t):
        b, s, d = t.shape
        return t.view(b, s, self.heads, d // self.heads).transpose(1, 2)

    def attend(self, q, k, v):
        out = F.scaled_dot_product_attention(self.heads_of(q), self.heads_of(k), self.heads_of(v))
        return out.transpose(1, 2).flatten(2)

    def forward(self, x, phase):
        h = self.norm1(x)
        x = x + self.o(self.attend(self.q(h) * phase, self.k(h) * phase, self.v(h)))
        return x + self.ffn(self.norm2(x))

    def sliced(self, runner, x, phase, in_place=False, own_keys=False):
        def keys_values(a, z):
            h = self.norm1(x[:, a:z])
            return self.k(h) * phase[:, a:z], self.v(h)

        def rest(a, z, keys, values):
            h = self.norm1(x[:, a:z])
            if own_keys:  # the wrong variant: the slice's own keys and values only
                keys, values = keys[:, a:z], values[:, a:z]
            xs = x[:, a:z] + self.o(self.attend(self.q(h) * phase[:, a:z], keys, values))
            return xs + self.ffn(self.norm2(xs))

        return attention_block(runner, "block", x, keys_values, rest, in_place)


@pytest.fixture(scope="module")
def block():
    torch.manual_seed(0)
    return Block().eval()


@pytest.mark.parametrize("slices", [1, 2, 3, 7, 11])
@pytest.mark.parametrize("in_place", [False, True])
def test_every_token_slicing_equals_the_block_run_whole(block, slices, in_place):
    gen = torch.Generator().manual_seed(slices)
    x = torch.randn(2, 11, 16, generator=gen)
    phase = 1 + 0.1 * torch.randn(1, 11, 1, generator=gen)
    with torch.no_grad():
        reference = block(x, phase)
        target = x.clone()
        out = block.sliced(Runner(lambda _n, _a, _l: (slices, "keep")), target, phase, in_place)
    assert torch.allclose(out, reference, atol=1e-6, rtol=0)
    assert (out.data_ptr() == target.data_ptr()) == in_place  # in place: the output is the input's storage


def test_attention_against_each_slices_own_keys_is_not_the_block(block):
    x = torch.randn(1, 9, 16, generator=torch.Generator().manual_seed(3))
    phase = torch.ones(1, 9, 1)
    with torch.no_grad():
        reference = block(x, phase)
        wrong = block.sliced(Runner(lambda _n, _a, _l: (3, "keep")), x, phase, own_keys=True)
    assert (wrong - reference).abs().max() > 1e-2


@pytest.mark.parametrize("in_place", [False, True])
def test_the_groups_are_reported_along_tokens(block, in_place):
    events = []
    with torch.no_grad():
        block.sliced(Runner(lambda _n, _a, _l: (4, "keep"), [events.append]), torch.randn(1, 10, 16),
                     torch.ones(1, 10, 1), in_place)
    starts = [(e.name, e.axis, e.length, e.slices, e.in_place) for e in events if e.kind == "start"]
    assert starts == [("block.self_attn.kv", "tokens", 10, 4, False), ("block", "tokens", 10, 4, in_place)]
