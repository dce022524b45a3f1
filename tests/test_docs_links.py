"""Every relative link in the README, the pages under docs/ and the benchmark
studies' READMEs points at a file of this repository (and, with ``#anchor``, at
a heading of that page), so that moving a file cannot leave a link dead."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = sorted(
    [REPO / "README.md", *(REPO / "docs").glob("*.md"), REPO / "benchmarks" / "README.md", *(REPO / "benchmarks").glob("*/README.md")]
)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def links(text: str) -> list[str]:
    """Link targets outside code blocks and inline code."""
    prose = INLINE_CODE.sub("", FENCE.sub("", text))
    return LINK.findall(prose)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*$", text, re.M)}


def test_the_pages_exist():
    assert (REPO / "README.md") in PAGES and len(PAGES) > 3


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    dead = []
    for target in links(page.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        path_part, _, anchor = target.partition("#")
        linked = (page.parent / path_part).resolve() if path_part else page
        if not linked.exists():
            dead.append(f"{target} (no {linked})")
        elif REPO not in linked.parents and linked != REPO:
            dead.append(f"{target} (outside the repository)")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            dead.append(f"{target} (no heading #{anchor} in {linked.name})")
    assert not dead, f"{page.relative_to(REPO)}: dead links: {dead}"


def test_the_checker_finds_a_dead_link_and_skips_code(tmp_path):
    text = "see [a](a.md) and `[b](b.md)`\n```\n[c](c.md)\n```\n![img](img/x.png) [web](https://example.org)"
    assert links(text) == ["a.md", "img/x.png", "https://example.org"]
    assert slug("On a GPU: the paper's Table 7 setting") == "on-a-gpu-the-papers-table-7-setting"
    assert slug("`axolotl-ila search CONFIG`") == "axolotl-ila-search-config"
