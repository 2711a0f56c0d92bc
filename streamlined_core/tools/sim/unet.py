"""Full-size activation memory without a GPU: the real architectures on the ``meta`` device.

Every row builds a real model class at full size on ``meta`` in fp16, runs one U-Net call of the
workload under :class:`~streamlined_core.engine.memory.MemoryTracker`, and reports the weights, the
activation peak, and the skip floor (the bytes of the skip tensors the down path hands to the up
path), computed from the module structure and checked against the traced run.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ...engine.arch import skip_floor_bytes, traced_skips
from ...engine.arch.comfy_attention import sdpa_on_meta
from ...engine.memory import GIB, MemoryTracker, weights_bytes
from ...host.comfyui import find_comfyui, import_comfy
from .. import configs

MODELS = {"svd": ("SVD", 14), "svd-xt": ("SVD-XT", 25), "animatediff": ("AnimateDiff", 16)}
IMPLEMENTATIONS = ("diffusers", "comfyui")
RESOLUTIONS = ((512, 512), (576, 1024))
CFG_BATCH = 2

# The paper's figures (docs/benchmarks.md, "The paper's figures"): whole-pipeline device memory read through NVML on an A100, in GB,
# CUDA context, allocator cache and Step Rehash included. Not comparable to live-tensor peaks.
PAPER_NVML_GB = {
    ("svd", 512, 512): (20.91, 13.67),
    ("svd", 576, 1024): (39.49, 23.42),
    ("svd-xt", 512, 512): (31.97, 19.37),
    ("svd-xt", 576, 1024): (61.17, 36.32),
    ("animatediff", 512, 512): (21.83, 7.51),
    ("animatediff", 576, 1024): (41.71, 11.07),
}


@dataclass
class Row:
    """One simulated configuration: a model, an implementation, a variant, a workload."""

    model: str
    implementation: str
    variant: str
    height: int
    width: int
    frames: int
    batch: int
    weights_bytes: int
    original_peak_bytes: int
    peak_bytes: int
    skip_floor_bytes: int
    traced_skip_floor_bytes: int | None = None
    paper_nvml_original_gb: float | None = None
    paper_nvml_streamlined_gb: float | None = None
    seconds: float = 0.0
    planning_seconds: float | None = None  # a streamlined row: the time its plan took (varies run to run)

    @property
    def x_floor(self) -> float:
        return self.peak_bytes / self.skip_floor_bytes

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["x_floor"] = round(self.x_floor, 4)
        return d


@dataclass
class Variant:
    """A way to run a model: the original, or a built-in memory feature of the host library."""

    name: str
    apply: Callable[[nn.Module], nn.Module] | None = None
    revert: Callable[[nn.Module], None] | None = None  # None with an ``apply``: build a fresh model
    label: Callable[[nn.Module], str] | None = None  # the row's name once it ran (e.g. naming the plan)


def _streamline(model: nn.Module) -> nn.Module:
    from ...engine.api import streamline

    streamline(model)
    return model


def _unstreamline(model: nn.Module) -> None:
    model._streamline_handle.remove()


def _streamlined_label(model: nn.Module) -> str:
    plan = model._streamline_handle.last_plan
    return f"streamlined auto ({plan.describe()})"


STREAMLINED = Variant("streamlined", _streamline, _unstreamline, _streamlined_label)


def _streamline_module_level(model: nn.Module) -> nn.Module:
    from ...engine.api import StreamlineHandle
    from ...engine.arch import adapter_for, module_level

    StreamlineHandle(model, module_level(adapter_for(model)), "auto", None)
    return model


def _module_level_label(model: nn.Module) -> str:
    plan = model._streamline_handle.last_plan
    return f"streamlined auto, module-level fallback ({plan.describe()})"


# ComfyUI versions the owned loop does not recognise: each layer sliced under the host's own loop.
MODULE_LEVEL = Variant("streamlined module-level", _streamline_module_level, _unstreamline, _module_level_label)


@dataclass
class Implementation:
    """A host library's version of a model family, with its variants."""

    key: str
    arch: str  # models are cached per arch: SVD and SVD-XT share one U-Net
    build: Callable[[], nn.Module]
    inputs: Callable[..., tuple[tuple, dict]]
    variants: list[Variant] = field(default_factory=list)


def _forward_chunking(model: nn.Module) -> nn.Module:
    model.enable_forward_chunking()
    return model


def _no_forward_chunking(model: nn.Module) -> None:
    for m in model.modules():
        if hasattr(m, "set_chunk_feed_forward"):
            m.set_chunk_feed_forward(chunk_size=None, dim=0)


def _free_noise_split(temporal_split_size: int | None) -> Callable[[nn.Module], nn.Module]:
    def apply(model: nn.Module) -> nn.Module:
        from diffusers import AnimateDiffPipeline, DDIMScheduler

        pipe = AnimateDiffPipeline(
            vae=None, text_encoder=None, tokenizer=None, unet=model, motion_adapter=None, scheduler=DDIMScheduler()
        )
        if temporal_split_size is None:
            pipe.enable_free_noise_split_inference()
        else:
            pipe.enable_free_noise_split_inference(temporal_split_size=temporal_split_size)
        return pipe.unet

    return apply


def implementations(model: str) -> list[Implementation]:
    """The implementations simulated for ``model`` ("svd", "svd-xt" or "animatediff")."""
    if model in ("svd", "svd-xt"):
        return [
            Implementation(
                "diffusers",
                "diffusers-svd",
                configs.build_diffusers_svd,
                configs.diffusers_svd_inputs,
                [
                    Variant("original"),
                    Variant("diffusers forward chunking", _forward_chunking, _no_forward_chunking),
                    STREAMLINED,
                ],
            ),
            Implementation(
                "comfyui", "comfyui-svd", configs.build_comfy_svd, configs.comfy_svd_inputs,
                [Variant("original"), STREAMLINED, MODULE_LEVEL],
            ),
        ]
    if model == "animatediff":
        return [
            Implementation(
                "diffusers",
                "diffusers-animatediff",
                configs.build_diffusers_animatediff,
                configs.diffusers_animatediff_inputs,
                [
                    Variant("original"),
                    Variant("diffusers FreeNoise split (default)", _free_noise_split(None)),
                    Variant("diffusers FreeNoise split temporal_split_size=1", _free_noise_split(1)),
                    STREAMLINED,
                ],
            ),
            Implementation(
                "comfyui", "comfyui-animatediff", configs.build_comfy_animatediff, configs.comfy_animatediff_inputs,
                [Variant("original"), STREAMLINED, MODULE_LEVEL],
            ),
        ]
    raise ValueError(f"model must be one of {', '.join(MODELS)}, got {model!r}")


def measure_call(model: nn.Module, args: tuple, kwargs: dict, trace: bool = False) -> tuple[int, int | None]:
    """Activation peak of one call of ``model`` and, if ``trace``, the bytes of its skip tensors.

    On ``meta``, ComfyUI's attention runs as PyTorch SDPA whatever backend ComfyUI chose, so the
    tracker counts a memory-efficient kernel (and no backend that needs a real device runs).
    """
    with sdpa_on_meta(model):
        if trace:
            with traced_skips(model) as skips, MemoryTracker() as tracker:
                model(*args, **kwargs)
            return tracker.peak_bytes, sum(skips.values())
        with MemoryTracker() as tracker:
            model(*args, **kwargs)
        return tracker.peak_bytes, None


def simulate(
    models: Iterable[str] = tuple(MODELS),
    resolutions: Iterable[tuple[int, int]] = RESOLUTIONS,
    frames: int | None = None,
    batch: int = CFG_BATCH,
    implementations_wanted: Iterable[str] = IMPLEMENTATIONS,
    device: str = "meta",
    dtype: torch.dtype = torch.float16,
    progress: Callable[[str], None] | None = None,
) -> list[Row]:
    """Simulate every requested configuration and return one :class:`Row` per variant."""
    say = progress or (lambda _msg: None)
    models, resolutions, wanted = list(models), list(resolutions), set(implementations_wanted)
    comfy_ok = False
    if "comfyui" in wanted:
        path, why = find_comfyui()
        if path is None:
            say(f"skipping ComfyUI rows: {why}")
        else:
            try:
                import_comfy(path, pytorch_attention=False)  # ComfyUI's default backend: measure_call runs SDPA on meta
                comfy_ok = True
            except Exception as exc:  # a checkout whose requirements are not installed
                say(f"skipping ComfyUI rows: importing ComfyUI from {path} failed: {exc}")
    work = [
        (m, impl, res, variant)
        for m in models
        for impl in implementations(m)
        if impl.key in wanted and (impl.key != "comfyui" or comfy_ok)
        for res in resolutions
        for variant in impl.variants
    ]
    cache: dict[str, nn.Module] = {}
    originals: dict[tuple, tuple[int, int | None]] = {}
    rows: list[Row] = []
    for i, (m, impl, (h, w), variant) in enumerate(work, 1):
        label, default_frames = MODELS[m]
        t = frames or default_frames
        say(f"[{i}/{len(work)}] {label} ({impl.key}) {h}x{w} {t} frames: {variant.name}")
        start = time.perf_counter()
        if impl.arch not in cache:
            cache[impl.arch] = impl.build(device=device, dtype=dtype)
        base = cache[impl.arch]
        if variant.apply is None:
            model = base
        elif variant.revert is not None:
            model = variant.apply(base)
        else:
            model = variant.apply(impl.build(device=device, dtype=dtype))
        try:
            args, kwargs = impl.inputs(model, batch, t, h, w)
            peak, traced = measure_call(model, args, kwargs, trace=variant.apply is None)
            name = variant.label(model) if variant.label is not None else variant.name
            handle = model.__dict__.get("_streamline_handle")
            planning = handle.last_plan.seconds if handle is not None and handle.last_plan is not None else None
        finally:
            if variant.apply is not None and variant.revert is not None:
                variant.revert(base)
        key = (m, impl.key, h, w, t)
        if variant.apply is None:
            originals[key] = (peak, traced)
        original_peak, traced_floor = originals[key]
        paper = PAPER_NVML_GB.get((m, h, w), (None, None)) if t == default_frames else (None, None)
        rows.append(
            Row(
                model=m,
                implementation=impl.key,
                variant=name,
                height=h,
                width=w,
                frames=t,
                batch=batch,
                weights_bytes=weights_bytes(model),
                original_peak_bytes=original_peak,
                peak_bytes=peak,
                skip_floor_bytes=skip_floor_bytes(model, batch * t, h // 8, w // 8, dtype),
                traced_skip_floor_bytes=traced_floor,
                paper_nvml_original_gb=paper[0],
                paper_nvml_streamlined_gb=paper[1],
                seconds=round(time.perf_counter() - start, 3),
                planning_seconds=None if planning is None else round(planning, 3),
            )
        )
        planned = "" if planning is None else f", planned in {planning:.1f} s"
        say(f"    activations {peak / GIB:.2f} GiB, {rows[-1].x_floor:.2f}x the skip floor{planned}")
    return rows


# -- tables ------------------------------------------------------------------------------------

COLUMNS = (
    "model", "implementation", "variant", "size", "frames", "weights GiB", "peak GiB", "x floor",
    "skip floor GiB", "vs original", "paper NVML GB orig / streamlined*",
)


def table_cells(row: Row) -> list[str]:
    """The cells of one table row."""
    paper = "-"
    if row.paper_nvml_original_gb is not None and row.variant == "original":
        paper = f"{row.paper_nvml_original_gb:.2f} / {row.paper_nvml_streamlined_gb:.2f}"
    return [
        MODELS[row.model][0],
        row.implementation,
        row.variant,
        f"{row.height}x{row.width}",
        str(row.frames),
        f"{row.weights_bytes / GIB:.2f}",
        f"{row.peak_bytes / GIB:.2f}",
        f"{row.x_floor:.2f}x",
        f"{row.skip_floor_bytes / GIB:.2f}",
        f"{row.peak_bytes / row.original_peak_bytes:.2f}",
        paper,
    ]


FOOTNOTE = (
    "Activations are live-tensor peaks of one U-Net call (fp16, classifier-free guidance as a batch of "
    "{batch}, memory-efficient attention), simulated on the meta device. *The paper's figures are "
    "whole-pipeline device memory read through NVML on an A100 (CUDA context, allocator cache, VAE and "
    "Step Rehash included): printed for reference, not directly comparable."
)


# The terminal's table (and --json) also shows how long each plan took; the Markdown table the docs embed
# does not: a time differs from run to run and machine to machine, and the docs' tables hold only figures
# a test can reproduce.
PLANNING_COLUMN = "planning s"


def format_text(rows: list[Row]) -> str:
    """A fixed-width table for the terminal, each plan's planning time in the last column."""
    cells = [[*COLUMNS, PLANNING_COLUMN]] + [
        [*table_cells(r), "-" if r.planning_seconds is None else f"{r.planning_seconds:.1f}"] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    batch = rows[0].batch if rows else CFG_BATCH
    return "\n".join(lines) + "\n\n" + FOOTNOTE.format(batch=batch) + "\n"


def format_markdown(rows: list[Row]) -> str:
    """The Markdown table the docs embed."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(table_cells(r)) + " |" for r in rows]
    batch = rows[0].batch if rows else CFG_BATCH
    return "\n".join(lines) + "\n\n" + FOOTNOTE.format(batch=batch) + "\n"
