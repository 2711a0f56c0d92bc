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


def compositions(pack: Any, host: str, root: str = "", profile: str = "ci") -> Tally:
    tally = Tally("compositions", host)
    if profile == "full":
        animatediff(pack, tally, root)
    svd = g.build_svd()
    kept, patches = options_of(svd), dict(svd.object_patches)
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
            check(svd.object_patches == patches, f"the MODEL that came in now carries object patches: {list(svd.object_patches)}")
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
    if tally.wants("ControlNet -> Streamline Model -> KSampler"):
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


def animatediff(pack: Any, tally: Tally, root: str) -> None:
    """Streamline Model with AnimateDiff-Evolved's context windows, before and after its Use Evolved Sampling, and
    with ComfyUI's EasyCache on SD1.5 with AnimateDiff-Evolved (where EasyCache runs: on SVD it raises by itself; on
    ADE with one cond per call), at full width (what the motion modules fit), 6 frames of 8x8 latents."""
    import tempfile

    from .worker import animatediff_evolved

    if not animatediff_evolved(root):
        tally.notes.append("AnimateDiff-Evolved is not in this checkout's custom_nodes: its compositions did not run")
        return
    frames, sd15 = 6, g.sd15_patcher()
    with tempfile.TemporaryDirectory(prefix="streamline-motion-") as folder:
        v2 = g.motion_model_files(folder)["v2"]
        windows = g.ksample_sd15(g.evolved(sd15, v2, 4), frames)
        for name, build in (("AnimateDiff-Evolved context windows of 4 -> Streamline Model",
                             lambda: _through(pack, g.evolved(sd15, v2, 4), "Streamline Model")),
                            ("Streamline Model -> AnimateDiff-Evolved context windows of 4",
                             lambda: g.evolved(_through(pack, sd15, "Streamline Model"), v2, 4))):
            if tally.wants(name):
                with tally.case(name):
                    out = g.ksample_sd15(build(), frames)
                    check(g.rel(out, windows) <= g.LATENT_TOL, f"off by {g.rel(out, windows):.2e} of the latent")
        name = "AnimateDiff-Evolved -> Streamline Model -> EasyCache"
        if not tally.wants(name):
            return
        try:
            from comfy_extras.nodes_easycache import EasyCacheNode
        except ImportError:
            tally.notes.append("this ComfyUI has no EasyCache node: its composition did not run")
            return

        def easycache(model):
            out = EasyCacheNode.execute(model, reuse_threshold=0.2, start_percent=0.15, end_percent=0.95,
                                        verbose=False)
            return out[0] if isinstance(out, tuple) else out.result[0]

        with tally.case(name):
            # one cond (cfg 1): with cond and uncond batched, EasyCache raises on ADE's sampling by itself
            unet, calls = sd15.get_model_object("diffusion_model"), []
            hook = unet.time_embed.register_forward_hook(  # once per U-Net call (plans run on meta)
                lambda _m, _i, out: calls.append(1) if out.device.type != "meta" else None)
            try:
                reference = g.ksample_sd15(easycache(g.evolved(sd15, v2)), frames, steps=6, cfg=1.0)
                plain = len(calls)
                out = g.ksample_sd15(easycache(_through(pack, g.evolved(sd15, v2), "Streamline Model")), frames,
                                     steps=6, cfg=1.0)
            finally:
                hook.remove()
            check(0 < plain < 6, f"EasyCache skipped no step, or all ({plain} U-Net calls in 6 steps)")
            check(len(calls) - plain == plain, f"EasyCache skipped other steps: {plain} calls, then {len(calls) - plain}")
            check(g.rel(out, reference) <= g.LATENT_TOL, f"off by {g.rel(out, reference):.2e} of the latent")
            tally.notes.append(f"EasyCache on AnimateDiff-Evolved ran the U-Net {plain} times in 6 steps, with "
                               "Streamline Model as without")


def diffusers_compositions(profile: str, cases: str = "") -> Tally:
    """``streamline()`` under ``torch.compile`` in diffusers: compiled over a streamlined U-Net it equals the U-Net's
    own output (``aot_eager`` at two slices per group in the ci profile; the inductor backend at the planned slicing
    in the full one); ``fullgraph=True``, which cannot hold the run's context, is refused by torch, never wrong
    output; a U-Net compiled first is refused by ``streamline()`` naming the order that works."""
    import diffusers
    import torch._dynamo as dynamo

    from ... import streamline
    from .. import configs

    tally = Tally("compositions", f"diffusers {diffusers.__version__}", only=cases)
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
