"""write_html: one self-contained file holding the panel's own code, uPlot and the timelines.

(It is drawn in a real browser by tests/host/test_browser.py; here: what the file holds.)
"""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from streamlined_core.tools.charts.report import MODULES, WEB_DIR, write_html

ROOT = Path(__file__).resolve().parents[2]
MIB = 1024**2


def timeline(label: str, peaks: list[int], predicted: int | None = None) -> dict:
    events = [{"t": 0.0, "kind": "run_start", "name": "run", "step": None, "sigma": None, "conds": None,
               "allocated": 0, "reserved": 0, "peak": 0, "predicted": None, "device_used": None}]
    for i, p in enumerate(peaks):
        events.append({"t": 0.1 * (i + 1), "kind": "group", "name": f"g{i}", "step": 0, "sigma": 1.0, "conds": None,
                       "allocated": 0, "reserved": 0, "peak": p * MIB, "predicted": predicted, "device_used": None})
    top = max(range(len(peaks)), key=lambda i: peaks[i])
    return {"schema": "streamline.timeline/1", "label": label, "prompt_id": None, "device": "cpu", "source": "tracker",
            "granularity": "group", "started_at": "2025-10-01T00:00:00+00:00", "seconds": 1.0, "weights_bytes": 0,
            "weights_on_device_bytes": 0, "partial_load": False, "baseline_bytes": 0, "peak_bytes": peaks[top] * MIB,
            "activation_peak_bytes": peaks[top] * MIB, "peak_step": 0, "peak_name": f"g{top}", "peak_t": 0.1 * (top + 1),
            "predicted_peak_bytes": predicted, "device_total_bytes": None, "steps": [], "events": events,
            "dropped_events": 0, "snapshot": {}, "streamline": None}


def scripts(page: str) -> list[tuple[str, str]]:
    return re.findall(r"<script([^>]*)>(.*?)</script>", page, re.S)


def test_the_file_holds_everything_it_needs(tmp_path):
    docs = [timeline("original", [3, 8, 5]), timeline("streamlined", [2, 4, 3], predicted=4 * MIB)]
    path = write_html(docs, tmp_path / "sub" / "panel.html", title="two runs")
    assert path == tmp_path / "sub" / "panel.html"
    page = path.read_text()
    # nothing is fetched: no external scripts, styles, images or frames
    assert not re.search(r"<(script|link|img|iframe)[^>]*\b(src|href)=", page)
    found = scripts(page)
    assert [attrs.strip() for attrs, _ in found] == ['type="application/json" id="streamline-timelines"', "",
                                                     'type="module"']
    assert json.loads(found[0][1]) == docs
    uplot = next(WEB_DIR.glob("vendor/uplot/uPlot-*.iife.min.js")).read_text()
    assert found[1][1] == uplot
    module = found[2][1]
    # the panel's own modules, as ComfyUI serves them, less their import lines and export keywords
    for name in MODULES:
        source = (WEB_DIR / name).read_text()
        for line in source.splitlines():
            if line.startswith("import "):
                assert line not in module
            else:
                assert line.removeprefix("export ") in module
    assert not re.search(r"^\s*(import|export)\b", module, re.M)
    assert "<title>two runs</title>" in page


def test_labels_cannot_break_out_of_the_page(tmp_path):
    evil = timeline("</script><script>alert(1)</script><!--", [1, 2])
    page = write_html([evil], tmp_path / "p.html").read_text()
    assert "<script>alert(1)" not in page
    data = scripts(page)[0][1]
    assert json.loads(data)[0]["label"] == evil["label"]
    assert "&lt;/script&gt;" in page  # the title and the run list, escaped as text


def test_timeline_objects_are_written_as_their_documents(tmp_path):
    from streamlined_core.features.profiler import Timeline

    doc = timeline("obj", [1, 4, 2])
    page = write_html([Timeline.from_json(doc)], tmp_path / "p.html").read_text()
    written = json.loads(scripts(page)[0][1])[0]
    assert written["label"] == "obj" and written["peak_name"] == "g1" and written["schema"] == "streamline.timeline/1"


@pytest.mark.parametrize("bad, error", [
    ([], "at least one"),
    ([{"schema": "other"}], "streamline.timeline/1"),
    (["text"], "streamline.timeline/1"),
])
def test_what_is_not_a_timeline_is_refused(tmp_path, bad, error):
    with pytest.raises(ValueError, match=error):
        write_html(bad, tmp_path / "p.html")


def test_a_missing_web_folder_says_where_the_files_live(tmp_path):
    with pytest.raises(FileNotFoundError, match="web/ folder"):
        write_html([timeline("a", [1])], tmp_path / "p.html", web_dir=tmp_path / "nowhere")


def test_module_syntax_it_cannot_inline_is_refused_not_dropped(tmp_path):
    web = tmp_path / "web"
    shutil.copytree(WEB_DIR, web, ignore=shutil.ignore_patterns("__pycache__"))
    panel = web / MODULES[1]
    panel.write_text(panel.read_text() + "\nexport default createTimelinePanel;\n")
    with pytest.raises(ValueError, match=r"timeline_panel\.js:\d+: cannot inline 'export default"):
        write_html([timeline("a", [1])], tmp_path / "p.html", web_dir=web)
    panel.write_text(panel.read_text().replace("export default createTimelinePanel;\n", "")
                     .replace('from "./timeline_logic.js";', 'from "./elsewhere.js";'))
    with pytest.raises(ValueError, match=r"imports \./elsewhere\.js"):
        write_html([timeline("a", [1])], tmp_path / "p.html", web_dir=web)


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_the_inlined_module_is_valid_javascript(tmp_path):
    page = write_html([timeline("a", [1, 2])], tmp_path / "p.html").read_text()
    module = tmp_path / "module.mjs"
    module.write_text(scripts(page)[2][1])
    result = subprocess.run(["node", "--check", str(module)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
