"""One ComfyUI process of the reliability self-test: ``python -m streamlined_core.tools.selftest.reliability
COMFYUI_ROOT PROFILE CATEGORY[,CATEGORY...]``. Imports the checkout's ComfyUI (``--cpu``), loads this pack with
ComfyUI's own loader and runs the categories asked for: faults, recoveries and compositions here, in this process
(:mod:`.faults`, :mod:`.compose`), repeated runs and bad inputs through a real server it starts (:mod:`.server`).
Prints one JSON line: a :class:`~.tally.Tally` per category.

``$STREAMLINE_SELFTEST_BROKEN`` (the tests only) switches on one deliberately broken variant of the pack
(:data:`~.tally.BROKEN_VARIANTS`), here and in the server, which its category must fail."""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Any

from .tally import CATEGORIES, Tally, broken_variant


def main(argv: list[str]) -> int:
    root, profile, wanted = argv[0], argv[1], [c for c in argv[2].split(",") if c]
    unknown = [c for c in wanted if c not in CATEGORIES]
    if unknown:
        raise SystemExit(f"unknown categories {unknown}; expected some of {', '.join(CATEGORIES)}")
    sys.argv = ["main.py", "--cpu"]
    sys.path.insert(0, root)
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.cli_args  # noqa: F401  (parses the flags as main.py does)
    import comfyui_version

    from ...host.comfyui import PACK_ROOT, load_pack_nodes

    host = f"ComfyUI {comfyui_version.__version__}"
    with contextlib.redirect_stdout(sys.stderr):  # this process's stdout is its JSON
        load_pack_nodes()
        pack = sys.modules[str(PACK_ROOT).replace(".", "_x_")]
        broken = broken_variant()
        if broken:
            break_pack(pack, broken)
        results = [run(category, pack, host, root, profile).finish() for category in wanted if category not in SERVED]
        served = [c for c in wanted if c in SERVED]
        if served:
            results += _served(served, host, root, profile)
        results.sort(key=lambda t: wanted.index(t.category))
    print(json.dumps([r.as_dict() for r in results]))
    return 0


SERVED = ("repeats", "bad inputs")  # through a real server


def run(category: str, pack: Any, host: str, root: str, profile: str) -> Tally:
    from . import compose, faults

    try:
        if category == "faults":
            return faults.faults(pack, host)
        if category == "recoveries":
            return faults.recoveries(pack, host)
        return compose.compositions(pack, host, root, profile)
    except Exception as e:  # noqa: BLE001  a category that cannot run is its own failure
        return _failed(category, host, e)


def _served(categories: list[str], host: str, root: str, profile: str) -> list[Tally]:
    from . import server

    try:
        return server.run(categories, root, host, profile)
    except Exception as e:  # noqa: BLE001  (the server did not start)
        return [_failed(c, host, e) for c in categories]


def _failed(category: str, host: str, e: Exception) -> Tally:
    tally = Tally(category, host)
    tally.failures.append({"case": "the category", "message": f"{type(e).__name__}: {str(e)[:1200]}"})
    return tally


def break_pack(pack: Any, variant: str) -> None:
    """Switch on one broken variant in the pack as ComfyUI loaded it (``pack``: its module)."""
    modules = {name: sys.modules[f"{pack.__name__}.{name}"] for name in
               ("nodes.streamline_model", "streamlined_core.engine.recovery")}
    if variant == "no-restore-after-interrupt":
        import comfy.model_management as mm

        outer = modules["nodes.streamline_model"].StreamlineOuter
        original = outer._with_estimate

        def _with_estimate(self, executor, *args, **kwargs):
            base = executor.class_obj.model_patcher.model
            try:
                return original(self, executor, *args, **kwargs)
            except mm.InterruptProcessingException:
                base.memory_required = base.memory_required  # an estimate left on the model: the restore skipped
                raise

        outer._with_estimate = _with_estimate
    elif variant == "no-retry-after-oom":
        from ...engine import recovery

        def run_recovering(run, first, least, what, budget_name):
            return run(first)

        for module in (modules["streamlined_core.engine.recovery"], recovery):
            module.run_recovering = run_recovering
    elif variant == "shared-patch":
        node = pack.NODE_CLASS_MAPPINGS["StreamlineModel"]
        original_patch = node.patch

        def patch(self, model, *args, **kwargs):
            (out,) = original_patch(self, model, *args, **kwargs)
            # the MODEL that came in carries our patch and wrappers
            model.object_patches, model.model_options = out.object_patches, out.model_options
            return (out,)

        node.patch = patch
    # leak-per-run and unchecked-input break the server's copy of the pack (.server_nodes)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
