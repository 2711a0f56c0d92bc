"""The README and the pages under docs/: short, linked, and their generated blocks where the script writes them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from readme import DOCS, README, ROOT, pages, tables

# Files of the project's working notes, kept outside the repository: a page that names one sends its
# reader nowhere.
OUTSIDE_FILES = ("HOST.md", "CONFIGS.md", "BENCHMARKS.md", "DESIGN.md", "PAPER.md", "STYLE.md")

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
MARKER = re.compile(r"<!-- ([\w-]+):(begin|end) -->")


def prose(text: str) -> str:
    """TEXT without fenced code blocks and inline code, where brackets are code, not links."""
    text = re.sub(r"^```.*?^```[^\n]*$", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def outside_blocks(text: str) -> str:
    """TEXT without its generated blocks (what the commands print there is theirs, not the page's)."""
    return re.sub(r"<!-- ([\w-]+):begin -->\n.*?<!-- \1:end -->", "", text, flags=re.S)


def anchors(page: Path) -> set[str]:
    """The heading anchors GitHub gives PAGE: lower case, punctuation dropped, spaces as hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    for line in prose(page.read_text()).splitlines():
        heading = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
            seen[slug] = seen.get(slug, -1) + 1
            if seen[slug]:
                seen[f"{slug}-{seen[slug]}"] = 0
    return set(seen)


def test_readme_is_under_300_lines():
    lines = len(README.read_text().splitlines())
    assert lines < 300, f"README.md has {lines} lines: it is read in five minutes, the rest lives in docs/"


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_files_and_headings_that_exist(page):
    broken = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file.relative_to(ROOT) if file.is_relative_to(ROOT) else file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in LINK.findall(prose(README.read_text()))}
    unlinked = [p.name for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


def test_every_generated_block_is_on_exactly_one_page():
    texts = {page: page.read_text() for page in pages()}
    for name in tables.BLOCKS:
        tables.holder(name, texts)  # LookupError names the pages when it is on none or several


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_marker_is_a_known_block_opened_and_closed_once(page):
    markers = MARKER.findall(prose(page.read_text()))  # a marker quoted as code is not one
    unknown = sorted({name for name, _ in markers} - set(tables.BLOCKS))
    assert not unknown, f"{page.name}: markers of blocks scripts/readme_tables.py does not write: {unknown}"
    for name in {name for name, _ in markers}:
        assert [m for m in markers if m[0] == name] == [(name, "begin"), (name, "end")], (page.name, name)


def test_figures_drawn_into_blocks_are_linked_from_the_page_that_holds_them():
    for name, figure in tables.FIGURE_IN_BLOCK.items():
        page = tables.holder(name)
        link = tables.figure_link(page, figure)
        assert f"]({link})" in tables.block(name), f"the {name} block on {page.name} should show {link}"
        assert (page.parent / link).resolve() == (DOCS / figure).resolve() and (DOCS / figure).is_file()


def test_every_picture_shown_is_one_that_is_generated():
    shown = {}
    for page in pages():
        for target in IMAGE.findall(prose(page.read_text())):
            file = (page.parent / target).resolve()
            assert file.parent == DOCS.resolve(), f"{page.name} shows {target}, not a picture under docs/"
            assert file.name in tables.FIGURES, f"{page.name} shows {target}, which nothing generates"
            shown.setdefault(file.name, []).append(page.name)
    assert set(shown) == set(tables.FIGURES), f"generated but shown nowhere: {set(tables.FIGURES) - set(shown)}"
    for figure, source in tables.FIGURES.items():
        assert (DOCS / figure).is_file(), figure
        writer = source.split()[0]
        if writer != "this":  # the browser test writes its screenshots into docs/ on request
            assert f'"docs" / "{figure}"' in (ROOT / writer).read_text(), f"{writer} no longer writes docs/{figure}"
    page = tables.holder("decode-cuts")  # its grid is drawn with the block and shown under it
    assert f"]({tables.figure_link(page, 'decode_cuts.png')})" in page.read_text(), page.name

@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_pages_name_no_file_kept_outside_the_repository(page):
    named = [f for f in OUTSIDE_FILES if f in outside_blocks(page.read_text())]
    assert not named, f"{page.relative_to(ROOT)} names {named}, which live outside the repository: say what they say"


def test_the_readme_says_where_the_test_hosts_come_from():
    text = README.read_text()
    for needed in ("../shared/hosts", "COMFYUI_PATH=", "~/comfy/ComfyUI", "docs/development.md"):
        assert needed in text, f"README.md's Tests section no longer mentions {needed}"


def _cells(block: str, start: str) -> list[str]:
    line = next(line for line in block.splitlines() if line.startswith(start))
    return [c.strip() for c in line.strip("|").split("|")]


def test_the_whole_workflow_tables_agree_with_the_u_net_and_decode_tables():
    """The workflow tables are generated from the same measurements as the U-Net and decode tables: their
    shared figures agree, and the card view says "yes" exactly where a stage's need is within the free memory."""
    from readme import generated_block

    pipeline, simulate, decode = generated_block("pipeline"), generated_block("simulate"), generated_block("decode")
    for label, frames in (("SVD", 14), ("SVD-XT", 25), ("AnimateDiff", 16)):
        original = _cells(simulate, f"| {label} | diffusers | original | 576x1024 | {frames} |")
        streamlined = next(_cells(simulate, line) for line in simulate.splitlines() if line.startswith(
            f"| {label} | diffusers | streamlined auto") and f"| 576x1024 | {frames} |" in line)
        unet = _cells(pipeline, f"| {label} {frames} frames 576x1024 | U-Net, one call with guidance")
        assert unet[2] == original[5] and unet[3].split(" / ")[0] == original[6], (unet, original)
        assert unet[4].split(" / ")[0] == streamlined[6], (unet, streamlined)
    for label, frames in (("SVD", 14), ("SVD-XT", 25)):
        stock = _cells(decode, f"| {label} | 576x1024 | {frames} |")
        stage = _cells(pipeline, f"| {label} {frames} frames 576x1024 | VAE decode")
        assert stage[3].split(" / ")[0] == stock[3].split()[0], (stage, stock)
    rows = [line for line in generated_block("pipeline-card").splitlines() if re.match(r"\| \w", line)][1:]
    assert len(rows) == 9
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        need, free = (float(x) for x in re.search(r": ([\d.]+) / ([\d.]+)$", cells[3]).groups())
        assert (cells[2] == "yes") == (need <= free), line
