"""`streamline simulate`: output formats and clear errors with exit status 2."""

import json

import pytest
import torch

from streamlined_core.tools.cli import main

SMALL = ["simulate", "--model", "animatediff", "--implementation", "diffusers", "--resolution", "64x128", "--frames", "3"]


@pytest.mark.parametrize(
    "argv, option, accepted",
    [
        (["simulate", "--model", "sdxl"], "--model", "svd, svd-xt, animatediff"),
        (["simulate", "--model", "svd,nope"], "--model", "svd, svd-xt, animatediff"),
        (["simulate", "--resolution", "500x512"], "--resolution", "multiples of 8"),
        (["simulate", "--resolution", "576"], "--resolution", "HEIGHTxWIDTH"),
        (["simulate", "--frames", "0"], "--frames", "positive integer"),
        (["simulate", "--frames", "-3"], "--frames", "positive integer"),
        (["simulate", "--implementation", "webui"], "--implementation", "diffusers, comfyui"),
    ],
)
def test_bad_input_names_the_option_and_accepted_values_with_exit_status_2(capsys, argv, option, accepted):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err and accepted in err


def test_json_prints_one_object_per_row_with_the_documented_fields(capsys):
    assert main(SMALL + ["--json"]) == 0
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    assert [r["variant"] for r in rows][:3] == [
        "original",
        "diffusers FreeNoise split (default)",
        "diffusers FreeNoise split temporal_split_size=1",
    ]
    assert len(rows) == 4 and rows[3]["variant"].startswith("streamlined auto (")
    for r in rows:
        for key in ("model", "variant", "height", "width", "frames", "weights_bytes", "original_peak_bytes",
                    "peak_bytes", "skip_floor_bytes"):
            assert key in r
        assert (r["model"], r["height"], r["width"], r["frames"]) == ("animatediff", 64, 128, 3)
        assert r["peak_bytes"] <= r["original_peak_bytes"]
    assert "[1/4]" in captured.err and "[4/4]" in captured.err  # progress goes to stderr


def test_markdown_and_text_tables_label_the_paper_figures_as_not_comparable(capsys):
    assert main(SMALL + ["--markdown"]) == 0
    md = capsys.readouterr().out
    assert md.startswith("| model | implementation | variant |") and md.count("\n| AnimateDiff |") == 4
    assert "not directly comparable" in md
    assert main(SMALL) == 0
    text = capsys.readouterr().out
    assert "AnimateDiff" in text and "not directly comparable" in text


def test_bench_latency_prints_the_ratio_with_the_plan_and_peaks(capsys):
    assert main(["bench", "--latency", "--config", "tiny", "--warmup", "0", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "ratio" in out and "SVD tiny" in out and "->" in out and "Not directly comparable" in out


def test_bench_cuts_prints_every_up_path_cut_with_time_and_flop_shares(capsys):
    from streamlined_core.tools.bench.unet import cuts

    assert main(["bench", "--cuts", "--config", "tiny", "--warmup", "0", "--repeats", "1", "--markdown"]) == 0
    out = capsys.readouterr().out
    assert "| up0.0.attn | up_blocks.1.attentions.0 | conv_in, d0.r0, d0.a0 |" in out and "(replay)" in out
    result = cuts("tiny", warmup=0, repeats=1)
    flops = [c.tail_flops for c in result.cuts]
    assert all(a > b for a, b in zip(flops, flops[1:])), "a later cut leaves a smaller tail"
    assert all(c.tail_flops <= c.shallow_tail_flops < 1 for c in result.cuts)
    timed = [c for c in result.cuts if c.direct_tail is not None]
    assert [c.cut for c in timed] == ["up0.0.res", "up0.0.attn", "up0.1.res"]
    assert all(0 < c.direct_tail < 1.5 and 0 < c.direct_shallow_tail < 1.5 for c in timed)


@pytest.mark.parametrize("argv", [["bench"], ["bench", "--latency", "--config", "huge"], ["bench", "--latency", "--repeats", "0"],
                                  ["bench", "--latency", "--cuts"]])
def test_bench_bad_input_exits_with_status_2(argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


@pytest.mark.parametrize("argv, message", [
    (["bench", "--latency", "--clips", "3"], "argument --clips: only with --fixture"),
    (["bench", "--fixture", "--frames", "30"], "argument --frames: 30: expected 8 to 16"),
    (["bench", "--fixture", "--config", "mid"], "argument --config: not with --fixture"),
    (["bench", "--cuts", "--json-out", "x.json"], "argument --json-out: only with --cuda or --fixture"),
    (["profile", "--granularity", "layer"], "argument --granularity"),
    (["profile", "--compare", "--streamline"], "not allowed with argument"),
])
def test_fixture_and_profile_options_are_checked(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_bench_fixture_names_missing_weights_with_exit_status_2(capsys, tmp_path):
    assert main(["bench", "--fixture", "--weights", str(tmp_path / "none.safetensors"), "--clips", "1"]) == 2
    assert "none.safetensors does not exist" in capsys.readouterr().err


def test_profile_compare_writes_the_timelines_and_a_chart(capsys, tmp_path):
    """Random weights of the fixture's layout, 2 steps, 8 frames: the streamlined run's peak is below the
    original's and both timelines are in the JSON; the PNG is a real image."""
    out, png = tmp_path / "t.json", tmp_path / "t.png"
    html = tmp_path / "t.html"
    assert main(["profile", "--model", "tiny", "--compare", "--steps", "2", "--frames", "8", "--threads", "1",
                 "--json-out", str(out), "--png", str(png), "--html", str(html)]) == 0
    doc = json.loads(out.read_text())
    original, streamlined = doc["runs"]
    assert original["label"] == "original" and streamlined["label"] == "streamlined"
    assert len(original["steps"]) == len(streamlined["steps"]) == 2
    assert streamlined["activation_peak_bytes"] < original["activation_peak_bytes"]
    assert streamlined["predicted_peak_bytes"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = html.read_text()
    assert "uPlot" in page and '"label": "streamlined"' in page.replace('"label":"streamlined"', '"label": "streamlined"')
    printed = capsys.readouterr().out
    assert "saving:" in printed and "original: peak" in printed


def test_simulate_decode_measures_the_stock_and_the_grouped_decode(capsys):
    assert main(["simulate", "--decode", "--resolution", "32x64", "--json"]) == 0
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    assert [(r["model"], r["frames"], r["height"], r["width"]) for r in rows] == [("SVD", 14, 32, 64), ("SVD-XT", 25, 32, 64)]
    for r in rows:
        assert r["peak_bytes"] == r["predicted_peak_bytes"]  # the plan predicts what the tracker measures
        assert r["floor_bytes"] < r["peak_bytes"] < r["original_peak_bytes"] / 3
        assert r["weights_bytes"] > 0 and "frames" in r["plan"]
    assert "decode SVD-XT 32x64 25 frames" in captured.err
    from streamlined_core.tools.sim.decode import DecodeRow, format_markdown

    assert "| SVD-XT | 32x64 | 25 |" in format_markdown([DecodeRow(**r) for r in rows])


def test_simulate_pipeline_prints_every_stage_original_and_streamlined(capsys):
    assert main(["simulate", "--pipeline", "--model", "svd-xt,animatediff", "--resolution", "32x64", "--json"]) == 0
    captured = capsys.readouterr()
    rows = {r["model"]: r for r in json.loads(captured.out)}
    stages = {m: [s["name"].split(" ")[0] for s in r["stages"]] for m, r in rows.items()}
    assert stages == {"svd-xt": ["image", "VAE", "U-Net,", "VAE"], "animatediff": ["text", "U-Net,", "VAE"]}, stages
    for r in rows.values():
        assert r["peak_bytes"] == max(s["total_bytes"] for s in r["stages"]) < r["original_peak_bytes"]
        assert r["card_bytes"] == r["peak_bytes"] + r["cuda_context_bytes"]  # all weights resident, no host reserve
        assert r["card_bytes"] <= r["smallest_card_gb"] * 1024**3 and "Step Rehash" in r["step_rehash"]
        unet, decode = r["stages"][-2], r["stages"][-1]
        assert unet["peak_bytes"] < unet["original_peak_bytes"] and decode["peak_bytes"] < decode["original_peak_bytes"]
        assert r["stages"][0]["peak_bytes"] == r["stages"][0]["original_peak_bytes"]  # encoders run unchanged
    assert "SVD-XT: VAE decode" in captured.err
    from streamlined_core.tools.sim.pipeline import PipelineRow, Stage, format_markdown

    table = format_markdown([PipelineRow("svd-xt", 32, 64, 25, [Stage(**{k: s[k] for k in (
        "name", "weights_bytes", "original_peak_bytes", "peak_bytes", "streamlined")}) for s in rows["svd-xt"]["stages"]])])
    assert "| SVD-XT 25 frames 32x64 | image encoder" in table and "all weights resident: smallest card" in table
    with pytest.raises(SystemExit):
        main(["simulate", "--pipeline", "--frames", "3"])


def test_simulate_pipeline_card_says_what_fits_and_what_the_host_streams(capsys):
    """--card N[,N...]: every workflow three ways on each card, loaded as ComfyUI loads it (2 GB with a desktop:
    1 GiB free)."""
    assert main(["simulate", "--pipeline", "--model", "svd-xt", "--resolution", "64x128", "--card", "2,24", "--system",
                 "windows", "--desktop-gb", "0.5", "--json"]) == 0
    predictions = json.loads(capsys.readouterr().out)
    assert [(p["card_gb"], p["variant"]) for p in predictions] == [
        (gb, v) for gb in (2, 24) for v in ("original", "streamlined", "streamlined + Step Rehash")]
    for p in predictions:
        gb = p["card_gb"]
        assert p["system"] == "windows" and p["desktop_bytes"] == 1024**3 // 2
        assert p["free_bytes"] == gb * 1024**3 - p["cuda_context_bytes"] - p["desktop_bytes"]
        assert p["reserved_bytes"] == (600 if gb == 2 else 700) * 1024**2  # Windows keeps 100 MiB more over 15 GiB
        stages = {s["name"]: s for s in p["stages"]}
        for s in stages.values():
            assert s["need_bytes"] == s["resident_bytes"] + s["cast_bytes"] + s["activation_bytes"] + s["cache_bytes"]
        assert p["fits"] == all(s["need_bytes"] <= p["free_bytes"] for s in stages.values())
        assert p["deciding_stage"] == max(stages.values(), key=lambda s: s["need_bytes"])["name"]
        unet = stages["sampler (U-Net)"]
        assert (unet["cache_bytes"] > 0) == (p["variant"] == "streamlined + Step Rehash")
        if gb == 2:  # 1 GiB free holds little of 2.84 GiB of weights
            assert unet["streamed_share"] > 0.5 and unet["cast_bytes"] > 0
        else:
            assert p["fits"] and all(s["streamed_bytes"] == 0 for s in stages.values())


@pytest.mark.parametrize("argv, message", [
    (["--pipeline", "--card", "0"], "--card: expected a card's memory in GB between 1 and 1024"),
    (["--pipeline", "--card", "six"], "--card: expected a card's memory in GB"),
    (["--pipeline", "--card", "6,2000"], "between 1 and 1024 (e.g. 6, or 6,8,12 for several cards), got '2000'"),
    (["--pipeline", "--card", "6", "--desktop-gb", "-1"], "--desktop-gb: expected GB already in use"),
    (["--card", "6"], "--card, --system, --desktop-gb: they go with --pipeline"),
    (["--pipeline", "--card", "1", "--desktop-gb", "1"], "leave nothing of a 1 GB card"),
])
def test_simulate_card_refuses_bad_input_naming_it(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(["simulate", "--model", "svd-xt", "--resolution", "64x128", *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_bench_decode_puts_the_error_at_the_cuts_and_none_in_the_groups(capsys, tmp_path):
    png, out = tmp_path / "cuts.png", tmp_path / "cuts.json"
    assert main(["bench", "--decode", "--grid", str(png), "--json-out", str(out)]) == 0
    assert "| Streamline, by groups" in capsys.readouterr().out
    rows = {r["method"].split(" (")[0]: r for r in json.loads(out.read_text())}
    ours = rows["Streamline, by groups"]
    assert ours["max_abs"] < 1e-5 and not ours["cuts"]
    chunked = rows["diffusers decode_chunk_size=4"]
    assert chunked["cuts"] == [4, 8, 12] and chunked["max_abs"] > 1000 * ours["max_abs"]
    assert chunked["border_mean_abs"] > 3 * chunked["other_mean_abs"]  # the error sits at the cuts
    assert png.stat().st_size > 10_000
    with pytest.raises(SystemExit):
        main(["bench", "--decode", "--frames", "3"])


def test_calibrate_writes_the_maps_the_schedule_and_a_picture(capsys, tmp_path):
    """One calibration clip, 4 steps: six maps, key steps by Algorithm 1, files that load back."""
    from streamlined_core.features.rehash import DEFAULT_CUT, LAST_UP_BLOCK, Schedule

    png = tmp_path / "maps.png"
    assert main(["calibrate", "--clips", "1", "--steps", "4", "--count", "3", "--positions", "256", "--threads", "1",
                 "--out", str(tmp_path / "s"), "--png", str(png)]) == 0
    printed = capsys.readouterr().out
    assert all(f"| {cut}" in printed for cut in LAST_UP_BLOCK) and "not on SVD" in printed
    schedule = Schedule.load(tmp_path / "s.json")
    assert schedule.steps == 4 and schedule.cut == DEFAULT_CUT and len(schedule.key_steps) <= 3
    assert set(schedule.maps) == set(LAST_UP_BLOCK)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_calibrate_names_bad_options(capsys, tmp_path):
    assert main(["calibrate", "--cut", "up1.0.res", "--out", str(tmp_path / "s")]) == 2
    assert "--cut up1.0.res" in capsys.readouterr().err
    assert main(["calibrate", "--steps", "4", "--count", "9", "--out", str(tmp_path / "s")]) == 2
    assert "--count 9" in capsys.readouterr().err
    assert main(["calibrate", "--out", str(tmp_path / "no" / "s")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bench_rehash_prints_one_object_per_setting(capsys, tmp_path):
    """A quick run (tiny cut costs, one clip, 4 steps): every method's row with the fields the README's
    claims are checked by, exactly one default, and the plot."""
    png = tmp_path / "r.png"
    assert main(["bench", "--rehash", "--quick", "--config", "tiny", "--clips", "1", "--steps", "4", "--threads", "1",
                 "--json", "--plot", str(png)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["method"] for r in rows} == {"full", "rehash", "deepcache", "whole-step", "pab"}
    for r in rows:
        assert {"method", "setting", "full_steps", "unet_time_ratio", "psnr_db", "default"} <= set(r)
        assert 0 < r["unet_time_ratio"] <= 1.0 + 1e-9 or r["method"] == "pab"
    assert sum(r["default"] for r in rows) == 1
    default = next(r for r in rows if r["default"])
    assert default["method"] == "rehash" and default["full_steps"] <= 4 and default["psnr_db"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_rehash_options_belong_to_it(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--latency", "--quick"])
    assert "--quick: only with --rehash" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--rehash", "--config", "full"])
    assert "--config" in capsys.readouterr().err
    for option in (["--comfyui"], ["--comfyui-only"]):
        with pytest.raises(SystemExit):
            main(["bench", "--latency", *option])
        assert f"{option[0]}: only with --rehash" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--rehash", "--comfyui-only", "--plot", "p.png"])
    assert "--plot" in capsys.readouterr().err


def test_bench_rehash_names_a_comfyui_path_that_is_not_a_checkout(capsys, tmp_path):
    assert main(["bench", "--rehash", "--comfyui", str(tmp_path), "--comfyui-only"]) == 2
    assert f"--comfyui {tmp_path}: not a ComfyUI checkout" in capsys.readouterr().err


@pytest.fixture(scope="module")
def svd_pipeline_dir(tmp_path_factory):
    """A tiny StableVideoDiffusionPipeline saved as a local folder (real diffusers and transformers classes,
    seeded weights), and a conditioning image."""
    from diffusers import StableVideoDiffusionPipeline
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from streamlined_core.fixture import model as fixture
    from streamlined_core.tools import configs

    torch.manual_seed(0)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, projection_dim=32, num_hidden_layers=1, num_attention_heads=2, image_size=224, patch_size=32,
        intermediate_size=37))
    pipe = StableVideoDiffusionPipeline(
        vae=configs.build_tiny_svd_vae(), image_encoder=encoder, unet=configs.build_tiny_diffusers_svd(),
        scheduler=fixture.make_scheduler(), feature_extractor=CLIPImageProcessor(crop_size=32, size=32))
    root = tmp_path_factory.mktemp("svd")
    pipe.save_pretrained(root / "pipe")
    image = root / "frame.png"
    Image.fromarray((torch.rand(32, 32, 3) * 255).to(torch.uint8).numpy()).save(image)
    return root / "pipe", image


def test_calibrate_a_local_svd_pipeline_writes_a_schedule_rehash_accepts(svd_pipeline_dir, capsys, tmp_path):
    from diffusers import StableVideoDiffusionPipeline
    from PIL import Image

    from streamlined_core import RehashConfig, rehash
    from streamlined_core.features.rehash import Schedule, fingerprint

    folder, image = svd_pipeline_dir
    out = tmp_path / "svd"
    assert main(["calibrate", "--pipeline", str(folder), "--image", str(image), "--resolution", "32x32",
                 "--frames", "3", "--steps", "5", "--clips", "2", "--count", "3", "--positions", "64",
                 "--device", "cpu", "--cut", "up0.0.attn", "--out", str(out), "--threads", "1"]) == 0
    printed = capsys.readouterr()
    assert f"Measured on the pipeline in {folder} (32x32" in printed.out and "2 calibration runs of 3 frames" in printed.out
    assert "calibration run 2/2: image 1, seed 1" in printed.err
    schedule = Schedule.load(out.with_suffix(".json"))
    pipe = StableVideoDiffusionPipeline.from_pretrained(folder)
    assert schedule.made_for["model"] == fingerprint(pipe.unet) and schedule.made_for["steps"] == 5
    assert schedule.cut == "up0.0.attn" and len(schedule.key_steps) <= 3 and schedule.key_steps[0] == 0
    pipe.set_progress_bar_config(disable=True)
    with rehash(pipe, RehashConfig(schedule=str(out.with_suffix(".json")))) as handle:
        pipe(Image.open(image), height=32, width=32, num_frames=3, num_inference_steps=5, output_type="latent")
    assert [r.step for r in handle.last_run.records if r.kind == "reuse"]  # the schedule reused steps


@pytest.mark.parametrize("extra, message", [
    ([], "--pipeline: this StableVideoDiffusionPipeline needs --image"),
    (["--prompt", "a red square"], "--prompt: not for this StableVideoDiffusionPipeline (it takes --image)"),
    (["--image", "missing.png"], "--image missing.png: no such file"),
    (["--image", "IMAGE", "--weights", "w.safetensors"], "--weights: a fixture file; not with --pipeline"),
    (["--image", "NOT_AN_IMAGE"], "not an image"),
])
def test_calibrate_pipeline_names_bad_options(svd_pipeline_dir, capsys, tmp_path, extra, message):
    folder, image = svd_pipeline_dir
    (tmp_path / "notes.png").write_text("not a picture")
    extra = [str(image) if a == "IMAGE" else str(tmp_path / "notes.png") if a == "NOT_AN_IMAGE" else a for a in extra]
    assert main(["calibrate", "--pipeline", str(folder), "--device", "cpu", "--out", str(tmp_path / "s"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "loading" not in err  # refused before the pipeline loads


def test_calibrate_names_pipeline_options_without_a_pipeline(capsys, tmp_path):
    assert main(["calibrate", "--image", "x.png", "--out", str(tmp_path / "s")]) == 2
    assert "--image: only with --pipeline" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["calibrate", "--pipeline", str(tmp_path), "--resolution", "36x32"])
    assert "multiples of 8" in capsys.readouterr().err
    assert main(["calibrate", "--pipeline", str(tmp_path / "nothing"), "--image", "x.png"]) == 2
    assert "not a diffusers pipeline folder" in capsys.readouterr().err


@pytest.fixture(scope="module")
def animatediff_pipeline_dir(tmp_path_factory):
    """A tiny AnimateDiffPipeline saved as a local folder (real diffusers and transformers classes, seeded
    weights, a CLIP tokenizer over a few letters)."""
    from diffusers import AnimateDiffPipeline, DDIMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from streamlined_core.tools import configs

    root = tmp_path_factory.mktemp("animatediff")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"), model_max_length=16)
    torch.manual_seed(0)
    encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=37,
                                           num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                                           bos_token_id=0, eos_token_id=1, pad_token_id=1))
    pipe = AnimateDiffPipeline(vae=configs.build_tiny_sd_vae(), text_encoder=encoder, tokenizer=tokenizer,
                               unet=configs.build_tiny_diffusers_animatediff(), motion_adapter=None,
                               scheduler=DDIMScheduler(beta_schedule="linear", steps_offset=1, clip_sample=False))
    pipe.save_pretrained(root / "pipe")
    return root / "pipe"


def test_calibrate_a_local_animatediff_pipeline_from_prompts(animatediff_pipeline_dir, capsys, tmp_path):
    from diffusers import AnimateDiffPipeline

    from streamlined_core.features.rehash import Schedule, fingerprint

    out = tmp_path / "ad"
    assert main(["calibrate", "--pipeline", str(animatediff_pipeline_dir), "--prompt", "a red square", "--prompt",
                 "a blue disc", "--resolution", "32x32", "--frames", "3", "--steps", "4", "--clips", "2",
                 "--positions", "64", "--device", "cpu", "--cut", "up0.0.attn", "--out", str(out),
                 "--threads", "1"]) == 0
    printed = capsys.readouterr()
    assert f"Measured on the pipeline in {animatediff_pipeline_dir} (32x32, DDIMScheduler" in printed.out
    assert "2 calibration runs of 3 frames" in printed.out and "calibration run 2/2: prompt 2, seed 1" in printed.err
    schedule = Schedule.load(out.with_suffix(".json"))
    pipe = AnimateDiffPipeline.from_pretrained(animatediff_pipeline_dir)
    assert schedule.made_for["model"] == fingerprint(pipe.unet) and schedule.made_for["steps"] == 4
    assert schedule.made_for["sampler"] == "DDIMScheduler" and schedule.maps
    from streamlined_core import RehashConfig, rehash

    pipe.set_progress_bar_config(disable=True)
    with rehash(pipe, RehashConfig(schedule=str(out.with_suffix(".json")))) as handle:
        pipe("a red square", height=32, width=32, num_frames=3, num_inference_steps=4, output_type="latent")
    keys = [r.step for r in handle.last_run.records if r.kind != "reuse"]
    assert keys == schedule.key_steps and len(keys) < 4  # the calibrated key steps ran; the others reused
    for extra, message in (([], "--pipeline: this AnimateDiffPipeline needs --prompt"),
                           (["--prompt", "a", "--image", "x.png"], "--image: not for this AnimateDiffPipeline"),
                           (["--prompt", "a", "--frames", "40"], "--frames 40: this pipeline's motion modules take "
                                                                 "at most 32 frames")):
        assert main(["calibrate", "--pipeline", str(animatediff_pipeline_dir), "--out", str(tmp_path / "s"),
                     "--device", "cpu", *extra]) == 2
        assert message in capsys.readouterr().err


def test_calibrate_refuses_a_pipeline_it_does_not_run(capsys, tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert main(["calibrate", "--pipeline", str(tmp_path), "--prompt", "a", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "'StableDiffusionPipeline' pipeline" in err and "StableVideoDiffusionPipeline (with --image)" in err


def test_bench_rehash_names_a_comfyui_it_cannot_import(tmp_path):
    """A folder that looks like a checkout but whose ComfyUI does not import: exit 2 before any bench runs
    (in a child process: the failed import must not leave a half-imported ComfyUI in this one)."""
    import subprocess
    import sys

    (tmp_path / "comfy").mkdir()
    (tmp_path / "main.py").touch()
    (tmp_path / "comfy" / "model_patcher.py").touch()
    done = subprocess.run([sys.executable, "-m", "streamlined_core.tools.cli", "bench", "--rehash", "--comfyui", str(tmp_path),
                           "--comfyui-only"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and not done.stdout
    assert f"--comfyui {tmp_path}: could not import ComfyUI" in done.stderr and "comfy.cli_args" in done.stderr
