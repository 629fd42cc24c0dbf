"""The one on-disk format of cbinterp folders (models, checkpoints, code caches, codebooks): a marker listing files.

A cbinterp folder holds `cbinterp.json` (the marker and manifest)::

    {"format": "cbinterp-model" | "cbinterp-checkpoint" | "cbinterp-code-cache" | "cbinterp-codebook"
               | "cbinterp-codebooks",
     "version": 2,
     "files": {"<name>": {"sha256": "<hex>", "bytes": <size>}, ...},
     ...}                                   # anything else the kind of folder records (a code cache's metadata)

`cbinterp.core.storage.folder.open_folder` is the one reader (marker, format, version, and the size and sha256 of every
listed file, read through one open folder; see there), with `verify_dir`, `verify_file` and `read_manifest` built
on it there. `check_replaceable` decides whether a write may replace what is at a
path: only a cbinterp folder of an allowed kind, holding nothing it does not list, or an empty folder.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import BinaryIO

import torch

from cbinterp.core.storage.atomic import user_path

__all__ = ["MANIFEST_FILE", "ResumeWarning"]


class ResumeWarning(UserWarning):
    """`train` or `cache_codes` continues what an earlier run left (the message says from where)."""


MANIFEST_FILE = "cbinterp.json"
VERSION = 2
MODEL = "cbinterp-model"
CHECKPOINT = "cbinterp-checkpoint"
CODE_CACHE = "cbinterp-code-cache"
CODEBOOK = "cbinterp-codebook"
CODEBOOK_SET = "cbinterp-codebooks"
KINDS = (MODEL, CHECKPOINT, CODE_CACHE, CODEBOOK, CODEBOOK_SET)

#: Files of a version-1 model or checkpoint (before the marker file existed): config.json says "cbinterp-model".
LEGACY_FILES = ("config.json", "model.safetensors", "trainer.pt")
LEGACY_CACHE_META = "meta.json"


def sha256_of(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return sha256_stream(f)


def sha256_stream(f: BinaryIO) -> str:
    digest = hashlib.sha256()
    for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


def file_entry(path: Path, hasher=sha256_of) -> dict:
    return {"sha256": hasher(path), "bytes": path.stat().st_size}


def write_manifest(directory: Path, kind: str, names: Iterable[str], extra: dict | None = None, hasher=None) -> dict:
    """Write `cbinterp.json` into `directory` listing `names` (files already written there) with their checksums."""
    if kind not in KINDS:
        raise ValueError(f"Unknown cbinterp folder kind {kind!r}.")
    hasher = hasher or sha256_of
    manifest = {**(extra or {}), "format": kind, "version": VERSION}
    manifest["files"] = {check_name(name): file_entry(directory / name, hasher) for name in names}
    write_json(directory / MANIFEST_FILE, manifest)
    return manifest


def write_json(path: Path, data) -> None:
    """JSON written and fsynced (not atomic by itself: used inside an atomic folder or file write)."""
    with open(path, "w") as f:
        f.write(json.dumps(data, indent=2, sort_keys=True))
        f.flush()
        os.fsync(f.fileno())


def check_name(name, where: str = "") -> str:
    """`name` if it names an entry directly inside a folder, else ValueError.

    No separator, not '.', '..' or the marker: a marker's names never lead out of its folder."""
    if (
        not isinstance(name, str)
        or name in ("", ".", "..", MANIFEST_FILE)
        or any(c in name for c in "/\\\0")
        or (os.name == "nt" and ":" in name)
    ):
        raise ValueError(f"{where}bad file name {name!r}: a cbinterp folder lists only files directly inside it.")
    return name


def parse_manifest(data: bytes, path: Path, kinds: Sequence[str], what: str = "cbinterp folder") -> dict:
    """The marker `data` of the folder `path`, checked for format, version and entries (the files are not read)."""
    marker = path / MANIFEST_FILE
    try:
        manifest = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"Damaged marker file {marker}: {err}. The {what} cannot be trusted; write it again.") from err
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ValueError(f"Damaged marker file {marker}: no file list. The {what} cannot be trusted; write it again.")
    kind, version = manifest.get("format"), manifest.get("version")
    if kind not in KINDS:
        raise ValueError(f"{marker} is not a cbinterp marker (format {kind!r}).")
    if not isinstance(version, int) or isinstance(version, bool) or version > VERSION:
        raise ValueError(
            f"{marker} was written by a newer cbinterp (format version {version!r}; this one reads up to {VERSION}); "
            "upgrade cbinterp."
        )
    if kind not in kinds:
        raise ValueError(f"{path} is a {kind} folder, not a {what} ({' or '.join(kinds)}).")
    for name, entry in manifest["files"].items():
        check_name(name, f"Damaged marker file {marker}: ")
        size = entry.get("bytes") if isinstance(entry, dict) else None
        if (
            not isinstance(entry.get("sha256") if isinstance(entry, dict) else None, str)
            or not isinstance(size, int)
            or isinstance(size, bool)
            or size < 0
        ):
            raise ValueError(f"Damaged marker file {marker}: bad entry {name!r}: {entry!r}.")
    return manifest


def parse_json_object(data: bytes, where: Path, what: str) -> dict:
    """The JSON object `data` (the file `where` of a `what`), or ValueError naming the file."""
    try:
        parsed = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"Corrupt cbinterp config {where}: {err}. Re-save the {what} with cbinterp.") from err
    if not isinstance(parsed, dict):
        raise ValueError(f"Corrupt cbinterp config {where}: not a JSON object. Re-save the {what}.")
    return parsed


# -- what a write may replace ------------------------------------------------------------------------------------
def legacy_kind(path: Path) -> str | None:
    """MODEL or CHECKPOINT for a version-1 folder (config.json says cbinterp-model, no marker), else None."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or config.get("format") != MODEL or config.get("version") != 1:
        return None
    return CHECKPOINT if (path / "trainer.pt").exists() else MODEL


def check_replaceable(path: Path, kinds: Sequence[str], what: str) -> None:
    """Raise unless a write of a `what` may replace `path`.

    It may replace nothing, an empty folder, or a cbinterp folder of one of `kinds` that holds only the files its
    marker lists (so nothing of the user's is ever deleted)."""
    from cbinterp.core.storage import folder  # it builds on this module

    path = user_path(path)
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
            manifest = folder.read_manifest(path, kinds, what)
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
    """The sha256 of every parameter (name, dtype, shape and values) but those named in `skip`.

    The weights that decide a result."""
    digest = hashlib.sha256()
    skip = set(skip)
    for name, p in sorted(module.named_parameters(), key=lambda item: item[0]):
        if name in skip:
            continue
        digest.update(name.encode())
        update_with_tensor(digest, p)
    return digest.hexdigest()
