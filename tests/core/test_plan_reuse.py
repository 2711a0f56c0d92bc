"""Plans reused: a known call shape is planned again without measuring (a second engine, a second model
built alike, a new budget), groups are measured sliced only where a plan needs it, groups measured before
are replayed, runs are counted, never timed, and every reused plan equals a fresh one."""

import pytest
import torch

from streamlined_core.engine import plan as plan_module
from streamlined_core.engine.api import Streamliner
from streamlined_core.engine.arch import engine_adapter
from streamlined_core.engine.plan import VERIFY_ROUNDS
from streamlined_core.engine.plan_store import PLANS, PlanStore, structure_key
from streamlined_core.tools import configs

SHAPE = (2, 3, 64, 96)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def runs(monkeypatch):
    """Every meta run any planner makes, counted."""
    made = []
    measure = plan_module.measure_groups

    def counted(run, decide, records=None):
        made.append(decide)
        return measure(run, decide, records)

    monkeypatch.setattr(plan_module, "measure_groups", counted)
    PLANS.clear()
    yield made
    PLANS.clear()


def svd(seed: int = 0):
    torch.manual_seed(seed)
    return configs.seed_weights(configs.build_tiny_diffusers_svd(), std=0.1)


def engine(model, budget=None, slices="auto"):
    return Streamliner(model, engine_adapter(model), slices, budget)


def arguments(model, e):
    args, kwargs = configs.diffusers_svd_inputs(model, *SHAPE)
    return e._arguments(args, kwargs)


def fresh_plan(model, budget=None):
    """The plan a process that never planned this shape makes."""
    saved = dict(PLANS._entries)
    PLANS.clear()
    try:
        e = engine(model, budget)
        return e._plan(arguments(model, e))
    finally:
        PLANS._entries.update(saved)


def test_a_second_engine_and_a_model_built_alike_plan_a_known_shape_without_a_run(runs):
    model = svd()
    first = engine(model)
    plan = first._plan(arguments(model, first))
    assert first._planner(arguments(model, first)).runs == len(runs) >= 4  # whole, the three fit runs, verify runs
    made = len(runs)

    again = engine(model)  # ComfyUI's node run again with other settings: a new engine on the same model
    assert again._plan(arguments(model, again)) == plan and again._plan(arguments(model, again)).groups == plan.groups
    alike = svd(seed=1)  # another model of the same structure (other weights)
    other = engine(alike)
    assert other._plan(arguments(alike, other)) == plan
    assert len(runs) == made, "a reused plan made a meta run"
    assert again._planner(arguments(model, again)).runs == other._planner(arguments(alike, other)).runs == 0

    assert fresh_plan(model) == plan  # and it is the plan a fresh planner makes
    assert len(runs) > made


def test_a_new_budget_for_a_known_shape_makes_no_measurement_run_and_equals_a_fresh_plan(runs):
    model = svd()
    e = engine(model)
    planner = e._planner(arguments(model, e))
    measured = len(runs)
    unsliced = planner.unsliced_peak()
    weights = planner.weights_bytes
    budget = weights + planner.least_peak() + (unsliced - planner.least_peak()) // 3
    first = engine(model, budget)._plan(arguments(model, e))
    verify = len(runs) - measured
    assert 1 <= verify <= VERIFY_ROUNDS + 1

    # A slightly different budget (as one read from free memory at run time; this model's peaks are a few
    # hundred KiB): the same choice, whose runs are known: no run at all.
    nearby = engine(model, budget + 64)
    assert nearby._plan(arguments(model, nearby)) == first == fresh_plan(model, budget + 64)
    assert nearby._planner(arguments(model, nearby)).runs == 0

    # A much smaller budget: another choice, measured by verify runs only (never the four measurement runs).
    before = len(runs)
    tight_budget = weights + planner.least_peak() + (unsliced - planner.least_peak()) // 20
    tight = engine(model, tight_budget)
    plan = tight._plan(arguments(model, tight))
    assert tight._planner(arguments(model, tight)).runs == len(runs) - before <= VERIFY_ROUNDS + 1
    assert plan == fresh_plan(model, tight_budget)
    assert sum(g.slices for g in plan.groups) > sum(g.slices for g in first.groups)


def test_a_chosen_plan_a_measurement_run_made_is_not_measured_again(runs):
    """A budget above the unsliced peak slices nothing: that is the first measurement run's plan (every group
    whole), and its figures are that run's, so the planner makes that one run: no group is measured sliced
    and no verify run is made."""
    model = svd()
    plan = engine(model, 10**12)._plan(arguments(model, engine(model)))
    assert all(g.slices == 1 for g in plan.groups)
    assert len(runs) == 1
    assert plan == fresh_plan(model, 10**12)


def test_groups_are_measured_sliced_only_where_a_plan_needs_it_and_plan_as_when_all_are(runs):
    """A budget between the least and the unsliced peak slices only the groups over it whole: only they are
    measured sliced (the fit runs run every other group whole), and the plan equals the one a planner that
    measured every group sliced first (asked for the least reachable peak) makes."""
    model = svd()
    e = engine(model)
    planner = e._planner(arguments(model, e))
    whole = {name: m.peaks[(1, "keep")] for name, m in planner.groups.items()}
    budget = sorted(whole.values())[len(whole) * 3 // 4]  # a quarter of the groups over it
    plan = planner.plan(budget)
    sliced = {name for name, m in planner.groups.items() if len(m.peaks) > 1}
    assert sliced and sliced <= {name for name, peak in whole.items() if peak > budget}
    assert len(sliced) < len(whole)

    PLANS.clear()
    eager = engine(model)._planner(arguments(model, e))
    eager.least_peak()  # every group measured sliced
    assert all(len(m.peaks) > 1 for m in eager.groups.values() if m.length > 1)
    assert eager.plan(budget) == plan


def test_the_structure_key_tells_models_apart_by_shape_and_attributes_not_by_weights():
    a, b = svd(0), svd(1)
    assert structure_key(a) == structure_key(b)
    half = svd(0).half()
    assert structure_key(half) != structure_key(a)
    other = svd(0)
    next(m for m in other.modules() if isinstance(m, torch.nn.GroupNorm)).eps = 1e-3
    assert structure_key(other) != structure_key(a)
    other = svd(0)
    other.train()  # dropout would make masks
    assert structure_key(other) != structure_key(a)


def test_the_store_keeps_the_shapes_used_last():
    store = PlanStore(max_entries=2)
    store.put("a", 1)
    store.put("b", 2)
    assert store.get("a") == 1  # a used last
    store.put("c", 3)
    assert store.get("b") is None and store.get("a") == 1 and store.get("c") == 3 and len(store) == 2


def test_outputs_the_meta_kernel_cache_made_are_counted_as_every_kernels_are(runs, monkeypatch):
    """The tracker looks up no input storages for outputs the meta kernel cache made (new storages): the
    plan, every group's figure and the peak are those of running every kernel."""
    from streamlined_core.engine import memory

    model = svd()
    fast = fresh_plan(model)
    monkeypatch.setattr(memory.META_KERNELS, "enabled", False)  # every kernel runs: no cache-made outputs
    slow = fresh_plan(model)
    assert [(g.name, g.slices, g.mode, g.predicted_bytes) for g in slow.groups] == \
        [(g.name, g.slices, g.mode, g.predicted_bytes) for g in fast.groups]
    assert slow.predicted_peak_bytes == fast.predicted_peak_bytes


# -- replayed groups ---------------------------------------------------------------------------------


def measured_runs(planner):
    """Every run a planner made, by its decisions: each group's peaks and the peak outside groups."""
    return {d: ({n: dict(m.peaks) for n, m in measured.items()}, outside)
            for d, (measured, outside) in planner.measurements.runs.items()}


def planned_without_replay(e, args, monkeypatch, budgets):
    """The planner and plans of ``e`` for ``args`` with group replay switched off (every group runs)."""
    PLANS.clear()
    e._planners.clear()
    e._plans.clear()
    with monkeypatch.context() as m:
        m.setattr(plan_module.Planner, "__init__", _no_replay(plan_module.Planner.__init__))
        planner = e._planner(args)
        plans = [planner.plan(b) for b in budgets]
    return planner, plans


def _no_replay(init):
    def wrapped(self, *a, **k):
        k["replay"] = False
        init(self, *a, **k)
    return wrapped


@pytest.mark.parametrize("build, inputs", [
    (lambda: svd(), lambda model, e: arguments(model, e)),
    (lambda: configs.seed_weights(configs.build_tiny_diffusers_animatediff(), std=0.1),
     lambda model, e: e._arguments(*configs.diffusers_animatediff_inputs(model, 1, 5, 64, 96))),
], ids=["svd", "animatediff"])
def test_replayed_groups_measure_what_running_them_measures(runs, monkeypatch, build, inputs):
    """Groups measured before with the same decision are replayed, not run: every run's figures (each group's
    peaks, the peak outside groups) and every plan equal those of running every group, and the later runs
    replay most of their groups."""
    model = build()
    e = engine(model)
    args = inputs(model, e)
    planner = e._planner(args)
    weights, least, whole = planner.weights_bytes, planner.least_peak(), planner.unsliced_peak()
    budgets = [None] + [least + (whole - least) * f // 8 for f in (1, 3, 6)] + [least // 2]
    plans = [planner.plan(b) for b in budgets]
    assert planner.measurements.replays, "groups were recorded"
    replayed = measured_runs(planner)
    plain, plain_plans = planned_without_replay(e, args, monkeypatch, budgets)
    assert not plain.measurements.replays
    assert measured_runs(plain) == replayed
    assert [(p.groups, p.predicted_peak_bytes, p.fits) for p in plans] == \
        [(p.groups, p.predicted_peak_bytes, p.fits) for p in plain_plans]
    assert weights == plain.weights_bytes


def test_a_group_that_leaves_memory_behind_is_run_again_not_replayed():
    """A group whose run leaves a tensor alive besides its output (a cache it fills) is never recorded: a
    replay would leave that tensor out of every later figure. Switched to record it anyway (the check
    skipped), the second run's figures come out wrong, which is what the check prevents."""
    from streamlined_core.engine.slicing import Rows

    kept = []

    def run(runner):
        x = torch.empty(8, 16, device="meta")

        def caching(a, b):
            y = x[a:b] * 2
            kept.append(torch.empty(1024, device="meta"))  # left behind
            return y

        h = runner.run("leaky", "frames", 8, caching, Rows(8))
        h = runner.run("plain", "frames", 8, lambda a, b: h[a:b] + 1, Rows(8))
        kept.clear()
        return h

    records = {}
    first = plan_module.measure_groups(run, lambda *_: (2, "keep"), records)
    assert [key[0] for key in records] == ["plain"]
    again = plan_module.measure_groups(run, lambda *_: (2, "keep"), records)
    assert again[:2] == first[:2]

    forced = {}
    end = plan_module.GroupReplay.end

    def unchecked(self, key, token, out, merge):  # records every group, however it left memory
        self.records[token["key"]] = plan_module.GroupRecord(self.tracker._mark_peak - token["live"],
                                                             (tuple(out.shape), out.stride(), out.dtype))

    plan_module.GroupReplay.end = unchecked
    try:
        plan_module.measure_groups(run, lambda *_: (2, "keep"), forced)
        wrong = plan_module.measure_groups(run, lambda *_: (2, "keep"), forced)
    finally:
        plan_module.GroupReplay.end = end
    assert wrong[0]["plain"].peaks != first[0]["plain"].peaks
