"""A real ComfyUI server with the pack loaded from outside: /object_info, a queued graph through
Streamline Model, and the example workflows served from the template route and checked by the server."""

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from workflow import api_prompt

ROOT = Path(__file__).resolve().parents[2]
PACK = "Streamline"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, url: str, process: subprocess.Popen, log: Path) -> None:
        self.url, self.process, self.log = url, process, log

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            body = r.read()
        return json.loads(body) if body[:1] in (b"{", b"[") else body

    def post(self, path: str, payload) -> tuple[int, dict]:
        request = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def run(self, prompt: dict, timeout: float = 300) -> dict:
        status, answer = self.post("/prompt", {"prompt": prompt, "client_id": "streamline-test"})
        assert status == 200, answer
        prompt_id = answer["prompt_id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                return history[prompt_id]
            assert self.process.poll() is None, self.log.read_text()[-4000:]
            time.sleep(0.5)
        raise AssertionError(f"prompt {prompt_id} did not finish in {timeout} s:\n{self.log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def server(comfyui, tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "streamline_test_nodes").symlink_to(Path(__file__).parent / "server_nodes")
    ade = Path(comfyui) / "custom_nodes" / "ComfyUI-AnimateDiff-Evolved"
    if ade.is_dir():
        (base / "custom_nodes" / ade.name).symlink_to(ade)
    outside = tmp_path_factory.mktemp("outside")
    (outside / "custom_nodes").mkdir()
    (outside / "custom_nodes" / PACK).symlink_to(ROOT, target_is_directory=True)
    config = outside / "extra_model_paths.yaml"
    config.write_text(f"streamline:\n  base_path: {outside}\n  custom_nodes: custom_nodes\n")
    port = _free_port()
    log = base / "server.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(base),
             "--extra-model-paths-config", str(config), "--disable-auto-launch"],
            cwd=comfyui, stdout=out, stderr=subprocess.STDOUT,
        )
    server = Server(f"http://127.0.0.1:{port}", process, log)
    try:
        deadline = time.time() + 180
        while True:
            try:
                server.get("/system_stats")
                break
            except (urllib.error.URLError, ConnectionError):
                assert process.poll() is None, log.read_text()[-4000:]
                assert time.time() < deadline, "the server did not start in 180 s:\n" + log.read_text()[-4000:]
                time.sleep(0.5)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


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
            return e["extra_info"]["input_name"] in ("ckpt_name", "model_name")
        return e["type"] == "custom_validation_failed" and e["details"].startswith("image - Invalid image file")

    assert errors and all(missing_file(e) for e in errors), errors


def profiled_graph(label: str) -> dict:
    prompt = graph(streamline=True, frames=3)
    prompt["2"]["inputs"]["slicing"] = "auto"  # planned: each group's predicted peak beside the measured one
    prompt["6"] = {"class_type": "VRAMProfiler", "inputs": {
        "model": ["2", 0], "granularity": "group", "snapshot_steps": 0, "label": label}}
    prompt["3"]["inputs"]["model"] = ["6", 0]
    return prompt


def get_status(server, path: str) -> tuple[int, object]:
    try:
        return 200, server.get(path)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


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
    status, answer = get_status(server, path)
    assert status == code and answer["error"], answer
    assert server.get("/system_stats")["system"]
