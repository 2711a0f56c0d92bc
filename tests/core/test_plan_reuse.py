"""Plans reused: a known call shape is planned again without measuring (a second engine, a second model
built alike, a new budget), runs are counted, never timed, and every reused plan equals a fresh one."""

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

    def counted(run, decide):
        made.append(decide)
        return measure(run, decide)

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
    assert first._planner(arguments(model, first)).runs == len(runs) >= 4  # four measurement runs, then the verify runs
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
    """A budget above the unsliced peak slices nothing: that is the first measurement run's plan, and its
    figures are that run's, so the planner makes the four measurement runs and no verify run."""
    model = svd()
    plan = engine(model, 10**12)._plan(arguments(model, engine(model)))
    assert all(g.slices == 1 for g in plan.groups)
    assert len(runs) == 4
    assert plan == fresh_plan(model, 10**12)


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
