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

from .fixture import data
from .fixture import demo as fixture_demo
from .rehash_bench import DEEPCACHE_CUT, EASYCACHE_END, EASYCACHE_START, EASYCACHE_THRESHOLDS, Row, _db, _shown
from .rehash_bench import beaten_by, centroid_px, psnr

SPLIT = "comfyui"
CFG, MIN_CFG = 3.0, 1.0  # SVD's pipeline guidance, rising across the frames (VideoLinearCFGGuidance)
SAMPLER, SCHEDULER = "euler", "karras"
EASYCACHE_NODE = "easycache (ComfyUI node)"
KEYS = re.compile(r"(\d+) of \d+ steps ran the whole U-Net \(([^)]*)\)")


@dataclass
class ComfyRehashResult:
    rows: list[Row]
    host: str
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
        ok = d.error is None
        return {
            "inside ComfyUI: the Step Rehash Sampler's default closer to full compute than DeepCache's setting":
                None if dc is None or not ok else _db(d) > _db(dc),
            "inside ComfyUI: its U-Net time no more than DeepCache's setting's":
                None if dc is None or not ok else d.unet_time_ratio <= dc.unet_time_ratio + 1e-9,
            "inside ComfyUI: no EasyCache node setting better on both axes":
                None if not ran or not ok else not beaten_by(d, ran),
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
    ``cuts_config``). ``quick``: fewer cut timings, for tests."""
    from .comfy_host import import_comfy, load_pack_nodes, model_folder

    say = progress or (lambda _m: None)
    torch.set_num_threads(threads)
    frames = frames or data.DEFAULT_FRAMES
    if shares is None:
        from .bench import cuts as cut_costs

        say(f"timing each cut's tail on the {cuts_config} configuration (bench --cuts)")
        costs = cut_costs(cuts_config, warmup=0 if quick else 1, repeats=1 if quick else 3, threads=threads,
                          direct=(DEEPCACHE_CUT,))
        torch.set_num_threads(threads)
        shares = {c.cut: c.shallow_tail for c in costs.cuts}
        shares_from = f"bench --cuts, {cuts_config} configuration"
    import_comfy(Path(comfyui).expanduser().resolve() if comfyui is not None else None)
    mappings = load_pack_nodes()
    import comfy.model_management
    import nodes
    from comfy_extras.nodes_video_model import VideoLinearCFGGuidance

    host = _host()
    say(f"inside {host} ({Path(comfy.model_management.__file__).resolve().parents[1]})")
    rehash_node = mappings["StepRehashSampler"]
    rehash_module = sys.modules[rehash_node.__module__]
    demo_module = sys.modules[mappings["StreamlineDemoLoader"].__module__]
    model = demo_module.load_fixture_model(weights)
    (guided,) = VideoLinearCFGGuidance().patch(model, MIN_CFG)
    unet = guided.get_model_object("diffusion_model")
    calls = [0]
    hook = unet.middle_block[0].register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    reports = _Reports()
    rehash_log = rehash_module.log
    level = rehash_log.level
    rehash_log.addHandler(reports)
    rehash_log.setLevel(logging.INFO)
    ksampler_inputs = set(nodes.KSampler.INPUT_TYPES()["required"])
    defaults = {name: spec[1]["default"] for name, spec in rehash_node.INPUT_TYPES()["required"].items()
                if name not in ksampler_inputs}

    def inputs(index: int, split: str = "eval"):
        clip = fixture_demo.demo_clip(index, frames, split=split)
        positive, negative = demo_module.conditioning(clip)
        _, _, h, w = clip.first_frame.shape
        return positive, negative, {"samples": torch.zeros(frames, 4, h, w)}

    def ksampler(m: Any) -> Callable[[int, str], torch.Tensor]:
        def sample(index: int, split: str = "eval") -> torch.Tensor:
            positive, negative, latent = inputs(index, split)
            (out,) = nodes.KSampler().sample(m, index, steps, CFG, SAMPLER, SCHEDULER, positive, negative, latent,
                                             denoise=1.0)
            return out["samples"]
        return sample

    def step_rehash(**options: Any) -> Callable[[int, str], torch.Tensor]:
        def sample(index: int, split: str = "eval") -> torch.Tensor:
            positive, negative, latent = inputs(index, split)
            (out,) = rehash_node().sample(guided, index, steps, CFG, SAMPLER, SCHEDULER, positive, negative, latent,
                                          denoise=1.0, **(defaults | options))
            return out["samples"]
        return sample

    seeds = [data.EVAL_SEEDS[k] for k in range(clips)]

    def run(method: str, setting: str, sample: Callable[[int], torch.Tensor], share: float | None,
            reference: torch.Tensor | None, full: tuple[int, float] | None) -> tuple[Row, torch.Tensor | None]:
        calls[0] = 0
        got = []
        start = time.perf_counter()
        try:
            for k in range(clips):
                got.append(data.unpack(sample(k).float()).clamp(0, 1))
                say(f"{setting}: clip {k + 1} of {clips}")
        except Exception as exc:  # noqa: BLE001 - a setting that fails is a result, reported with its error
            say(f"{setting}: raised {type(exc).__name__}: {exc}")
            return Row(method, setting, 0, None, None, None, None, split=SPLIT,
                       error=f"{type(exc).__name__}: {exc}"), None
        seconds = time.perf_counter() - start
        clip_batch = torch.stack(got)
        if full is None:  # the reference itself
            return Row(method, setting, steps, 1.0, None, 0.0, 1.0, split=SPLIT), clip_batch
        full_calls, full_s = full
        ran = calls[0] * steps / full_calls  # full steps per clip, on average
        ratio = (ran + (steps - ran) * share) / steps
        return Row(method, setting, round(ran), ratio, psnr(clip_batch, reference),
                   centroid_px(clip_batch, reference, seeds, frames), seconds / full_s, split=SPLIT), clip_batch

    folder = tempfile.TemporaryDirectory(prefix="streamline-bench-")
    rows: list[Row] = []
    try:
        with model_folder(rehash_module.FOLDER, folder.name, {".json"}):
            start = time.perf_counter()
            full_row, reference = run("full", f"KSampler, {steps} of {steps} steps", ksampler(guided), None, None,
                                      None)
            if full_row.error is not None:
                raise RuntimeError(f"KSampler at full compute failed inside {host}: {full_row.error}")
            full = (calls[0], time.perf_counter() - start)
            rows.append(full_row)
            say(f"full compute on {clips} held-out clips: {full[1]:.1f} s")

            say("the Step Rehash Sampler calibrates on its first run (calibration clip 0)")
            step_rehash()(0, "calibration")
            saved = re.search(r"saved (\S+)", reports.lines[-1] if reports.lines else "")
            calibration = f"saved as {saved[1]}" if saved else f"not saved ({reports.lines[-1:] or 'no report'})"
            default = step_rehash()
            del reports.lines[:]
            row, _ = run("rehash", f"Step Rehash Sampler defaults ({defaults['cut']}, target key steps)", default,
                         shares[defaults["cut"]], reference, full)
            keys = [m for line in reports.lines if (m := KEYS.search(line))]
            if keys:  # the first held-out clip's key steps, as the node reported them
                row.setting += f": {keys[0][1]} key steps ({keys[0][2]})"
            row.default = True
            rows.append(row)
            row, _ = run("deepcache", f"Step Rehash Sampler at {DEEPCACHE_CUT}, uniform interval 2",
                         step_rehash(schedule="uniform interval", interval=2, cut=DEEPCACHE_CUT),
                         shares[DEEPCACHE_CUT], reference, full)
            rows.append(row)
            try:
                from comfy_extras.nodes_easycache import EasyCacheNode
            except ImportError as exc:
                rows.append(Row(EASYCACHE_NODE, "EasyCache", 0, None, None, None, None, split=SPLIT,
                                error=f"this ComfyUI has no EasyCache node ({exc})"))
                thresholds = ()
            for t in thresholds:
                out = EasyCacheNode.execute(guided, reuse_threshold=t, start_percent=EASYCACHE_START,
                                            end_percent=EASYCACHE_END, verbose=False)
                cached = out.result[0] if hasattr(out, "result") else out[0]
                row, _ = run(EASYCACHE_NODE, f"EasyCache node, reuse_threshold {t}", ksampler(cached), 0.0,
                             reference, full)
                rows.append(row)
    finally:
        hook.remove()
        rehash_log.removeHandler(reports)
        rehash_log.setLevel(level)
        folder.cleanup()
    return ComfyRehashResult(rows, host, calibration, steps, clips, frames, threads, shares,
                             shares_from or "given shares")


def format_markdown(r: ComfyRehashResult) -> str:
    head = ["method", "setting", "full steps", "U-Net time", "PSNR (dB)", "centroid error (px)", "wall time (CPU)", ""]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in r.rows:
        if row.error is not None:
            cells = [row.method, row.setting, "-", "-", "-", "-", "-", f"raised {row.error}"]
        else:
            cells = [row.method, row.setting, str(row.full_steps), f"{row.unet_time_ratio:.3f}",
                     "-" if row.method == "full" else _shown(row.psnr_db), f"{row.centroid_px:.3f}",
                     f"{row.measured_ratio:.2f}", "**default**" if row.default else ""]
        lines.append("| " + " | ".join(cells) + " |")
    checks = "\n".join(f"- {name}: {'not measured' if ok is None else 'holds' if ok else 'does not hold'}"
                       for name, ok in r.checks().items())
    note = (f"Measured inside {r.host} on the fixture model (not on SVD), through ComfyUI's own KSampler, "
            f"VideoLinearCFGGuidance and EasyCache nodes and this pack's Step Rehash Sampler: {r.clips} held-out clips "
            f"of {r.frames} frames, {r.steps} steps ({SAMPLER}, {SCHEDULER}, guidance {MIN_CFG:g} to {CFG:g}), each "
            f"against KSampler at full compute from the same seed. Full steps counted at the U-Net's middle block; "
            f"U-Net time: a reuse step costs its cut's share ({r.shares_from}), a skipped step nothing. Wall time: this "
            f"CPU, {r.threads} threads. The Step Rehash Sampler's defaults use the calibration the node made itself on "
            f"its first run, on a calibration clip ({r.calibration}).")
    return "\n".join(lines) + "\n\n" + note + "\n\nTargets:\n" + checks + "\n"


__all__ = ["ComfyRehashResult", "bench_rehash_comfyui", "format_markdown"]
