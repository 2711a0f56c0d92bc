"""Time the CPU demo workflow in a real ComfyUI server: the wall time to its result and the planning lines of its log.

    .venv/bin/python scripts/demo_timing.py [RUNS] [COMFYUI]   # default: 2 runs, build/hosts/0.3.64/ComfyUI

Starts ``main.py --cpu`` with this pack in a temporary base directory's ``custom_nodes``, queues
``example_workflows/streamline_demo_cpu.json`` through ``/prompt`` (each later run with a new seed, so
sampling runs again while ComfyUI keeps the Streamline Model node's output), and prints each run's time,
its "planned in" lines and their share of the run.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from workflow import api_prompt  # noqa: E402  (the page's conversion of a UI workflow, as the tests use it)

PLANNED = (re.compile(r"planned in ([\d.]+) s"), re.compile(r"\) in ([\d.]+) s: "))


def main(runs: int = 2, comfyui: Path = ROOT / "build" / "hosts" / "0.3.64" / "ComfyUI") -> None:
    base = Path(tempfile.mkdtemp(prefix="streamline_demo_"))
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "ComfyUI-Streamline").symlink_to(ROOT, target_is_directory=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = base / "server.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                                    "--base-directory", str(base), "--disable-auto-launch"], cwd=comfyui, stdout=out,
                                   stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def get(path: str):
        with urllib.request.urlopen(url + path, timeout=30) as r:
            body = r.read()
        return json.loads(body) if body[:1] in (b"{", b"[") else body

    def post(path: str, payload: dict) -> dict:
        request = urllib.request.Request(url + path, data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as r:
            return json.loads(r.read())

    try:
        deadline = time.time() + 180
        while True:
            try:
                get("/system_stats")
                break
            except OSError:
                if process.poll() is not None or time.time() > deadline:
                    raise SystemExit("the server did not start:\n" + log.read_text()[-4000:]) from None
                time.sleep(0.5)
        workflow = json.loads((ROOT / "example_workflows" / "streamline_demo_cpu.json").read_text())
        prompt = api_prompt(workflow, get("/object_info"))
        for run in range(runs):
            for node in prompt.values():
                if node["class_type"] == "KSampler" and run:
                    node["inputs"]["seed"] = int(node["inputs"].get("seed", 0)) + 1
            start = len(log.read_text().splitlines())
            t0 = time.time()
            prompt_id = post("/prompt", {"prompt": prompt})["prompt_id"]
            while True:
                history = get(f"/history/{prompt_id}")
                if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                    break
                time.sleep(0.2)
            total = time.time() - t0
            lines = log.read_text().splitlines()[start:]
            planned = [float(m.group(1)) for line in lines for p in PLANNED for m in [p.search(line)] if m]
            print(f"run {run + 1}: {total:.1f} s to the result ({history[prompt_id]['status']['status_str']}); planning "
                  f"{planned} = {sum(planned):.1f} s, {100 * sum(planned) / total:.1f}% of the run")
            for line in lines:
                if "planned in" in line or ") in " in line:
                    print("   ", line.strip()[:200])
    finally:
        process.terminate()
        process.wait(30)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2, *(Path(a) for a in sys.argv[2:3]))
