"""``streamline bench --rehash --comfyui``: the step caches inside ComfyUI, through the host's own nodes.

The fixture model loads into ComfyUI (the pack's Streamline Demo Model), so ComfyUI's own EasyCache
node runs on it as users run it, not a copy of its rule. Every setting samples the same held-out clips
(``data.EVAL_SEEDS``, the demo loader's clips) from the same KSampler seed, with SVD's guidance
(``VideoLinearCFGGuidance`` from 1 to 3, euler, karras), and is scored as ``bench --rehash`` scores: PSNR
of the final clips and the error of tracked shape centroids against KSampler at full compute.

Settings: ComfyUI's EasyCache node at each threshold (its default start and end percent); the Step
Rehash Sampler at its defaults (target key steps, the default cut, its own calibration made on the
first run, here on a calibration clip); and the Step Rehash Sampler at DeepCache's setting (a uniform
interval of 2 at ``up0.0.attn``). Full steps are counted, not assumed: a forward pre-hook on the
U-Net's middle block counts the calls that ran the whole U-Net. A reuse step's U-Net time is its cut's
share from ``bench --cuts``; a step EasyCache skips costs nothing. A setting that raises is reported
with its error instead of figures.

Figures measured on the fixture model are properties of that 6 M-parameter model, never of SVD.
"""

from __future__ import annotations

import logging
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ...fixture import data
from ...fixture import demo as fixture_demo
from .rehash import (
    DEEPCACHE_CUT,
    EASYCACHE_END,
    EASYCACHE_START,
    EASYCACHE_THRESHOLDS,
    Row,
    beaten_by,
    centroid_px,
    format_checks,
    markdown_rows,
    psnr,
    psnr_db,
    unet_time,
)

SPLIT = "comfyui"
CFG, MIN_CFG = 3.0, 1.0  # SVD's pipeline guidance, rising across the frames (VideoLinearCFGGuidance)
SAMPLER, SCHEDULER = "euler", "karras"
EASYCACHE_NODE = "easycache (ComfyUI node)"
KEYS = re.compile(r"(\d+) of \d+ steps ran the whole U-Net \(([^)]*)\)")


@dataclass
class ComfyRehashResult:
    rows: list[Row]
    host: str
    device: str  # where ComfyUI ran the model
    calibration: str  # the Step Rehash Sampler's report of its calibrating run
    steps: int
    clips: int
    frames: int
    threads: int
    shares: dict[str, float]
    shares_from: str

    def default(self) -> Row:
        return next(r for r in self.rows if r.default)

    def checks(self) -> dict[str, bool | None]:
        """The core targets, inside ComfyUI (None: a row they need did not run)."""
        d = self.default()
        dc = next((r for r in self.rows if r.method == "deepcache" and r.error is None), None)
        ran = [r for r in self.rows if r.method == EASYCACHE_NODE and r.error is None]
        return {  # the default never carries an error: this pack's nodes stop the bench when they raise
            "inside ComfyUI: the Step Rehash Sampler's default closer to full compute than DeepCache's setting":
                None if dc is None else psnr_db(d) > psnr_db(dc),
            "inside ComfyUI: its U-Net time no more than DeepCache's setting's":
                None if dc is None else d.unet_time_ratio <= dc.unet_time_ratio + 1e-9,
            "inside ComfyUI: no EasyCache node setting better on both axes": None if not ran else not beaten_by(d, ran),
        }


def _host() -> str:
    try:
        import comfyui_version

        return f"ComfyUI {comfyui_version.__version__}"
    except ImportError:
        return "ComfyUI of unknown version"


class _Reports(logging.Handler):
    """The Step Rehash Sampler's reports (its log lines), collected during the bench."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Step Rehash: "):
            self.lines.append(message.removeprefix("Step Rehash: "))


def bench_rehash_comfyui(comfyui: str | Path | None = None, clips: int = 4, steps: int = 25, frames: int | None = None,
                         threads: int = 2, shares: dict[str, float] | None = None, shares_from: str | None = None,
                         cuts_config: str = "mid", thresholds: Sequence[float] = EASYCACHE_THRESHOLDS,
                         weights: str | None = None, quick: bool = False,
                         progress: Callable[[str], None] | None = None) -> ComfyRehashResult:
    """Run the comparison inside the ComfyUI checkout at ``comfyui`` (None: ``comfy_host.find_comfyui``).
    ``shares``: each cut's reuse-step share of a full forward (None: timed now with ``bench --cuts`` on
    ``cuts_config``). ``quick``: fewer cut timings, for tests. Torch's thread count is restored after."""
    say = progress or (lambda _m: None)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if shares is None:
            from .unet import cuts as cut_costs

            say(f"timing each cut's tail on the {cuts_config} configuration (bench --cuts)")
            costs = cut_costs(cuts_config, warmup=0 if quick else 1, repeats=1 if quick else 3, threads=threads,
                              direct=(DEEPCACHE_CUT,))
            torch.set_num_threads(threads)
            shares = {c.cut: c.shallow_tail for c in costs.cuts}
            shares_from = f"bench --cuts, {cuts_config} configuration"
        return _in_comfyui(comfyui, clips, steps, frames or data.DEFAULT_FRAMES, threads, shares,
                           shares_from or "given shares", thresholds, weights, say)
    finally:
        torch.set_num_threads(previous_threads)


def prepare(comfyui: str | Path | None = None) -> dict:
    """Import the ComfyUI checkout and load this pack's nodes into it (raises, naming what is missing);
    ComfyUI's node mappings. Cheap: a caller checks this before a long run."""
    from ...host.comfyui import import_comfy, load_pack_nodes

    import_comfy(Path(comfyui).expanduser().resolve() if comfyui is not None else None)
    return load_pack_nodes("StreamlineDemoLoader")


def _raised(method: str, setting: str, error: str) -> Row:
    """A setting of ComfyUI's own nodes that could not sample: no figures, its error."""
    return Row(method, setting, 0, None, None, None, None, split=SPLIT, error=error)


def _cut_taken(lines: Sequence[str], widget: str) -> str:
    """The cut a Step Rehash run took: the widget's, or where its report says auto took it."""
    for line in lines:
        found = re.search(r"cut (\S+) \(auto", line)
        if found:
            return found[1]
    return widget


def _saved_calibration(report: str) -> str:
    """What the Step Rehash Sampler's report of its calibrating run says about the file."""
    saved = re.search(r"and saved (\S+\.json) in ", report)
    return f"saved as {saved[1]}" if saved else f"not saved: {report or 'no report'}"


def _in_comfyui(comfyui, clips: int, steps: int, frames: int, threads: int, shares: dict[str, float],
                shares_from: str, thresholds: Sequence[float], weights: str | None,
                say: Callable[[str], None]) -> ComfyRehashResult:
    from ...host.comfyui import model_folder

    mappings = prepare(comfyui)
    import comfy.model_management as mm
    from comfy_extras.nodes_video_model import VideoLinearCFGGuidance

    import nodes

    try:
        from comfy_extras.nodes_easycache import EasyCacheNode
    except ImportError:  # ComfyUI before its EasyCache node
        EasyCacheNode = None
    host = _host()
    device = str(mm.get_torch_device())
    say(f"inside {host} ({Path(mm.__file__).resolve().parents[1]}), on {device}")
    rehash_node = mappings["StepRehashSampler"]
    pack = rehash_node.__module__.rsplit(".nodes.", 1)[0]  # the pack as ComfyUI loaded it
    rehash_module = sys.modules[f"{pack}.streamlined_core.features.rehash.comfyui"]  # its run's log and folder
    demo_module = sys.modules[mappings["StreamlineDemoLoader"].__module__]
    ksampler_inputs = set(nodes.KSampler.INPUT_TYPES()["required"])
    defaults = {name: spec[1]["default"] for name, spec in rehash_node.INPUT_TYPES()["required"].items()
                if name not in ksampler_inputs}
    model = demo_module.load_fixture_model(weights)
    (guided,) = VideoLinearCFGGuidance().patch(model, MIN_CFG)
    unet = guided.get_model_object("diffusion_model")
    seeds = [data.EVAL_SEEDS[k] for k in range(clips)]

    def inputs(index: int, split: str):
        clip = fixture_demo.demo_clip(index, frames, split=split)
        positive, negative = demo_module.conditioning(clip)
        _, _, h, w = clip.first_frame.shape
        # KSampler's noise seed: the clip's index for held-out clips, a seed none of them uses otherwise
        seed = index if split == "eval" else data.CALIBRATION_SEEDS[index]
        return seed, positive, negative, {"samples": torch.zeros(frames, 4, h, w)}

    def ksampler(make_model: Callable[[], Any]) -> Callable[..., torch.Tensor]:
        def sample(index: int, split: str = "eval") -> torch.Tensor:
            seed, positive, negative, latent = inputs(index, split)
            (out,) = nodes.KSampler().sample(make_model(), seed, steps, CFG, SAMPLER, SCHEDULER, positive, negative,
                                             latent, denoise=1.0)
            return out["samples"]
        return sample

    def step_rehash(**options: Any) -> Callable[..., torch.Tensor]:
        def sample(index: int, split: str = "eval") -> torch.Tensor:
            seed, positive, negative, latent = inputs(index, split)
            (out,) = rehash_node().sample(guided, seed, steps, CFG, SAMPLER, SCHEDULER, positive, negative, latent,
                                          denoise=1.0, **(defaults | options))
            return out["samples"]
        return sample

    def easycache(threshold: float) -> Any:
        out = EasyCacheNode.execute(guided, reuse_threshold=threshold, start_percent=EASYCACHE_START,
                                    end_percent=EASYCACHE_END, verbose=False)
        return out.result[0] if hasattr(out, "result") else out[0]  # io.NodeOutput, or a tuple

    calls = [0]
    reports = _Reports()
    rehash_log, level = rehash_module.log, rehash_module.log.level
    hook = unet.middle_block[0].register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    folder = tempfile.TemporaryDirectory(prefix="streamline-bench-")
    try:
        rehash_log.addHandler(reports)
        rehash_log.setLevel(logging.INFO)
        rows: list[Row] = []
        runs: dict[str, Any] = {}  # the reference's clips, middle-block calls and seconds

        def run(method: str, setting: str, sample: Callable[[int], torch.Tensor], share: float = 0.0,
                tolerate: bool = False, reference: bool = False) -> Row:
            """Sample every held-out clip; ``reference``: this is full compute, what the others are scored
            against; ``tolerate``: a setting that raises is a result (ComfyUI's own nodes), otherwise (this
            pack's nodes, the reference) the error stops the bench."""
            calls[0] = 0
            got = []
            start = time.perf_counter()
            try:
                for k in range(clips):
                    got.append(data.unpack(sample(k).float()).clamp(0, 1))
                    say(f"{setting}: clip {k + 1} of {clips}")
            except Exception as exc:
                if not tolerate:
                    raise
                say(f"{setting}: raised {type(exc).__name__}: {exc}")
                return _raised(method, setting, f"{type(exc).__name__}: {exc}")
            seconds = time.perf_counter() - start
            clip_batch = torch.stack(got)
            if reference:
                if not calls[0]:
                    raise RuntimeError("no call reached the U-Net's middle block during full compute")
                runs.update(reference=clip_batch, calls=calls[0], seconds=seconds)
                return Row(method, setting, steps, 1.0, None, 0.0, 1.0, split=SPLIT)
            ran = calls[0] * steps / runs["calls"]  # full steps per clip, on average
            return Row(method, setting, round(ran), unet_time(ran, steps, share), psnr(clip_batch, runs["reference"]),
                       centroid_px(clip_batch, runs["reference"], seeds, frames), seconds / runs["seconds"],
                       split=SPLIT)

        with model_folder(rehash_module.FOLDER, folder.name, {".json"}):
            rows.append(run("full", f"KSampler, {steps} of {steps} steps", ksampler(lambda: guided), reference=True))
            say(f"full compute on {clips} held-out clips: {runs['seconds']:.1f} s")
            say("the Step Rehash Sampler calibrates on its first run (calibration clip 0)")
            step_rehash()(0, "calibration")
            calibration = _saved_calibration(reports.lines[-1] if reports.lines else "")
            cut = _cut_taken(reports.lines, defaults["cut"])  # the default, auto: the cut the node says it took
            del reports.lines[:]
            row = run("rehash", f"Step Rehash Sampler defaults ({cut}, target key steps)", step_rehash(), shares[cut])
            keys = [m for line in reports.lines if (m := KEYS.search(line))]
            if keys:  # the first held-out clip's key steps, as the node reported them
                row.setting += f": {keys[0][1]} key steps ({keys[0][2]})"
            row.default = True
            rows.append(row)
            rows.append(run("deepcache", f"Step Rehash Sampler at {DEEPCACHE_CUT}, uniform interval 2",
                            step_rehash(schedule="uniform interval", interval=2, cut=DEEPCACHE_CUT),
                            shares[DEEPCACHE_CUT]))
            if EasyCacheNode is None:
                rows.append(_raised(EASYCACHE_NODE, "EasyCache", f"{host} has no EasyCache node (comfy_extras.nodes_easycache)"))
            for t in thresholds if EasyCacheNode is not None else ():
                rows.append(run(EASYCACHE_NODE, f"EasyCache node, reuse_threshold {t}",
                                ksampler(lambda t=t: easycache(t)), tolerate=True))
    finally:
        hook.remove()
        rehash_log.removeHandler(reports)
        rehash_log.setLevel(level)
        folder.cleanup()
    return ComfyRehashResult(rows, host, device, calibration, steps, clips, frames, threads, shares, shares_from)


def format_markdown(r: ComfyRehashResult) -> str:
    where = "CPU" if r.device == "cpu" else r.device
    note = (f"Measured inside {r.host} on the fixture model (not on SVD), through ComfyUI's own KSampler, "
            f"VideoLinearCFGGuidance and EasyCache nodes and this pack's Step Rehash Sampler: {r.clips} held-out clips "
            f"of {r.frames} frames, {r.steps} steps ({SAMPLER}, {SCHEDULER}, guidance {MIN_CFG:g} to {CFG:g}), each "
            f"against KSampler at full compute from the same seed. Full steps counted at the U-Net's middle block; "
            f"U-Net time: a reuse step costs its cut's share ({r.shares_from}), a skipped step nothing. Wall time: "
            f"{'this CPU' if where == 'CPU' else where}, {r.threads} CPU threads. The Step Rehash Sampler's defaults "
            f"use the calibration the node made itself on its first run, on a calibration clip ({r.calibration}).")
    return markdown_rows(r.rows, where) + "\n\n" + note + "\n\nTargets:\n" + format_checks(r.checks()) + "\n"


__all__ = ["ComfyRehashResult", "bench_rehash_comfyui", "format_markdown", "prepare"]
