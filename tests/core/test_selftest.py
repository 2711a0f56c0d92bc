"""``streamline selftest exactness`` on the diffusers architectures: the CI profile passes and counts what
it ran, each shrunk failure it found is a regular test, and each wrong variant makes it exit 1 in its
category (so the counts can fail)."""

import json

import pytest

from streamlined_core.tools import cli
from streamlined_core.tools.selftest import exactness
from streamlined_core.tools.selftest.archs import DIFFUSERS
from streamlined_core.tools.selftest.contract import Coverage

ARCHS = {a.key: a for a in DIFFUSERS}


@pytest.mark.parametrize("example", [e for e in exactness.REGRESSIONS if e[0] in ARCHS],
                         ids=lambda e: f"{e[0]}-{'x'.join(map(str, e[2]))}")
def test_each_shrunk_failure_holds(example):
    key, config, shape, slices, modes, dtype = example
    ill: list = []
    coverage = Coverage()
    exactness.check_example(ARCHS[key], exactness.Models(ARCHS[key]), config, shape, slices, modes, dtype, coverage, ill)
    assert coverage.sliced, "the example ran sliced"


def test_an_ill_conditioned_example_is_judged_against_fp64_and_counted():
    """At a 1x2 latent the host's own fp32 output is 1e-4 from the fp64 forward: the sliced run, as far, passes
    and is counted; the same run with per-slice norm statistics is far further and fails."""
    key, config, shape, slices, modes, dtype = exactness.REGRESSIONS[2]
    arch, ill = ARCHS[key], []
    exactness.check_example(arch, exactness.Models(arch), config, shape, slices, modes, dtype, Coverage(), ill)
    assert len(ill) == 1 and ill[0] > exactness.TOL


def run_json(capsys, monkeypatch, *args, wrong=None):
    if wrong:
        monkeypatch.setenv(exactness.WRONG_ENV, wrong)
    else:
        monkeypatch.delenv(exactness.WRONG_ENV, raising=False)
    code = cli.main(["selftest", "exactness", "--only", "diffusers", "--json", *args])
    return code, json.loads(capsys.readouterr().out)


def test_the_ci_profile_passes_and_counts_examples_groups_and_restores(capsys, monkeypatch):
    code, report = run_json(capsys, monkeypatch)
    rows = {r["arch"]: r for r in report["rows"]}
    assert code == 0 and report["failed"] == 0, [r["failures"] for r in report["rows"]]
    assert set(rows) == set(ARCHS)
    for r in rows.values():
        assert r["examples"] >= exactness.PROFILES["ci"][0] and r["fp32"] > 0
        assert r["groups_sliced"] >= 10 and r["restore_runs"] == 2
        assert r["groups_sliced"] == r["groups_seen"] and not r["never_sliced"], r  # every group sliced somewhere
        assert r["worst_fp32"] <= exactness.TOL


@pytest.mark.parametrize("wrong, check, examples", [("norm-stats", "exactness", 10), ("skip-restore", "restore", 3)])
def test_each_wrong_variant_fails_its_category(capsys, monkeypatch, wrong, check, examples):
    """Per-slice statistics fail at the first example that slices a norm's axis (the run stops there)."""
    code, report = run_json(capsys, monkeypatch, "--examples", str(examples), wrong=wrong)
    assert code == 1
    for r in report["rows"]:
        assert r["failed"] and {f["check"] for f in r["failures"]} == {check}, (r["arch"], r["failures"])


def test_a_wrong_variant_name_is_refused():
    import os

    os.environ[exactness.WRONG_ENV] = "nonsense"
    try:
        with pytest.raises(ValueError, match="STREAMLINE_SELFTEST_WRONG must be one of norm-stats, skip-restore"):
            exactness.wrong_variant()
    finally:
        del os.environ[exactness.WRONG_ENV]


def test_the_drawn_runner_gives_groups_different_slicing():
    from streamlined_core.tools.selftest.contract import drawn

    runner = drawn((2, 7), ("keep", "recompute", "keep"))
    assert [runner.decide("g", "frames", 9) for _ in range(4)] == [(2, "keep"), (7, "recompute"), (2, "keep"),
                                                                   (7, "keep")]


def test_an_engine_that_raises_is_a_failure_with_its_example_not_a_crash(monkeypatch):
    from streamlined_core.engine.arch import diffusers_sd_vae

    def broken(*args, **kwargs):
        raise RuntimeError("broken on purpose")

    monkeypatch.setattr(diffusers_sd_vae, "streamlined_forward", broken)
    result = exactness.run_category(ARCHS["diffusers-sd-vae"], "default", "diffusers", 2, shrink=False)
    (failure,) = [f for f in result.failures if f.check == "exactness"]
    assert "the engine raised RuntimeError: broken on purpose" in failure.message and failure.example["config"]


def test_streamline_under_torch_compile_is_counted_among_the_compositions(capsys, monkeypatch):
    """Compiled over a streamlined U-Net (aot_eager in the ci profile) it is exact; fullgraph=True is refused by
    torch; a U-Net compiled first is refused by streamline() naming the order that works."""
    monkeypatch.delenv("STREAMLINE_SELFTEST_BROKEN", raising=False)
    code = cli.main(["selftest", "compositions", "--only", "diffusers", "--json"])
    report = json.loads(capsys.readouterr().out)
    (row,) = report["categories"]
    assert code == 0 and row["category"] == "compositions" and row["host"].startswith("diffusers"), row
    assert row["tried"] == 3 and row["failed"] == 0, row["failures"]
    assert any("fullgraph=True: torch refuses" in n for n in row["notes"]), row["notes"]


def test_an_unknown_check_and_cases_that_match_nothing_are_refused(capsys):
    with pytest.raises(SystemExit) as raised:
        cli.main(["selftest", "exactnes"])
    assert raised.value.code == 2 and "CHECK 'exactnes': expected any of exactness, faults" in capsys.readouterr().err
    assert cli.main(["selftest", "compositions", "--only", "diffusers", "--cases", "no such case"]) == 2
    assert "no case's name contains --cases 'no such case'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["selftest", "repeats", "--runs", "3"])
    assert "--runs 3: growth is judged from the third run on" in capsys.readouterr().err


def test_a_broken_variant_name_is_refused(monkeypatch):
    from streamlined_core.tools.selftest import tally

    monkeypatch.setenv(tally.BROKEN_ENV, "nonsense")
    with pytest.raises(ValueError, match="STREAMLINE_SELFTEST_BROKEN must be one of no-restore-after-interrupt"):
        tally.broken_variant()


def test_arch_runs_only_the_categories_of_the_architectures_named(capsys, monkeypatch):
    from streamlined_core.tools.commands.selftest import ARCHS as KEYS

    assert set(ARCHS) <= set(KEYS)  # every diffusers architecture can be named
    code, report = run_json(capsys, monkeypatch, "--arch", "diffusers-sd-vae", "--examples", "2")
    assert code == 0 and [r["arch"] for r in report["rows"]] == ["diffusers-sd-vae"]
