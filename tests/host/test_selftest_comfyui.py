"""``streamline selftest exactness`` on this ComfyUI host: its SVD U-Net and VAE decoder under every attention
backend its flags select on a CPU, AnimateDiff-Evolved's U-Net (under the default backend in the CI profile),
the U-Net with fp16 and fp8 weights cast per call, partially loaded, and with a ``_forward`` the engine does
not recognise (module level, said in the log); the CI profile passes and counts, and per-slice norm
statistics fail every category."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def selftest(comfyui, *args, wrong=None):
    env = {k: v for k, v in os.environ.items() if k != "STREAMLINE_SELFTEST_WRONG"}
    if wrong:
        env["STREAMLINE_SELFTEST_WRONG"] = wrong
    done = subprocess.run([sys.executable, "-m", "streamlined_core.tools.cli", "selftest", "exactness", "--only",
                           "comfyui", "--comfyui", str(comfyui), "--json", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert done.stdout, done.stderr[-3000:]
    return done.returncode, json.loads(done.stdout)


def test_the_ci_profile_passes_under_every_backend_and_weight_path(comfyui):
    code, report = selftest(comfyui)
    rows = report["rows"]
    assert code == 0 and report["failed"] == 0, [(r["arch"], r["path"], r["failures"]) for r in rows if r["failed"]]
    paths = {r["path"] for r in rows}
    backends = {p.split(": ")[1] for p in paths if ": " in p}
    assert {"attention_pytorch", "attention_split", "attention_sub_quad"} <= backends, paths
    assert {"fp16 weights cast per call", "fp8 weights cast per call", "partially loaded (lowvram)",
            "unrecognised _forward (module level)"} <= paths
    assert {r["arch"] for r in rows} == {"comfyui-svd-unet", "comfyui-svd-vae", "comfyui-ade-unet"}
    for r in rows:
        assert r["examples"] >= 3 and r["groups_sliced"] >= 10 and r["restore_runs"] == 2, r
    fallback = next(r for r in rows if r["path"].startswith("unrecognised"))
    assert any("(module level)" in n for n in fallback["notes"]), fallback["notes"]
    partial = next(r for r in rows if r["path"].startswith("partially"))
    assert any(n.startswith("modules casting per call") for n in partial["notes"])


def test_per_slice_norm_statistics_fail_every_category(comfyui):
    code, report = selftest(comfyui, "--examples", "10", "--backend", "default", wrong="norm-stats")  # stops at the first failure
    assert code == 1
    for r in report["rows"]:
        assert r["failed"] and {f["check"] for f in r["failures"]} == {"exactness"}, (r["arch"], r["path"], r["failures"])
