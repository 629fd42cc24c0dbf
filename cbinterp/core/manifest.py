"""The one on-disk format of cbinterp folders (models, checkpoints, code caches): a marker file listing every file.

A cbinterp folder holds `cbinterp.json` (the marker and manifest)::

    {"format": "cbinterp-model" | "cbinterp-checkpoint" | "cbinterp-code-cache" | "cbinterp-codebook",
     "version": 2,
     "files": {"<name>": {"sha256": "<hex>", "bytes": <size>}, ...},
     ...}                                   # anything else the kind of folder records (a code cache's metadata)

`verify_dir` is the one verifier (marker, format, version, and the size and sha256 of every listed file), used by
`load`, by `train` on resume, and by the code cache. `check_replaceable` decides whether a write may replace what
is at a path: only a cbinterp folder of an allowed kind, holding nothing it does not list, or an empty folder.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

__all__ = ["MANIFEST_FILE", "ResumeWarning", "read_manifest", "verify_dir", "verify_file"]


class ResumeWarning(UserWarning):
    """`train` or `cache_codes` continues what an earlier run left (the message says from where)."""


MANIFEST_FILE = "cbinterp.json"
VERSION = 2
MODEL = "cbinterp-model"
CHECKPOINT = "cbinterp-checkpoint"
CODE_CACHE = "cbinterp-code-cache"
CODEBOOK = "cbinterp-codebook"
KINDS = (MODEL, CHECKPOINT, CODE_CACHE, CODEBOOK)

#: Files of a version-1 model or checkpoint (before the marker file existed): config.json says "cbinterp-model".
LEGACY_FILES = ("config.json", "model.safetensors", "trainer.pt")
LEGACY_CACHE_META = "meta.json"


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_entry(path: Path, hasher=sha256_of) -> dict:
    return {"sha256": hasher(path), "bytes": path.stat().st_size}


def write_manifest(directory: Path, kind: str, names: Iterable[str], extra: Optional[dict] = None, hasher=None) -> dict:
    """Write `cbinterp.json` into `directory` listing `names` (files already written there) with their checksums."""
    if kind not in KINDS:
        raise ValueError(f"Unknown cbinterp folder kind {kind!r}.")
    hasher = hasher or sha256_of
    manifest = {**(extra or {}), "format": kind, "version": VERSION}
    manifest["files"] = {name: file_entry(directory / name, hasher) for name in names}
    write_json(directory / MANIFEST_FILE, manifest)
    return manifest


def write_json(path: Path, data) -> None:
    """JSON written and fsynced (not atomic by itself: used inside an atomic folder or file write)."""
    with open(path, "w") as f:
        f.write(json.dumps(data, indent=2, sort_keys=True))
        f.flush()
        os.fsync(f.fileno())


def read_manifest(path: Path, kinds: Sequence[str], what: str = "cbinterp folder") -> dict:
    """The parsed marker of the folder `path`, checked for format and version (the files are not read)."""
    marker = path / MANIFEST_FILE
    if not path.is_dir():
        if path.exists():
            raise NotADirectoryError(f"{path} is a file, not a {what} (a folder).")
        raise FileNotFoundError(f"No {what} at {path}: the folder does not exist.")
    if not marker.is_file():
        raise FileNotFoundError(f"No {what} at {path}: its marker file {MANIFEST_FILE} is missing.")
    try:
        manifest = json.loads(marker.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"Damaged marker file {marker}: {err}. The {what} cannot be trusted; write it again.") from err
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ValueError(f"Damaged marker file {marker}: no file list. The {what} cannot be trusted; write it again.")
    kind, version = manifest.get("format"), manifest.get("version")
    if kind not in KINDS:
        raise ValueError(f"{marker} is not a cbinterp marker (format {kind!r}).")
    if not isinstance(version, int) or version > VERSION:
        raise ValueError(
            f"{marker} was written by a newer cbinterp (format version {version!r}; this one reads up to {VERSION}); "
            "upgrade cbinterp."
        )
    if kind not in kinds:
        raise ValueError(f"{path} is a {kind} folder, not a {what} ({' or '.join(kinds)}).")
    for name, entry in manifest["files"].items():
        if (
            not isinstance(name, str)
            or "/" in name
            or name in ("", ".", "..", MANIFEST_FILE)
            or not isinstance(entry, dict)
            or not isinstance(entry.get("sha256"), str)
            or not isinstance(entry.get("bytes"), int)
        ):
            raise ValueError(f"Damaged marker file {marker}: bad entry {name!r}: {entry!r}.")
    return manifest


def verify_file(path: Path, manifest: dict, name: str, what: str = "cbinterp folder") -> Path:
    """Check one listed file of the folder `path` against its recorded size and sha256."""
    entry = manifest["files"].get(name)
    target = path / name
    if entry is None:
        raise ValueError(f"{target} is not listed in {path / MANIFEST_FILE}; the {what} is incomplete or mixed.")
    if not target.is_file():
        raise FileNotFoundError(f"The {what} at {path} is incomplete: its file {name} is missing.")
    if target.stat().st_size != entry["bytes"] or sha256_of(target) != entry["sha256"]:
        raise ValueError(
            f"{target} does not match the checksum recorded in {MANIFEST_FILE} (checksum differs): the file is "
            f"truncated, corrupt, or from another save. Write the {what} again."
        )
    return target


def verify_dir(
    path: str | os.PathLike,
    kinds: Sequence[str],
    what: str = "cbinterp folder",
    check_files: bool = True,
    strict: bool = False,
) -> dict:
    """The one verifier: marker, format version, and (with `check_files`) the size and sha256 of every listed file.

    `strict` also refuses files the marker does not list (a checkpoint must be exactly what was written).
    Returns the manifest.
    """
    path = Path(path)
    manifest = read_manifest(path, kinds, what)
    if check_files:
        for name in manifest["files"]:
            verify_file(path, manifest, name, what)
    if strict:
        extra = sorted(p.name for p in path.iterdir() if p.name != MANIFEST_FILE and p.name not in manifest["files"])
        if extra:
            raise ValueError(
                f"The {what} at {path} holds files its marker does not list ({extra[:5]}): it is mixed with other "
                "data. Remove them, or write it again."
            )
    return manifest


# -- what a write may replace ------------------------------------------------------------------------------------
def legacy_kind(path: Path) -> Optional[str]:
    """MODEL or CHECKPOINT for a version-1 folder (config.json says cbinterp-model, no marker), else None."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or config.get("format") != MODEL or config.get("version") != 1:
        return None
    return CHECKPOINT if (path / "trainer.pt").exists() else MODEL


def check_replaceable(path: Path, kinds: Sequence[str], what: str) -> None:
    """Raise unless a write of a `what` may replace `path`: nothing there, an empty folder, or a cbinterp folder of
    one of `kinds` that holds only the files its marker lists (so nothing of the user's is ever deleted)."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_dir():
        raise FileExistsError(
            f"Refusing to write the {what} to {path}: a file is there, not a cbinterp folder. Choose another path, or "
            "remove the file yourself."
        )
    entries = sorted(p.name for p in path.iterdir())
    if not entries:
        return
    if MANIFEST_FILE in entries:
        try:
            manifest = read_manifest(path, kinds, what)
        except (OSError, ValueError) as err:
            raise FileExistsError(
                f"Refusing to replace {path}: it is not a {what} cbinterp may replace ({err})."
            ) from err
        allowed = set(manifest["files"]) | {MANIFEST_FILE}
    else:
        kind = legacy_kind(path)
        if kind is None or kind not in kinds:
            raise FileExistsError(
                f"Refusing to write the {what} to {path}: the folder holds other files ({entries[:5]}) and is not a "
                f"{what} written by cbinterp (no {MANIFEST_FILE}). Choose another path, or empty it yourself."
            )
        allowed = set(LEGACY_FILES)
    foreign = [name for name in entries if name not in allowed]
    if foreign:
        raise FileExistsError(
            f"Refusing to replace {path}: besides the {what} it holds files cbinterp did not write ({foreign[:5]}), "
            "which replacing it would delete. Move them away, or choose another path."
        )


# -- fingerprints --------------------------------------------------------------------------------------------------
def tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def update_with_tensor(digest, t: torch.Tensor) -> None:
    digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
    digest.update(tensor_bytes(t))


def tensor_fingerprint(t: torch.Tensor) -> str:
    digest = hashlib.sha256()
    update_with_tensor(digest, t)
    return digest.hexdigest()


def weights_fingerprint(module: torch.nn.Module, skip: Sequence[str] = ()) -> str:
    """sha256 of every parameter (name, dtype, shape and values) but those named in `skip`: the weights that decide
    a result."""
    digest = hashlib.sha256()
    skip = set(skip)
    for name, p in sorted(module.named_parameters(), key=lambda item: item[0]):
        if name in skip:
            continue
        digest.update(name.encode())
        update_with_tensor(digest, p)
    return digest.hexdigest()
