"""Regenerate the generated blocks of README.md and docs/*.md from the commands that print them.

    .venv/bin/python scripts/readme_tables.py            # streamline simulate --markdown
    .venv/bin/python scripts/readme_tables.py --bench    # also streamline bench --latency --markdown
    .venv/bin/python scripts/readme_tables.py --cuts     # also streamline bench --cuts --markdown
    .venv/bin/python scripts/readme_tables.py --profile  # also streamline profile --compare (docs/profile.png)
    .venv/bin/python scripts/readme_tables.py --overhead # also streamline profile --overhead
    .venv/bin/python scripts/readme_tables.py --fixture  # also streamline bench --fixture (docs/fixture_grid.png)
    .venv/bin/python scripts/readme_tables.py --decode   # also streamline simulate --decode, bench --decode (docs/decode_cuts.png)
    .venv/bin/python scripts/readme_tables.py --pipeline # also streamline simulate --pipeline, and with --card 6
    .venv/bin/python scripts/readme_tables.py --calibrate # also streamline calibrate (docs/rehash_maps.png)
    .venv/bin/python scripts/readme_tables.py --wan      # also streamline simulate --model wan --markdown (a ComfyUI checkout)
    .venv/bin/python scripts/readme_tables.py --rehash   # also streamline bench --rehash (docs/rehash_bench.png; about 2.5 h on 2 cores)
    .venv/bin/python scripts/readme_tables.py --rehash-comfyui  # also bench --rehash --comfyui-only (a ComfyUI checkout; ~12 min)
    .venv/bin/python scripts/readme_tables.py --cuda FILE # the table `streamline bench --cuda` printed on a GPU, saved in FILE

``--no-simulate`` leaves the simulate table as it is. Each block sits between ``<!-- NAME:begin -->`` and
``<!-- NAME:end -->`` markers, once, on one of the pages (README.md or docs/*.md); the script finds it
wherever it is, and a figure inside a block is linked relative to the page that holds it. The tests find
blocks the same way (tests/readme.py loads this file).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"

# Every generated block: its name, and the option of this script that writes it.
BLOCKS = {
    "simulate": "(always, unless --no-simulate): streamline simulate --markdown",
    "bench": "--bench: streamline bench --latency --markdown",
    "cuts": "--cuts: streamline bench --cuts --markdown",
    "profile": "--profile: streamline profile --compare --steps 4, and its chart",
    "overhead": "--overhead: streamline profile --overhead",
    "fixture": "--fixture: streamline bench --fixture, and its grid",
    "decode": "--decode: streamline simulate --decode --markdown",
    "decode-cuts": "--decode: streamline bench --decode --grid, and its grid (shown under the block)",
    "pipeline": "--pipeline: streamline simulate --pipeline --markdown",
    "pipeline-card": "--pipeline: streamline simulate --pipeline --card 6",
    "wan": "--wan: streamline simulate --model wan --markdown",
    "rehash-calibration": "--calibrate: streamline calibrate, and its maps",
    "rehash-bench": "--rehash: streamline bench --rehash --plot",
    "rehash-comfyui": "--rehash-comfyui: streamline bench --rehash --comfyui-only",
    "cuda": "--cuda FILE: the table streamline bench --cuda prints on a GPU",
}

# Every picture a page shows (all under docs/), and what draws it.
FIGURES = {
    "profile.png": "this script, --profile (inside the profile block)",
    "fixture_grid.png": "this script, --fixture (inside the fixture block)",
    "decode_cuts.png": "this script, --decode (under the decode-cuts block)",
    "rehash_maps.png": "this script, --calibrate (inside the rehash-calibration block)",
    "rehash_bench.png": "this script, --rehash (inside the rehash-bench block)",
    "panel.png": "tests/host/test_browser.py with STREAMLINE_UPDATE_SCREENSHOT=1",
    "step_rehash_node.png": "tests/host/test_browser.py with STREAMLINE_UPDATE_SCREENSHOT=1",
}

# The block that shows each figure this script draws inside a block.
FIGURE_IN_BLOCK = {
    "profile": "profile.png",
    "fixture": "fixture_grid.png",
    "rehash-calibration": "rehash_maps.png",
    "rehash-bench": "rehash_bench.png",
}


def pages() -> list[Path]:
    """The pages a generated block may live on: README.md, then docs/*.md."""
    return [README, *sorted(DOCS.glob("*.md"))]


def _pattern(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- {re.escape(name)}:begin -->\n)(.*?)(<!-- {re.escape(name)}:end -->)", re.S)


def holder(name: str, texts: dict[Path, str] | None = None) -> Path:
    """The one page that holds NAME's block (LookupError when none or several do)."""
    texts = texts if texts is not None else {page: page.read_text() for page in pages()}
    found = [page for page, text in texts.items() if _pattern(name).search(text)]
    if len(found) != 1:
        where = ", ".join(str(p.relative_to(ROOT)) for p in found) or "no page"
        raise LookupError(f"<!-- {name}:begin --> ... <!-- {name}:end --> must be on exactly one page "
                          f"(README.md or docs/*.md); found on {where}")
    return found[0]


def block(name: str, texts: dict[Path, str] | None = None) -> str:
    """The text between NAME's markers, on whichever page holds them."""
    texts = texts if texts is not None else {page: page.read_text() for page in pages()}
    return _pattern(name).search(texts[holder(name, texts)]).group(2)


def figure_link(page: Path, figure: str) -> str:
    """The link from PAGE to docs/FIGURE, as Markdown on that page resolves it."""
    return Path(os.path.relpath(DOCS / figure, page.parent)).as_posix()


def replace(text: str, name: str, body: str) -> str:
    """``text`` with the block between NAME's markers replaced by ``body``."""
    return _pattern(name).sub(lambda m: m.group(1) + body + m.group(3), text)


def profile_block(say, page: Path) -> str:
    """The original and the streamlined fixture model recorded (4 steps, 14 frames), charted in docs/."""
    from streamlined_core.tools.charts.profile import plot
    from streamlined_core.tools.profiling import sampling_run

    runs = [sampling_run("fixture", streamlined, "group", steps=4, frames=8) for streamlined in (False, True)]
    plot(runs, DOCS / FIGURE_IN_BLOCK["profile"],
         title="fixture model, 8 frames at 32x32, 4 steps (measured on the fixture model, CPU tracker)")
    a, b = (r.activation_peak_bytes for r in runs)
    lines = [f"- {r.label}: {r.summary()}" for r in runs]
    lines.append(f"- saving: {(a - b) / 2**20:.1f} MiB of activations ({1 - b / a:.0%})")
    return ("`streamline profile --compare --steps 4` (measured on the fixture model, CPU):\n\n" + "\n".join(lines)
            + f"\n\n![original and streamlined fixture runs]({figure_link(page, FIGURE_IN_BLOCK['profile'])})\n")


def fixture_block(say, page: Path) -> str:
    """The fixture's quality bar on 16 held-out clips, with the grid of true and sampled clips."""
    from streamlined_core.fixture import quality
    from streamlined_core.fixture.model import load_unet

    report, true, got = quality.evaluate(load_unet(), progress=say)
    quality.save_grid(true, got, DOCS / FIGURE_IN_BLOCK["fixture"])
    return (quality.format_report(report) + "\n\n![true (upper) and sampled (lower) held-out clips]"
            f"({figure_link(page, FIGURE_IN_BLOCK['fixture'])})\n")


def calibration_block(say, page: Path) -> str:
    """Step Rehash's similarity maps on the fixture model (4 calibration clips, 25 steps), drawn in docs/."""
    from streamlined_core.features.rehash import format_calibration
    from streamlined_core.fixture.calibration import calibrate_fixture
    from streamlined_core.fixture.model import load_unet
    from streamlined_core.tools.charts.rehash import draw_maps

    cal = calibrate_fixture(load_unet(), clips=4, progress=say)
    draw_maps(cal, DOCS / FIGURE_IN_BLOCK["rehash-calibration"])
    return (format_calibration(cal, 4, 8) + "\n![step similarity at each cut of the last up block, key steps boxed]"
            f"({figure_link(page, FIGURE_IN_BLOCK['rehash-calibration'])})\n")


def main() -> None:
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    args = sys.argv[1:]
    texts = {page: page.read_text() for page in pages()}
    before = dict(texts)

    def put(name: str, body) -> None:
        """Write NAME's block on the page that holds it; ``body(page)`` gives its text."""
        try:
            page = holder(name, texts)
        except LookupError as e:
            raise SystemExit(str(e)) from None
        texts[page] = replace(texts[page], name, body(page))

    if "--bench" in args:
        from streamlined_core.tools.bench.unet import format_latency, latency

        put("bench", lambda page: format_latency(latency(progress=say), markdown=True))
    if "--cuts" in args:
        from streamlined_core.tools.bench.unet import cuts, format_cuts

        put("cuts", lambda page: format_cuts(cuts(progress=say), markdown=True))
    if "--profile" in args:
        put("profile", lambda page: profile_block(say, page))
    if "--overhead" in args:
        from streamlined_core.tools.profiling import format_overhead, overhead

        put("overhead", lambda page: format_overhead(overhead("mid", progress=say)))
    if "--fixture" in args:
        put("fixture", lambda page: fixture_block(say, page))
    if "--decode" in args:
        from streamlined_core.tools.sim.decode import decode_rows
        from streamlined_core.tools.sim.decode import format_markdown as decode_markdown

        put("decode", lambda page: decode_markdown(decode_rows(((512, 512), (576, 1024)), progress=say)))
        from streamlined_core.tools.bench.decode import decode_errors, plot
        from streamlined_core.tools.bench.decode import format_markdown as errors_markdown

        rows, clips = decode_errors(progress=say)
        plot(clips, DOCS / "decode_cuts.png")
        put("decode-cuts", lambda page: errors_markdown(rows))
    if "--pipeline" in args:
        from streamlined_core.tools.sim.cards import VARIANTS, format_card_markdown
        from streamlined_core.tools.sim.host_memory import Card
        from streamlined_core.tools.sim.pipeline import format_markdown as pipeline_markdown
        from streamlined_core.tools.sim.pipeline import pipeline_rows

        rows = pipeline_rows(progress=say)
        put("pipeline", lambda page: pipeline_markdown(rows))
        card = Card(6)
        put("pipeline-card", lambda page: format_card_markdown([r.host.predict(card, v) for r in rows for v in VARIANTS]))
    if "--wan" in args:
        from streamlined_core.tools.sim.wan import WAN_MODELS, wan_rows
        from streamlined_core.tools.sim.wan import format_markdown as wan_markdown

        put("wan", lambda page: wan_markdown(wan_rows(list(WAN_MODELS), progress=say)))
    if "--calibrate" in args:
        put("rehash-calibration", lambda page: calibration_block(say, page))
    if "--rehash" in args:
        from streamlined_core.tools.bench.rehash import bench_rehash
        from streamlined_core.tools.bench.rehash import format_markdown as rehash_markdown
        from streamlined_core.tools.bench.rehash import plot as rehash_plot

        result = bench_rehash(progress=say)
        rehash_plot(result, str(DOCS / FIGURE_IN_BLOCK["rehash-bench"]))
        put("rehash-bench", lambda page: rehash_markdown(result) + "\n![error against U-Net time of every setting]"
            f"({figure_link(page, FIGURE_IN_BLOCK['rehash-bench'])})\n")
    if "--rehash-comfyui" in args:
        from streamlined_core.tools.bench.rehash_comfyui import bench_rehash_comfyui
        from streamlined_core.tools.bench.rehash_comfyui import format_markdown as host_markdown

        given = dict(shares=result.shares, shares_from=result.shares_from) if "--rehash" in args else {}
        put("rehash-comfyui", lambda page: host_markdown(bench_rehash_comfyui(**given, progress=say)))
    if "--cuda" in args:
        at = args.index("--cuda") + 1
        if at >= len(args) or not Path(args[at]).is_file():
            raise SystemExit("--cuda FILE: the Markdown table `streamline bench --cuda` printed, saved in a file")
        table = Path(args[at]).read_text().strip() + "\n"
        put("cuda", lambda page: table)
    if "--no-simulate" not in args:
        from streamlined_core.tools.sim.unet import format_markdown, simulate

        put("simulate", lambda page: format_markdown(simulate(progress=say)))
    for page, text in texts.items():
        if text != before[page]:
            page.write_text(text)
            print(f"updated {page.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
