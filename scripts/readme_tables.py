"""Regenerate the README's generated tables from the commands that print them.

    .venv/bin/python scripts/readme_tables.py            # streamline simulate --markdown
    .venv/bin/python scripts/readme_tables.py --bench    # also streamline bench --latency --markdown
    .venv/bin/python scripts/readme_tables.py --cuts     # also streamline bench --cuts --markdown
    .venv/bin/python scripts/readme_tables.py --profile  # also streamline profile --compare (docs/profile.png)
    .venv/bin/python scripts/readme_tables.py --overhead # also streamline profile --overhead
    .venv/bin/python scripts/readme_tables.py --fixture  # also streamline bench --fixture (docs/fixture_grid.png)
    .venv/bin/python scripts/readme_tables.py --decode   # also streamline simulate --decode, bench --decode (docs/decode_cuts.png)
    .venv/bin/python scripts/readme_tables.py --pipeline # also streamline simulate --pipeline
    .venv/bin/python scripts/readme_tables.py --calibrate # also streamline calibrate (docs/rehash_maps.png)
    .venv/bin/python scripts/readme_tables.py --rehash   # also streamline bench --rehash (docs/rehash_bench.png; about 2.5 h on 2 cores)
    .venv/bin/python scripts/readme_tables.py --rehash-comfyui  # also bench --rehash --comfyui-only (a ComfyUI checkout; ~12 min)

``--no-simulate`` leaves the simulate table as it is. Each table sits between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` markers.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from streamlined_core.tools.bench.unet import cuts, format_cuts, format_latency, latency
from streamlined_core.tools.sim.unet import format_markdown, simulate

README = Path(__file__).resolve().parents[1] / "README.md"


def replace(text: str, name: str, body: str) -> str:
    """``text`` with the block between NAME's markers replaced by ``body``."""
    pattern = re.compile(rf"(<!-- {name}:begin -->\n).*?(<!-- {name}:end -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"README.md has no <!-- {name}:begin --> ... <!-- {name}:end --> markers")
    return pattern.sub(lambda m: m.group(1) + body + m.group(2), text)


def profile_block(say) -> str:
    """The original and the streamlined fixture model recorded (4 steps, 14 frames), charted in docs/."""
    from streamlined_core.tools.charts.profile import plot
    from streamlined_core.tools.profile_run import sampling_run

    runs = [sampling_run("fixture", streamlined, "group", steps=4, frames=8) for streamlined in (False, True)]
    plot(runs, README.parent / "docs" / "profile.png",
         title="fixture model, 8 frames at 32x32, 4 steps (measured on the fixture model, CPU tracker)")
    a, b = (r.activation_peak_bytes for r in runs)
    lines = [f"- {r.label}: {r.summary()}" for r in runs]
    lines.append(f"- saving: {(a - b) / 2**20:.1f} MiB of activations ({1 - b / a:.0%})")
    return ("`streamline profile --compare --steps 4` (measured on the fixture model, CPU):\n\n" + "\n".join(lines)
            + "\n\n![original and streamlined fixture runs](docs/profile.png)\n")


def fixture_block(say) -> str:
    """The fixture's quality bar on 16 held-out clips, with the grid of true and sampled clips."""
    from streamlined_core.fixture import quality
    from streamlined_core.fixture.model import load_unet

    report, true, got = quality.evaluate(load_unet(), progress=say)
    quality.save_grid(true, got, README.parent / "docs" / "fixture_grid.png")
    return (quality.format_report(report) + "\n\n![true (upper) and sampled (lower) held-out clips]"
            "(docs/fixture_grid.png)\n")


def calibration_block(say) -> str:
    """Step Rehash's similarity maps on the fixture model (4 calibration clips, 25 steps), drawn in docs/."""
    from streamlined_core.fixture.calibration import calibrate_fixture
    from streamlined_core.fixture.model import load_unet
    from streamlined_core.features.rehash import format_calibration
    from streamlined_core.tools.charts.rehash import draw_maps

    cal = calibrate_fixture(load_unet(), clips=4, progress=say)
    draw_maps(cal, README.parent / "docs" / "rehash_maps.png")
    return (format_calibration(cal, 4, 8) + "\n![step similarity at each cut of the last up block, key steps boxed]"
            "(docs/rehash_maps.png)\n")


def main() -> None:
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    text = README.read_text()
    if "--bench" in sys.argv[1:]:
        text = replace(text, "bench", format_latency(latency(progress=say), markdown=True))
    if "--cuts" in sys.argv[1:]:
        text = replace(text, "cuts", format_cuts(cuts(progress=say), markdown=True))
    if "--profile" in sys.argv[1:]:
        text = replace(text, "profile", profile_block(say))
    if "--overhead" in sys.argv[1:]:
        from streamlined_core.tools.profile_run import format_overhead, overhead

        text = replace(text, "overhead", format_overhead(overhead("mid", progress=say)))
    if "--fixture" in sys.argv[1:]:
        text = replace(text, "fixture", fixture_block(say))
    if "--decode" in sys.argv[1:]:
        from streamlined_core.tools.sim.decode import decode_rows
        from streamlined_core.tools.sim.decode import format_markdown as decode_markdown

        text = replace(text, "decode", decode_markdown(decode_rows(((512, 512), (576, 1024)), progress=say)))
        from streamlined_core.tools.bench.decode import decode_errors, plot
        from streamlined_core.tools.bench.decode import format_markdown as errors_markdown

        rows, clips = decode_errors(progress=say)
        plot(clips, README.parent / "docs" / "decode_cuts.png")
        text = replace(text, "decode-cuts", errors_markdown(rows))
    if "--pipeline" in sys.argv[1:]:
        from streamlined_core.tools.sim.pipeline import format_markdown as pipeline_markdown
        from streamlined_core.tools.sim.pipeline import pipeline_rows

        text = replace(text, "pipeline", pipeline_markdown(pipeline_rows(progress=say)))
    if "--calibrate" in sys.argv[1:]:
        text = replace(text, "rehash-calibration", calibration_block(say))
    if "--rehash" in sys.argv[1:]:
        from streamlined_core.tools.bench.rehash import bench_rehash
        from streamlined_core.tools.bench.rehash import format_markdown as rehash_markdown
        from streamlined_core.tools.bench.rehash import plot as rehash_plot

        result = bench_rehash(progress=say)
        rehash_plot(result, str(README.parent / "docs" / "rehash_bench.png"))
        text = replace(text, "rehash-bench", rehash_markdown(result) + "\n![error against U-Net time of every setting]"
                       "(docs/rehash_bench.png)\n")
    if "--rehash-comfyui" in sys.argv[1:]:
        from streamlined_core.tools.bench.rehash_comfyui import bench_rehash_comfyui
        from streamlined_core.tools.bench.rehash_comfyui import format_markdown as host_markdown

        given = dict(shares=result.shares, shares_from=result.shares_from) if "--rehash" in sys.argv[1:] else {}
        text = replace(text, "rehash-comfyui", host_markdown(bench_rehash_comfyui(**given, progress=say)))
    if "--no-simulate" not in sys.argv[1:]:
        text = replace(text, "simulate", format_markdown(simulate(progress=say)))
    README.write_text(text)
    print(f"updated {README}")


if __name__ == "__main__":
    main()
