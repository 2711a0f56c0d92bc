"""Streamline Model plans and samples under every attention backend ComfyUI offers on a CPU.

ComfyUI picks its attention function once, when ``comfy.ldm.modules.attention`` is imported, from
its command-line flags; this test process already imported it with PyTorch attention. So each
backend runs in a fresh process started with the real flag, parsed by ComfyUI's own parser as
``main.py`` parses it. Planning runs the U-Net on ``meta``, where sub-quadratic and split attention
would ask the device's free memory (and fail); the plan must be the same whatever the backend.

The exactness property profile (``streamline selftest exactness``, one ComfyUI process per flag) runs in
tests/host/test_selftest_comfyui.py with the self-test's other checks; here, per-slice norm statistics fail
every one of its ComfyUI categories.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# flag -> the function ComfyUI selects with it on a CPU (no flag: what a new user runs)
BACKENDS = {
    None: "attention_sub_quad",
    "--use-quad-cross-attention": "attention_sub_quad",
    "--use-split-cross-attention": "attention_split",
    "--use-pytorch-cross-attention": "attention_pytorch",
}

SAMPLE_UNDER_FLAG = r"""
import asyncio, importlib.util, inspect, json, sys
comfy_root, pack_root, flags = sys.argv[1], sys.argv[2], sys.argv[3:]
sys.argv = ["main.py", "--cpu", *flags]
sys.path.insert(0, comfy_root)
import comfy.options
comfy.options.enable_args_parsing()
import comfy.cli_args
import comfy.ldm.modules.attention as attention
import nodes
import torch

loaded = nodes.load_custom_node(pack_root)
assert (asyncio.run(loaded) if inspect.iscoroutine(loaded) else loaded), "ComfyUI could not load the pack"
pack = sys.modules[pack_root.replace(".", "_x_")]
spec = importlib.util.spec_from_file_location("server_nodes",
                                              pack_root + "/streamlined_core/tools/selftest/server_nodes/__init__.py")
server_nodes = importlib.util.module_from_spec(spec)
spec.loader.exec_module(server_nodes)

host = {name: value for name, value in vars(attention).items() if callable(value) and "attention" in name}
patcher, positive, negative, latent = server_nodes.TinySVD().build(3, 96, 64)

def sample(model):
    (out,) = nodes.KSampler().sample(model, 7, 2, 2.5, "euler", "karras", positive, negative, latent, denoise=1.0)
    return out["samples"]

reference = sample(patcher)
(patched,) = pack.NODE_CLASS_MAPPINGS["StreamlineModel"]().patch(patcher, "auto", 8, 0.0, "all")
out = sample(patched)
plans = patched.object_patches["diffusion_model._forward"]._plans.values()  # one per call shape
print(json.dumps({
    "backend": attention.optimized_attention.__name__,
    "restored": all(getattr(attention, name) is value for name, value in host.items()),
    "plans": sorted([p.describe(), p.predicted_peak_bytes] for p in plans),
    "rel": ((out - reference).abs().max() / reference.abs().max()).item(),
    "finite": bool(torch.isfinite(out).all()) and out.std().item() > 0,
}))
"""

_results: dict = {}


@pytest.fixture(scope="module")
def run_under(comfyui):
    """Sample the tiny SVD with and without Streamline Model in a ComfyUI started with ``flag``."""

    def run(flag):
        if flag not in _results:
            result = subprocess.run(
                [sys.executable, "-c", SAMPLE_UNDER_FLAG, str(comfyui), str(ROOT), *([flag] if flag else [])],
                cwd=comfyui, capture_output=True, text=True, timeout=600,
            )
            assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
            _results[flag] = json.loads(result.stdout.strip().splitlines()[-1])
        return _results[flag]

    return run


@pytest.mark.parametrize("flag", list(BACKENDS), ids=lambda f: f or "no-flag")
def test_streamline_model_plans_and_samples_under_the_attention_backend(run_under, flag):
    r = run_under(flag)
    assert r["backend"] == BACKENDS[flag]  # the flag took effect: the real run used this backend
    assert r["restored"]  # every attention function of the host is its own again after planning
    assert r["plans"]  # the node planned
    assert r["finite"] and r["rel"] <= 2e-3  # same latent as the plain model (tolerance of test_node.py)


def test_the_plan_is_the_same_whatever_the_attention_backend(run_under):
    plans = {flag or "no flag": run_under(flag)["plans"] for flag in BACKENDS}
    assert all(p == plans["no flag"] for p in plans.values()), plans


def test_in_the_region_meta_queries_run_sdpa_and_real_ones_the_hosts_own_function(comfyui):
    import comfy.ldm.modules.attention as attention
    import torch

    from streamlined_core.engine.arch.comfy_attention import sdpa_on_meta

    names = ("optimized_attention", "attention_basic", "attention_sub_quad", "attention_split", "attention_pytorch")
    before = {name: getattr(attention, name) for name in names}
    holder = torch.nn.Module()  # a module that bound a backend when it was built, as ADE's CrossAttentionMM does
    holder.actual_attention = attention.attention_sub_quad
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 16, 64, generator=gen) for _ in range(3))
    meta = [t.to("meta") for t in (q, k, v)]
    real = {name: f(q, k, v, 2) for name, f in before.items()}
    with sdpa_on_meta(holder):
        for name in names:
            f = getattr(attention, name)
            assert torch.equal(f(q, k, v, 2), real[name])  # a real device: the host's own function
            assert f(*meta, 2).shape == (2, 16, 64)  # sub-quadratic and split would ask meta's free memory
        assert holder.actual_attention(*meta, 2).device.type == "meta"
        assert attention.attention_sub_quad(query=meta[0], key=meta[1], value=meta[2], heads=2).shape == (2, 16, 64)
    assert all(getattr(attention, name) is f for name, f in before.items())
    assert holder.actual_attention is before["attention_sub_quad"]


# -- the exactness property profile under every backend and weight path ------------------------------


def selftest(comfyui, *args, wrong=None):
    env = {k: v for k, v in os.environ.items() if k != "STREAMLINE_SELFTEST_WRONG"}
    if wrong:
        env["STREAMLINE_SELFTEST_WRONG"] = wrong
    done = subprocess.run([sys.executable, "-m", "streamlined_core.tools.cli", "selftest", "exactness", "--only",
                           "comfyui", "--comfyui", str(comfyui), "--json", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert done.stdout, done.stderr[-3000:]
    return done.returncode, json.loads(done.stdout)


def test_per_slice_norm_statistics_fail_every_category(comfyui):
    code, report = selftest(comfyui, "--examples", "10", "--backend", "default", wrong="norm-stats")  # stops at the first failure
    assert code == 1
    for r in report["rows"]:
        assert r["failed"] and {f["check"] for f in r["failures"]} == {"exactness"}, (r["arch"], r["path"], r["failures"])
