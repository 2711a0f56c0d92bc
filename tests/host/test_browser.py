"""The memory panel in a real browser: Debian's chromium, headless, driven by Playwright, against a real
``main.py --cpu`` with the pack loaded from outside, on the frontend the checkout pins.

The checkout's ``requirements.txt`` names its ``comfyui-frontend-package``. When the environment has
that version (ComfyUI 0.3.64: 1.27.10) the server serves it as usual; otherwise (ComfyUI 0.3.52:
1.25.10) the set-up downloads that version's wheel with pip, unpacks it in a temporary folder and
starts the server with ``--front-end-root`` on it.

The page is loaded, the first-run template dialog closed, a small graph with the VRAM Profiler run
twice from the page (without, then with Streamline Model), and the panel opened in the bottom panel.
The checks: every plotted series has one point per recorded event (up to the panel's bound), the
peak label names the group the timeline's events put the peak in, the overlay writes the saving the
two documents give, the plotted area has the runs' colours in it (pixels of a screenshot), the panel
is readable in the dark and light palettes, the user can pick the runs, the panel comes back after a
reload from the server's history, and ``write_html`` draws the same in a file opened from disk.
Screenshots are kept in ``build/test-output/browser/frontend-<version>/``; with
``STREAMLINE_UPDATE_SCREENSHOT=1`` the panel's (dark palette, the environment's frontend) is also
written to ``docs/panel.png``, the README's picture.
"""

from __future__ import annotations

import importlib.metadata
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest

from streamlined_core.host.comfyui import find_comfyui
from streamlined_core.tools.selftest.server import Server, start  # the self-test's own server

ROOT = Path(__file__).resolve().parents[2]
PACK = "Streamline"
OUT = ROOT / "build" / "test-output" / "browser"
MIB = 1024**2
LOGIC = (ROOT / "web" / "timeline_logic.js").read_text()
MAX_POINTS = int(re.search(r"^export const MAX_POINTS = (\d+);", LOGIC, re.M).group(1))  # the panel's bound
RUN_COLORS = re.findall(r"#[0-9a-f]{6}", re.search(r"^export const RUN_COLORS = \[(.*)\];", LOGIC, re.M).group(1))[:2]
TAB_TITLE = "Streamline memory"
CHROMIUM = shutil.which("chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

try:
    import playwright.sync_api  # noqa: F401

    NO_PLAYWRIGHT = None
except ImportError:
    NO_PLAYWRIGHT = "the Python playwright package is not installed (pip install playwright; scripts/dev.sh installs it)"

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium; scripts/dev.sh "
                                                "installs it when run as root)"),
    pytest.mark.skipif(NO_PLAYWRIGHT is not None, reason=NO_PLAYWRIGHT or ""),
]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def pinned_frontend(checkout: Path) -> str:
    """The comfyui-frontend-package version the checkout's requirements.txt pins."""
    text = (checkout / "requirements.txt").read_text()
    m = re.search(r"^comfyui-frontend-package==([\w.]+)", text, re.M)
    assert m, f"{checkout}/requirements.txt pins no comfyui-frontend-package"
    return m.group(1)


@pytest.fixture(scope="module")
def checkout():
    path, why = find_comfyui()
    if path is None:
        pytest.skip(why)
    return path


@pytest.fixture(scope="module")
def frontend(checkout, tmp_path_factory):
    """(version, --front-end-root or None): the environment's frontend when it is the pinned one, else
    the pinned version's wheel, downloaded and unpacked here."""
    version = pinned_frontend(checkout)
    try:
        installed = importlib.metadata.version("comfyui-frontend-package")
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if installed == version:
        return version, None
    folder = tmp_path_factory.mktemp(f"frontend-{version}")
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
                           "-d", str(folder), f"comfyui-frontend-package=={version}"],
                          capture_output=True, text=True, timeout=300)
    wheels = list(folder.glob("comfyui_frontend_package-*.whl"))
    assert done.returncode == 0 and wheels, (
        f"ComfyUI at {checkout} pins comfyui-frontend-package {version} (the environment has {installed}); "
        f"downloading its wheel failed:\n{done.stderr[-2000:]}")
    with zipfile.ZipFile(wheels[0]) as z:
        z.extractall(folder / "unpacked")
    static = folder / "unpacked" / "comfyui_frontend_package" / "static"
    assert (static / "index.html").is_file(), f"no static/index.html in {wheels[0].name}"
    return version, static


@pytest.fixture(scope="module")
def server(checkout, frontend, tmp_path_factory):
    """A real ComfyUI on the CPU with the pack loaded from outside and the self-test's tiny model nodes."""
    args = ["--front-end-root", str(frontend[1])] if frontend[1] is not None else []
    with start(checkout, tmp_path_factory.mktemp("comfy_base"), args=args) as running:
        yield running


def profiled(streamline: bool, label: str, frames: int = 3) -> dict:
    """The tiny SVD sampled for 2 steps, through the VRAM Profiler (group granularity), with or without
    Streamline Model before it."""
    prompt = {
        "1": {"class_type": "StreamlineTestTinySVD", "inputs": {"frames": frames, "width": 96, "height": 64}},
        "6": {"class_type": "VRAMProfiler", "inputs": {
            "model": ["2", 0] if streamline else ["1", 0], "granularity": "group", "snapshot_steps": 0, "label": label}},
        "3": {"class_type": "KSampler", "inputs": {
            "model": ["6", 0], "seed": 7, "steps": 2, "cfg": 2.5, "sampler_name": "euler", "scheduler": "karras",
            "positive": ["1", 1], "negative": ["1", 2], "latent_image": ["1", 3], "denoise": 1.0}},
        "4": {"class_type": "StreamlineTestLatentFrames", "inputs": {"samples": ["3", 0]}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}},
    }
    if streamline:
        prompt["2"] = {"class_type": "StreamlineModel", "inputs": {
            "model": ["1", 0], "slicing": "auto", "max_slices": 3, "vram_budget_gb": 0.0, "groups": "all"}}
    return prompt


@pytest.fixture(scope="module")
def out_dir(frontend):
    folder = OUT / f"frontend-{frontend[0]}"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1500, "height": 950})
        try:
            yield context
        finally:
            context.close()


def close_template_dialog(page, wait_ms: int) -> bool:
    """Close the "Get Started with a Template" dialog a fresh profile opens; True when one was open."""
    dialog = page.locator(".p-dialog").filter(has_text=re.compile("template", re.I))
    try:
        dialog.first.wait_for(state="visible", timeout=wait_ms)
    except Exception:  # noqa: BLE001 - playwright's TimeoutError: no dialog this time
        return False
    dialog.first.locator("button[aria-label='Close'], .p-dialog-close-button, .p-dialog-header-close").first.click()
    dialog.first.wait_for(state="hidden", timeout=10_000)
    return True


def open_panel(page) -> None:
    """Open the bottom panel and the panel's tab, as the command a shortcut or the menu runs, then a click."""
    page.evaluate("() => window.comfyAPI.app.app.extensionManager.command.execute('Workspace.ToggleBottomPanel')")
    tab = page.get_by_role("tab", name=re.compile(TAB_TITLE, re.I))
    tab.wait_for(state="visible", timeout=15_000)
    tab.click()
    page.locator(".sl-panel").wait_for(state="visible", timeout=15_000)


def load_page(page, url: str) -> None:
    """Load ComfyUI's page; the pack's web files must load without an error."""
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(f"{e}\n{getattr(e, 'stack', '')}"))
    page.on("console", lambda m: errors.append(f"{m.text} {m.location.get('url', '')}") if m.type == "error" else None)
    page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
    page.goto(url, wait_until="domcontentloaded", timeout=120_000)
    page.wait_for_function("() => window.comfyAPI?.app?.app?.graph && window.comfyAPI.api.api.clientId",
                           timeout=120_000)
    assert close_template_dialog(page, 30_000), "no template dialog on a fresh profile's first load"
    ours = [e for e in errors if re.search(r"streamline|uplot", e, re.I)]
    assert not ours, ours


def queue(page, prompt: dict) -> str:
    """Queue a graph from the page (so the node's event comes to this page's socket); its prompt id."""
    status, answer = page.evaluate("""async (prompt) => {
        const api = window.comfyAPI.api.api;
        const r = await api.fetchApi('/prompt', {method: 'POST', headers: {'Content-Type': 'application/json'},
                                                 body: JSON.stringify({prompt, client_id: api.clientId})});
        return [r.status, await r.json()];
    }""", prompt)
    assert status == 200, answer
    return answer["prompt_id"]


def wait_done(server: Server, prompt_id: str, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        history = server.get(f"/history/{prompt_id}")
        if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
            assert history[prompt_id]["status"]["status_str"] == "success", history[prompt_id]["status"]
            return
        assert server.process.poll() is None, server.log.read_text()[-4000:]
        time.sleep(0.5)
    raise AssertionError(f"prompt {prompt_id} did not finish in {timeout} s:\n{server.log.read_text()[-4000:]}")


CHART_STATE = """() => {
    const plot = document.querySelector('.sl-memory-chart .sl-plot');
    const u = plot && plot.uplot;
    if (!u) return null;
    const bars = document.querySelector('.sl-group-chart .sl-plot');
    return {
        rows: u.data[0].length,
        series: plot.series.map((s, i) => ({key: s.key, kind: s.kind, label: s.label,
                                           count: u.data[i + 1].filter(v => v != null).length})),
        peakTexts: [...document.querySelectorAll('.sl-peak-text')].map(e => ({key: e.dataset.run, text: e.textContent})),
        peakLabels: [...document.querySelectorAll('.sl-peak-label')].map(e => ({key: e.dataset.run, text: e.textContent})),
        saving: document.querySelector('.sl-saving')?.textContent ?? null,
        selected: [document.querySelector('.sl-run-a').value, document.querySelector('.sl-run-b').value],
        options: [...document.querySelector('.sl-run-a').options].map(o => o.value),
        bars: bars && bars.uplot && bars.offsetParent !== null
            ? {names: bars.names, series: bars.uplot.series.map(s => s.label),
               counts: bars.uplot.data.slice(1).map(a => a.filter(v => v != null).length)} : null,
    };
}"""


def chart_state(page) -> dict:
    return page.evaluate(CHART_STATE)


def group_peak(doc: dict) -> tuple[int, str]:
    """Where the events put the run's peak: (step, group) of the first group event with the largest peak."""
    events = doc["events"]
    top = max(e["peak"] for e in events)
    first = next(e for e in events if e["peak"] == top)
    assert first["kind"] == "group", f"the peak of {doc['label']} is at a {first['kind']} event, not a group"
    return first["step"], first["name"]


def fmt_mib(n: float) -> str:
    """web/timeline_logic.js formatMiB."""
    mib = n / MIB
    return f"{mib:.{2 if abs(mib) < 10 else 1}f}"


def hex_rgb(color: str) -> tuple[int, int, int]:
    return tuple(int(color[i:i + 2], 16) for i in (1, 3, 5))


def count_color(png: bytes, color: str, tolerance: int = 40) -> int:
    """Pixels of the screenshot within `tolerance` (per channel) of `color`."""
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    return int((np.abs(pixels - np.array(hex_rgb(color))).max(axis=-1) <= tolerance).sum())


def plotted_area(page, chart: str) -> bytes:
    """A screenshot of a chart's plotted area showing only its data: on the memory chart, the runs'
    memory lines (the peak points, the predicted level and the peak labels hidden meanwhile)."""
    style = page.add_style_tag(content=".sl-peak-label { visibility: hidden !important; }")
    shown = """(show) => {
        const plot = document.querySelector('.sl-memory-chart .sl-plot');
        plot.series.forEach((s, i) => { if (s.kind !== 'memory') plot.uplot.setSeries(i + 1, {show}); });
    }"""
    memory = chart == ".sl-memory-chart"
    try:
        if memory:
            page.evaluate(shown, False)
        return page.locator(f"{chart} .u-over").screenshot()
    finally:
        if memory:
            page.evaluate(shown, True)
        style.evaluate("(element) => element.remove()")


def luminance(css: str) -> float:
    values = [float(v) for v in re.findall(r"[\d.]+", css)[:3]]
    channel = [(v / 255) / 12.92 if v / 255 <= 0.03928 else ((v / 255 + 0.055) / 1.055) ** 2.4 for v in values]
    return 0.2126 * channel[0] + 0.7152 * channel[1] + 0.0722 * channel[2]


def contrast(page) -> tuple[float, str, str]:
    fg, bg = page.evaluate("""() => { const s = getComputedStyle(document.querySelector('.sl-panel'));
                                      return [s.color, s.backgroundColor]; }""")
    a, b = sorted((luminance(fg), luminance(bg)), reverse=True)
    return (a + 0.05) / (b + 0.05), fg, bg


@pytest.fixture(scope="module")
def session(server, frontend, browser, out_dir):
    """The page after both runs: (page, {label: timeline document from the server})."""
    page = browser.pages[0] if browser.pages else browser.new_page()
    t0 = time.time()
    load_page(page, server.url)
    served = page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__")
    assert served == frontend[0], f"the page is frontend {served}, expected {frontend[0]}"
    open_panel(page)
    assert "No memory timeline yet" in page.locator(".sl-panel").inner_text()
    docs = {}
    for label, streamline in (("original", False), ("streamlined", True)):
        prompt_id = queue(page, profiled(streamline, label))
        wait_done(server, prompt_id)
        # the event reaches the open panel: the run is listed and shown, nothing reloaded
        page.wait_for_function("(id) => document.querySelector('.sl-run-a')?.value === id", arg=prompt_id, timeout=30_000)
        docs[label] = server.get(f"/streamline/timelines/{prompt_id}")
    page.wait_for_function("() => document.querySelector('.sl-saving') !== null", timeout=15_000)
    page.wait_for_timeout(300)
    print(f"page loaded and two runs recorded in {time.time() - t0:.1f} s")
    return page, docs


def test_the_chart_plots_one_point_per_recorded_sample_of_each_run(session):
    page, docs = session
    state = chart_state(page)
    ids = {label: d["prompt_id"] for label, d in docs.items()}
    assert state["selected"] == [ids["streamlined"], ids["original"]]
    memory = {s["key"]: s for s in state["series"] if s["kind"] == "memory"}
    assert set(memory) == set(ids.values())
    for label, doc in docs.items():
        assert len(doc["events"]) > 10
        assert memory[doc["prompt_id"]]["count"] == min(len(doc["events"]), MAX_POINTS), label
    assert state["rows"] == sum(min(len(d["events"]), MAX_POINTS) for d in docs.values())
    peaks = [s for s in state["series"] if s["kind"] == "peak"]
    assert [s["count"] for s in peaks] == [1, 1]
    predicted = [s for s in state["series"] if s["kind"] == "predicted"]
    assert [s["key"] for s in predicted] == [ids["streamlined"]]  # only the planned run has a prediction


def test_the_peak_label_names_the_group_where_the_peak_happened(session):
    page, docs = session
    state = chart_state(page)
    for label, doc in docs.items():
        step, group = group_peak(doc)
        assert (doc["peak_step"], doc["peak_name"]) == (step, group), label
        where = f"at step {step}, {group}"
        text = next(t["text"] for t in state["peakTexts"] if t["key"] == doc["prompt_id"])
        assert text.startswith(f"{label}: peak {fmt_mib(doc['activation_peak_bytes'])} MiB {where}"), text
        on_chart = next(t["text"] for t in state["peakLabels"] if t["key"] == doc["prompt_id"])
        assert on_chart.endswith(f"step {step}, {group}"), on_chart
    streamlined = next(t["text"] for t in state["peakTexts"] if t["key"] == docs["streamlined"]["prompt_id"])
    assert f"Streamline predicted {fmt_mib(docs['streamlined']['predicted_peak_bytes'])} MiB" in streamlined


def test_the_overlay_writes_the_saving_of_streamline(session):
    page, docs = session
    original, streamlined = docs["original"]["activation_peak_bytes"], docs["streamlined"]["activation_peak_bytes"]
    saved = original - streamlined
    assert saved > 0, (original, streamlined)
    expected = (f"streamlined saves {fmt_mib(saved)} MiB ({100 * saved / original:.1f}%) against original: "
                f"activation peak {fmt_mib(streamlined)} MiB against {fmt_mib(original)} MiB")
    assert chart_state(page)["saving"] == expected


def test_the_group_bars_put_the_plans_prediction_beside_the_measurement(session):
    page, docs = session
    bars = chart_state(page)["bars"]
    doc = docs["streamlined"]
    groups = list(dict.fromkeys(e["name"] for e in doc["events"] if e["kind"] == "group"))
    assert bars["names"] == groups
    assert bars["series"] == ["group", "measured", "predicted by the plan"]
    predicted = {e["name"] for e in doc["events"] if e["kind"] == "group" and e["predicted"] is not None}
    assert bars["counts"] == [len(groups), len(predicted)] and predicted


def test_the_plotted_area_is_drawn_in_the_runs_colours(session, out_dir, frontend):
    page, _ = session
    page.screenshot(path=str(out_dir / "panel-dark.png"))
    plotted = plotted_area(page, ".sl-memory-chart")
    (out_dir / "memory-plot-dark.png").write_bytes(plotted)
    for color in RUN_COLORS:
        assert count_color(plotted, color) > 500, f"hardly any pixel of {color} in the plotted area"
    print("pixels of the runs' colours in the plotted area:", [count_color(plotted, c) for c in RUN_COLORS])
    bars = plotted_area(page, ".sl-group-chart")
    assert count_color(bars, RUN_COLORS[0]) > 500
    panel = page.locator(".sl-panel").screenshot()
    (out_dir / "panel.png").write_bytes(panel)
    if os.environ.get("STREAMLINE_UPDATE_SCREENSHOT") == "1" and frontend[1] is None:  # the environment's frontend
        (ROOT / "docs" / "panel.png").write_bytes(panel)


def test_the_panel_is_readable_in_the_dark_and_light_palettes(session, out_dir):
    page, _ = session
    ratio, fg, bg = contrast(page)
    assert ratio >= 4.5, f"dark palette: text {fg} on {bg}, contrast {ratio:.2f}"
    page.evaluate("() => { document.querySelector('.sl-memory-chart .sl-plot').uplot.slDark = true; }")
    page.evaluate("() => window.comfyAPI.app.app.extensionManager.setting.set('Comfy.ColorPalette', 'light')")
    try:
        page.wait_for_function("""() => { const u = document.querySelector('.sl-memory-chart .sl-plot').uplot;
                                          return u && !u.slDark; }""", timeout=15_000)  # redrawn
        ratio_light, fg_light, bg_light = contrast(page)
        assert bg_light != bg and luminance(bg_light) > luminance(bg)
        assert ratio_light >= 4.5, f"light palette: text {fg_light} on {bg_light}, contrast {ratio_light:.2f}"
        page.screenshot(path=str(out_dir / "panel-light.png"))
        plotted = plotted_area(page, ".sl-memory-chart")
        for color in RUN_COLORS:
            assert count_color(plotted, color) > 500
    finally:
        page.evaluate("() => window.comfyAPI.app.app.extensionManager.setting.set('Comfy.ColorPalette', 'dark')")
    page.wait_for_function("(bg) => getComputedStyle(document.querySelector('.sl-panel')).backgroundColor === bg",
                           arg=bg, timeout=15_000)


def test_the_user_picks_the_runs_to_compare(session):
    page, docs = session
    page.select_option(".sl-run-b", "")
    page.wait_for_function("() => document.querySelector('.sl-saving') === null")
    state = chart_state(page)
    assert [s["kind"] for s in state["series"]] == ["memory", "peak", "predicted"]
    page.select_option(".sl-run-a", docs["original"]["prompt_id"])
    page.select_option(".sl-run-b", docs["streamlined"]["prompt_id"])
    page.wait_for_function("() => document.querySelector('.sl-saving') !== null")
    state = chart_state(page)
    assert state["selected"] == [docs["original"]["prompt_id"], docs["streamlined"]["prompt_id"]]
    assert state["saving"].startswith("original uses ") and " more than streamlined" in state["saving"]
    page.select_option(".sl-x-mode", "time")
    page.wait_for_function("() => document.querySelector('.sl-memory-chart .u-over') !== null")
    counts = {s["key"]: s["count"] for s in chart_state(page)["series"] if s["kind"] == "memory"}
    assert counts == {d["prompt_id"]: min(len(d["events"]), MAX_POINTS) for d in docs.values()}
    page.select_option(".sl-x-mode", "step")


def test_the_panel_comes_back_after_a_reload_from_the_servers_history(session, server):
    page, docs = session
    page.reload(wait_until="domcontentloaded")
    page.wait_for_function("() => window.comfyAPI?.app?.app?.graph", timeout=120_000)
    close_template_dialog(page, 3_000)
    if not page.locator(".sl-panel").is_visible():
        open_panel(page)
    page.wait_for_function("() => document.querySelector('.sl-saving') !== null", timeout=30_000)
    state = chart_state(page)
    listed = [r["prompt_id"] for r in server.get("/streamline/timelines")]
    assert state["options"] == listed == [docs["streamlined"]["prompt_id"], docs["original"]["prompt_id"]]
    assert state["selected"] == listed
    counts = {s["key"]: s["count"] for s in state["series"] if s["kind"] == "memory"}
    assert counts == {d["prompt_id"]: min(len(d["events"]), MAX_POINTS) for d in docs.values()}
    assert state["saving"].startswith("streamlined saves ")


def test_write_html_draws_the_same_panel_from_a_file(session, browser, out_dir):
    from streamlined_core.tools.charts.report import write_html

    _, docs = session
    path = write_html([docs["original"], docs["streamlined"]], out_dir / "profile.html", title="tiny SVD, 3 frames")
    page = browser.new_page()
    try:
        requests: list[str] = []
        page.on("request", lambda r: requests.append(r.url))
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(path.as_uri())
        page.wait_for_function("() => document.documentElement.dataset.ready === '1'", timeout=30_000)
        state = chart_state(page)
        assert not errors, errors
        assert all(u.startswith("file:") or u.startswith("data:") for u in requests), requests
        counts = {s["key"]: s["count"] for s in state["series"] if s["kind"] == "memory"}
        assert counts == {d["prompt_id"]: min(len(d["events"]), MAX_POINTS) for d in docs.values()}
        assert state["saving"].startswith("streamlined saves ")
        step, group = group_peak(docs["streamlined"])
        assert any(f"step {step}, {group}" in t["text"] for t in state["peakTexts"])
        page.select_option("#sl-theme", "dark")
        page.wait_for_timeout(200)
        plotted = plotted_area(page, ".sl-memory-chart")
        for color in RUN_COLORS:
            assert count_color(plotted, color) > 500
        page.screenshot(path=str(out_dir / "profile-html.png"))
    finally:
        page.close()


def test_the_step_rehash_workflow_loads_with_the_nodes_widgets(session, out_dir, frontend):
    """The CPU demo with Step Rehash, loaded into the page: the Step Rehash Sampler shows KSampler's
    widgets, then its own, with the workflow's values; a picture of it for the README."""
    page, _ = session
    workflow = json.loads((ROOT / "example_workflows" / "streamline_demo_cpu_step_rehash.json").read_text())
    page.evaluate("async (w) => { await window.comfyAPI.app.app.loadGraphData(w); }", workflow)
    node = page.evaluate("""() => {
        const app = window.comfyAPI.app.app;
        const n = app.graph._nodes.find(x => x.type === 'StepRehashSampler');
        return n && {title: n.title, widgets: n.widgets.map(w => [w.name, w.value]), pos: n.pos, size: n.size};
    }""")
    assert node is not None and node["title"] == "Step Rehash Sampler", node
    names = [name for name, _ in node["widgets"]]
    assert names[:3] == ["seed", "control_after_generate", "steps"], names
    assert names[-10:] == ["schedule", "key_steps", "gamma", "interval", "cut", "calibration", "start_percent",
                           "end_percent", "max_consecutive_reuses", "override_calibration"], names
    values = dict(node["widgets"])
    assert values["schedule"] == "target key steps" and values["calibration"] == "auto (find or make one)"
    page.evaluate("() => window.comfyAPI.app.app.extensionManager.command.execute('Workspace.ToggleBottomPanel')")
    page.locator(".sl-panel").wait_for(state="hidden", timeout=15_000)
    clip = page.evaluate("""() => { const app = window.comfyAPI.app.app;
        const n = app.graph._nodes.find(x => x.type === 'StepRehashSampler');
        const title = window.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
        app.canvas.ds.scale = 1.0;
        app.canvas.ds.offset = [60 - n.pos[0], 60 + title - n.pos[1]];
        app.canvas.setDirty(true, true); app.canvas.draw(true, true);
        const r = app.canvas.canvas.getBoundingClientRect();
        return {x: r.left + 45, y: r.top + 45, width: n.size[0] + 30, height: n.size[1] + title + 30}; }""")
    page.wait_for_timeout(500)
    picture = page.screenshot(clip=clip)
    (out_dir / "step_rehash_node.png").write_bytes(picture)
    if os.environ.get("STREAMLINE_UPDATE_SCREENSHOT") == "1" and frontend[1] is None:  # the environment's frontend
        (ROOT / "docs" / "step_rehash_node.png").write_bytes(picture)


def test_a_wan_run_shows_its_blocks_in_the_panel_with_the_plans_prediction(session, server, out_dir):
    """A tiny Wan 2.1 through Streamline Model and the VRAM Profiler: the panel's group bars are Wan's blocks (each
    block's keys and values, then the rest), each with the plan's prediction beside the measurement."""
    page, _ = session
    prompt = {
        "1": {"class_type": "StreamlineTestTinyWan", "inputs": {"frames": 3, "width": 80, "height": 48}},
        "2": {"class_type": "StreamlineModel", "inputs": {
            "model": ["1", 0], "slicing": "auto", "max_slices": 8, "vram_budget_gb": 0.0, "groups": "all"}},
        "6": {"class_type": "VRAMProfiler", "inputs": {
            "model": ["2", 0], "granularity": "group", "snapshot_steps": 0, "label": "wan"}},
        "3": {"class_type": "KSampler", "inputs": {
            "model": ["6", 0], "seed": 7, "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["1", 1], "negative": ["1", 2], "latent_image": ["1", 3], "denoise": 1.0}},
        "4": {"class_type": "StreamlineTestLatentFrames", "inputs": {"samples": ["3", 0]}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}},
    }
    if not page.locator(".sl-panel").is_visible():
        open_panel(page)
    prompt_id = queue(page, prompt)
    wait_done(server, prompt_id)
    page.wait_for_function("(id) => [...document.querySelectorAll('.sl-run-a option')].some(o => o.value === id)",
                           arg=prompt_id, timeout=30_000)
    page.select_option(".sl-run-a", prompt_id)
    page.select_option(".sl-run-b", "")
    page.wait_for_function("() => document.querySelector('.sl-saving') === null")
    page.wait_for_timeout(300)
    doc = server.get(f"/streamline/timelines/{prompt_id}")
    bars = chart_state(page)["bars"]
    assert bars["names"] == ["blocks.0.self_attn.kv", "blocks.0", "blocks.1.self_attn.kv", "blocks.1"], bars["names"]
    predicted = {e["name"] for e in doc["events"] if e["kind"] == "group" and e["predicted"] is not None}
    assert bars["counts"] == [4, len(predicted)] and len(predicted) == 4
    page.locator(".sl-panel").screenshot(path=str(out_dir / "panel-wan.png"))


def test_the_wan_workflow_renders_in_the_page(session, out_dir):
    """The Wan 2.1 text-to-video example (1.3B, 832x480, 81 frames), loaded into the page: every node is a known type
    with its widgets, Streamline Model sits between the model sampling and KSampler, and a picture of it is kept."""
    page, _ = session
    workflow = json.loads((ROOT / "example_workflows" / "wan21_text_to_video_1.3b.json").read_text())
    page.evaluate("async (w) => { await window.comfyAPI.app.app.loadGraphData(w); }", workflow)
    nodes = page.evaluate("""() => window.comfyAPI.app.app.graph._nodes.map(n => ({
        type: n.type, widgets: (n.widgets || []).map(w => [w.name, w.value]),
        known: !!window.LiteGraph.registered_node_types[n.type]}))""")
    assert sorted(n["type"] for n in nodes) == sorted(n["type"] for n in workflow["nodes"])
    assert all(n["known"] for n in nodes), [n["type"] for n in nodes if not n["known"]]
    values = {n["type"]: dict(n["widgets"]) for n in nodes}
    assert values["StreamlineModel"] == {"slicing": "auto", "max_slices": 8, "vram_budget_gb": 0.0, "groups": "all"}
    assert values["UNETLoader"]["unet_name"] == "wan2.1_t2v_1.3B_fp16.safetensors"
    assert (values["EmptyHunyuanLatentVideo"]["width"], values["EmptyHunyuanLatentVideo"]["height"]) == (832, 480)
    assert values["ModelSamplingSD3"]["shift"] == 8
    page.wait_for_timeout(500)
    page.screenshot(path=str(out_dir / "wan-workflow.png"))
