"""Jane Austen: the janeaustenr package's R lazy-load database -> one document per chapter."""

from __future__ import annotations

import re
from pathlib import Path

from .base import Document, SourceResult, join_paragraphs, slug
from .fetch import AUSTEN, _deb_extract
from .rdata import read_r_lazyload

AUSTEN_DIR = "usr/lib/R/site-library/janeaustenr/data"

AUSTEN_NOVELS = {
    "sensesensibility": "Sense and Sensibility",
    "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}
_CHAPTER = re.compile(r"(CHAPTER|Chapter)\s+([IVXLC]+|\d+)\.?")
_VOLUME = re.compile(r"VOLUME\s+([IVX]+)")
# End of the novel's text; Northanger Abbey then has a modern editor's note, which is not Austen's.
_AUSTEN_END = {"THE END", "FINIS", "Finis", "A NOTE ON THE TEXT"}


def austen_chapters(lines: list[str]) -> list[tuple[str, list[str]]]:
    """(heading, paragraphs) per chapter; front matter before the first chapter is dropped."""
    chapters: list[tuple[str, list[str]]] = []
    volume = None
    paragraph: list[str] = []
    for line in lines + [""]:
        line = line or ""
        stripped = line.strip()
        if stripped in _AUSTEN_END:
            break
        if _VOLUME.fullmatch(stripped):
            volume = _VOLUME.fullmatch(stripped).group(1)
            continue
        chapter = _CHAPTER.fullmatch(stripped)
        if chapter:
            heading = f"Chapter {chapter.group(2)}"
            chapters.append((f"Volume {volume}, {heading}" if volume else heading, []))
            continue
        if not chapters:
            continue
        if stripped:
            paragraph.append(stripped)
        elif paragraph:
            chapters[-1][1].append(" ".join(paragraph))
            paragraph = []
    if paragraph and chapters:
        chapters[-1][1].append(" ".join(paragraph))
    # Underscores mark italics in these Gutenberg-derived texts; the words stay, the marks go.
    return [(head, [re.sub(r"_([^_]+)_", r"\1", p) for p in paras]) for head, paras in chapters]


def extract_austen(deb: Path, work: Path) -> SourceResult:
    """One document per chapter of each of the six novels."""
    data_dir = _deb_extract(deb, work / "austen") / AUSTEN_DIR
    objects = read_r_lazyload(data_dir)
    if set(objects) != set(AUSTEN_NOVELS):
        raise SystemExit(f"unexpected janeaustenr objects {sorted(objects)}")
    docs = []
    for key, novel in AUSTEN_NOVELS.items():
        for n, (heading, paragraphs) in enumerate(austen_chapters(objects[key]), start=1):
            text = join_paragraphs(paragraphs)
            if text:
                docs.append(Document(f"austen/{slug(novel)}-{n:02d}", "austen", f"{novel}, {heading}", text))
    return SourceResult("austen", docs, AUSTEN, f"{AUSTEN_DIR}/Rdata.{{rdb,rdx}}")
