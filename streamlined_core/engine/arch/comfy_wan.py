"""ComfyUI's Wan 2.1 / 2.2 video transformer (``comfy/ldm/wan/model.py``), each block run on token slices, exactly.

In a ``WanAttentionBlock`` every operation but self-attention's mixing of keys and values is local along
tokens: the modulated LayerNorms, the q/k RMSNorms, the rotary embedding, the feed-forward, and
cross-attention (each query attends to the text and image context on its own). So a block runs as the two
groups along ``"tokens"`` of ``engine/tokens.py`` (which LTX-Video's and HunyuanVideo's blocks would share; this
module says only what a Wan slice computes):

- ``blocks.{i}.self_attn.kv``: the keys (rotary-embedded) and values of every token, slice by slice, into
  one (2, B, L, dim) tensor;
- ``blocks.{i}``: per query slice, self-attention of the slice against those keys and values, its output
  projection and gated residual, cross-attention, the modulated feed-forward and its gated residual,
  written over the block's input where the model's block loop drops that input once the block returns
  (``DROPS_BLOCK_INPUT``: the plain model and camera control; VACE keeps the first block's input for its
  VACE blocks, so there, and under another pack's block patch, the output is a new tensor).

So a block's peak is the residual stream, the keys and values, and one slice's intermediates: the transformer
floor (``floor_bytes``) plus a slice.

The modulation is sliced with the tokens: with per-frame timesteps (Wan 2.2 5B image-to-video, a
``denoise_mask``) ``e`` has one row per latent frame and the host's ``repeat_e`` maps token ``j`` to a row by
``x.size(1)``; each slice takes its own tokens' rows of the map the host's ``repeat_e`` makes for the whole
sequence (run on an index and a zero-size stand-in of ``x``: no activation is repeated).

The host's own ``_forward`` runs the call (patch embedding in fp32, rotary frequencies, time and text
embeddings, VACE hints, the head, unpatchify); the blocks are reached through its block hook,
``transformer_options["patches_replace"]["dit"][("double_block", i)]``, which every Wan forward of both
reference hosts honours. A patch another pack set there wraps ours (its ``original_block`` runs the sliced
block). A block of another class or of a forward this module does not reproduce runs whole through the host's
own code, and a model this module does not slice (S2V, HuMo, Animate: ``SLICED_MODELS``) runs untouched; the
run's log says so once.

Nothing here imports ComfyUI: the host's helpers come from the module the block class lives in.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import sys
from typing import Any, Callable

import torch
from torch import nn

from ..slicing import Runner
from ..tokens import attention_block
from .comfy_common import forward_signature
from .comfy_unet import planning_arguments, replayable  # noqa: F401 (the same per-call options as the U-Net's)

log = logging.getLogger(__name__)

SLOT = "_forward"  # WanModel.forward runs the DIFFUSION_MODEL wrappers, then this
SAMPLE = "x"
FLOOR_NAME = "transformer floor"

# The models whose blocks are sliced: the plain WanModel (text and image to video, Wan 2.1 and 2.2, with
# time_dim_concat and reference_latent), VACE (its VACE blocks run whole between the main blocks) and camera
# control. The others built on WanModel (S2V, HuMo, Animate: audio and face inputs, blocks of their own) run
# untouched, said in the log.
SLICED_MODELS = ("WanModel", "VaceWanModel", "CameraWanModel")
# sha256 of the forward_orig sources whose block loop drops a block's input once the block returns, so the block's
# output may be written over its input (VACE keeps the first block's input for its VACE blocks: not there)
DROPS_BLOCK_INPUT = {
    "e7d86ed3001d5c350dd2134fed71186fb87b580ace4b04f168be6bdfa2a1f662": "WanModel, ComfyUI 0.3.52",
    "9192f6af9af1a8083353dc2ef191d59e2b8b7df5d9b9783209651eb52787e761": "CameraWanModel, ComfyUI 0.3.52",
    "35f0483e79718453d7c82c38faa49054d40dced5eba15c230fd40bff09299dae": "WanModel, ComfyUI 0.3.64",
    "d40dc792813df7655a58ec33c669bb1400dbff55c16aed72953b0c1e941f86a9": "CameraWanModel, ComfyUI 0.3.64",
}

# sha256 of WanAttentionBlock.forward, WanSelfAttention.forward and repeat_e: the host versions reproduced
KNOWN_BLOCK_SHAS: dict[str, str] = {
    "a01b21188ff507ea8c8da40b92f0f24ffeca9ed2e8d96d982368c638426c3144": "ComfyUI 0.3.52",
    "e55a84264c4f3eed1a0b7ee518d3ff45a8457c4dce5ce86a80a1e7825c57bffd": "ComfyUI 0.3.64",
}

def matches(model: nn.Module) -> bool:
    """True for ComfyUI's ``WanModel`` and the classes built on it (VACE, camera, S2V, HuMo, Animate)."""
    return (any(c.__name__ == "WanModel" and c.__module__.startswith("comfy.") for c in type(model).__mro__)
            and hasattr(model, "blocks") and hasattr(model, "patch_embedding") and hasattr(model, "head"))


def call_shape(arguments: dict) -> tuple[int, int, int, int]:
    """(batch, latent frames, latent height, latent width) of ComfyUI's (B, C, T, H, W) input."""
    b, _, t, h, w = arguments["x"].shape
    return b, t, h, w


def tokens(model: nn.Module, arguments: dict) -> int:
    """The sequence length the blocks see: the patched latent (padded to the patch size), plus the frames
    ``time_dim_concat`` appends and the one frame of ``reference_latent`` tokens ``ref_conv`` prepends."""
    pt, ph, pw = model.patch_size
    _, _, t, h, w = arguments["x"].shape
    extra = arguments.get("time_dim_concat")
    frames = -(-t // pt) + (-(-extra.shape[2] // pt) if isinstance(extra, torch.Tensor) else 0)
    per_frame = -(-h // ph) * -(-w // pw)
    ref = 1 if getattr(model, "ref_conv", None) is not None and arguments.get("reference_latent") is not None else 0
    return (frames + ref) * per_frame


def floor_bytes(model: nn.Module, arguments: dict) -> int:
    """The transformer floor: the residual stream (B x L x dim) and one self-attention's keys and values
    (2 x B x L x dim), in the activation dtype (the dtype of ``x``: the host casts the patch embedding's fp32
    output to it), L the token count after patching."""
    x = arguments["x"]
    return 3 * x.shape[0] * tokens(model, arguments) * model.dim * x.element_size()


# -- recognising the host's block -----------------------------------------------------------------


def _host(block: nn.Module):
    return sys.modules[type(block).__module__]


def block_fingerprint(block: nn.Module) -> str:
    """sha256 of the sources of the block's forward, its self-attention's forward and the host's ``repeat_e``."""
    return _fingerprint(type(block), type(block.self_attn), type(block).__module__)


@functools.lru_cache(maxsize=None)
def _fingerprint(block_cls: type, attn_cls: type, module: str) -> str:
    parts = [inspect.getsource(block_cls.forward), inspect.getsource(attn_cls.forward),
             inspect.getsource(sys.modules[module].repeat_e)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


@functools.lru_cache(maxsize=None)
def drops_block_input(cls: type) -> bool:
    """Whether the class's ``forward_orig`` is one whose block loop drops each block's input after the block."""
    try:
        source = inspect.getsource(cls.forward_orig)
    except (OSError, TypeError, AttributeError):
        return False
    return hashlib.sha256(source.encode()).hexdigest() in DROPS_BLOCK_INPUT


def sliced_model(model: nn.Module) -> bool:
    """Whether the model is one whose blocks are sliced (``SLICED_MODELS``, ComfyUI's own classes)."""
    cls = type(model)
    return cls.__name__ in SLICED_MODELS and cls.__module__.startswith("comfy.")


def sliceable(block: nn.Module) -> str | None:
    """None when the block is one this module reproduces, else why it runs whole."""
    if type(block).__name__ != "WanAttentionBlock":
        return f"its class is {type(block).__name__}"
    try:
        sha = block_fingerprint(block)
    except (OSError, TypeError, AttributeError) as e:
        return f"its source cannot be read ({e})"
    if sha not in KNOWN_BLOCK_SHAS:
        return (f"its forward is not a version Streamline reproduces (sha256 {sha[:12]}; known: "
                f"{', '.join(sorted(set(KNOWN_BLOCK_SHAS.values())))})")
    return None


# -- the sliced block ------------------------------------------------------------------------------


def _rope(host) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The host's rotary embedding of one tensor: ``apply_rope1`` (0.3.64), else ``apply_rope`` of q and k
    (0.3.52), which embeds each on its own."""
    one = getattr(host, "apply_rope1", None)
    if one is not None:
        return one
    both = host.apply_rope
    return lambda x, freqs: both(x, x, freqs)[0]


def _token_rows(host, rows: int, length: int, device) -> torch.Tensor | None:
    """The row of a modulation of ``rows`` rows each of ``length`` tokens takes, as the host's ``repeat_e``
    maps it (None: one row for every token, broadcast)."""
    if rows == 1:
        return None
    index = torch.arange(rows, device=device).view(1, rows, 1)
    mapped = host.repeat_e(index, torch.empty((1, length, 0), device=device)).reshape(-1)
    if mapped.numel() != length:
        raise RunWhole(f"its modulation has {rows} rows for {length} tokens")
    return mapped


def modulation_of(host, e: torch.Tensor, rows: torch.Tensor | None, start: int, stop: int,
                  x: torch.Tensor) -> torch.Tensor:
    """The modulation of tokens ``start:stop``: their rows of ``e`` by the whole sequence's map (``rows``)."""
    return e if rows is None else e[:, rows[start:stop]]


def modulation_of_the_slice(host, e: torch.Tensor, rows: torch.Tensor | None, start: int, stop: int,
                            x: torch.Tensor) -> torch.Tensor:
    """What a block part called on a token slice with the whole ``e`` does: the host's ``repeat_e`` maps rows by
    the slice's length. Wrong (every slice restarts the map): the self-test's wrong variant, never the engine's."""
    return host.repeat_e(e, x[:, start:stop])


class RunWhole(Exception):
    """A call this module cannot slice exactly: the host's block runs it."""


def sliced_block(runner: Runner, name: str, block: nn.Module, x: torch.Tensor, e: torch.Tensor,
                 freqs: torch.Tensor, context: torch.Tensor, context_img_len: Any,
                 transformer_options: dict | None, own_input: bool = False) -> torch.Tensor:
    """``WanAttentionBlock.forward`` as two token groups (module docstring): the same result within rounding.
    ``own_input``: nothing reads ``x`` after the block, so its output may be written over it."""
    host = _host(block)
    attn = block.self_attn
    b, length, dim = x.shape
    n, d = attn.num_heads, attn.head_dim
    modulation = host.comfy.model_management.cast_to(block.modulation, dtype=x.dtype, device=x.device)
    es = (modulation + e).chunk(6, dim=1) if e.ndim < 4 else (modulation.unsqueeze(0) + e).unbind(2)
    rows = _token_rows(host, es[0].shape[1], length, x.device)
    rope = _rope(host)
    opts = {"transformer_options": transformer_options} if transformer_options is not None else {}
    # passed where the host's own forward takes them (0.3.52's take none; another pack may add them to the args)
    attn_opts = opts if "transformer_options" in forward_signature(type(attn)).parameters else {}
    cross = forward_signature(type(block.cross_attn)).parameters
    cross_opts = opts if "transformer_options" in cross or any(p.kind is p.VAR_KEYWORD for p in cross.values()) else {}

    def mod(i: int, a: int, z: int) -> torch.Tensor:
        return modulation_of(host, es[i], rows, a, z, x)

    def modulated(a: int, z: int) -> torch.Tensor:
        return torch.addcmul(mod(0, a, z), block.norm1(x[:, a:z]), 1 + mod(1, a, z))

    def keys_values(a: int, z: int):
        h = modulated(a, z)
        k = rope(attn.norm_k(attn.k(h)).view(b, z - a, n, d), freqs[:, a:z]).view(b, z - a, n * d)
        return k, attn.v(h).view(b, z - a, n * d)

    def rest(a: int, z: int, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        q = rope(attn.norm_q(attn.q(modulated(a, z))).view(b, z - a, n, d), freqs[:, a:z])
        y = host.optimized_attention(q.view(b, z - a, n * d), keys, values, heads=n, **attn_opts)
        del q
        xs = torch.addcmul(x[:, a:z], attn.o(y), mod(2, a, z))
        del y
        xs = xs + block.cross_attn(block.norm3(xs), context, context_img_len=context_img_len, **cross_opts)
        y = block.ffn(torch.addcmul(mod(3, a, z), block.norm2(xs), 1 + mod(4, a, z)))
        return torch.addcmul(xs, y, mod(5, a, z))

    # written over the block's input only where the model's loop drops it and no dtype changes on the way
    in_place = own_input and all(t.dtype == x.dtype for t in es)
    return attention_block(runner, name, x, keys_values, rest, in_place)


# -- the call --------------------------------------------------------------------------------------


class _BlockPatch:
    """The ``("double_block", i)`` patch of one call: the block on token slices, under another pack's patch
    for the same block when there is one (its ``original_block`` is ours)."""

    def __init__(self, runner: Runner, index: int, block: nn.Module, context_img_len: Any, previous,
                 drops_input: bool) -> None:
        self.runner, self.index, self.block = runner, index, block
        self.context_img_len, self.previous, self.drops_input = context_img_len, previous, drops_input

    def run(self, args: dict, host_block) -> dict:
        try:
            out = sliced_block(self.runner, f"blocks.{self.index}", self.block, args["img"], args["vec"], args["pe"],
                               args["txt"], self.context_img_len, args.get("transformer_options"),
                               own_input=self.drops_input and self.previous is None)
        except RunWhole as e:  # raised before anything ran
            _say(self.block, ("wan block whole", str(e)), "Streamline: Wan block %d runs whole, unsliced: %s",
                 self.index, e)
            return host_block(args)
        return {"img": out}

    def __call__(self, args: dict, extra: dict) -> dict:
        host_block = extra["original_block"]
        if self.previous is None:
            return self.run(args, host_block)
        return self.previous(args, {**extra, "original_block": lambda a: self.run(a, host_block)})


def streamlined_forward(model: nn.Module, runner: Runner, **arguments: Any) -> torch.Tensor:
    """``WanModel._forward`` (the model's own class's), its recognised blocks run on token slices."""
    if not sliced_model(model):
        _say(model, ("wan model untouched", type(model).__name__),
             "Streamline: %s is not a Wan model Streamline slices (%s); it runs untouched, with ComfyUI's own memory "
             "use", type(model).__name__, ", ".join(SLICED_MODELS))
        return getattr(type(model), SLOT)(model, **arguments)
    if "optimized_attention_override" in (arguments.get("transformer_options") or {}):
        # another pack's attention (sparse or sliding-tile masks, attention capture, quantized blocks) may assume
        # its queries and keys cover the same tokens: never hand it a query slice
        _say(model, ("wan attention override", type(model).__name__),
             "Streamline: %s: another node set transformer_options['optimized_attention_override']; the blocks run "
             "whole, unsliced, so that attention sees every query", type(model).__name__)
        return getattr(type(model), SLOT)(model, **arguments)
    options = dict(arguments.get("transformer_options") or {})
    replace = dict(options.get("patches_replace") or {})
    dit = dict(replace.get("dit") or {})
    clip_fea = arguments.get("clip_fea")
    context_img_len = clip_fea.shape[-2] if clip_fea is not None else None
    # in place only under the class's own block loop: another pack may have put its own forward_orig on the
    # instance (a step cache), which may keep a block's input
    drops_input = drops_block_input(type(model)) and "forward_orig" not in model.__dict__
    whole = []
    for i, block in enumerate(model.blocks):
        why = sliceable(block)
        if why is not None:
            whole.append((i, why))
            continue
        dit[("double_block", i)] = _BlockPatch(runner, i, block, context_img_len, dit.get(("double_block", i)),
                                               drops_input)
    if whole:
        first, why = whole[0]
        _say(model, ("wan blocks whole", type(model).__name__),
             "Streamline: %s: %d of %d blocks run whole, unsliced, through ComfyUI's own code (block %d: %s)",
             type(model).__name__, len(whole), len(model.blocks), first, why)
    replace["dit"] = dit
    options["patches_replace"] = replace
    return getattr(type(model), SLOT)(model, **{**arguments, "transformer_options": options})


def _say(model: nn.Module, key: tuple, message: str, *args: Any) -> None:
    """Log ``message`` once per run (once per process outside a run)."""
    from ..context import current

    ctx = current()
    said = ctx.said if ctx is not None else _SAID
    if key in said:
        return
    said.add(key)
    log.info(message, *args)


_SAID: set = set()


def example_arguments(model: nn.Module, input_shape, device="meta", frames: int | None = None, tokens: int = 1,
                      transformer_options: dict | None = None, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """``_forward`` arguments for a latent batch of ``input_shape`` (B, C, T, H, W), for planning: a text context
    of ``tokens`` tokens, the image context of an image-to-video model (CLIP vision's 257 tokens), the sampler's
    ``transformer_options`` and the compute ``dtype`` (``comfy_unet.example_arguments``' counterpart; ``frames``
    is the latent's own frame count here and is not needed)."""
    b, _, t, h, w = input_shape
    dtype = dtype or getattr(model, "dtype", None) or torch.float32
    arguments: dict[str, Any] = {
        "x": torch.empty((b, model.in_dim, t, h, w), device=device, dtype=dtype),
        "timestep": torch.empty(b, device=device, dtype=torch.float32),
        "context": torch.empty(b, tokens, model.text_dim, device=device, dtype=dtype),
        "transformer_options": dict(transformer_options or {}),
    }
    if getattr(model, "img_emb", None) is not None:
        arguments["clip_fea"] = torch.empty(b, 257, 1280, device=device, dtype=dtype)
    return arguments
