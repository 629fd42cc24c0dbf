"""Checks of a rebuild: per-source counts against the measured ones, and the hashes against the shipped folder."""

from __future__ import annotations

import json
from pathlib import Path

from .base import CORPUS_FILE, MANIFEST_FILE, SourceResult
from .fetch import _sha256

MIN_TOTAL_CHARS = 15_000_000

# Character counts measured in shared/notes/offline-text.md, to flag an extraction that went wrong.
EXPECTED_CHARS = {"wikipedia": 2_900_000, "lee": 360_000, "brown": 6_100_000, "bible": 5_050_000, "austen": 4_020_000}
TOLERANCE = 0.15


def print_table(manifest: dict, results: list[SourceResult]) -> bool:
    """Per-source counts against the measured ones; False if any is off by more than TOLERANCE."""
    ok = True
    print(f"{'source':<10} {'docs':>6} {'chars':>11} {'expected':>11} {'ratio':>6}  notes")
    for r in sorted(results, key=lambda r: r.name):
        s = manifest["sources"][r.name]
        ratio = s["n_chars"] / EXPECTED_CHARS[r.name]
        flag = "" if abs(ratio - 1) <= TOLERANCE else "  <-- off"
        ok &= not flag
        print(
            f"{r.name:<10} {s['n_documents']:>6} {s['n_chars']:>11,} {EXPECTED_CHARS[r.name]:>11,} "
            f"{ratio:>6.2f}  {'; '.join(r.notes)}{flag}"
        )
    print(f"{'total':<10} {manifest['n_documents']:>6} {manifest['n_chars']:>11,}")
    print(f"{CORPUS_FILE}: {manifest['bytes']:,} bytes, sha256 {manifest['sha256']}")
    if manifest["n_chars"] < MIN_TOTAL_CHARS:
        print(f"total below {MIN_TOTAL_CHARS:,} characters")
        ok = False
    return ok


def check_against(rebuilt: dict, shipped_dir: Path) -> list[str]:
    """What differs between a rebuild's manifest and the shipped folder; empty when the hashes agree."""
    shipped_path, shipped_file = shipped_dir / MANIFEST_FILE, shipped_dir / CORPUS_FILE
    shipped = json.loads(shipped_path.read_text(encoding="utf-8")) if shipped_path.exists() else {}
    file_sha = _sha256(shipped_file) if shipped_file.exists() else None
    print(
        f"check: rebuilt      {rebuilt['sha256']}\n       manifest     {shipped.get('sha256')}\n"
        f"       shipped file {file_sha}"
    )
    problems = []
    if not shipped:
        problems.append(f"{shipped_path} is missing")
    if file_sha is None:
        problems.append(f"{shipped_file} is missing")
    elif file_sha != shipped.get("sha256"):
        problems.append(f"{shipped_file} does not match the sha256 in {shipped_path}")
    if shipped and rebuilt["sha256"] != shipped.get("sha256"):
        if rebuilt["sha256"] == file_sha:
            problems.append(f"the shipped file equals the rebuild; the hash in {shipped_path} is wrong")
        elif rebuilt["jsonl_sha256"] == shipped.get("jsonl_sha256"):
            problems.append("the rebuild has the same documents but other xz bytes (another xz library?)")
        else:
            problems.append("the rebuilt documents differ from the manifest's")
    return problems
