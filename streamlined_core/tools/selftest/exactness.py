"""``streamline selftest exactness``: property-based exactness, counted.

For each category (an architecture under one attention backend or weight path), hypothesis draws
tiny configurations, call shapes, per-group slice counts and modes, and fp32 or bf16, and each
example holds the engine's sliced run to the host's own forward (:mod:`.contract`). The profile sets
how many examples each category draws (a fixed seed per category: the same examples on every run). A failure is
shrunk to its smallest example, reported, and the command exits 1; shrunk failures are kept as
regular tests (``REGRESSIONS``). Each category also checks that ``streamline()`` leaves the model
exactly as it was after a run that succeeds and one that raises.

``STREAMLINE_SELFTEST_WRONG`` (set only by the tests) switches on a deliberately wrong variant so the
counts are shown to be able to fail: ``norm-stats`` (per-slice statistics: each slice's own norm statistics,
and Wan's per-frame modulation mapped by each token slice's own length) fails every category's exactness,
``skip-restore`` (a handle that does not restore the model) its restore check.
"""

from __future__ import annotations

import copy
import os
import time
import zlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch

from ..configs import quiet_diffusers
from .archs import Arch, Shape
from .contract import LOW_PRECISION_RATIO, LOW_PRECISION_TOL, TOL, Coverage, Subject, drawn, per_slice_statistics, rel

WRONG_ENV = "STREAMLINE_SELFTEST_WRONG"
WRONG_VARIANTS = ("norm-stats", "skip-restore")
SLICES = (1, 2, 3, 4, 7, 10_000)  # per group, clamped to its axis: 10_000 is the most slicing
MODES = ("keep", "recompute")
CONDITIONED_RATIO = 2.0  # an ill-conditioned example: our error against fp64 at most 2x the host's own rounding
CONDITIONED_CAP = 0.1  # an error over 10% of the output's magnitude is no rounding: failed without the fp64 forward
SPREAD_DRAWS = 2  # runs of the host with one-ulp noise on every layer's output: how far rounding alone moves it
# Examples per category: (diffusers architecture, ComfyUI architecture under one backend or weight path).
PROFILES = {"ci": (10, 3), "full": (200, 50)}
# Shrunk failures, replayed before the drawn examples: (architecture key, configuration, shape, slices, modes, dtype).
REGRESSIONS: list[tuple[str, dict, Shape, tuple[int, ...], tuple[str, ...], str]] = [
    # a 1x1 latent sliced by frames: the host's GroupNorm refused one item alone (slicing.paired)
    ("diffusers-svd-unet", {"block_out_channels": (32, 32), "attention": [False, False, False], "layers_per_block": 1,
                            "num_attention_heads": 1, "cross_attention_dim": 16, "addition_time_embed_dim": 8},
     (1, 2, 1, 1), (2,), ("keep",), "fp32"),
    # the same in a VAE decoder's whole-frame tiles
    ("diffusers-svd-vae", {"block_out_channels": (32, 32), "layers_per_block": 1}, (1, 2, 1, 1), (2,), ("keep",), "fp32"),
    # a 1x2 latent: the host's own fp32 output is 1e-4 from the fp64 forward, and so is the sliced run's
    ("diffusers-svd-unet", {"block_out_channels": (32, 32), "attention": [False, False, False], "layers_per_block": 1,
                            "num_attention_heads": 1, "cross_attention_dim": 16, "addition_time_embed_dim": 8},
     (1, 2, 1, 2), (2,), ("keep",), "fp32"),
    # ComfyUI, two videos at a 2x1 latent, unsliced: the temporal ResBlocks' whole run viewed the video with other
    # strides than the host's, its GroupNorm took another kernel, and groups of two values made that 0.24
    ("comfyui-svd-unet", {"model_channels": 32, "mults": [2], "num_res_blocks": [2, 1, 1],
                          "attention": [True, False, False], "num_head_channels": 16, "context_dim": 32,
                          "adm_in_channels": 256}, (2, 3, 2, 1), (1,), ("keep",), "fp32"),
    # the same at 2x2, sliced by two: 5.9e-5 from the fp64 forward where the host's own output is 7e-6, and one-ulp
    # noise on the host's layers moves it 2.5e-4 (ill-conditioned, judged by the host's spread)
    ("comfyui-svd-unet", {"model_channels": 32, "mults": [2], "num_res_blocks": [2, 1, 1],
                          "attention": [True, False, False], "num_head_channels": 16, "context_dim": 32,
                          "adm_in_channels": 256}, (2, 3, 2, 2), (2,), ("keep",), "fp32"),
]


@dataclass
class Failure:
    check: str  # "exactness" or "restore"
    example: dict
    message: str


@dataclass
class CategoryResult:
    arch: str
    path: str  # the attention backend or weight path ("default" where the host has no choice)
    host: str  # "diffusers x.y" or "ComfyUI x.y"
    examples: int = 0  # drawn examples that ran (not the kept failures replayed first, nor shrinking's re-runs)
    regressions: int = 0  # kept failures replayed first
    completions: int = 0  # examples run again with every group at two slices, for groups the draws never sliced
    rejected: int = 0  # drawn examples the host itself could not run
    fp32: int = 0
    bf16: int = 0
    groups_sliced: int = 0
    groups_seen: int = 0
    never_sliced: list[str] = field(default_factory=list)
    worst_fp32: float = 0.0
    ill_conditioned: int = 0  # fp32 examples over 1e-5 where the host's own output is as far from fp64
    restore_runs: int = 0
    failures: list[Failure] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return bool(self.failures)

    def as_dict(self) -> dict:
        return asdict(self) | {"failed": self.failed}


def wrong_variant() -> str | None:
    """The wrong variant the tests switched on, or None (the real engine)."""
    value = os.environ.get(WRONG_ENV) or None
    if value is not None and value not in WRONG_VARIANTS:
        raise ValueError(f"{WRONG_ENV} must be one of {', '.join(WRONG_VARIANTS)}; got {value!r}")
    return value


class Models:
    """The models a category's examples use, built once per configuration (and per dtype)."""

    def __init__(self, arch: Arch, keep: int = 4) -> None:
        self.arch, self.keep = arch, keep
        self._cache: dict[tuple, torch.nn.Module] = {}

    def get(self, config: dict, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        key = (repr(sorted(config.items())), dtype)
        if dtype == torch.float64:  # the rare fp64 judge: built when needed, not kept (twice the fp32 weights)
            with quiet_diffusers():
                return copy.deepcopy(self.get(config)).to(dtype)
        if key not in self._cache:
            if len(self._cache) >= self.keep:
                self._cache.pop(next(iter(self._cache)))
            base = self.get(config) if dtype != torch.float32 else self.arch.build(config)
            if dtype == torch.float32:
                self._cache[key] = base
            else:
                with quiet_diffusers():
                    self._cache[key] = copy.deepcopy(base).to(dtype)
        return self._cache[key]


def check_example(arch: Arch, models: Models, config: dict, shape: Shape, slices, modes, dtype: str,
                  coverage: Coverage, ill_conditioned: list[float]) -> float:
    """One example: the engine at the drawn slicing against the host's forward. Returns the fp32 error (or
    the bf16 error's excess over the bound, negative when within it); raises AssertionError when it fails.
    An fp32 example over 1e-5 (and at most ``CONDITIONED_CAP``) whose output is as close to the fp64 forward
    as the host's own is (within ``CONDITIONED_RATIO``) passes and is counted in ``ill_conditioned``."""
    model = models.get(config)
    record = Coverage()
    with torch.no_grad():
        subject = arch.subject(model, shape, torch.float32)
        try:
            reference = subject.reference()
        except Exception as e:  # a shape the host itself cannot run (GroupNorm of one value, say): not ours
            raise _Unusable(f"the host's own forward raised {type(e).__name__}: {e}") from None
        if not (torch.isfinite(reference).all() and reference.std() > 0):
            raise _Unusable("the host's output is not finite or constant: the comparison would prove nothing")
        if dtype == "fp32":
            out = subject.engine(drawn(slices, modes, [record.record]))
            assert out.shape == reference.shape, f"shape {tuple(out.shape)} != {tuple(reference.shape)}"
            error = rel(out, reference)
            coverage.merge(record)
            if error <= TOL:
                return error
            _host_repeats(subject, reference)
            # Over 1e-5: where its norms see a handful of values (a 1x2 latent, two values per group), the host's
            # own fp32 output moves that far when its rounding changes. Measured: the host with one-ulp noise
            # on every layer's output (its spread), and the host's own distance from the fp64 forward. The
            # sliced run, rounded differently, is judged against the fp64 forward within twice the larger.
            spread = host_spread(model, subject, reference)
            if spread > CONDITIONED_CAP:
                raise _Unusable(f"one-ulp noise on the host's layers moves its output {spread:.3g} of its magnitude: "
                                "too ill-conditioned to judge anything")
            assert error <= CONDITIONED_CAP, f"fp32: max error {error:.3g} of the output's magnitude > {TOL:g}"
            truth = arch.subject(models.get(config, torch.float64), shape, torch.float64).reference()
            host, ours = rel(reference, truth), rel(out, truth)
            noise = max(host, spread)
            assert ours <= CONDITIONED_RATIO * noise + TOL, (
                f"fp32: max error {error:.3g} of the output's magnitude > {TOL:g}; against the fp64 forward "
                f"{ours:.3g}, the host's own fp32 output {host:.3g}, the host under one-ulp noise {spread:.3g}")
            ill_conditioned.append(error)
            return ours - noise
        low_model = models.get(config, torch.bfloat16)
        low = arch.subject(low_model, shape, torch.bfloat16)
        try:
            low_reference = low.reference().float()
        except Exception as e:  # an operator the host's bf16 path lacks on this device: not ours
            raise _Unusable(f"the host's own bf16 forward raised {type(e).__name__}: {e}") from None
        if not torch.isfinite(low_reference).all():
            raise _Unusable("the host's own bf16 output is not finite")
        unsliced = (low_reference - reference).abs().max().item()
        out = low.engine(drawn(slices, modes, [record.record]))
        assert out.shape == low_reference.shape, f"shape {tuple(out.shape)} != {tuple(low_reference.shape)}"
        coverage.merge(record)
        sliced = (out.float() - reference).abs().max().item()
        magnitude = reference.abs().max().item()
        bound = LOW_PRECISION_RATIO * unsliced + LOW_PRECISION_TOL * magnitude
        if not sliced <= bound:
            # one bf16 run's error is one draw of its rounding: the host's other draws (one-ulp bf16 noise on
            # every layer's output) say how far its own error goes
            _host_repeats(low, low_reference)
            unsliced = max(unsliced, host_spread(low_model, low, reference, against_reference=True))
            bound = LOW_PRECISION_RATIO * unsliced + LOW_PRECISION_TOL * magnitude
        assert sliced <= bound, (f"bf16: sliced max error {sliced:.3g} > 1.5 x the unsliced run's {unsliced:.3g} + "
                                 f"1e-3 of the output's magnitude ({bound:.3g})")
        return sliced - bound


def _host_repeats(subject: Subject, reference: torch.Tensor, runs: int = 2) -> None:
    """Before a failure is reported: the host's own forward, run again, must give its output bitwise. Some CPU
    kernels are not deterministic on some shapes (a bf16 forward that is NaN on its first call only, seen on a
    9x1 latent): no comparison with such a host says anything about the engine."""
    for _ in range(runs):
        again = subject.reference().float()
        if not torch.equal(torch.nan_to_num(again, 1e30), torch.nan_to_num(reference.float(), 1e30)):
            raise _Unusable("the host's own forward is not deterministic on this example (two runs differ)")


def host_spread(model: torch.nn.Module, subject: Subject, reference: torch.Tensor, draws: int = SPREAD_DRAWS,
                against_reference: bool = False) -> float:
    """How far the host's own output moves when its rounding changes: its forward with every layer's floating
    output scaled by ``1 + r * eps`` (``r`` = +-1 drawn per value, ``eps`` the output dtype's machine epsilon, one
    ulp), the largest error of ``draws`` such runs against ``reference`` (relative, as :func:`rel`; with
    ``against_reference`` the absolute max error, the bf16 rule's unit). Slicing changes the rounding of the same
    layers, so an example whose spread is large is ill-conditioned, not inexact."""
    gen = torch.Generator().manual_seed(0)

    def noise(_module, _args, out):
        if isinstance(out, torch.Tensor) and out.is_floating_point() and out.numel():
            r = torch.randint(0, 2, out.shape, generator=gen).to(torch.float32).mul_(2).sub_(1)
            return (out.float() * (1 + torch.finfo(out.dtype).eps * r)).to(out.dtype)
        return None

    hooks = [m.register_forward_hook(noise) for m in model.modules() if next(m.children(), None) is None]
    try:
        errors = []
        for _ in range(draws):
            out = subject.reference().float()
            errors.append((out - reference).abs().max().item() if against_reference else rel(out, reference))
        return max(errors)
    finally:
        for hook in hooks:
            hook.remove()


class _Unusable(Exception):
    """The drawn example cannot test anything (the host's own output is degenerate): rejected."""


def check_restore(arch: Arch, model: torch.nn.Module, shape: Shape) -> int:
    """``streamline()`` on the model, a run, removal; then a run that raises inside, removal: every module's
    attributes and every weight as before, and the host's output bitwise as before. Returns the runs made."""
    from ... import streamline
    from ...engine.api import StreamlineHandle

    with torch.no_grad():
        reference = arch.subject(model, shape, torch.float32).reference()
    before = _snapshot(model)  # after a plain call: what the host's own call leaves set (ADE's video length)
    wrong = wrong_variant() == "skip-restore"
    original_remove = StreamlineHandle._remove
    if wrong:
        StreamlineHandle._remove = lambda self, keep_rehash: None
    runs = 0
    try:
        for fail in (False, True):
            handle = streamline(model, slices=3)
            interrupted = False
            try:
                assert _changes(before, _snapshot(model)), "streamline() patched nothing this check could see"
                with torch.no_grad(), (_interrupt_second_group() if fail else _null()):
                    arch.subject(model, shape, torch.float32).reference()
            except _Interrupted:
                interrupted = True
            finally:
                handle.remove()
            runs += 1
            assert interrupted == fail, "the run meant to fail inside the engine did not"
            changed = _changes(before, _snapshot(model))
            assert not changed, f"after a {'failed' if fail else 'successful'} run and remove(): {changed[:3]}"
            with torch.no_grad():
                again = arch.subject(model, shape, torch.float32).reference()
            assert torch.equal(again, reference), "the restored model's output differs from before"
    finally:
        StreamlineHandle._remove = original_remove
    return runs


class _Interrupted(Exception):
    """Raised inside the engine's run by :func:`_interrupt_second_group`."""


@contextmanager
def _interrupt_second_group() -> Iterator[None]:
    """The engine's runner raises as it starts its second layer group (a run that fails half way)."""
    from ...engine import slicing

    original, calls = slicing.Runner.run, [0]

    def run(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            raise _Interrupted("interrupted inside the engine")
        return original(self, *args, **kwargs)

    slicing.Runner.run = run
    try:
        yield
    finally:
        slicing.Runner.run = original


def _snapshot(model: torch.nn.Module) -> dict:
    out = {}
    for name, module in model.named_modules():
        out[name] = {k: (v if not isinstance(v, dict) else dict(v)) for k, v in module.__dict__.items()}
    return out


def _changes(before: dict, after: dict) -> list[str]:
    changed = []
    for name in set(before) | set(after):
        a, b = before.get(name, {}), after.get(name, {})
        for key in set(a) | set(b):
            if key not in a or key not in b:
                changed.append(f"{name or 'model'}.{key} {'added' if key in b else 'removed'}")
            elif isinstance(a[key], dict):
                if a[key].keys() != b[key].keys() or any(a[key][k] is not b[key][k] for k in a[key]):
                    changed.append(f"{name or 'model'}.{key} changed")
            elif a[key] is not b[key] and not _same_value(a[key], b[key]):
                changed.append(f"{name or 'model'}.{key} changed")
    return sorted(changed)


def _same_value(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:
        return False


def run_category(arch: Arch, path: str, host: str, examples: int, *, wrong: str | None = None,
                 progress: Callable[[str], None] | None = None, regressions: Iterable | None = None,
                 shrink: bool = True) -> CategoryResult:
    """Draw ``examples`` examples of ``arch`` (a fixed seed per category) and check each; then check restoration."""
    from hypothesis import HealthCheck, Phase, given, reject, seed, settings
    from hypothesis import strategies as st
    from hypothesis.errors import Unsatisfiable

    result = CategoryResult(arch.key, path, host)
    start = time.perf_counter()
    models = Models(arch)
    coverage = Coverage()
    last: list[dict] = []
    failing: list[bool] = []  # set at the first failure: later runs are hypothesis shrinking it
    ill_conditioned: list[float] = []
    rejections: list[str] = []
    first_seen: dict[str, tuple] = {}  # group -> the first passing example that ran it with an axis of two or more

    def one(config, shape, slices, modes, dtype, counted=True):
        """One example; raises _Unusable (the host cannot run it) or AssertionError (with the example kept)."""
        example = {"config": config, "shape": list(shape), "slices": list(slices), "modes": list(modes), "dtype": dtype}
        last[:] = [example]
        seen = set(coverage.seen)
        try:
            error = check_example(arch, models, config, shape, tuple(slices), tuple(modes), dtype, coverage,
                                  ill_conditioned)
        except _Unusable as e:
            result.rejected += counted and not failing
            if len(rejections) < 3:
                rejections.append(f"{example['config']} {example['shape']}: {e}")
            raise
        except AssertionError as e:
            failing.append(True)
            last[:] = [example | {"message": str(e)}]
            raise
        except Exception as e:  # the engine raised where the host ran: a failure, reported with its example
            failing.append(True)
            last[:] = [example | {"message": f"the engine raised {type(e).__name__}: {e}"}]
            raise AssertionError(last[0]["message"]) from e
        for name in coverage.seen - seen:
            first_seen.setdefault(name, (config, tuple(shape)))
        if not counted or failing:  # a regression replay, or a re-run while shrinking: not a drawn example
            return
        result.examples += 1
        setattr(result, dtype, getattr(result, dtype) + 1)
        if dtype == "fp32" and error <= TOL:
            result.worst_fp32 = max(result.worst_fp32, error)
        if progress and result.examples % 10 == 0:
            progress(f"{arch.key} [{path}]: {result.examples}/{examples} examples")

    def replay_regressions():
        for key, config, shape, slices, modes, dtype in (REGRESSIONS if regressions is None else regressions):
            if key != arch.key:
                continue
            result.regressions += 1
            try:
                one(config, shape, slices, modes, dtype, counted=False)
            except _Unusable as e:
                result.failures.append(Failure("exactness", last[0], f"a kept failure no longer runs on the host: {e}"))
            except AssertionError as e:
                example = dict(last[0])
                result.failures.append(Failure("exactness", example, example.pop("message", str(e))))
        failing.clear()

    # a wrong variant fails at once: its first failure is the answer, not worth shrinking
    phases = (Phase.explicit, Phase.generate) if wrong or not shrink else (Phase.explicit, Phase.generate, Phase.shrink)

    @seed(zlib.crc32(f"{arch.key}|{path}".encode()))  # fixed per category: every run draws the same examples
    @settings(max_examples=examples, database=None, deadline=None, phases=phases,
              suppress_health_check=list(HealthCheck), print_blob=False, report_multiple_bugs=False)
    @given(st.data())
    def prop(data):
        config = data.draw(arch.configs(st), label="config")
        shape = data.draw(arch.shapes(st, config), label="shape")
        slices = data.draw(st.lists(st.sampled_from(SLICES), min_size=1, max_size=5), label="slices")
        modes = data.draw(st.lists(st.sampled_from(MODES), min_size=1, max_size=3), label="modes")
        dtype = data.draw(st.sampled_from(arch.dtypes), label="dtype")
        try:
            one(config, shape, slices, modes, dtype)
        except _Unusable:
            reject()

    context = per_slice_statistics() if wrong == "norm-stats" else _null()
    with context:
        replay_regressions()
        try:
            prop()
        except AssertionError as e:
            example = dict(last[0]) if last else {}
            result.failures.append(Failure("exactness", example, example.pop("message", str(e))))
        except Unsatisfiable:
            result.failures.append(Failure("exactness", {}, "no drawn example could run on the host: "
                                           + "; ".join(rejections)))
        except Exception as e:  # hypothesis itself (a flaky example): reported, not raised
            result.failures.append(Failure("exactness", dict(last[0]) if last else {}, f"{type(e).__name__}: {e}"))
        if not result.failures:
            complete_coverage(one, coverage, first_seen, result)
    if result.rejected:
        result.notes.append(f"{result.rejected} drawn examples the host itself cannot run, e.g. {rejections[0][:240]}")
    result.ill_conditioned = len(ill_conditioned)
    result.groups_seen, result.groups_sliced = len(coverage.seen), len(coverage.sliced)
    result.never_sliced = coverage.never_sliced()
    try:
        config = last[0]["config"] if last else None
        if config is not None:
            result.restore_runs = check_restore(arch, models.get(config), (1, 2, 4, 4))
    except Exception as e:
        message = str(e) if isinstance(e, AssertionError) else f"{type(e).__name__}: {e}"
        result.failures.append(Failure("restore", {"config": config, "shape": [1, 2, 4, 4]}, message))
    result.seconds = time.perf_counter() - start
    return result


def complete_coverage(one: Callable, coverage: Coverage, first_seen: dict[str, tuple], result: CategoryResult) -> None:
    """Every group sliced in at least one example: a group the drawn examples ran but never sliced (its draws
    gave it one slice) gets the first example that ran it again, every group at two slices, in fp32."""
    for name in coverage.never_sliced():
        if name in coverage.sliced or name not in first_seen:  # sliced by an earlier completion
            continue
        config, shape = first_seen[name]
        try:
            one(config, shape, (2,), ("keep",), "fp32", counted=False)
        except _Unusable:
            continue
        except AssertionError as e:
            example = {"config": config, "shape": list(shape), "slices": [2], "modes": ["keep"], "dtype": "fp32"}
            result.failures.append(Failure("exactness", example, f"completing coverage of {name}: {e}"))
            return
        result.completions += 1


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
