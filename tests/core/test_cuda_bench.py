"""`streamline bench --cuda`: its whole row loop on the CPU probe with tiny models, its refusals, its table."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from streamlined_core.host.comfyui import find_comfyui
from streamlined_core.tools import configs
from streamlined_core.tools.bench import cuda as cuda_bench
from streamlined_core.tools.bench.cuda import CpuProbe, CudaBenchResult, CudaRow, MemoryFigures, format_markdown, measure, workloads
from streamlined_core.tools.cli import main

TINY_ARGS = ["bench", "--cuda", "--config", "tiny", "--model", "svd,animatediff", "--implementation", "diffusers",
             "--warmup", "1", "--repeats", "2"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the command would run")
def test_bench_cuda_refuses_without_a_cuda_device_with_exit_status_2(capsys):
    assert main(["bench", "--cuda"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "bench --cuda measures on a CUDA device and finds none" in captured.err
    assert "torch.cuda.is_available() is False" in captured.err


@pytest.mark.parametrize(
    "argv, option",
    [
        (["bench", "--latency", "--config", "full"], "--config"),
        (["bench", "--cuda", "--config", "mid"], "--config"),
        (["bench", "--cuts", "--json-out", "x.json"], "--json-out"),
        (["bench", "--latency", "--deadline", "60"], "--deadline"),
        (["bench", "--cuda", "--model", "sdxl"], "--model"),
        (["bench", "--cuda", "--implementation", "webui"], "--implementation"),
        (["bench", "--cuda", "--deadline", "0"], "--deadline"),
        (["bench", "--latency", "--cuda"], "--cuda"),
    ],
)
def test_bench_options_name_themselves_when_refused_with_exit_status_2(capsys, argv, option):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert f"argument {option}" in capsys.readouterr().err


def test_json_out_into_a_missing_directory_is_refused_before_measuring(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(cuda_bench, "cuda_probe", CpuProbe)  # past the CUDA check: the path is checked next
    monkeypatch.setattr(cuda_bench, "measure", lambda *a, **k: pytest.fail("measured despite an unwritable --json-out"))
    assert main(TINY_ARGS + ["--json-out", str(tmp_path / "missing" / "cuda.json")]) == 2
    err = capsys.readouterr().err
    assert "--json-out" in err and "does not exist" in err


def test_full_rows_are_the_issues_workloads_at_full_size():
    rows = workloads("full")
    got = [(w.implementation, w.model, w.height, w.width, w.frames, w.batch) for w in rows]
    want = [(impl, *row) for impl in ("diffusers", "comfyui") for row in (
        ("svd", 576, 1024, 14, 2), ("svd-xt", 576, 1024, 25, 2), ("animatediff", 512, 512, 16, 2),
        ("animatediff", 576, 1024, 16, 2))]
    assert got == want
    builds = {(w.implementation, w.model): w.build for w in rows}
    assert builds[("diffusers", "svd")] is builds[("diffusers", "svd-xt")] is configs.build_diffusers_svd
    assert builds[("diffusers", "animatediff")] is configs.build_diffusers_animatediff
    assert builds[("comfyui", "svd")] is configs.build_comfy_svd
    assert builds[("comfyui", "animatediff")] is configs.build_comfy_animatediff
    assert [w.model for w in workloads("full", models=["animatediff"], implementations_wanted=["diffusers"])] == [
        "animatediff", "animatediff"]


@pytest.mark.filterwarnings("ignore:Streamline. the device's memory")  # tiny models cannot reach 1.5x their floor
def test_bench_cuda_runs_every_row_on_the_cpu_probe_and_agrees_with_the_simulator(capsys, monkeypatch, tmp_path):
    """The command's whole path with the CPU probe in place of the CUDA one: build, seed, plan for the
    target, warm up, measure memory, time, simulate in workers, table and JSON. The tracker on real
    tensors and the simulator on ``meta`` share their counting rules, so here they agree to the byte."""
    monkeypatch.setattr(cuda_bench, "cuda_probe", CpuProbe)
    path = tmp_path / "cuda.json"
    assert main(TINY_ARGS + ["--json-out", str(path)]) == 0
    captured = capsys.readouterr()
    doc = json.loads(path.read_text())
    assert doc["device"]["probe"] == "cpu" and doc["dtype"] == "float16" and doc["defects"] == []
    assert [(r["model"], r["frames"], r["status"]) for r in doc["rows"]] == [("svd", 3, "measured"), ("animatediff", 4, "measured")]
    for r in doc["rows"]:
        original, streamlined = r["original"]["activation_bytes"], r["streamlined"]["activation_bytes"]
        assert original == r["simulated_original_bytes"] and streamlined == r["simulated_streamlined_bytes"]
        assert r["original_measured_over_simulated"] == r["streamlined_measured_over_simulated"] == 1.0
        assert 0 < streamlined < original
        assert r["simulated_plan_matches"] and r["simulated_plan"] == r["plan"]
        assert max(slices for _name, slices, _mode in r["plan_groups"]) >= 2, "the plan slices something"
        assert r["target_bytes"] == int(1.5 * r["skip_floor_bytes"])
        assert len(r["original_times_s"]) == len(r["streamlined_times_s"]) == 2
        assert r["latency_ratio"] == pytest.approx(r["streamlined_median_s"] / r["original_median_s"])
        # fp16 rounding at most (equal bits are possible: the CPU's threads can sum both ways alike)
        assert 0 <= r["streamlined_max_abs_diff"] <= 1e-2 * r["output_max_abs"], "fp16 rounding, not a different model"
        assert r["output_max_abs"] > 0
    md = captured.out
    assert md.startswith("`streamline bench --cuda` (tiny models, fp16")
    assert "torch " + torch.__version__ in md and "| model | implementation | size |" in md
    assert md.count("\n| SVD | diffusers | 64x64 | 3 |") == 2 and md.count("\n| AnimateDiff | diffusers | 64x64 | 4 |") == 2
    assert f"| streamlined ({doc['rows'][0]['plan']}" in md and "| 1.000 |" in md
    assert "[1/2] SVD (diffusers)" in captured.err and "[2/2] AnimateDiff (diffusers)" in captured.err
    assert "predicted activation peak" in captured.err  # the plan, group by group


def test_rows_past_the_deadline_are_listed_as_not_measured():
    result = measure(CpuProbe(), "tiny", models=["svd", "svd-xt"], implementations_wanted=["diffusers"], deadline_s=0)
    assert [(r.model, r.status) for r in result.rows] == [("svd", "not measured"), ("svd-xt", "not measured")]
    md = format_markdown(result)
    assert md.count("| not measured: deadline (0 s) reached before the row |") == 2


def _row(original: int, simulated: int) -> CudaRow:
    row = CudaRow("svd", "diffusers", 576, 1024, 14, 2, status="measured", plan="k<=7 frames", plan_fits=True,
                  weights_bytes=3 << 30, original=MemoryFigures(original, 6 << 30, 8 << 30),
                  streamlined=MemoryFigures(simulated // 4, 4 << 30, 6 << 30))
    row.simulated_original_bytes, row.simulated_streamlined_bytes = simulated, simulated // 4
    row.original_times_s, row.streamlined_times_s = [1.0, 1.2, 1.1], [1.3, 1.4, 1.5]
    return row


def test_a_measured_figure_more_than_10_percent_from_the_simulated_one_is_flagged_as_a_defect():
    ok, off = _row(109, 100), _row(111, 100)
    assert not ok.off("original") and off.off("original") and not off.off("streamlined")
    assert off.latency_ratio == pytest.approx(1.4 / 1.1)
    result = CudaBenchResult({"probe": "cuda", "device": "a GPU", "memory_total_bytes": 80 << 30, "torch": "2", "cuda": "12",
                              "cudnn": 9, "driver": None, "allocator": "native"}, "full", "float16", 2, 5, 270, 200.0, [ok, off])
    assert result.defects == ["SVD (diffusers) 576x1024 14 frames original: measured / simulated = 1.110"]
    md = format_markdown(result)
    assert "| 1.110 (!) |" in md and "| 1.090 |" in md and "Defect: SVD (diffusers) 576x1024 14 frames original" in md
    assert "`native` allocator (ComfyUI's default is cudaMallocAsync" in md and "CUDA 12" in md


@pytest.mark.skipif(find_comfyui()[0] is None, reason=find_comfyui()[1])
def test_comfyui_rows_run_on_the_cpu_probe_in_a_process_of_their_own():
    """ComfyUI's SVD row, in a subprocess: the core suite never imports ComfyUI in its own process."""
    script = textwrap.dedent("""
        import json
        from streamlined_core.tools.bench.cuda import CpuProbe, measure
        result = measure(CpuProbe(), "tiny", models=["svd"], implementations_wanted=["comfyui"], warmup=0, repeats=1)
        print("RESULT " + json.dumps(result.as_dict()))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[len("RESULT "):])
    (row,) = doc["rows"]
    assert (row["implementation"], row["model"], row["status"]) == ("comfyui", "svd", "measured"), row["note"]
    assert row["original"]["activation_bytes"] == row["simulated_original_bytes"]
    assert row["streamlined"]["activation_bytes"] == row["simulated_streamlined_bytes"] < row["simulated_original_bytes"]
