"""The reliability self-test's real ComfyUI server (``main.py --cpu`` on the loopback address, this pack loaded
from outside its tree, the self-test's own nodes beside it) and the two categories run through it.

Repeated runs: the graph with every node of the pack (Streamline Model, VRAM Profiler, Step Rehash Sampler,
Step Rehash Guider with SamplerCustomAdvanced, Streamline VAE Decode, the demo nodes) queued 20 times with a new
seed each time; after each run a probe node reports what the server process holds. Nothing may grow from the
third run to the last (live tensors, their bytes, objects of the pack's classes, entries of its module-level
containers), and the VRAM Profiler keeps at most its limit of timelines.

Bad inputs: every input of every node of the pack, sent through ``/prompt`` as a user's workflow JSON would be:
missing, of the wrong type, below its minimum, above its maximum, not one of its choices, linked to an output of
another type; each is refused with an error naming the input, and the server keeps serving. Each node's numbers
at their edges (all at the minimum, all at the maximum) run, or fail naming the input. Malformed route
parameters, and requests to the routes while a run records, get answers (never a path derived from the input)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .tally import Tally, check

PACK_ROOT = Path(__file__).resolve().parents[3]
NODES_DIR = Path(__file__).resolve().parent / "server_nodes"
RUNS = {"ci": 8, "full": 20}  # repeated runs per profile (`streamline selftest --runs N`: $STREAMLINE_SELFTEST_RUNS)


class Server:
    """A ComfyUI server's HTTP API on the loopback address."""

    def __init__(self, url: str, process: subprocess.Popen, log: Path) -> None:
        self.url, self.process, self.log = url, process, log
        self.base = log.parent  # the server's base directory

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            body = r.read()
        return json.loads(body) if body[:1] in (b"{", b"[") else body

    def get_status(self, path: str) -> tuple[int, Any]:
        try:
            return 200, self.get(path)
        except urllib.error.HTTPError as e:
            body = e.read()
            return e.code, json.loads(body) if body[:1] == b"{" else body

    def post(self, path: str, payload: Any) -> tuple[int, dict]:
        request = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def queue(self, prompt: dict) -> str:
        status, answer = self.post("/prompt", {"prompt": prompt, "client_id": "streamline-selftest"})
        if status != 200:
            raise AssertionError(f"the server refused the graph ({status}): {json.dumps(answer)[:800]}")
        return answer["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 300) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                return history[prompt_id]
            if self.process.poll() is not None:
                raise AssertionError(f"the server stopped: {self.log.read_text()[-3000:]}")
            time.sleep(0.05)
        raise AssertionError(f"prompt {prompt_id} did not finish in {timeout} s: {self.log.read_text()[-3000:]}")

    def run(self, prompt: dict, timeout: float = 300) -> dict:
        return self.wait(self.queue(prompt), timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def start(comfyui: str | Path, base: str | Path | None = None, env: dict | None = None,
          args: list[str] = (), animatediff: bool = True) -> Iterator[Server]:
    """A ComfyUI server from the checkout ``comfyui``, with a base directory of its own (``base``, else a temporary
    one): the self-test's nodes and AnimateDiff-Evolved (when the checkout has it and ``animatediff``) in its
    ``custom_nodes``, this
    pack linked into a ``custom_nodes`` outside ComfyUI's tree through an extra model paths file; ``args``: more of
    ``main.py``'s flags."""
    with tempfile.TemporaryDirectory(prefix="streamline-selftest-") as scratch:
        base = Path(base or Path(scratch) / "base")
        (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
        (base / "custom_nodes" / "streamline_selftest_nodes").symlink_to(NODES_DIR, target_is_directory=True)
        ade = Path(comfyui) / "custom_nodes" / "ComfyUI-AnimateDiff-Evolved"
        if animatediff and ade.is_dir():
            (base / "custom_nodes" / ade.name).symlink_to(ade, target_is_directory=True)
        outside = Path(scratch) / "outside"
        (outside / "custom_nodes").mkdir(parents=True)
        (outside / "custom_nodes" / "Streamline").symlink_to(PACK_ROOT, target_is_directory=True)
        config = outside / "extra_model_paths.yaml"
        config.write_text(f"streamline:\n  base_path: {outside}\n  custom_nodes: custom_nodes\n")
        port = _free_port()
        log = base / "server.log"
        path = os.pathsep.join(p for p in (str(PACK_ROOT), os.environ.get("PYTHONPATH")) if p)
        with open(log, "w") as out:
            process = subprocess.Popen(
                [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory",
                 str(base), "--extra-model-paths-config", str(config), "--disable-auto-launch", *args],
                cwd=comfyui, stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": path, **(env or {})})
        server = Server(f"http://127.0.0.1:{port}", process, log)
        try:
            deadline = time.time() + 180
            while True:
                try:
                    server.get("/system_stats")
                    break
                except (urllib.error.URLError, ConnectionError):
                    if process.poll() is not None or time.time() > deadline:
                        raise RuntimeError("the ComfyUI server did not start: " + log.read_text()[-3000:]) from None
                    time.sleep(0.5)
            yield server
        finally:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


def every_node(seed: int = 7, label: str = "selftest") -> dict:
    """A graph with every node of the pack, on the tiny SVD, its VAE and the demo model."""
    from .comfy_graph import rehash_options

    rehash = rehash_options(interval=2)
    sampling = {"seed": seed, "steps": 2, "cfg": 2.5, "sampler_name": "euler", "scheduler": "karras",
                "positive": ["1", 1], "negative": ["1", 2], "latent_image": ["1", 3], "denoise": 1.0}
    return {
        "1": {"class_type": "StreamlineTestTinySVD", "inputs": {"frames": 3, "width": 48, "height": 32}},
        "2": {"class_type": "StreamlineModel", "inputs": {"model": ["1", 0], "slicing": "auto", "max_slices": 8,
                                                          "vram_budget_gb": 0.0, "groups": "all"}},
        "3": {"class_type": "VRAMProfiler", "inputs": {"model": ["2", 0], "granularity": "group", "snapshot_steps": 0,
                                                       "label": label}},
        "4": {"class_type": "StepRehashSampler", "inputs": {"model": ["3", 0], **sampling, **rehash}},
        "5": {"class_type": "StreamlineTestLatentFrames", "inputs": {"samples": ["4", 0]}},
        "7": {"class_type": "StepRehashGuider", "inputs": {"model": ["2", 0], "positive": ["1", 1],
                                                           "negative": ["1", 2], "cfg": 2.5, **rehash}},
        "8": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
        "9": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "10": {"class_type": "BasicScheduler", "inputs": {"model": ["2", 0], "scheduler": "karras", "steps": 2,
                                                          "denoise": 1.0}},
        "11": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["8", 0], "guider": ["7", 0],
                                                                 "sampler": ["9", 0], "sigmas": ["10", 0],
                                                                 "latent_image": ["1", 3]}},
        "12": {"class_type": "StreamlineTestTinyVAE", "inputs": {}},
        "13": {"class_type": "StreamlineVAEDecode", "inputs": {"samples": ["11", 0], "vae": ["12", 0],
                                                               "vram_budget_gb": 0.0}},
        "15": {"class_type": "StreamlineDemoLoader", "inputs": {"clip_seed": seed % 100, "frames": 8,
                                                                "augmentation_level": 0.02}},
        "16": {"class_type": "StreamlineDemoFrames", "inputs": {"samples": ["15", 3]}},
        "18": {"class_type": "StreamlineTestProbe", "inputs": {"after_images": ["13", 0], "after_latent": ["4", 0],
                                                               "after_frames": ["16", 0]}},
        "19": {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}},
    }


def failure_of(result: dict) -> dict | None:
    """The execution error of a run (node, type, message), or None when it succeeded."""
    if result["status"]["status_str"] == "success":
        return None
    for kind, data in result["status"].get("messages", []):
        if kind in ("execution_error", "execution_interrupted"):
            return {k: data.get(k) for k in ("node_type", "exception_type", "exception_message")}
    return {"exception_message": json.dumps(result["status"])[:600]}


def probe_of(result: dict) -> dict:
    failure = failure_of(result)
    check(failure is None, f"the run failed: {failure}")
    return result["outputs"]["18"]["streamline_probe"][0]


GROWTH = ("tensors", "tensor_bytes", "pack_objects", "module_entries")


def repeats(server: Server, tally: Tally, runs: int) -> None:
    probes = []
    with tally.case(f"{runs} runs of every node"):
        for i in range(runs):
            probes.append(probe_of(server.run(every_node(seed=100 + i))))
        third, last = probes[min(2, runs - 1)], probes[-1]
        grew = {k: (third[k], last[k]) for k in GROWTH if last[k] > third[k]}
        objects = {k: (third["objects"].get(k, 0), n) for k, n in last["objects"].items() if n > third["objects"].get(k, 0)}
        check(not grew, f"grew from run 3 to run {runs}: {grew}; the pack's objects that grew: {objects}")
        check(0 < last["timelines"] <= last["timeline_limit"],
              f"the VRAM Profiler keeps {last['timelines']} timelines (limit {last['timeline_limit']})")
    tally.notes.append(f"run 3 -> run {runs}: " + ", ".join(f"{k} {probes[min(2, runs - 1)][k]} -> {probes[-1][k]}"
                                                               for k in GROWTH) if probes else "no run finished")


def run(categories: list[str], root: str, host: str, profile: str) -> list[Tally]:
    """The server's categories (repeats, bad inputs) through one server of their own."""
    from . import bad_inputs

    runs = int(os.environ.get("STREAMLINE_SELFTEST_RUNS") or RUNS[profile])
    tallies = []
    with start(root, animatediff=False) as server:  # the graphs need no AnimateDiff-Evolved: a faster start
        for category in categories:
            tally = Tally(category, host)
            try:
                if category == "repeats":
                    repeats(server, tally, runs)
                else:
                    bad_inputs.bad_inputs(server, tally)
            except Exception as e:  # noqa: BLE001  a category that cannot go on is its own failure
                tally.failures.append({"case": "the category", "message": f"{type(e).__name__}: {str(e)[:1200]}"})
            tallies.append(tally.finish())
    return tallies
