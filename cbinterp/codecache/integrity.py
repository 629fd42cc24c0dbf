"""Checks that a code cache folder is what its marker says, before anything in it is read.

* The marker's metadata (n_codes, n_docs, n_tokens, chunk list, hooks, conditions, ...) is covered by
  ``meta_sha256``, the sha256 of the rest of the marker, written with it and checked on open; a marker without one
  (written by an older cbinterp) is still checked for consistency with itself and with each chunk's own header.
* Every file name the marker gives is a plain name inside the folder: chunk entries must be chunk names, listed
  (and so checksummed); paths with separators or ``..``, absolute paths and symbolic links are refused.
* A file is checked for presence, size and sha256 before it is parsed, with an error naming it and the fix.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path

from safetensors import SafetensorError, safe_open

from cbinterp.core.storage import manifest as mf

__all__ = ["check_marker", "check_member", "marker_checksum", "open_chunk", "seal"]

CHECKSUM_KEY = "meta_sha256"
CHUNK_NAME = re.compile(r"^chunk_(\d{6}|d\d{12})\.safetensors$")
_FIX = "Restore it from a copy, or delete the folder and run cache_codes again"


def marker_checksum(meta: dict) -> str:
    """sha256 of the marker's content, `meta_sha256` left out (keys sorted, so the order of writing is free)."""
    body = {k: v for k, v in meta.items() if k != CHECKSUM_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def seal(meta: dict) -> dict:
    """`meta` with its checksum set (in place), to be written as the marker."""
    meta[CHECKSUM_KEY] = marker_checksum(meta)
    return meta


def _damaged(directory: Path, what: str) -> ValueError:
    return ValueError(
        f"Damaged code cache marker {directory / mf.MANIFEST_FILE}: {what}. The cache cannot be trusted; restore "
        "the marker, or delete the folder and run cache_codes again."
    )


def check_marker(directory: Path, meta: dict) -> None:
    """Raise a ValueError if the marker's metadata was edited, names a file outside the folder, or contradicts itself.

    Contradictions are chunks that do not cover documents 0 .. n_docs - 1 in order, and counts that do not add up."""
    recorded = meta.get(CHECKSUM_KEY)
    if recorded is not None and recorded != marker_checksum(meta):
        raise ValueError(
            f"The metadata in {directory / mf.MANIFEST_FILE} was changed after cbinterp wrote it (its checksum "
            f"{CHECKSUM_KEY} differs): n_codes, n_docs, the chunk list or another recorded value no longer describes "
            "the cached data. Restore the marker, or delete the folder and run cache_codes again."
        )
    files = meta.get("files")
    for name in meta.get("tokenizer_files", []) or []:
        if not isinstance(name, str) or not isinstance(files, dict) or name not in files:
            raise _damaged(directory, f"the tokenizer file {name!r} is not listed with a checksum")
    layout = meta.get("layout", 1)
    end = tokens = 0
    for i, chunk in enumerate(meta["chunks"]):
        if not isinstance(chunk, dict):
            raise _damaged(directory, f"chunk entry {i} is not an object")
        name = chunk.get("file")
        if not isinstance(name, str) or not CHUNK_NAME.match(name):
            outside = isinstance(name, str) and (
                "/" in name or "\\" in name or ".." in name or Path(name).is_absolute()
            )
            why = "a path outside the cache folder, which is never read" if outside else "not a chunk file name"
            raise _damaged(
                directory, f"chunk entry {i} names {name!r}: {why} (chunks are chunk_d<12 digits>.safetensors)"
            )
        if isinstance(files, dict) and name not in files:
            raise _damaged(directory, f"the chunk {name} is not listed with a checksum in 'files'")
        for key in ("n_docs", "n_tokens") + (("first_doc",) if layout >= 2 else ()):
            value = chunk.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise _damaged(directory, f"the chunk {name} has no valid {key!r} ({value!r})")
        first = chunk.get("first_doc", end)
        if first != end:
            raise _damaged(
                directory, f"the chunk {name} has first_doc={first!r}, but the chunks before it end at document {end}"
            )
        if layout >= 2 and name != f"chunk_d{first:012d}.safetensors":
            raise _damaged(directory, f"the chunk {name} is listed with first_doc={first}")
        end += chunk["n_docs"]
        tokens += chunk["n_tokens"]
    if "files" in meta:  # a version-1 meta.json did not sum its chunks
        for key, total in (("n_docs", end), ("n_tokens", tokens)):
            if meta[key] != total:
                raise _damaged(directory, f"{key} says {meta[key]}, but its chunks hold {total}")


def check_member(directory: Path, meta: dict, name: str) -> Path:
    """The path of the file `name` of the cache at `directory`, checked.

    It must be a plain file inside it (no symbolic link), present, of its recorded size and sha256 (when the marker
    records them)."""
    if not CHUNK_NAME.match(name) and ("/" in name or "\\" in name or name in ("", ".", "..")):
        raise _damaged(directory, f"the file name {name!r} leaves the cache folder")
    path = directory / name
    if path.is_symlink():
        raise ValueError(
            f"{path} is a symbolic link; a code cache reads only its own files, never what a link points to. "
            f"Replace the link by the file itself. {_FIX}."
        )
    if not path.is_file():
        raise FileNotFoundError(f"The code cache at {directory} is incomplete: its file {name} is missing. {_FIX}.")
    entry = (meta.get("files") or {}).get(name)
    if entry is None:
        if "files" in meta:
            raise _damaged(directory, f"the file {name} is not listed with a checksum")
        return path  # a version-1 cache (meta.json) recorded no checksums
    size = path.stat().st_size
    if size != entry["bytes"]:
        state = "truncated" if size < entry["bytes"] else "larger than written"
        raise ValueError(
            f"The file {path} is {state}: {size} bytes, its marker records {entry['bytes']} (an interrupted copy, or "
            f"another file). {_FIX}."
        )
    if mf.sha256_of(path) != entry["sha256"]:
        raise ValueError(
            f"The file {path} does not match its checksum in {mf.MANIFEST_FILE} (corrupt, or from another cache). "
            f"{_FIX}."
        )
    return path


@contextlib.contextmanager
def open_chunk(path: Path) -> Iterator:
    """`safe_open` of a chunk file, a parse error told as a damaged chunk naming the file and the fix."""
    try:
        handle = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as err:
        raise ValueError(f"The chunk {path} cannot be read as safetensors ({err}). {_FIX}.") from err
    with handle as f:
        yield f


def check_header(directory: Path, name: str, entry: dict, header: dict | None, meta: dict) -> None:
    """Raise a ValueError if a chunk's own header (layout 2) disagrees with its entry in the marker."""
    if header is None:
        return
    for key in ("first_doc", "n_docs", "n_tokens"):
        if key in entry and header.get(key) != entry[key]:
            raise _damaged(
                directory, f"it lists {name} with {key}={entry[key]}, but the chunk says {key}={header.get(key)}"
            )
    for key in ("weights_sha256", "run_sha256"):
        if key in header and key in meta and header[key] != meta[key]:
            raise _damaged(directory, f"the chunk {name} was made by another run ({key} differs from the marker's)")
