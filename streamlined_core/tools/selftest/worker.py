"""One ComfyUI process of the exactness self-test: ``python -m streamlined_core.tools.selftest.worker
COMFYUI_ROOT EXAMPLES PROFILE [FLAG]``. ComfyUI picks its attention function once, at import, from its flags, so
each backend runs in a process of its own started with the real flag; the default backend's process also
runs the weight paths and the unrecognised forward. AnimateDiff-Evolved's U-Net (full-width SD1.5, the
slowest by far) runs under every backend in the full profile, under the default one in the CI profile (its
attention is the host function the SVD U-Net's rows already run under each backend). Prints one JSON line: the categories' results."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys

from .exactness import Failure, run_category, wrong_variant


def main(argv: list[str]) -> int:
    root, examples, profile, flags = argv[0], int(argv[1]), argv[2], argv[3:]
    sys.argv = ["main.py", "--cpu", *flags]
    sys.path.insert(0, root)
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.cli_args  # noqa: F401  (parses the flags as main.py does)
    import comfy.ldm.modules.attention as attention
    import comfyui_version
    from comfy.ldm.modules.diffusionmodules import model as vae_model

    from . import comfy as archs

    wrong = wrong_variant()
    host = f"ComfyUI {comfyui_version.__version__}"
    backend = f"{' '.join(flags) or 'default'}: {attention.optimized_attention.__name__}"
    chosen = getattr(vae_model, "vae_attention", None)
    vae_backend = f"{' '.join(flags) or 'default'}: {getattr(chosen() if chosen else None, '__name__', 'unknown')}"
    wanted = set(filter(None, os.environ.get("STREAMLINE_SELFTEST_ARCHS", "").split(","))) or None
    want = lambda key: wanted is None or key in wanted  # noqa: E731 (selftest --arch)
    results = []
    if want("comfyui-svd-unet"):
        results.append(run_category(archs.unet_arch(), backend, host, examples, wrong=wrong))
    if want("comfyui-svd-vae"):
        results.append(run_category(archs.VAE, vae_backend, host, examples, wrong=wrong))
    if want("comfyui-wan"):
        results.append(run_category(archs.wan_arch(), backend, host, examples, wrong=wrong))
    if (profile == "ci" and flags) or not want("comfyui-ade-unet"):
        pass  # AnimateDiff-Evolved: under the default backend only in the CI profile
    elif animatediff_evolved(root):
        results.append(run_category(archs.ANIMATEDIFF, backend, host, examples, wrong=wrong))
    elif results:
        results[0].notes.append("AnimateDiff-Evolved is not in this checkout's custom_nodes: its rows did not run")
    if not flags:
        for weights in ("fp16", "fp8") if want("comfyui-svd-unet") else ():
            arch = archs.unet_arch(weights, label=f"ComfyUI SVD U-Net, {weights} weights")
            results.append(run_category(arch, f"{weights} weights cast per call", host, examples, wrong=wrong))
        for weights in ("fp16", "bf16", "fp8") if want("comfyui-wan") else ():
            results.append(run_category(archs.wan_arch(weights), f"{weights} weights cast per call", host, examples,
                                        wrong=wrong))
        if want("comfyui-svd-unet"):
            results.append(partial(archs, host, examples, wrong))
        if want("comfyui-wan"):
            results.append(partial(archs, host, examples, wrong, wan=True))
        if want("comfyui-svd-unet"):
            results.append(unrecognised(archs, host, examples, wrong))
    print(json.dumps([r.as_dict() for r in results]))
    return 0


def animatediff_evolved(root: str) -> bool:
    """Load AnimateDiff-Evolved from the checkout's custom_nodes with ComfyUI's own loader; whether it is there."""
    from pathlib import Path

    from ...host.comfyui import load_custom_node

    found = [p for p in (Path(root) / "custom_nodes").glob("*AnimateDiff-Evolved*") if (p / "__init__.py").exists()]
    if not found:
        return False
    with contextlib.redirect_stdout(sys.stderr):  # ADE logs to stdout; this process's stdout is its JSON
        return load_custom_node(found[0])


def partial(archs, host, examples, wrong, wan=False):
    casts = []

    def build(c):
        model, cast = archs.partially_loaded(archs.build_wan(c) if wan else archs.build_unet(c))
        if wan:
            model._selftest_per_frame = c["per_frame"]
        casts.append(cast)
        return model

    # fp32 compute only: a bf16 copy would convert the weights the partial load leaves to cast per call
    if wan:
        arch = archs.wan_arch(build=build, label="ComfyUI Wan 2.1 / 2.2 transformer, partially loaded")
    else:
        arch = archs.Arch("comfyui-svd-unet", "ComfyUI SVD U-Net, partially loaded", archs.unet_configs,
                          archs.video_shapes, build, archs.unet_subject(), host=True, dtypes=("fp32",))
    result = run_category(arch, "partially loaded (lowvram)", host, examples, wrong=wrong)
    result.notes.append(f"modules casting per call: {min(casts, default=0)}-{max(casts, default=0)} per model")
    if not casts or min(casts) == 0:
        result.failures.append(archs_failure("partial load", "no module was left to cast per call"))
    return result


def unrecognised(archs, host, examples, wrong):
    """A ``UNetModel._forward`` with the same computation and another source: the engine must take the
    module-level path, say so in the log, and be exact."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    from ... import streamline
    from ...engine.arch import comfy_unet

    original = UNetModel._forward

    def _forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):
        # a later release's forward: the same computation, another source
        return original(self, x, timesteps, context, y, control, transformer_options, **kwargs)

    UNetModel._forward = _forward
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        arch = archs.unet_arch(forward=comfy_unet.module_level_forward, label="ComfyUI SVD U-Net, unrecognised _forward")
        result = run_category(arch, "unrecognised _forward (module level)", host, examples, wrong=wrong)
        model = archs.build_unet({"model_channels": 32, "mults": [2], "num_res_blocks": [1, 1, 1],
                                  "attention": [True, True, True], "num_head_channels": 16, "context_dim": 32,
                                  "adm_in_channels": 256})
        with streamline(model, slices=2) as handle:
            taken = handle.adapter.forward is comfy_unet.module_level_forward
            import torch

            with torch.no_grad():
                archs.unet_subject()(model, (1, 2, 4, 4), torch.float32).reference()
        said = [r for r in records if "(module level)" in r]
        if not taken:
            result.failures.append(archs_failure("module level", "streamline() did not take the module-level path"))
        elif not said:
            result.failures.append(archs_failure("module level", "the log does not say the module-level path was taken"))
        else:
            result.notes.append(f"log: {said[0][:160]}")
    finally:
        UNetModel._forward = original
        root.removeHandler(handler)
        root.setLevel(level)
    return result


def archs_failure(check: str, message: str) -> Failure:
    return Failure(check, {}, message)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
