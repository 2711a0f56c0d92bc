"""``streamline selftest`` on a real ComfyUI: the CI profile of every check passes and counts what it ran (its
report is kept in build/test-output, which scripts/dev.sh prints into the CI log), and each deliberately broken
variant makes it exit 1 in its own category, and only there."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from streamlined_core.host.comfyui import find_comfyui
from streamlined_core.tools.selftest.tally import BROKEN_ENV, BROKEN_VARIANTS, CATEGORIES

ROOT = Path(__file__).resolve().parents[2]
OUTPUT = ROOT / "build" / "test-output"


def selftest(comfyui, *args, broken=None):
    env = {k: v for k, v in os.environ.items() if k not in (BROKEN_ENV, "STREAMLINE_SELFTEST_WRONG")}
    if broken:
        env[BROKEN_ENV] = broken
    done = subprocess.run([sys.executable, "-m", "streamlined_core.tools.cli", "selftest", *args, "--only", "comfyui",
                           "--comfyui", str(comfyui), "--json"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=3000)
    assert done.stdout, done.stderr[-3000:]
    return done.returncode, json.loads(done.stdout)


@pytest.fixture(scope="module")
def ci(comfyui):
    """The CI profile of every check on this host, its table written beside the suite's other reports."""
    from streamlined_core.tools.commands.selftest import _categories_table, _table

    code, report = selftest(comfyui, "--profile", "ci")
    version = report["categories"][0]["host"].split()[-1] if report["categories"] else "unknown"
    OUTPUT.mkdir(parents=True, exist_ok=True)
    table = _table(report["rows"], "ci", report["notes"], report["seconds"]) + "\n" + _categories_table(report["categories"])
    (OUTPUT / f"selftest-ci-{version}.txt").write_text(table + "\n")
    return code, report


def test_the_ci_profile_passes_every_check_and_counts_it(ci):
    code, report = ci
    failed = [(r["arch"], r["path"], r["failures"]) for r in report["rows"] if r["failed"]]
    failed += [(c["category"], c["failures"]) for c in report["categories"] if c["failed"]]
    assert code == 0 and report["failed"] == 0, failed
    tried = {c["category"]: c["tried"] for c in report["categories"]}
    assert list(tried) == list(CATEGORIES)
    assert tried["faults"] >= 11 and tried["recoveries"] >= 5 and tried["repeats"] == 1, tried
    assert tried["bad inputs"] >= 150 and tried["compositions"] >= 9, tried
    (repeats,) = [c for c in report["categories"] if c["category"] == "repeats"]
    assert any(n.startswith("run 3 -> run 8: tensors") for n in repeats["notes"]), repeats["notes"]


def test_the_ci_profile_runs_exactness_under_every_backend_and_weight_path(ci):
    rows = ci[1]["rows"]
    paths = {r["path"] for r in rows}
    backends = {p.split(": ")[1] for p in paths if ": " in p}
    assert {"attention_pytorch", "attention_split", "attention_sub_quad"} <= backends, paths
    assert {"fp16 weights cast per call", "fp8 weights cast per call", "partially loaded (lowvram)",
            "unrecognised _forward (module level)"} <= paths
    assert {r["arch"] for r in rows} == {"comfyui-svd-unet", "comfyui-svd-vae", "comfyui-ade-unet", "comfyui-wan"}
    wan = {r["path"] for r in rows if r["arch"] == "comfyui-wan"}
    assert {p for p in paths if p.endswith(" weights cast per call")} | {"partially loaded (lowvram)"} <= wan
    assert {"fp16 weights cast per call", "bf16 weights cast per call", "fp8 weights cast per call"} <= wan
    unet = {p.split(": ")[1] for r in rows if r["arch"] == "comfyui-svd-unet" for p in [r["path"]] if ": " in p}
    assert unet <= {p.split(": ")[1] for p in wan if ": " in p}, wan  # Wan under every backend the U-Net ran under
    for r in rows:
        # a Wan block is two groups (keys and values, then the rest by query slices): 1-3 blocks drawn
        least = 2 if r["arch"] == "comfyui-wan" else 10
        assert r["examples"] >= 3 and r["groups_sliced"] >= least and r["restore_runs"] == 2, r
        assert r["groups_sliced"] == r["groups_seen"], (r["arch"], r["path"], r["never_sliced"])
    fallback = next(r for r in rows if r["path"].startswith("unrecognised"))
    assert any("(module level)" in n for n in fallback["notes"]), fallback["notes"]
    partial = next(r for r in rows if r["path"].startswith("partially"))
    assert any(n.startswith("modules casting per call") for n in partial["notes"])


# each broken variant, run on the cases that show it (the whole category shows it too: `--cases` only saves time)
SHOWN_BY = {"no-restore-after-interrupt": ("--cases", "Streamline Model: ComfyUI's interrupt"),
            "no-retry-after-oom": ("--cases", "Streamline Model: out of memory once"),
            "leak-per-run": ("--runs", "4"),
            "unchecked-input": ("--cases", "StreamlineModel.max_slices"),
            "shared-patch": ("--cases", "Streamline Model -> Streamline Model")}


# The check that catches each variant is the pack's own code, not the host's: on the two reference hosts
# (which CI runs one after the other) each variant is collected on one of them, the two that start a server
# on different ones; on any other host every variant is.
REFERENCE_SHARE = {"0.3.64": ("no-restore-after-interrupt", "leak-per-run", "shared-patch"),
                   "0.3.52": ("no-retry-after-oom", "unchecked-input")}
assert sorted(sum(REFERENCE_SHARE.values(), ())) == sorted(BROKEN_VARIANTS)


def _variants():
    sys.path.insert(0, str(ROOT / "tests"))
    from hosts import version

    root, _ = find_comfyui()  # the host conftest.py chose ($COMFYUI_PATH)
    return list(REFERENCE_SHARE.get(version(Path(root)), BROKEN_VARIANTS)) if root else list(BROKEN_VARIANTS)


@pytest.mark.parametrize("variant", _variants())
def test_each_broken_variant_makes_it_exit_1_in_its_own_category(comfyui, variant):
    category = BROKEN_VARIANTS[variant][0]
    code, report = selftest(comfyui, category.replace(" ", "-"), *SHOWN_BY[variant], broken=variant)
    assert code == 1
    (row,) = report["categories"]
    assert row["category"] == category and row["tried"] >= 1 and row["failed"] >= 1, row
    assert report["failed"] == 1 and not report["rows"]


def test_a_broken_variant_name_is_refused(comfyui):
    done = subprocess.run([sys.executable, "-m", "streamlined_core.tools.selftest.reliability", str(comfyui), "ci",
                           "compositions"], cwd=comfyui, capture_output=True, text=True, timeout=600,
                          env={**os.environ, BROKEN_ENV: "nonsense", "PYTHONPATH": str(ROOT)})
    assert done.returncode != 0 and f"{BROKEN_ENV} must be one of no-restore-after-interrupt" in done.stderr
