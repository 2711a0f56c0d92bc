"""``simulate --pipeline --card N``: a whole workflow on a named card, with ComfyUI's own partial loading.

Each stage of a workflow is loaded and run as ComfyUI 0.3.64 loads and runs it (``host_memory.py``):
its model's resident weights from the host's own decision for the free memory and the stage's
memory estimate, the rest streamed per call; the sampler's cond/uncond batching from the host's
rule; the stock VAE Decode's frames per part from its estimate. The streamlined workflow does what
the nodes do at their defaults: Streamline Model tells the host the smaller of its own estimate and
the plan's predicted peak, planned for the room the card leaves with every weight resident (its
least-memory plan where that room is short), then plans each call for the free memory the host
leaves less its reserve; Streamline VAE Decode plans the decode for the card's free memory less the
VAE and the reserve. Step Rehash's cached feature and the copy a reuse step starts from are counted
in the sampler's stage when it is used.

A stage fits when its resident weights, its activation peak, the largest streamed module's weight
(cast to the device while that module runs) and Step Rehash's cache fit in the card's free memory
(the card less the CUDA context and the desktop). Every figure is a prediction from measurements on
the meta device; ``streamline bench --cuda`` measures peaks on a real card.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from ...engine.api import Streamliner
from ...engine.arch import engine_adapter
from ...engine.memory import GIB
from ...engine.plan import Plan, Planner
from ...features.rehash import DEFAULT_CUT
from .host_memory import (
    Card,
    Inventory,
    Load,
    decode_estimate,
    load,
    stock_decode_frames,
    unet_estimate,
)

MODEL_SAMPLING_BYTES = 8000  # BaseModel.model_sampling: 1000 sigmas and their logs in fp32, counted by model_size()
MEMORY_USAGE_FACTOR = {"svd": 2.0, "svd-xt": 2.0, "animatediff": 1.0}  # supported_models: SVD_img2vid (base default), SD15
VARIANTS = ("original", "streamlined", "streamlined + Step Rehash")
DTYPE_SIZE = 2  # fp16


@dataclass
class HostStage:
    """One stage as the host loads and runs it on one card."""

    name: str
    load: Load
    activation_bytes: int
    runs: str
    cache_bytes: int = 0  # Step Rehash's cached feature and its working copy

    @property
    def need_bytes(self) -> int:
        """Device memory the stage holds at its peak (the context and the desktop aside)."""
        return self.load.resident_bytes + self.load.cast_bytes + self.activation_bytes + self.cache_bytes

    def as_dict(self) -> dict:
        return {"name": self.name, "resident_bytes": self.load.resident_bytes, "streamed_bytes": self.load.streamed_bytes,
                "streamed_share": round(self.load.streamed_share, 4), "cast_bytes": self.load.cast_bytes,
                "activation_bytes": self.activation_bytes, "cache_bytes": self.cache_bytes, "need_bytes": self.need_bytes,
                "kept_free_bytes": int(self.load.minimum_bytes), "runs": self.runs}


@dataclass
class CardPrediction:
    """A workflow, one way of running it, on one card."""

    workflow: str
    card: Card
    variant: str
    stages: list[HostStage] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return all(s.need_bytes <= self.card.free_bytes for s in self.stages)

    @property
    def deciding(self) -> HostStage:
        """The stage with the largest need: the one that decides whether the workflow fits."""
        return max(self.stages, key=lambda s: s.need_bytes)

    @property
    def streamed_share(self) -> float:
        return max(s.load.streamed_share for s in self.stages)

    def as_dict(self) -> dict:
        c = self.card
        return {"workflow": self.workflow, "variant": self.variant, "card_gb": c.gb, "system": c.system,
                "desktop_bytes": c.desktop_bytes, "cuda_context_bytes": c.context_bytes, "free_bytes": c.free_bytes,
                "reserved_bytes": c.reserved_bytes, "fits": self.fits, "deciding_stage": self.deciding.name,
                "streamed_share": round(self.streamed_share, 4), "stages": [s.as_dict() for s in self.stages]}


@dataclass
class Encoder:
    """A stage Streamline leaves alone: its model, the estimate the host loads it with, its peak."""

    name: str
    inventory: Inventory
    memory_required: float
    activation_bytes: int


class HostWorkflow:
    """One workflow's models at full size on meta, run stage by stage as the host would on any card."""

    def __init__(self, key: str, label: str, height: int, width: int, frames: int, encoders: list[Encoder],
                 unet: nn.Module, unet_inputs: Callable[[int], tuple[tuple, dict]], stock_unet_peak: Callable[[int], int],
                 vae: nn.Module, stock_decode_peak: Callable[[int], int], decode_inputs: Callable[[], tuple[tuple, dict]] | None):
        self.key, self.label, self.height, self.width, self.frames = key, label, height, width, frames
        self.encoders = encoders
        self.unet, self.unet_inputs, self.stock_unet_peak = unet, unet_inputs, stock_unet_peak
        self.unet_inventory = Inventory.of(unet, extra_bytes=MODEL_SAMPLING_BYTES)
        self.vae_inventory = Inventory.of(vae, fp32_modules=())
        self.stock_decode_peak, self.decode_inputs = stock_decode_peak, decode_inputs
        self._unet = Streamliner(unet, engine_adapter(unet), "auto", None)
        self._decode = Streamliner(vae.decoder, engine_adapter(vae.decoder), "auto", None) if decode_inputs else None
        self._cache: dict[int, int] = {}

    @property
    def name(self) -> str:
        return f"{self.label} {self.frames} frames {self.height}x{self.width}"

    # -- measured pieces (cached per shape by the planners) --------------------------------
    def unet_planner(self, batch: int) -> Planner:
        args, kwargs = self.unet_inputs(batch)
        return self._unet.planner_for(*args, **kwargs)

    def decode_planner(self) -> Planner:
        args, kwargs = self.decode_inputs()
        return self._decode.planner_for(*args, **kwargs)

    def cache_bytes(self, batch: int) -> int:
        """Step Rehash's cached feature at its default cut and the copy a reuse step starts from."""
        if batch not in self._cache:
            args, kwargs = self.unet_inputs(batch)
            self._cache[batch] = self._unet.reserved_for(_Cut(DEFAULT_CUT), *args, **kwargs)
        return self._cache[batch]

    # -- the host's run -------------------------------------------------------------------
    def predict(self, card: Card, variant: str) -> CardPrediction:
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        prediction = CardPrediction(self.name, card, variant)
        for e in self.encoders:
            prediction.stages.append(HostStage(e.name, load(card, e.inventory, e.memory_required), e.activation_bytes,
                                               "unchanged"))
        prediction.stages.append(self._sampler(card, variant))
        prediction.stages.append(self._decode_stage(card, variant))
        return prediction

    def _sampler(self, card: Card, variant: str) -> HostStage:
        inv = self.unet_inventory
        area = self.frames * (self.height // 8) * (self.width // 8)
        host = {b: unet_estimate(b * area, DTYPE_SIZE, MEMORY_USAGE_FACTOR[self.key]) for b in (1, 2)}
        rehash = variant == "streamlined + Step Rehash"
        if variant == "original":
            estimate = host
        else:  # the node's estimate: planned for the room with every weight resident (Streamline Model's wrapper)
            room = card.free_bytes - inv.size_bytes - card.reserved_bytes
            estimate = {b: min(host[b], self._unet_plan(b, room).predicted_peak_bytes) for b in (1, 2)}
        loaded = load(card, inv, estimate[2], estimate[1])
        batch = 2 if estimate[2] * 1.5 < loaded.free_after_bytes else 1
        together = "cond and uncond batched" if batch == 2 else "cond and uncond one after the other"
        cache = self.cache_bytes(batch) if rehash else 0
        if variant == "original":
            return HostStage("sampler (U-Net)", loaded, self.stock_unet_peak(batch), f"unsliced, {together}")
        budget = loaded.free_after_bytes - card.reserved_bytes - cache  # the node's budget at run time
        plan = self._unet_plan(batch, budget)
        short = ", its least-memory plan" if budget < self.unet_planner(batch).least_peak() else ""
        return HostStage("sampler (U-Net)", loaded, plan.predicted_peak_bytes,
                         f"{plan.describe()}, {together}{short}", cache)

    def _unet_plan(self, batch: int, activation_budget: int) -> Plan:
        """The plan Streamline Model makes for a budget read from the host (the engine's own rule)."""
        args, kwargs = self.unet_inputs(batch)
        return self._unet.plan_within(self._unet.bind(*args, **kwargs), activation_budget, "simulated")

    def _decode_stage(self, card: Card, variant: str) -> HostStage:
        inv = self.vae_inventory
        if variant == "original" or self._decode is None:
            per_frame = decode_estimate(self.height // 8, self.width // 8, DTYPE_SIZE)
            loaded = load(card, inv, per_frame)
            n = min(self.frames, stock_decode_frames(loaded.free_after_bytes, per_frame))
            cut = self._decode is not None and n < self.frames
            note = ", the clip cut into parts: the output changes" if cut else ""
            return HostStage("VAE decode", loaded, self.stock_decode_peak(n),
                             f"ComfyUI's VAE Decode, {n} of {self.frames} frames at a time{note}")
        planner = self.decode_planner()
        args, kwargs = self.decode_inputs()
        room = card.free_bytes - inv.size_bytes - card.reserved_bytes  # Streamline VAE Decode's default budget
        plan = self._decode.plan_within(self._decode.bind(*args, **kwargs), room, "simulated")
        loaded = load(card, inv, plan.predicted_peak_bytes)
        least = planner.least_peak()
        return HostStage("VAE decode", loaded, plan.predicted_peak_bytes,
                         f"by groups ({plan.describe()}), {plan.predicted_peak_bytes / plan.skip_floor_bytes:.2f}x its "
                         f"floor (least plan {least / plan.skip_floor_bytes:.2f}x)")

    def smallest_card(self, variant: str, cards_gb, system: str = "linux", desktop_bytes: int = 0) -> CardPrediction | None:
        """The prediction on the smallest card of ``cards_gb`` the workflow fits, with partial loading."""
        for gb in cards_gb:
            prediction = self.predict(Card(gb, system, desktop_bytes), variant)
            if prediction.fits:
                return prediction
        return None


class _Cut:
    def __init__(self, cut: str) -> None:
        self.cut = cut


def gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def streamed_text(p: CardPrediction) -> str:
    """Which stages stream weights, and what share of their model."""
    streamed = [f"{s.name.split(' (')[0]} {s.load.streamed_share:.0%}" for s in p.stages if s.load.streamed_bytes]
    return ", ".join(streamed) if streamed else "none"


def format_card_markdown(predictions: list[CardPrediction]) -> str:
    """One row per workflow and way of running it on the card: fits or not, the deciding stage, the slicing."""
    if not predictions:
        return ""
    card = predictions[0].card
    lines = [
        f"| workflow | runs as | fits {card.gb:g} GB | deciding stage: needs / free GiB | sampler | VAE decode "
        f"| weights streamed |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in predictions:
        stages = {s.name: s for s in p.stages}
        d = p.deciding
        unet, decode = stages["sampler (U-Net)"], stages["VAE decode"]
        lines.append(f"| {p.workflow} | {p.variant} | {'yes' if p.fits else '**no**'} | {d.name}: {gib(d.need_bytes)} / "
                     f"{gib(card.free_bytes)} | {unet.runs} | {decode.runs} | {streamed_text(p)} |")
    lines += ["", f"Predicted for {card.describe()} (assumed), with ComfyUI 0.3.64's own loading: it keeps "
              f"{card.reserved_bytes / 2**20:.0f} MiB free for other programs and streams the weights that do not fit. A "
              f"stage needs its resident weights, its activation peak, the largest streamed module's weight and Step "
              f"Rehash's cache. No GPU measured these figures: `streamline bench --cuda` measures the peaks on a card."]
    return "\n".join(lines) + "\n"


def format_smallest_markdown(workflows: list[HostWorkflow], cards_gb, system: str = "linux", desktop_bytes: int = 0) -> str:
    """Per workflow and way of running it: the smallest card with ComfyUI's partial loading, and what it streams."""
    lines = ["| workflow | runs as | smallest card, ComfyUI's partial loading | deciding stage | weights streamed there |",
             "|---|---|---|---|---|"]
    for w in workflows:
        for variant in VARIANTS:
            p = w.smallest_card(variant, cards_gb, system, desktop_bytes)
            if p is None:
                lines.append(f"| {w.name} | {variant} | none up to {cards_gb[-1]} GB | - | - |")
                continue
            lines.append(f"| {w.name} | {variant} | {p.card.gb:g} GB | {p.deciding.name}: {gib(p.deciding.need_bytes)} GiB "
                         f"| {streamed_text(p)} |")
    return "\n".join(lines) + "\n"
