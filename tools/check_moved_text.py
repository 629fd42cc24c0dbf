"""Check that markdown moved out of one file lost nothing: every table row, code line, sentence and number of the
old file must still be in the union of the new files.

    python tools/check_moved_text.py OLD.md README.md benchmarks/README.md docs/*.md
    git show <commit>:README.md > /tmp/old.md && python tools/check_moved_text.py /tmp/old.md README.md ...

Links are compared by their text (`[text](target)` counts as `text`), so a moved sentence may gain a link, and
whitespace is collapsed, so it may be wrapped anew. Exits 1 and lists what is missing, 0 when nothing is.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

LINK = re.compile(r"\[([^\]]*)\]\([^)]*\)")
NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
SEPARATOR = re.compile(r"^\|[\s|:-]+\|$")


def normalise(text: str) -> str:
    """Links as their text, whitespace collapsed."""
    return " ".join(LINK.sub(r"\1", text).split())


def split_blocks(text: str) -> tuple[list[str], list[str], list[str]]:
    """(table rows, code lines, prose paragraphs) of a markdown text."""
    rows, code, paragraphs, current, in_code = [], [], [], [], False
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        if in_code:
            if line.strip():
                code.append(line.rstrip())
            continue
        if line.startswith("|"):
            if not SEPARATOR.match(line.strip()):
                rows.append(normalise(line))
            continue
        if line.strip() and not line.startswith("#"):
            current.append(line)
        elif current:
            paragraphs.append(normalise(" ".join(current)))
            current = []
    if current:
        paragraphs.append(normalise(" ".join(current)))
    return rows, code, paragraphs


def sentences(paragraph: str) -> list[str]:
    """A paragraph cut after each `.`, `:` or `;` that ends a clause (followed by a space)."""
    return [s for s in re.split(r"(?<=[.:;])\s+", paragraph) if s]


def missing(old: str, new: list[str]) -> dict[str, list[str]]:
    """What of `old` is in none of `new`: table rows, code lines, sentences, and numbers found fewer times."""
    union = "\n".join(new)
    new_rows, new_code, new_paragraphs = split_blocks(union)
    row_set, code_set, prose = set(new_rows), {c.strip() for c in new_code}, "\n".join(new_paragraphs)
    rows, code, paragraphs = split_blocks(old)
    old_numbers, new_numbers = Counter(NUMBER.findall(old)), Counter(NUMBER.findall(union))
    return {
        "table rows": [r for r in rows if r not in row_set],
        "code lines": [c for c in code if c.strip() not in code_set],
        "sentences": [s for p in paragraphs for s in sentences(p) if s not in prose],
        "numbers": [f"{n} (old {k}, new {new_numbers[n]})" for n, k in old_numbers.items() if new_numbers[n] < k],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path, help="the markdown file as it was")
    parser.add_argument("new", type=Path, nargs="+", help="the files its text moved to (the old path may be one)")
    args = parser.parse_args(argv)
    report = missing(args.old.read_text(encoding="utf-8"), [p.read_text(encoding="utf-8") for p in args.new])
    for kind, items in report.items():
        print(f"{kind}: {len(items)} missing")
        for item in items:
            print(f"  {item}")
    return 1 if any(report.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
