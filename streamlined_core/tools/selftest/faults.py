"""Faults, recoveries and compositions of the reliability self-test, on a real ComfyUI imported in this process
with this pack loaded by ComfyUI's own loader (``pack``: its module).

Faults: an exception inside a sliced group, ComfyUI's own interrupt (``interrupt_current_processing``, thrown where
its server throws it, from the progress hook), an error inside another pack's wrapper around ours, through
Streamline Model, the Step Rehash Sampler and the VRAM Profiler, and an error or an interrupt inside a band of
Streamline VAE Decode. Afterwards the run's context is gone (a weak reference to it is dead), nothing the run
allocated is alive (the tracker), ComfyUI's memory estimate, the MODEL's options and the decoder are as before,
and the next run is correct.

Recoveries: the device's own ``torch.OutOfMemoryError``, raised by a host layer on its first real call(s), in
Streamline Model's U-Net calls, Streamline VAE Decode and ``streamline()`` in diffusers: once, the call runs
again at the least-memory plan with the same output and the log says so; twice, the device's error names the
budget input and the next run is correct.

Compositions: our nodes chained in every order, two Streamline Models in a row, the MODEL that came in used
elsewhere in the graph, a weight patch (what a LoRA loader adds) before and after Streamline Model, FreeU: each
equal to the same graph without our node (with Step Rehash: the same Step Rehash on the plain MODEL)."""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import sys
import weakref
from typing import Any, Callable

import torch

from . import comfy_graph as g
from .tally import Tally, check

FAULTS = ("an error in a sliced group", "ComfyUI's interrupt", "another pack's wrapper raises")
NODES = ("Streamline Model", "Step Rehash Sampler", "VRAM Profiler")


def pack_module(pack: Any, name: str) -> Any:
    """The pack's own copy of one of its modules (``engine.context``), as ComfyUI loaded it."""
    return sys.modules[f"{pack.__name__}.{name}"]


def options_of(model: Any) -> dict:
    return {k: dict(v) if isinstance(v, dict) else v for k, v in model.model_options.items()}


def graph(pack: Any, svd: Any, node: str) -> tuple[Any, Callable[[Any], torch.Tensor]]:
    """The MODEL through ``node``, and how the graph samples it."""
    classes = pack.NODE_CLASS_MAPPINGS
    if node == "Streamline Model":
        return classes["StreamlineModel"]().patch(svd, "auto", 8, 0.0, "all")[0], g.ksample
    if node == "VRAM Profiler":
        return classes["VRAMProfiler"]().patch(svd, "group", 0, "selftest")[0], g.ksample
    return svd, lambda model: rehash_sample(pack, model)


def rehash_sample(pack: Any, model: Any, **options: Any) -> torch.Tensor:
    positive, negative, latent = g.conditioning(3, 8, 12)
    (out,) = pack.NODE_CLASS_MAPPINGS["StepRehashSampler"]().sample(
        model, 7, 2, 2.5, "euler", "karras", positive, negative, latent, 1.0, **g.rehash_options(interval=2, **options))
    return out["samples"]


class Fault:
    """The fault, at the U-Net's second real call; what the run held, seen from inside it."""

    def __init__(self, pack: Any, model: Any, kind: str) -> None:
        import comfy.model_management as mm
        import comfy.patcher_extension as pe
        import comfy.utils

        self.kind, self.mm, self.utils = kind, mm, comfy.utils
        self.context = pack_module(pack, "streamlined_core.engine.context")
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

    def on_layer(self, _module: Any, inputs: tuple) -> None:
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

    def other_pack(self, executor: Callable, *args: Any, **kwargs: Any) -> Any:
        out = executor(*args, **kwargs)
        if self.calls >= 2:
            raise RuntimeError("another pack's wrapper failed")
        return out

    def close(self) -> None:
        self.hook.remove()
        if self.kind == FAULTS[1]:
            self.mm.interrupt_current_processing(False)
            self.utils.set_progress_bar_global_hook(self.previous_hook)


def _raised(run: Callable[[], Any], types: tuple, within: Any = None) -> BaseException | None:
    """The exception of one of ``types`` that ``run()`` raised (inside ``within``, a tracker), or None."""
    try:
        with within or contextlib.nullcontext():
            run()
    except types as e:
        return e
    return None


def faults(pack: Any, host: str) -> Tally:
    import comfy.model_management as mm

    from ...engine.memory import MemoryTracker

    tally = Tally("faults", host)
    svd = g.build_svd()
    reference = g.ksample(svd)
    base = svd.model
    for node, fault in itertools.product(NODES, FAULTS):
        if not tally.wants(f"{node}: {fault}"):
            continue
        with tally.case(f"{node}: {fault}"):
            model, sample = graph(pack, svd, node)
            options = options_of(model)
            injected = Fault(pack, model, fault)
            tracker = MemoryTracker(devices={"cpu"})
            try:
                raised = _raised(lambda: sample(injected.model), (RuntimeError, mm.InterruptProcessingException),
                                 tracker)
            finally:
                injected.close()
            expected = mm.InterruptProcessingException if fault == FAULTS[1] else RuntimeError
            check(type(raised) is expected, f"the run raised {raised!r}, not {expected.__name__}")
            del raised  # its traceback holds the run's frames
            gc.collect()
            check(injected.calls >= 2, "the fault was not reached")
            check(injected.contexts and injected.contexts[0]() is None, "the run's context is still alive")
            check(injected.context.current() is None, "a run context is still current")
            check(tracker.current_bytes == 0, f"{tracker.current_bytes} bytes the run allocated are still alive")
            check("memory_required" not in base.__dict__, "ComfyUI's memory estimate is still replaced on the model")
            check(options_of(model) == options, "the MODEL's options changed")
            check(torch.equal(g.ksample(svd), reference), "the MODEL that came in samples differently after the fault")
            again, sample = graph(pack, svd, node)
            out = sample(again)
            bound = g.LATENT_TOL if node != "Step Rehash Sampler" else 1.0
            check(g.rel(out, reference) <= bound and torch.isfinite(out).all(),
                  f"the next run is off by {g.rel(out, reference):.2e} of the latent")
    _decode_faults(pack, tally)
    return tally


def _decode_faults(pack: Any, tally: Tally) -> None:
    import comfy.model_management as mm

    if not tally.wants("Streamline VAE Decode: an error in a band", "Streamline VAE Decode: ComfyUI's interrupt in a band"):
        return
    from ...engine.memory import MemoryTracker

    vae = g.build_svd_vae()
    node = pack.NODE_CLASS_MAPPINGS["StreamlineVAEDecode"]()
    decoder = vae.first_stage_model.decoder
    torch.manual_seed(2)
    latent = {"samples": torch.randn(3, 4, 3, 2)}
    (reference,) = node.decode(latent, vae, 0.0)["result"]
    for fault, error in (("an error in a band", lambda: RuntimeError("fault in a band")),
                         ("ComfyUI's interrupt in a band", mm.InterruptProcessingException)):
        if not tally.wants(f"Streamline VAE Decode: {fault}"):
            continue
        with tally.case(f"Streamline VAE Decode: {fault}"):
            calls = [0]

            def hook(_module, inputs, error=error):
                if inputs[0].device.type != "meta":
                    calls[0] += 1
                    if calls[0] == 2:
                        raise error()  # a new one: a kept instance would keep its traceback's frames alive

            handle = decoder.up[1].block[0].conv1.register_forward_pre_hook(hook)
            tracker = MemoryTracker(devices={"cpu"})
            try:
                raised = _raised(lambda: node.decode(latent, vae, 0.0), (RuntimeError, mm.InterruptProcessingException),
                                 tracker)
            finally:
                handle.remove()
            check(type(raised) is type(error()), f"the decode raised {raised!r}, not {type(error()).__name__}")
            del raised
            gc.collect()
            check(calls[0] >= 2, "the fault was not reached")
            check("forward" not in decoder.__dict__, "the VAE's decoder is still replaced")
            check(tracker.current_bytes == 0, f"{tracker.current_bytes} bytes the decode allocated are still alive")
            (again,) = node.decode(latent, vae, 0.0)["result"]
            check((again - reference).abs().max() <= 1e-5, "the next decode differs")


class _Log(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def recoveries(pack: Any, host: str) -> Tally:
    tally = Tally("recoveries", host)
    log = _Log()
    root = logging.getLogger()
    level = root.level
    root.addHandler(log)
    root.setLevel(logging.INFO)
    try:
        if tally.wants("Streamline Model: out of memory once", "Streamline Model: out of memory twice"):
            _recover_unet(pack, tally, log)
        if tally.wants("Streamline VAE Decode: out of memory once", "Streamline VAE Decode: out of memory twice"):
            _recover_decode(pack, tally, log)
        if tally.wants("streamline() in diffusers: out of memory once"):
            _recover_diffusers(tally, log)
    finally:
        root.removeHandler(log)
        root.setLevel(level)
    return tally


def _said(log: _Log) -> list[str]:
    said = [line for line in log.lines if "retrying once at the least-memory plan" in line]
    log.lines.clear()
    return said


def _recover_unet(pack: Any, tally: Tally, log: _Log) -> None:
    svd = g.build_svd()
    reference = g.ksample(svd)
    unet = svd.get_model_object("diffusion_model")
    (patched,) = pack.NODE_CLASS_MAPPINGS["StreamlineModel"]().patch(svd, "auto", 8, 0.0, "all")
    _said(log)
    if tally.wants("Streamline Model: out of memory once"):
        with tally.case("Streamline Model: out of memory once"):
            hook, count = g.out_of_memory(unet.input_blocks[1][0].in_layers[2], 1)
            try:
                out = g.ksample(patched)
            finally:
                hook.remove()
            said = _said(log)
            check(count[0] == 1, "the injected error was not raised")
            check(g.rel(out, reference) <= g.LATENT_TOL, f"the run is off by {g.rel(out, reference):.2e} of the latent")
            check(len(said) == 1 and "UNetModel for input" in said[0], f"the log does not say it retried: {said}")
    if tally.wants("Streamline Model: out of memory twice"):
        with tally.case("Streamline Model: out of memory twice"):
            _said(log)
            hook, count = g.out_of_memory(unet.input_blocks[1][0].in_layers[2], 2)
            try:
                raised = _raised(lambda: g.ksample(patched), (torch.OutOfMemoryError,))
            finally:
                hook.remove()
            check(raised is not None and "vram_budget_gb" in str(raised),
                  f"the second failure did not raise the device's error naming vram_budget_gb: {raised!r}")
            del raised
            check(torch.equal(g.ksample(svd), reference), "the MODEL that came in samples differently")
            check(getattr(unet._forward, "__func__", None) is type(unet)._forward, "the U-Net's _forward is still replaced")
            check(g.rel(g.ksample(patched), reference) <= g.LATENT_TOL, "the streamlined MODEL's next run is wrong")


def _recover_decode(pack: Any, tally: Tally, log: _Log) -> None:
    vae = g.build_svd_vae()
    node = pack.NODE_CLASS_MAPPINGS["StreamlineVAEDecode"]()
    decoder = vae.first_stage_model.decoder
    torch.manual_seed(2)
    latent = {"samples": torch.randn(3, 4, 3, 2)}
    (reference,) = node.decode(latent, vae, 0.0)["result"]
    _said(log)
    if tally.wants("Streamline VAE Decode: out of memory once"):
        with tally.case("Streamline VAE Decode: out of memory once"):
            hook, count = g.out_of_memory(decoder.mid.block_1.conv1, 1)
            try:
                out = node.decode(latent, vae, 0.0)
            finally:
                hook.remove()
            said = _said(log)
            check(count[0] == 1 and (out["result"][0] - reference).abs().max() <= 1e-5, "the decode after the retry differs")
            check("decoded again at the least-memory plan" in out["ui"]["text"][0], "the node's text does not say it retried")
            check(len(said) == 1 and "VideoDecoder for input" in said[0], f"the log does not say it retried: {said}")
    if tally.wants("Streamline VAE Decode: out of memory twice"):
        with tally.case("Streamline VAE Decode: out of memory twice"):
            _said(log)
            hook, count = g.out_of_memory(decoder.mid.block_1.conv1, 2)
            try:
                raised = _raised(lambda: node.decode(latent, vae, 0.0), (torch.OutOfMemoryError,))
            finally:
                hook.remove()
            check(raised is not None and "vram_budget_gb" in str(raised),
                  f"the second failure did not raise the device's error naming vram_budget_gb: {raised!r}")
            del raised
            check("forward" not in decoder.__dict__, "the VAE's decoder is still replaced")
            check((node.decode(latent, vae, 0.0)["result"][0] - reference).abs().max() <= 1e-5, "the next decode differs")


def _recover_diffusers(tally: Tally, log: _Log) -> None:
    from ... import streamline
    from .. import configs

    _said(log)
    with tally.case("streamline() in diffusers: out of memory once"):
        model = configs.seed_weights(configs.build_tiny_diffusers_svd(), std=0.1)
        torch.manual_seed(0)
        args, kwargs = configs.diffusers_svd_inputs(model, 1, 5, 64, 96)
        with torch.no_grad():
            reference = model(*args, **kwargs)[0]
            hook, count = g.out_of_memory(model.down_blocks[0].resnets[0].spatial_res_block.conv1, 1)
            handle = streamline(model)
            try:
                out = model(*args, **kwargs)[0]
            finally:
                hook.remove()
                handle.remove()
        said = _said(log)
        check(count[0] == 1, "the injected error was not raised")
        check((out - reference).abs().max() / reference.abs().max() <= 1e-5, "the output after the retry differs")
        check(len(said) == 1, f"the log does not say it retried: {said}")
