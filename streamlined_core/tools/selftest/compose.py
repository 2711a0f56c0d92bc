"""Compositions of the reliability self-test, on a real ComfyUI in this process: each graph with our nodes equals
the same graph without them (with the Step Rehash Sampler: the same Step Rehash on the plain MODEL), and the MODEL
that came in, used elsewhere in the graph, stays as it was."""

from __future__ import annotations

import itertools
from typing import Any, Callable

import torch

from . import comfy_graph as g
from .faults import options_of, rehash_sample
from .tally import Tally, check

PATCHING = ("Streamline Model", "VRAM Profiler")


def _through(pack: Any, model: Any, node: str) -> Any:
    classes = pack.NODE_CLASS_MAPPINGS
    if node == "Streamline Model":
        return classes["StreamlineModel"]().patch(model, "upper bound", 3, 0.0, "all")[0]
    return classes["VRAMProfiler"]().patch(model, "group", 0, "selftest")[0]


def _weight_patch(model: Any) -> Any:
    """What a LoRA loader hands on: a clone with a weight patch (a low-rank difference) on two layers."""
    patched = model.clone()
    gen = torch.Generator().manual_seed(3)
    patches = {}
    for key in ("diffusion_model.input_blocks.1.0.in_layers.2.weight", "diffusion_model.output_blocks.0.0.out_layers.3.weight"):
        weight = model.get_model_object(key)
        out, rest = weight.shape[0], weight[0].numel()
        delta = (torch.randn(out, 2, generator=gen) @ torch.randn(2, rest, generator=gen) * 0.02).reshape(weight.shape)
        patches[key] = (delta,)
    patched.add_patches(patches, 1.0)
    return patched


def _freeu(model: Any) -> Any:
    from comfy_extras.nodes_freelunch import FreeU_V2

    return FreeU_V2().patch(model, 1.3, 1.4, 0.9, 0.2)[0]


def compositions(pack: Any, host: str) -> Tally:
    tally = Tally("compositions", host)
    svd = g.build_svd()
    kept = options_of(svd)
    plain = g.ksample(svd)
    rehashed = rehash_sample(pack, svd)

    def same(name: str, out: torch.Tensor, reference: torch.Tensor) -> None:
        check(g.rel(out, reference) <= g.LATENT_TOL, f"{name}: off by {g.rel(out, reference):.2e} of the latent")

    def case(name: str, build: Callable[[], Any], reference: torch.Tensor, sample: Callable = g.ksample) -> None:
        if not tally.wants(name):
            return
        with tally.case(name):
            same(name, sample(build()), reference)
            check(options_of(svd) == kept, "the MODEL that came in now carries other options")
            check(torch.equal(g.ksample(svd), plain), "the MODEL that came in, used elsewhere, samples differently")

    for order in itertools.permutations(PATCHING):
        def chain(order=order):
            model = svd
            for node in order:
                model = _through(pack, model, node)
            return model

        case(f"{' -> '.join(order)} -> KSampler", chain, plain)
        case(f"{' -> '.join(order)} -> Step Rehash Sampler", chain, rehashed, lambda m: rehash_sample(pack, m))
    case("Streamline Model -> Streamline Model -> KSampler",
         lambda: _through(pack, _through(pack, svd, "Streamline Model"), "Streamline Model"), plain)
    lora = _weight_patch(svd)
    with_lora = g.ksample(lora)
    case("a weight patch (LoRA) -> Streamline Model", lambda: _through(pack, lora, "Streamline Model"), with_lora)
    case("Streamline Model -> a weight patch (LoRA)", lambda: _weight_patch(_through(pack, svd, "Streamline Model")),
         with_lora)
    if tally.wants("ControlNet -> Streamline Model"):
        import nodes

        def controlled(model):
            (positive, negative), calls = g.controlnet(g.conditioning(3, 8, 12)[:2])
            latent = g.conditioning(3, 8, 12)[2]
            (out,) = nodes.KSampler().sample(model, 7, 2, 2.5, "euler", "karras", positive, negative, latent, denoise=1.0)
            check(len(calls) >= 2, "the ControlNet did not run")
            return out["samples"]

        case("ControlNet -> Streamline Model -> KSampler", lambda: _through(pack, svd, "Streamline Model"), controlled(svd),
             controlled)
    freeu = g.ksample(_freeu(svd))
    case("FreeU V2 -> Streamline Model", lambda: _through(pack, _freeu(svd), "Streamline Model"), freeu)
    case("Streamline Model -> FreeU V2", lambda: _freeu(_through(pack, svd, "Streamline Model")), freeu)
    return tally


def diffusers_compositions(profile: str) -> Tally:
    """``streamline()`` under ``torch.compile`` in diffusers: compiled over a streamlined U-Net it equals the U-Net's
    own output (``aot_eager`` at two slices per group in the ci profile; the inductor backend at the planned slicing
    in the full one); ``fullgraph=True``, which cannot hold the run's context, is refused by torch, never wrong
    output; a U-Net compiled first is refused by ``streamline()`` naming the order that works."""
    import diffusers
    import torch._dynamo as dynamo

    from ... import streamline
    from .. import configs

    tally = Tally("compositions", f"diffusers {diffusers.__version__}")
    backend, slices = ("aot_eager", 2) if profile == "ci" else ("inductor", "auto")
    model = configs.seed_weights(configs.build_tiny_diffusers_svd(), std=0.1)
    torch.manual_seed(0)
    args, kwargs = configs.diffusers_svd_inputs(model, 1, 5, 64, 96)
    with torch.no_grad():
        reference = model(*args, **kwargs)[0]
    for name, full in ((f"torch.compile(backend={backend!r}) over streamline(slices={slices!r})", False),
                       ("torch.compile(fullgraph=True) over streamline()", True)):
        if not tally.wants(name):
            continue
        with tally.case(name):
            dynamo.reset()
            handle = streamline(model, slices=slices)
            try:
                compiled = torch.compile(model, backend="aot_eager" if full else backend, fullgraph=full)
                with torch.no_grad():
                    out = compiled(*args, **kwargs)[0]
                check(not full, "fullgraph=True compiled: expected torch to refuse the run's context")
                error = (out - reference).abs().max() / reference.abs().max()
                check(error <= 1e-5, f"the compiled, streamlined U-Net is off by {error:.2e}")
            except dynamo.exc.Unsupported as e:
                check(full, f"torch.compile refused it: {str(e).splitlines()[0]}")
                tally.notes.append(f"fullgraph=True: torch refuses: {str(e).splitlines()[0][:160]}")
            finally:
                handle.remove()
                dynamo.reset()
            with torch.no_grad():
                check(torch.equal(model(*args, **kwargs)[0], reference), "the U-Net is not restored")
    if tally.wants("streamline() over a compiled U-Net"):
        with tally.case("streamline() over a compiled U-Net"):
            raised = None
            try:
                streamline(torch.compile(model))
            except TypeError as e:
                raised = str(e)
            check(raised and "streamline(model); model = torch.compile(model)" in raised,
                  f"not refused naming the order that works: {raised!r}")
    return tally.finish()
