"""A real ComfyUI server with the pack loaded from outside: /object_info, a queued graph through
Streamline Model, and the example workflows served from the template route and checked by the server."""

import json
import time
from pathlib import Path

import pytest
from workflow import MODEL_FILES, api_prompt

from streamlined_core.tools.selftest.server import start  # the self-test's own server

ROOT = Path(__file__).resolve().parents[2]
PACK = "Streamline"


@pytest.fixture(scope="module")
def server(comfyui, tmp_path_factory):
    with start(comfyui, tmp_path_factory.mktemp("comfy_base")) as running:
        yield running


def test_object_info_shows_the_node_and_its_inputs(server):
    info = server.get("/object_info/StreamlineModel")["StreamlineModel"]
    assert info["display_name"] == "Streamline Model" and info["category"] == "Streamline"
    required = info["input"]["required"]
    assert list(required) == ["model", "slicing", "max_slices", "vram_budget_gb", "groups"]
    assert required["slicing"][0] == ["auto", "upper bound"] and required["groups"][0] == ["all", "spatial", "temporal"]
    assert all(spec[1]["tooltip"] for spec in required.values())
    assert info["output"] == ["MODEL"] and info["description"]
    decode = server.get("/object_info/StreamlineVAEDecode")["StreamlineVAEDecode"]
    assert decode["display_name"] == "Streamline VAE Decode" and decode["category"] == "Streamline"
    assert list(decode["input"]["required"]) == ["samples", "vae", "vram_budget_gb"]
    assert all(spec[1]["tooltip"] for spec in decode["input"]["required"].values())
    assert decode["output"] == ["IMAGE"] and decode["description"]


def graph(streamline: bool, frames: int = 5) -> dict:
    model = ["2", 0] if streamline else ["1", 0]
    prompt = {
        "1": {"class_type": "StreamlineTestTinySVD", "inputs": {"frames": frames, "width": 96, "height": 64}},
        "3": {"class_type": "KSampler", "inputs": {
            "model": model, "seed": 7, "steps": 2, "cfg": 2.5, "sampler_name": "euler", "scheduler": "karras",
            "positive": ["1", 1], "negative": ["1", 2], "latent_image": ["1", 3], "denoise": 1.0}},
        "4": {"class_type": "StreamlineTestLatentFrames", "inputs": {"samples": ["3", 0]}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}},
    }
    if streamline:
        prompt["2"] = {"class_type": "StreamlineModel", "inputs": {
            "model": ["1", 0], "slicing": "upper bound", "max_slices": 3, "vram_budget_gb": 0.0, "groups": "all"}}
    return prompt


def frames_of(server, result) -> list:
    import io

    import numpy as np
    from PIL import Image

    assert result["status"]["status_str"] == "success", result["status"]
    images = result["outputs"]["5"]["images"]
    out = []
    for image in images:
        query = f"/view?filename={image['filename']}&subfolder={image['subfolder']}&type={image['type']}"
        out.append(np.asarray(Image.open(io.BytesIO(server.get(query)))).astype(int))
    return out


def test_a_queued_graph_runs_through_streamline_model_and_returns_frames(server):
    plain = frames_of(server, server.run(graph(streamline=False)))
    streamlined = frames_of(server, server.run(graph(streamline=True)))
    assert len(streamlined) == len(plain) == 5
    assert streamlined[0].shape == (8, 12, 3) and max(f.std() for f in plain) > 0
    assert max(abs(a - b).max() for a, b in zip(plain, streamlined)) <= 1  # 8-bit frames, equal within rounding


WORKFLOWS = sorted(p.name for p in (ROOT / "example_workflows").glob("*.json"))


@pytest.mark.parametrize("name", WORKFLOWS)
def test_example_workflows_are_served_and_valid_for_the_server(server, name):
    listed = server.get("/workflow_templates")
    assert name[:-5] in listed.get(PACK, []), listed
    workflow = server.get(f"/api/workflow_templates/{PACK}/{name}")
    assert workflow == json.loads((ROOT / "example_workflows" / name).read_text())
    info = server.get("/object_info")
    if any(n["type"].startswith("ADE_") for n in workflow["nodes"]) and "ADE_UseEvolvedSampling" not in info:
        pytest.skip("AnimateDiff-Evolved is not in this ComfyUI's custom_nodes")
    assert any(n["type"] == "StreamlineModel" for n in workflow["nodes"])
    prompt = api_prompt(workflow, info)
    if any(n["type"] == "StreamlineDemoLoader" for n in workflow["nodes"]):
        # Needs no files: api_prompt() checked it against /object_info; tests/host/test_fixture_comfyui.py
        # validates it with ComfyUI's own validation and runs it through the real nodes.
        return
    status, answer = server.post("/prompt", {"prompt": prompt})
    # No model files here: the server's validation may object to nothing but the missing files.
    assert status == 400, answer
    errors = [e for node in answer["node_errors"].values() for e in node["errors"]]

    def missing_file(e):
        if e["type"] == "value_not_in_list":
            return e["extra_info"]["input_name"] in MODEL_FILES
        return e["type"] == "custom_validation_failed" and e["details"].startswith("image - Invalid image file")

    assert errors and all(missing_file(e) for e in errors), errors


def profiled_graph(label: str) -> dict:
    prompt = graph(streamline=True, frames=3)
    prompt["2"]["inputs"]["slicing"] = "auto"  # planned: each group's predicted peak beside the measured one
    prompt["6"] = {"class_type": "VRAMProfiler", "inputs": {
        "model": ["2", 0], "granularity": "group", "snapshot_steps": 0, "label": label}}
    prompt["3"]["inputs"]["model"] = ["6", 0]
    return prompt


def test_the_vram_profiler_keeps_each_runs_timeline_behind_its_routes(server):
    status, answer = server.post("/prompt", {"prompt": profiled_graph("server"), "client_id": "streamline-test"})
    assert status == 200, answer
    prompt_id = answer["prompt_id"]
    deadline = time.time() + 300
    while prompt_id not in server.get("/history/" + prompt_id):
        assert time.time() < deadline, server.log.read_text()[-4000:]
        time.sleep(0.5)
    listed = server.get("/streamline/timelines")
    assert listed[0]["prompt_id"] == prompt_id and listed[0]["label"] == "server" and listed[0]["steps"] == 2
    doc = server.get(f"/api/streamline/timelines/{prompt_id}")
    assert doc["schema"] == "streamline.timeline/1" and doc["prompt_id"] == prompt_id
    assert [s["step"] for s in doc["steps"]] == [0, 1] and doc["predicted_peak_bytes"] > 0
    assert any(e["kind"] == "group" and e["predicted"] is not None for e in doc["events"])
    assert "VRAM Profiler [server]: peak" in server.log.read_text()


@pytest.mark.parametrize("path, code", [
    ("/streamline/timelines?limit=abc", 400), ("/streamline/timelines?limit=0", 400),
    ("/streamline/timelines?limit=100000", 400), ("/streamline/timelines/bad%20id%3B", 400),
    ("/streamline/timelines/" + "x" * 200, 400), ("/streamline/timelines/no-such-prompt", 404),
])
def test_malformed_route_parameters_get_a_clear_error_and_the_server_keeps_serving(server, path, code):
    status, answer = server.get_status(path)
    assert status == code and answer["error"], answer
    assert server.get("/system_stats")["system"]
