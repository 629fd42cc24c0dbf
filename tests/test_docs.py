"""The markdown beyond the README: its relative links resolve (file and heading, as GitHub renders them), its Python
snippets run, and the README stays a short entry with the details one link away."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def github_anchors(text: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as hyphens, -1, -2 ...
    after repeats."""
    seen: dict[str, int] = {}
    anchors = set()
    in_code = False
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("#"):
            continue
        title = line.lstrip("#").strip().lower()
        slug = re.sub(r"[^\w\- ]", "", title).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def relative_links(page: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
    text = re.sub(r"`[^`\n]*`", "", text)  # code spans are not links
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


def test_github_anchors_follow_githubs_rule():
    text = "# A: b, and `c`\n## Speed benchmarks\n## Speed benchmarks\n```\n# not a heading\n```\n"
    assert github_anchors(text) == {"a-b-and-c", "speed-benchmarks", "speed-benchmarks-1"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    links = relative_links(page)
    assert links or page.name != "README.md", f"{page} links to nothing"
    for link in links:
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        assert target.exists(), f"{page.relative_to(ROOT)}: link {link!r} points at a missing {target}"
        assert ROOT in target.parents or target == ROOT, f"{page.relative_to(ROOT)}: {link!r} leaves the repository"
        if anchor:
            anchors = github_anchors(target.read_text(encoding="utf-8"))
            where = target.relative_to(ROOT)
            assert anchor in anchors, f"{page.relative_to(ROOT)}: no heading #{anchor} in {where}: {sorted(anchors)}"


def test_readme_is_a_short_entry_with_the_details_linked():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) < 300, "the README is the entry: move details to benchmarks/README.md or docs/"
    assert readme.startswith("# cbinterp\n\n```bash\nmake reproduce   #")
    for page in ("benchmarks/README.md", "docs/architecture.md", "docs/training.md", "docs/guarantees.md"):
        assert f"]({page}" in readme, f"the README does not link {page}"
    assert "## Guarantees" in readme


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


@pytest.mark.needs_hooked  # the pages are written for the pinned transformer-lens 3.9
@pytest.mark.parametrize("page", PAGES[1:], ids=lambda p: str(p.relative_to(ROOT)))
def test_snippets_run(page, one_thread):
    """Each page's Python snippets, in order in one namespace (the README's own are tests/test_readme.py's)."""
    namespace: dict = {}
    for i, block in enumerate(python_blocks(page.read_text(encoding="utf-8"))):
        exec(compile(block, f"{page.relative_to(ROOT)} python block {i}", "exec"), namespace)
