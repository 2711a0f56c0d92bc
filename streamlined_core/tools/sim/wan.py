"""Wan's full-size activation memory without a GPU: ComfyUI's ``WanModel`` on the ``meta`` device.

Each row builds the real class at full size on ``meta``, with its weights stored as a ComfyUI checkpoint
stores them (bf16, or fp8 cast to bf16 per call by the host's operations), runs one call of the workload
under :class:`~streamlined_core.engine.memory.MemoryTracker` as the model's own forward and streamlined
(``auto``: the least slicing that reaches 1.5x the transformer floor), and reports both peaks against the
transformer floor: the residual stream (B x L x dim) and one self-attention's keys and values
(2 x B x L x dim), in bf16, computed from the configuration (``comfy_wan.floor_bytes``). ComfyUI runs cond
and uncond as one batch of two when memory allows and one after the other when not: both are rows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable

import torch

from ...engine.arch import comfy_wan
from ...engine.arch.comfy_attention import sdpa_on_meta
from ...engine.memory import GIB, MemoryTracker, weights_bytes
from ...host.comfyui import find_comfyui, import_comfy
from .. import configs

# name -> (label, usual sizes as (width, height), frames, the VAE's spatial compression)
WAN_MODELS: dict[str, tuple[str, tuple[tuple[int, int], ...], int, int]] = {
    "wan2.1-1.3b": ("Wan 2.1 1.3B", ((832, 480), (1280, 720)), 81, 8),
    "wan2.1-14b": ("Wan 2.1 14B", ((832, 480), (1280, 720)), 81, 8),
    "wan2.2-5b": ("Wan 2.2 5B", ((1280, 704),), 121, 16),
}
STORAGE = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}
GUIDANCE = (("batched", 2), ("separate", 1))
TARGET_X_FLOOR = 1.5  # the goal of every row


@dataclass
class WanRow:
    """One Wan workload: a model at a size, its weights' storage, cond and uncond batched or separate."""

    model: str
    width: int
    height: int
    frames: int
    storage: str
    guidance: str
    batch: int
    tokens: int
    weights_bytes: int
    original_peak_bytes: int
    peak_bytes: int
    floor_bytes: int
    plan: str
    planning_seconds: float = 0.0
    host: str = ""  # the ComfyUI whose WanModel ran ("ComfyUI 0.3.64")

    @property
    def x_floor(self) -> float:
        return self.peak_bytes / self.floor_bytes

    @property
    def original_x_floor(self) -> float:
        return self.original_peak_bytes / self.floor_bytes

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"x_floor": round(self.x_floor, 4), "original_x_floor": round(self.original_x_floor, 4)}


def _peak(model: torch.nn.Module, args: tuple) -> int:
    with sdpa_on_meta(model), MemoryTracker() as tracker:
        model(*args)
    return tracker.peak_bytes


def wan_rows(models: Iterable[str], sizes: Iterable[tuple[int, int]] | None = None, frames: int | None = None,
             progress: Callable[[str], None] | None = None) -> list[WanRow]:
    """Every requested Wan workload (``sizes`` as (width, height); default: each model's usual sizes)."""
    from ...engine.api import streamline

    say = progress or (lambda _msg: None)
    path, why = find_comfyui()
    if path is None:
        raise RuntimeError(f"the Wan rows run ComfyUI's WanModel: {why}")
    import_comfy(path, pytorch_attention=False)
    host = f"ComfyUI {_version()}"
    sizes = list(sizes) if sizes is not None else None
    work = [(m, size, storage, guidance) for m in models for size in (sizes or WAN_MODELS[m][1])
            for storage in STORAGE for guidance in GUIDANCE]
    rows: list[WanRow] = []
    for i, (name, (width, height), storage, (guidance, batch)) in enumerate(work, 1):
        label, _, usual_frames, scale = WAN_MODELS[name]
        count = frames or usual_frames
        say(f"[{i}/{len(work)}] {label} {width}x{height} {count} frames, {storage} weights, cond/uncond {guidance}")
        model = configs.build_comfy_wan(configs.WAN_CONFIGS[name], dtype=STORAGE[storage], compute_dtype=torch.bfloat16)
        args, _ = configs.comfy_wan_inputs(model, batch, count, height, width, scale)
        original = _peak(model, args)
        handle = streamline(model)
        try:
            peak = _peak(model, args)
            plan = handle.last_plan
        finally:
            handle.remove()
        arguments = {"x": args[0]}
        rows.append(WanRow(name, width, height, count, storage, guidance, batch, comfy_wan.tokens(model, arguments),
                           weights_bytes(model), original, peak, comfy_wan.floor_bytes(model, arguments),
                           plan.describe(), round(plan.seconds, 3), host))
        say(f"    original {original / GIB:.2f} GiB ({rows[-1].original_x_floor:.2f}x the floor), streamlined "
            f"{peak / GIB:.2f} GiB ({rows[-1].x_floor:.2f}x, {plan.describe()}), planned in {plan.seconds:.1f} s")
    return rows


def _version() -> str:
    try:
        import comfyui_version

        return comfyui_version.__version__
    except ImportError:
        return "(version unknown)"


COLUMNS = ("model", "width x height", "frames", "tokens", "weights", "weights GiB", "cond/uncond", "original GiB",
           "x floor", "streamlined GiB", "x floor", "transformer floor GiB", "slicing")


def _cells(row: WanRow) -> list[str]:
    return [WAN_MODELS[row.model][0], f"{row.width}x{row.height}", str(row.frames), str(row.tokens), row.storage,
            f"{row.weights_bytes / GIB:.2f}", f"{row.guidance} (B={row.batch})", f"{row.original_peak_bytes / GIB:.2f}",
            f"{row.original_x_floor:.2f}x", f"{row.peak_bytes / GIB:.2f}", f"{row.x_floor:.2f}x",
            f"{row.floor_bytes / GIB:.2f}", row.plan]


FOOTNOTE = ("Activations are live-tensor peaks of one call of {host}'s WanModel at full size on the meta device "
            "(bf16 activations, memory-efficient attention, the text context at 512 tokens); fp8 weights are cast "
            "to bf16 per call by ComfyUI's operations, and those casts count. Transformer floor: the residual stream "
            "and one self-attention's keys and values, 3 x B x tokens x dim in bf16. Goal: streamlined at most "
            f"{TARGET_X_FLOOR}x the floor in every row.")


def format_markdown(rows: list[WanRow]) -> str:
    """The Markdown table the docs embed."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n\n" + _footnote(rows) + "\n"


def _footnote(rows: list[WanRow]) -> str:
    return FOOTNOTE.format(host=rows[0].host if rows else "ComfyUI")


def format_text(rows: list[WanRow]) -> str:
    """A fixed-width table for the terminal, each plan's planning time in the last column."""
    cells = [[*COLUMNS, "planning s"]] + [[*_cells(r), f"{r.planning_seconds:.1f}"] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n\n" + _footnote(rows) + "\n"
