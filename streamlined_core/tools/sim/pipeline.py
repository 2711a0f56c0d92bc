"""``streamline simulate --pipeline``: every stage of a video workflow at full size, on the meta device.

A user's peak is the largest of the pipeline's stages, not the U-Net's. Each stage runs the real
model class at full size on ``meta`` in fp16 under the tracker, holding only its own weights (a host
that offloads between stages, as ComfyUI does on small cards):

* SVD and SVD-XT: the CLIP image encoder on the conditioning image; the VAE encoder on the init
  image; one U-Net call with classifier-free guidance as a batch of 2; SVD's VAE decode of every
  frame as one clip (the stock decoder in one call, and by groups).
* AnimateDiff: the CLIP text encoder on the prompt and the negative prompt; one U-Net call with
  guidance; the SD VAE decode (no temporal layers, so frames decode apart exactly): the stock
  decoder over every frame in one call, and one frame at a time by groups.

Each stage's figure is weights plus the activation peak; the pipeline's peak is the largest stage.
This is the "all weights resident" view: the smallest card it fits adds the CUDA context, nothing
else (ComfyUI's inference reserve is kept free for the activations, which are counted). The same
models also give ``cards.py``'s view, where each stage is loaded as ComfyUI loads it on a given card
(part of the weights streamed per call on a small one). Both are predictions until ``streamline
bench --cuda`` measures them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn

from ...engine.api import streamline
from ...engine.memory import GIB, MemoryTracker, weights_bytes
from ...engine.slicing import Runner
from .. import configs
from .cards import VARIANTS, Encoder, HostWorkflow, streamed_text
from .host_memory import CUDA_CONTEXT_BYTES, Inventory, encode_estimate
from .unet import MODELS, PAPER_NVML_GB, STREAMLINED, implementations, measure_call

CARDS_GB = (4, 6, 8, 10, 11, 12, 16, 20, 24, 32, 48, 80)  # consumer and workstation memory sizes (GiB as sold)
STEP_REHASH_NOTE = ("Step Rehash's cache (the cached feature and a reuse step's working copy) is counted in the "
                    "sampler's stage of the card view's Step Rehash rows, not in this view")


@dataclass
class Stage:
    name: str
    weights_bytes: int
    original_peak_bytes: int  # activations, the stock module
    peak_bytes: int  # activations, streamlined (the stock figure for stages Streamline leaves alone)
    streamlined: str  # what runs in the streamlined pipeline

    @property
    def original_total_bytes(self) -> int:
        return self.weights_bytes + self.original_peak_bytes

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.peak_bytes


@dataclass
class PipelineRow:
    model: str  # "svd", "svd-xt", "animatediff"
    height: int
    width: int
    frames: int
    stages: list[Stage] = field(default_factory=list)
    host: HostWorkflow | None = field(default=None, repr=False, compare=False)  # the same models, for the card view

    @property
    def original_peak_bytes(self) -> int:
        return max(s.original_total_bytes for s in self.stages)

    @property
    def peak_bytes(self) -> int:
        return max(s.total_bytes for s in self.stages)

    @property
    def peak_stage(self) -> str:
        return max(self.stages, key=lambda s: s.total_bytes).name

    @property
    def card_bytes(self) -> int:
        """What the streamlined workflow needs of a card with every weight resident: its peak and the CUDA context."""
        return self.peak_bytes + CUDA_CONTEXT_BYTES

    @property
    def smallest_card_gb(self) -> int | None:
        return next((gb for gb in CARDS_GB if gb * GIB >= self.card_bytes), None)

    def as_dict(self) -> dict:
        paper = PAPER_NVML_GB.get((self.model, self.height, self.width), (None, None))
        return {
            "model": self.model, "height": self.height, "width": self.width, "frames": self.frames,
            "stages": [{**asdict(s), "original_total_bytes": s.original_total_bytes, "total_bytes": s.total_bytes}
                       for s in self.stages],
            "original_peak_bytes": self.original_peak_bytes, "peak_bytes": self.peak_bytes, "peak_stage": self.peak_stage,
            "card_bytes": self.card_bytes, "smallest_card_gb": self.smallest_card_gb,
            "cuda_context_bytes": CUDA_CONTEXT_BYTES,
            "paper_nvml_original_gb": paper[0], "paper_nvml_streamlined_gb": paper[1],
            "step_rehash": STEP_REHASH_NOTE,
        }


def _tracked(call: Callable[[], object]) -> int:
    with torch.no_grad(), MemoryTracker() as tracker:
        call()
    return tracker.peak_bytes


def _encoder_stage(name: str, module: nn.Module, call: Callable[[], object], loaded: nn.Module | None = None,
                   memory_required: float = 0) -> tuple[Stage, Encoder]:
    """The stage, and the encoder as the host loads it (``loaded``: the whole model it loads, default ``module``)."""
    peak = _tracked(call)
    encoder = Encoder(name, Inventory.of(loaded if loaded is not None else module, fp32_modules=()), memory_required, peak)
    return Stage(name, weights_bytes(module), peak, peak, "unchanged"), encoder


def image_encoder_stage(dtype: torch.dtype) -> tuple[Stage, Encoder]:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, intermediate_size=5120,
                              image_size=224, patch_size=14, projection_dim=1024)
    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(config).to(dtype).eval()
    pixels = torch.empty(1, 3, 224, 224, device="meta", dtype=dtype)
    return _encoder_stage("image encoder (CLIP ViT-H/14)", model, lambda: model(pixel_values=pixels))


def text_encoder_stage(dtype: torch.dtype) -> tuple[Stage, Encoder]:
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                            max_position_embeddings=77, vocab_size=49408)
    with torch.device("meta"):
        model = CLIPTextModel(config).to(dtype).eval()
    ids = torch.zeros(2, 77, device="meta", dtype=torch.long)  # the prompt and the negative prompt
    return _encoder_stage("text encoder (CLIP ViT-L/14), prompt + negative", model, lambda: model(input_ids=ids))


def vae_encode_stage(vae: nn.Module, height: int, width: int, dtype: torch.dtype) -> tuple[Stage, Encoder]:
    image = torch.empty(1, 3, height, width, device="meta", dtype=dtype)
    encoder = nn.ModuleList([vae.encoder, vae.quant_conv]) if vae.quant_conv is not None else vae.encoder
    # ComfyUI loads the whole VAE to encode, with its memory_used_encode estimate
    return _encoder_stage("VAE encode of the init image", encoder, lambda: vae.encode(image), vae,
                          encode_estimate(height, width, image.element_size()))


def unet_stage(model_key: str, frames: int, height: int, width: int, dtype: torch.dtype):
    """The U-Net's stage, its model, its inputs per batch, and its stock peak per batch (measured once each)."""
    impl = next(i for i in implementations(model_key) if i.key == "diffusers")
    model = impl.build(device="meta", dtype=dtype)
    inputs = lambda batch: impl.inputs(model, batch, frames, height, width)  # noqa: E731
    args, kwargs = inputs(2)
    original, _ = measure_call(model, args, kwargs)
    stock = {2: original}

    def stock_peak(batch: int) -> int:
        if batch not in stock:
            stock[batch] = measure_call(model, *inputs(batch))[0]
        return stock[batch]

    STREAMLINED.apply(model)
    try:
        peak, _ = measure_call(model, args, kwargs)
        label = STREAMLINED.label(model)
    finally:
        STREAMLINED.revert(model)
    return Stage("U-Net, one call with guidance (batch of 2)", weights_bytes(model), original, peak, label), model, inputs, stock_peak


def svd_decode_stage(vae: nn.Module, frames: int, height: int, width: int, dtype: torch.dtype) -> Stage:
    decoder = vae.decoder
    z = torch.empty(frames, 4, height // 8, width // 8, device="meta", dtype=dtype)
    ioi = torch.zeros(1, frames, device="meta", dtype=dtype)
    original = _tracked(lambda: decoder(z, image_only_indicator=ioi, num_frames=frames))
    with streamline(vae) as handle:
        plan = handle.plan_for(z, image_only_indicator=ioi, num_frames=frames)
        peak = _tracked(lambda: handle.adapter.forward(decoder, Runner(plan.decide), z, ioi, num_frames=frames))
    return Stage("VAE decode, every frame as one clip", weights_bytes(decoder), original, peak,
                 f"by groups ({plan.describe()})")


def sd_decode_stage(vae: nn.Module, frames: int, height: int, width: int, dtype: torch.dtype) -> Stage:
    decoder = nn.ModuleList([vae.decoder, vae.post_quant_conv])
    z = torch.empty(frames, 4, height // 8, width // 8, device="meta", dtype=dtype)
    original = _tracked(lambda: vae.decode(z))
    one = z[:1]
    with streamline(vae) as handle:
        plan = handle.plan_for(vae.post_quant_conv(one))
        peak = _tracked(lambda: vae.decode(one))
    return Stage("VAE decode (SD VAE), one frame at a time", weights_bytes(decoder), original, peak,
                 f"the least single-frame peak, by groups ({plan.describe()})")


def _stock_decode(decode: Callable[[torch.Tensor], object], height: int, width: int, dtype: torch.dtype,
                  measured: dict[int, int]) -> Callable[[int], int]:
    """The stock decode's peak on ``n`` latent frames (ComfyUI's VAE Decode decodes its parts so), measured once
    per ``n``; ``measured`` holds the peaks the stage table already measured."""
    peaks = dict(measured)

    def peak(n: int) -> int:
        if n not in peaks:
            z = torch.empty(n, 4, height // 8, width // 8, device="meta", dtype=dtype)
            peaks[n] = _tracked(lambda: decode(z))
        return peaks[n]

    return peak


def pipeline_rows(models=tuple(MODELS), height: int = 576, width: int = 1024, dtype: torch.dtype = torch.float16,
                  progress: Callable[[str], None] | None = None) -> list[PipelineRow]:
    """Simulate every stage of each model's workflow at ``height`` x ``width`` (``row.host``: the same
    models for the card view)."""
    say = progress or (lambda _m: None)
    rows = []
    for key in models:
        label, frames = MODELS[key]
        row = PipelineRow(key, height, width, frames)
        encoders = []
        if key in ("svd", "svd-xt"):
            say(f"{label}: image encoder")
            stage, encoder = image_encoder_stage(dtype)
            row.stages.append(stage)
            encoders.append(encoder)
            vae = configs.build_svd_vae(dtype=dtype)
            say(f"{label}: VAE encode")
            stage, encoder = vae_encode_stage(vae, height, width, dtype)
            row.stages.append(stage)
            encoders.append(encoder)
            say(f"{label}: U-Net")
            stage, unet, inputs, stock_peak = unet_stage(key, frames, height, width, dtype)
            row.stages.append(stage)
            say(f"{label}: VAE decode")
            row.stages.append(svd_decode_stage(vae, frames, height, width, dtype))
            stock_decode = _stock_decode(lambda z, vae=vae: vae.decoder(z, image_only_indicator=torch.zeros(
                1, len(z), device="meta", dtype=dtype), num_frames=len(z)), height, width, dtype,
                {frames: row.stages[-1].original_peak_bytes})

            def decode_inputs(frames=frames):
                z = torch.empty(frames, 4, height // 8, width // 8, device="meta", dtype=dtype)
                return (z,), {"image_only_indicator": torch.zeros(1, frames, device="meta", dtype=dtype), "num_frames": frames}
        else:
            say(f"{label}: text encoder")
            stage, encoder = text_encoder_stage(dtype)
            row.stages.append(stage)
            encoders.append(encoder)
            say(f"{label}: U-Net")
            stage, unet, inputs, stock_peak = unet_stage(key, frames, height, width, dtype)
            row.stages.append(stage)
            say(f"{label}: VAE decode")
            vae = configs.build_sd_vae(dtype=dtype)
            row.stages.append(sd_decode_stage(vae, frames, height, width, dtype))
            stock_decode = _stock_decode(vae.decode, height, width, dtype, {frames: row.stages[-1].original_peak_bytes})
            decode_inputs = None
        row.host = HostWorkflow(key, label, height, width, frames, encoders, unet, inputs, stock_peak, vae, stock_decode,
                                decode_inputs)
        rows.append(row)
    return rows


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def _card(need_bytes: int) -> str:
    gb = next((gb for gb in CARDS_GB if gb * GIB >= need_bytes), None)
    return f"{gb} GB" if gb else "-"


def _partial(row: PipelineRow) -> str:
    """The smallest card of each way of running the workflow with ComfyUI's partial loading, and its streamed share."""
    if row.host is None:
        return "-"
    cells = []
    for variant in VARIANTS:
        p = row.host.smallest_card(variant, CARDS_GB)
        cells.append("-" if p is None else f"{p.card.gb:g} GB (streamed: {streamed_text(p)})")
    return " / ".join(cells)


def format_markdown(rows: list[PipelineRow]) -> str:
    """One table of every stage, then one of each workflow's peak beside the paper's and the card it needs."""
    lines = [
        "| workflow | stage | weights GiB | original: activations / total GiB | streamlined: activations / total GiB | streamlined runs |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = f"{MODELS[r.model][0]} {r.frames} frames {r.height}x{r.width}"
        for s in r.stages:
            lines.append(f"| {name} | {s.name} | {_gib(s.weights_bytes)} | {_gib(s.original_peak_bytes)} / "
                         f"{_gib(s.original_total_bytes)} | {_gib(s.peak_bytes)} / {_gib(s.total_bytes)} | {s.streamlined} |")
    lines += [
        "",
        "| workflow | original peak GiB | streamlined peak GiB | largest stage | paper NVML GB orig / streamlined* "
        "| all weights resident: smallest card, original / streamlined | ComfyUI's partial loading: smallest card, "
        "original / streamlined / with Step Rehash (weights ComfyUI streams there) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        paper = PAPER_NVML_GB.get((r.model, r.height, r.width), (None, None))
        paper_cell = f"{paper[0]:.2f} / {paper[1]:.2f}" if paper[0] is not None else "-"
        resident = f"{_card(r.original_peak_bytes + CUDA_CONTEXT_BYTES)} / {_card(r.card_bytes)}"
        lines.append(f"| {MODELS[r.model][0]} {r.frames} frames {r.height}x{r.width} | {_gib(r.original_peak_bytes)} | "
                     f"{_gib(r.peak_bytes)} | {r.peak_stage} | {paper_cell} | {resident} | {_partial(r)} |")
    lines += [
        "",
        f"fp16, simulated on the meta device. All weights resident: each stage holds its own weights and its "
        f"activations (the streamlined U-Net at its default plan, 1.5x its skip floor, with guidance batched), and the "
        f"card adds {CUDA_CONTEXT_BYTES / GIB:.1f} GiB for the CUDA context (assumed). ComfyUI's partial loading: each "
        f"stage loaded as ComfyUI 0.3.64 loads it on the card (Linux, no desktop), streaming the weights that do not "
        f"fit, the nodes at their defaults; the original decode is ComfyUI's VAE Decode, which cuts SVD's clip into "
        f"parts and changes its output. {STEP_REHASH_NOTE}. Predictions until `streamline bench --cuda` measures them. "
        f"*The paper's figures are whole-pipeline NVML readings on an A100 (CUDA context, allocator cache, Step Rehash "
        f"included), for reference.",
    ]
    return "\n".join(lines) + "\n"
