"""Faults survived, through Streamline Model, the Step Rehash Sampler and the VRAM Profiler on a real ComfyUI:
an exception inside a sliced group, ComfyUI's own interrupt during sampling (``interrupt_current_processing``,
thrown where ComfyUI's server throws it, from the progress hook), an error inside another pack's wrapper
around ours. Afterwards the run's context is gone (a weak reference to it is dead), nothing the run allocated
is alive (the tracker), ComfyUI's memory estimate and the MODEL's options are as before, and the next run is
correct."""

import gc
import weakref

import pytest
import torch
from comfy_svd import LATENT_TOL, build_svd, conditioning, ksample, rehash_options, rel

FAULTS = ("error in a sliced group", "ComfyUI's interrupt", "another pack's wrapper raises")
NODES = ("Streamline Model", "Step Rehash Sampler", "VRAM Profiler")


@pytest.fixture(scope="module")
def svd(comfyui):
    return build_svd()


def graph(pack, svd, node):
    """The MODEL through the node, and how the graph samples it."""
    classes = pack.NODE_CLASS_MAPPINGS
    if node == "Streamline Model":
        (model,) = classes["StreamlineModel"]().patch(svd, "auto", 8, 0.0, "all")
        return model, ksample
    if node == "VRAM Profiler":
        (model,) = classes["VRAMProfiler"]().patch(svd, "group", 0, "fault")
        return model, ksample

    def rehash(model):
        positive, negative, latent = conditioning(3, 8, 12)
        (out,) = classes["StepRehashSampler"]().sample(model, 7, 2, 2.5, "euler", "karras", positive, negative,
                                                       latent, 1.0, **rehash_options(interval=2))
        return out["samples"]

    return svd, rehash


class Fault:
    """The fault, at the U-Net's second real call; what the run held, seen from inside it."""

    def __init__(self, pack, model, kind):
        import comfy.model_management as mm
        import comfy.patcher_extension as pe
        import comfy.utils

        self.kind, self.mm, self.utils = kind, mm, comfy.utils
        self.context = __import__(f"{pack.__name__}.streamlined_core.engine.context", fromlist=["current"])
        self.contexts: list = []
        self.calls = 0
        unet = model.get_model_object("diffusion_model")
        # a method of an object holding modules: a plan's meta replica shares it (it cannot be copied)
        self.hook = unet.input_blocks[1][0].in_layers[2].register_forward_pre_hook(self.on_layer)
        self.model = model
        if kind == FAULTS[2]:
            self.model = model.clone()
            self.model.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "another pack", self.other_pack)
        if kind == FAULTS[1]:  # what ComfyUI's server installs: the progress hook throws a pending interrupt
            self.previous_hook = comfy.utils.PROGRESS_BAR_HOOK
            comfy.utils.set_progress_bar_global_hook(lambda *a, **k: mm.throw_exception_if_processing_interrupted())

    def on_layer(self, _module, inputs):
        if inputs[0].device.type == "meta":
            return
        self.calls += 1
        if self.calls == 2:
            if self.context.current() is not None:
                self.contexts.append(weakref.ref(self.context.current()))
            if self.kind == FAULTS[0]:
                raise RuntimeError("fault in a sliced group")
            if self.kind == FAULTS[1]:
                self.mm.interrupt_current_processing(True)

    def other_pack(self, executor, *args, **kwargs):
        out = executor(*args, **kwargs)
        if self.calls >= 2:
            raise RuntimeError("another pack's wrapper failed")
        return out

    def close(self):
        self.hook.remove()
        if self.kind == FAULTS[1]:
            self.mm.interrupt_current_processing(False)
            self.utils.set_progress_bar_global_hook(self.previous_hook)


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("node", NODES)
def test_a_fault_leaves_nothing_behind_and_the_next_run_is_correct(pack, svd, node, fault):
    import comfy.model_management as mm

    from streamlined_core import MemoryTracker

    reference = ksample(svd)
    model, sample = graph(pack, svd, node)
    options = {k: dict(v) if isinstance(v, dict) else v for k, v in model.model_options.items()}
    base = svd.model
    injected = Fault(pack, model, fault)
    tracker = MemoryTracker(devices={"cpu"})
    try:
        with tracker, pytest.raises((RuntimeError, mm.InterruptProcessingException)) as raised:
            sample(injected.model)
    finally:
        injected.close()
    assert raised.type is (mm.InterruptProcessingException if fault == FAULTS[1] else RuntimeError), raised.value
    del raised  # its traceback holds the run's frames
    gc.collect()
    assert injected.calls >= 2
    assert injected.contexts and injected.contexts[0]() is None, "the run's context was freed"
    assert injected.context.current() is None
    assert tracker.current_bytes == 0, "a tensor the run made is still alive"
    assert "memory_required" not in base.__dict__, "ComfyUI's memory estimate is its own again"
    assert {k: dict(v) if isinstance(v, dict) else v for k, v in model.model_options.items()} == options
    assert torch.equal(ksample(svd), reference), "the MODEL that came in samples as before"
    again, sample = graph(pack, svd, node)
    out = sample(again)
    assert rel(out, reference) <= (LATENT_TOL if node != "Step Rehash Sampler" else 1.0) and torch.isfinite(out).all()
