"""The one contract every adapter and loop is held to, bound to each model by the test files.

For a call of a model (a :class:`Subject`: the host's own forward, and the engine's forward given a
:class:`~streamlined_core.engine.slicing.Runner`):

* sliced equals unsliced: max abs difference at most ``TOL`` of the output's max magnitude, fp32
  (docs/benchmarks.md); one slice is the control, and :class:`Coverage` records which groups ran sliced;
* every cut point, captured in one full forward: the tail from the captured state equals the full
  forward (bitwise on the CPU in fp32 when nothing is sliced, within ``TOL`` when sliced); for middle
  and up cuts, the shallow path that recomputes the skips plus the tail, fed that forward's deep
  feature, equals it too; stopping at a cut returns the state a capture records;
* per-slice norm statistics (the approximation the paper's released code makes) fail the first check.

Removal (the model exactly as before) is checked where each adapter is patched: ``streamline()``'s
handle, the node's clone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from streamlined_core.engine import slicing
from streamlined_core.engine.slicing import Runner
from streamlined_core.engine.stages import CutState, StageRequest
from streamlined_core.tools.selftest.contract import TOL, Coverage, Subject, check_sliced, forced, rel  # noqa: F401


def check_per_slice_statistics_fail(subject: Subject, monkeypatch, slices: int = 4) -> None:
    """The same comparison with per-slice norm statistics must fail (so it can fail at all)."""
    monkeypatch.setattr(slicing, "group_norm", lambda x, stats, eps, affine: F.group_norm(x, stats.num_groups, affine[0], affine[1], eps))
    assert check_sliced(subject, slices) > 10 * TOL


def banded(band_rows: int, coverage: Coverage | None = None) -> Runner:
    """A runner that runs every ``"tiles"`` group in row bands of about ``band_rows`` rows (every frame
    alone) and every other group whole, so what a test sees is the bands' doing."""
    def decide(_name, axis, length):
        return (slicing.ceil_div(length, band_rows), "keep") if axis == "tiles" else (1, "keep")

    return Runner(decide, [coverage.record] if coverage else [])


def check_banded(subject: Subject, band_rows: int, coverage: Coverage | None = None) -> float:
    """The engine with its tiles groups in row bands against the host's own forward: the error."""
    with torch.no_grad():
        reference = subject.reference()
        out = subject.engine(banded(band_rows, coverage))
    assert torch.isfinite(reference).all() and reference.std() > 0, "the comparison would prove nothing"
    assert out.shape == reference.shape
    return rel(out, reference)


def check_bands_fail_without_statistics_or_halos(subject: Subject, monkeypatch, band_rows: int = 3) -> None:
    """Row bands with per-band norm statistics, and row bands without halo rows, must each fail."""
    import dataclasses

    with monkeypatch.context() as m:
        m.setattr(slicing, "group_norm", lambda x, stats, eps, affine: F.group_norm(x, stats.num_groups, affine[0], affine[1], eps))
        assert check_banded(subject, band_rows) > 10 * TOL
    original = slicing.spatial_resblock
    with monkeypatch.context() as m:
        m.setattr(slicing, "spatial_resblock",
                  lambda runner, name, block, x, **kw: original(runner, name, dataclasses.replace(block, halo=0), x, **kw))
        assert check_banded(subject, band_rows) > 10 * TOL


# Every cut check of this test session, for the summary the suite prints (tests/conftest.py).
CUT_CHECKS: list[CutReport] = []


@dataclass
class CutReport:
    cuts: int = 0
    tails: int = 0
    shallow: int = 0
    worst: float = 0.0
    seconds: float = 0.0  # wall time of the whole check (the contract's share of CI)


def check_cuts(subject: Subject, slices: int = 1) -> CutReport:
    """Capture every cut in one full forward, then run each tail (and each shallow path plus tail) from it."""
    start = time.perf_counter()
    report = CutReport(cuts=len(subject.cuts))
    ids = [c.id for c in subject.cuts]
    assert len(set(ids)) == len(ids), "canonical cut ids are unique"
    with torch.no_grad():
        request = StageRequest(capture=frozenset(ids))
        full = subject.engine(forced(slices, request=request))
        (captured,) = request.captures
        assert set(captured) == set(ids), f"not captured: {sorted(set(ids) - set(captured))}"
        expected = full if slices == 1 else subject.reference()
        if slices > 1:
            assert rel(full, expected) <= TOL

        def same(out: torch.Tensor, what: str) -> None:
            if slices == 1:
                assert torch.equal(out, full), f"{what} differs from the full forward by {rel(out, full):.3g}"
            else:
                error = rel(out, expected)
                report.worst = max(report.worst, error)
                assert error <= TOL, f"{what}: {error:.3g}"

        for cut in subject.cuts:
            state = captured[cut.id]
            assert len(state.skips) == cut.skips
            same(subject.engine(forced(slices, request=StageRequest(start=state))), f"tail from {cut.id}")
            report.tails += 1
            if cut.section in ("mid", "up"):
                shallow = StageRequest(start=CutState(cut.id, state.h, [], state.pending), recompute_skips=True)
                same(subject.engine(forced(slices, request=shallow)), f"shallow path + tail at {cut.id}")
                report.shallow += 1
        if slices == 1:  # stopping at a cut returns what a capture records there
            middle = subject.cuts[len(subject.cuts) // 2]
            stopped = subject.engine(forced(1, request=StageRequest(stop=middle.id)))
            assert isinstance(stopped, CutState) and same_state(stopped, captured[middle.id])
    report.seconds = time.perf_counter() - start
    CUT_CHECKS.append(report)
    return report


def same_state(a: CutState, b: CutState) -> bool:
    """Bitwise-equal feature and skips, the same pending upsampler and shape."""
    pending = (a.pending is None and b.pending is None) or (
        a.pending is not None and b.pending is not None and a.pending.module is b.pending.module
        and tuple(a.pending.skip_shape or ()) == tuple(b.pending.skip_shape or ()))
    return (a.cut == b.cut and torch.equal(a.h, b.h) and len(a.skips) == len(b.skips)
            and all(torch.equal(x, y) for x, y in zip(a.skips, b.skips)) and pending)


def _fresh_control(control):
    return None if control is None else {k: list(v) for k, v in control.items()}


class ComfyProbe:
    """Takes a ComfyUI clone's engine object patch and sits where the engine sits, inside every wrapper
    (so AnimateDiff-Evolved's injected modules and cross-frame norms are active for both sides): each
    U-Net call runs the host's own ``_forward`` and the engine on the same inputs and records the error.

    ``cuts``: the first call also runs :func:`check_cuts` on the engine's stage loop, unsliced.
    ``fallback_captures``: the first call also checks that the module-level fallback's captures equal
    the stage loop's.
    """

    def __init__(self, patched, coverage: Coverage | None = None, cuts: bool = False, fallback_captures: bool = False):
        self.engine = patched.object_patches["diffusion_model._forward"]
        self.coverage = coverage or Coverage()
        self.cuts, self.fallback_captures = cuts, fallback_captures
        self.errors: list[float] = []
        self.reports: list[CutReport] = []
        self.captures_compared = 0
        self.calls: list[dict] = []  # per call: what was active (filled by ``observe``)
        self.observe: Callable[[Any], dict] | None = None
        patched.add_object_patch("diffusion_model._forward", self)

    def __call__(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):
        import sys

        from streamlined_core.engine.arch import comfy_unet

        # the engine's own copy of the core (ComfyUI loads the pack by path): its run context
        listen = sys.modules[type(self.engine).__module__.rsplit(".", 1)[0] + ".context"].listen
        unet = self.engine.unet
        if self.observe is not None:
            self.calls.append(self.observe(unet))
        with torch.no_grad():
            reference = type(unet)._forward(unet, x, timesteps, context, y, _fresh_control(control),
                                            dict(transformer_options), **kwargs)
        first = not self.errors
        if first and (self.cuts or self.fallback_captures):
            def engine_with(forward):
                return lambda runner: forward(unet, runner, x, timesteps, context, y, _fresh_control(control),
                                              dict(transformer_options), **kwargs)

            subject = Subject(lambda: reference, engine_with(comfy_unet.streamlined_forward), comfy_unet.cuts(unet))
            if self.cuts:
                self.reports.append(check_cuts(subject))
            if self.fallback_captures:
                ids = frozenset(c.id for c in subject.cuts)
                owned, fallback = StageRequest(capture=ids), StageRequest(capture=ids)
                with torch.no_grad():
                    subject.engine(forced(1, request=owned))
                    engine_with(comfy_unet.module_level_forward)(forced(1, request=fallback))
                for cut in ids:
                    assert same_state(fallback.captures[0][cut], owned.captures[0][cut]), cut
                self.captures_compared = len(ids)
        with listen(self.coverage.record):
            out = self.engine(x, timesteps, context, y, control, transformer_options, **kwargs)
        self.errors.append(rel(out, reference))
        return out


def diffusers_svd_call(shape: tuple[int, int, int, int], std: float = 0.1):
    """A seeded tiny diffusers SVD U-Net, inputs of ``shape`` (batch, frames, height, width in pixels) and its own
    output on them: ``(model, args, kwargs, reference)``."""
    from streamlined_core.tools import configs

    model = configs.seed_weights(configs.build_tiny_diffusers_svd(), std=std)
    torch.manual_seed(0)
    args, kwargs = configs.diffusers_svd_inputs(model, *shape)
    with torch.no_grad():
        reference = model(*args, **kwargs)[0]
    return model, args, kwargs, reference


from streamlined_core.tools.selftest.comfy_graph import out_of_memory  # noqa: E402,F401  (the tests' injector too)


def pack_module(pack, name):
    """A module of the engine as the pack loaded it (ComfyUI imports the pack by path: one copy)."""
    import sys

    return sys.modules[f"{pack.__name__}.streamlined_core.{name}"]
