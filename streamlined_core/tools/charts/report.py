"""Recorded timelines as one self-contained HTML file: the ComfyUI memory panel, outside ComfyUI.

The file holds the very code ComfyUI's "Streamline memory" tab runs, read from the pack's ``web/``
folder when the file is written: the pure logic (``web/timeline_logic.js``), the drawing code
(``web/timeline_panel.js``) and the vendored uPlot build with its CSS (``web/vendor/uplot/``), plus
the timeline documents as JSON. It opens from disk in any current browser, with no network.

Where the web files come from: ``web/`` sits at the root of the pack (ComfyUI serves it from there),
beside the ``streamlined_core`` folder. A clone of the repository and an editable install
(``pip install -e .``, what ``scripts/dev.sh`` makes) both have it; a wheel holds ``streamlined_core``
only, so there ``web_dir`` must name a copy of the pack's ``web/`` folder, or the function says what
is missing.

The two ES modules are inlined into one ``<script type="module">``: their ``import { ... } from
"./x.js";`` lines (single-line imports of the modules listed in :data:`MODULES`) are dropped and
their ``export`` keywords removed, so both share the module's scope; anything else that imports or
exports is refused, so the file can never silently lose code.
"""

from __future__ import annotations

import html
import json
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

WEB_DIR = Path(__file__).resolve().parents[3] / "web"
MODULES = ("timeline_logic.js", "timeline_panel.js")  # in the order they are inlined: each after what it imports
SCHEMA = "streamline.timeline/1"

_IMPORT = re.compile(r'^import\s*\{[^}]*\}\s*from\s*"\./([\w.-]+)";\s*$')
_EXPORT = re.compile(r"^export\s+(?=(async\s+)?function\b|const\b|let\b|class\b)")
_MODULE_SYNTAX = re.compile(r"^\s*(import|export)\b")

# ComfyUI's own "dark" and "light" palettes (comfy_base), the variables the panel's CSS reads
_DARK = {"fg-color": "#fff", "bg-color": "#202020", "comfy-menu-bg": "#353535", "comfy-input-bg": "#222",
         "input-text": "#ddd", "descrip-text": "#999", "error-text": "#ff4444", "border-color": "#4e4e4e",
         "content-hover-bg": "#222"}
_LIGHT = {"fg-color": "#222", "bg-color": "#DDD", "comfy-menu-bg": "#F5F5F5", "comfy-input-bg": "#C9C9C9",
          "input-text": "#222", "descrip-text": "#444", "error-text": "#F44336", "border-color": "#888",
          "content-hover-bg": "#adadad"}


def _vars(palette: dict[str, str]) -> str:
    return " ".join(f"--{k}: {v};" for k, v in palette.items())


def _inline_module(source: str, name: str, before: Sequence[str]) -> str:
    """The module's code without its imports of earlier modules and without ``export`` keywords."""
    out = []
    for number, line in enumerate(source.splitlines(), 1):
        m = _IMPORT.match(line)
        if m:
            if m.group(1) not in before:
                raise ValueError(f"web/{name}:{number}: imports ./{m.group(1)}, which is not inlined before it "
                                 f"(inlined: {', '.join(MODULES)})")
            continue
        if _EXPORT.match(line):
            out.append(_EXPORT.sub("", line))
            continue
        if _MODULE_SYNTAX.match(line):
            raise ValueError(f"web/{name}:{number}: cannot inline {line.strip()[:60]!r} (only single-line imports of "
                             "./ modules and `export function|const|let|class` are understood)")
        out.append(line)
    return "\n".join(out)


def _script_text(text: str) -> str:
    """Text safe inside a <script> or <style> element (nothing in it can close the element)."""
    return re.sub(r"</(script|style)", r"<\\/\1", text, flags=re.IGNORECASE)


def _one(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    if len(found) != 1:
        raise FileNotFoundError(f"{folder}: expected one {pattern}, found {len(found)}")
    return found[0]


def _document(t: Any) -> dict:
    doc = t.to_json() if hasattr(t, "to_json") else t
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        got = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
        raise ValueError(f"timelines: expected {SCHEMA} documents (or Timeline objects), got {got!r}")
    return doc


def write_html(timelines: Sequence[dict], path: Path | str, title: str = "", web_dir: Path | str | None = None) -> Path:
    """Write ``timelines`` (``streamline.timeline/1`` documents, oldest first; ``Timeline`` objects are
    accepted too) to ``path`` as a self-contained HTML page showing the memory panel, and return the path.

    The newest run is shown beside the one it is best compared with (for ``[original, streamlined]``:
    streamlined against original, with the saving); every run can be picked in the page.
    ``web_dir``: the pack's ``web/`` folder (default: the one beside ``streamlined_core``).
    """
    docs = [_document(t) for t in timelines]
    if not docs:
        raise ValueError("timelines: expected at least one")
    web = Path(web_dir) if web_dir is not None else WEB_DIR
    if not (web / MODULES[0]).is_file():
        raise FileNotFoundError(
            f"the memory panel's files are not in {web}: they live in the pack's web/ folder, which a clone or an "
            "editable install (pip install -e) has; pass web_dir= a copy of that folder")
    modules = []
    for i, name in enumerate(MODULES):
        modules.append(f"// ---- web/{name}\n" + _inline_module((web / name).read_text(encoding="utf-8"), name, MODULES[:i]))
    uplot_dir = web / "vendor" / "uplot"
    uplot_js = _one(uplot_dir, "uPlot-*.iife.min.js").read_text(encoding="utf-8")
    uplot_css = _one(uplot_dir, "uPlot-*.min.css").read_text(encoding="utf-8")
    data = json.dumps(docs, separators=(",", ":"), allow_nan=False)
    data = data.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    title = title or "Memory timeline" + (f": {docs[-1].get('label')}" if len(docs) == 1 and docs[-1].get("label") else "")
    written = datetime.now(timezone.utc).isoformat(timespec="seconds")
    runs = ", ".join(html.escape(d.get("label") or "(no label)") for d in docs)
    page = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="streamline profile">
<title>{html.escape(title)}</title>
<style>{_script_text(uplot_css)}</style>
<style>
:root {{ color-scheme: dark; {_vars(_DARK)} }}
:root[data-theme="light"] {{ color-scheme: light; {_vars(_LIGHT)} }}
@media (prefers-color-scheme: light) {{ :root:not([data-theme="dark"]) {{ color-scheme: light; {_vars(_LIGHT)} }} }}
body {{ margin: 0; background: var(--bg-color); color: var(--fg-color); font: 13px/1.4 system-ui, sans-serif; }}
.sl-page-head {{ display: flex; gap: 16px; align-items: baseline; flex-wrap: wrap; padding: 8px 12px; }}
.sl-page-head h1 {{ margin: 0; font-size: 15px; }}
.sl-page-head span, .sl-page-head label {{ color: var(--descrip-text); }}
.sl-page-head select {{ color: var(--input-text); background: var(--comfy-input-bg); border: 1px solid var(--border-color); }}
#streamline-panel {{ height: calc(100vh - 44px); min-height: 520px; }}
</style>
</head>
<body>
<div class="sl-page-head">
<h1>{html.escape(title)}</h1>
<span>{len(docs)} run{'s' if len(docs) != 1 else ''}: {runs} · written {written}</span>
<label>theme <select id="sl-theme"><option value="">as the system</option><option value="dark">dark</option>
<option value="light">light</option></select></label>
</div>
<div id="streamline-panel"></div>
<script type="application/json" id="streamline-timelines">{data}</script>
<script>{_script_text(uplot_js)}</script>
<script type="module">
{_script_text(chr(10).join(modules))}
// ---- the page
const theme = document.getElementById("sl-theme");
theme.addEventListener("change", () => {{
  if (theme.value) document.documentElement.dataset.theme = theme.value;
  else delete document.documentElement.dataset.theme;
}});
const timelines = JSON.parse(document.getElementById("streamline-timelines").textContent);
const panel = createTimelinePanel({{ uPlot: window.uPlot }});
timelines.forEach((doc, i) => panel.addTimeline(doc, {{ select: i === timelines.length - 1 }}));
await panel.mount(document.getElementById("streamline-panel"));
document.documentElement.dataset.ready = "1";
</script>
</body>
</html>
"""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out
