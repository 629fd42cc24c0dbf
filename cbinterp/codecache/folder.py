"""A code cache folder: its marker, the chunks it lists or may adopt, and the checks before a run writes into it.

The marker is read, checked and rewritten here; a run writes into a new folder, or resumes the same run.

The marker lists the chunks that cover documents 0.. without a gap, so what opens is always a whole cache of the
first ``n_docs`` documents. An interrupted run keeps its finished chunks; running `cache_codes` again on the same
folder with the same model, weights, data, hooks on the model, codebook modes and settings
(`cbinterp.codecache.conditions`; any batch size, any number of ranks) skips the documents already cached (checking
that they are the same) and caches the rest; anything else is refused.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from cbinterp.codecache import conditions as cond
from cbinterp.codecache import integrity
from cbinterp.codecache.identity import describe_mismatch, run_fingerprint, tokenizer_only_difference
from cbinterp.codecache.layout import (
    CHUNK,
    ENTRY_KEYS,
    FORMAT_NAME,
    LAYOUT,
    LAYOUT1_CHUNK,
    LEGACY_META_FILE,
    META_FILE,
    TEMPORARY,
    chunk_info,
    combined_fingerprint,
)
from cbinterp.core.storage import manifest as mf
from cbinterp.core.storage.atomic import _pid_alive, atomic_file
from cbinterp.core.storage.folder import verify_dir
from cbinterp.core.storage.tokenizer import write_tokenizer_files

__all__ = ["list_chunks", "open_for_writing", "pending_chunks", "read_marker", "store_tokenizer", "write_marker"]


def write_marker(directory: Path, meta: dict) -> None:
    """Write `meta`, sealed with its checksum, as the marker of `directory` (atomically)."""
    with atomic_file(directory / META_FILE) as tmp:
        tmp.write_text(json.dumps(integrity.seal(meta), indent=2))


def read_marker(directory: Path, check_files: bool = False) -> dict:
    """The cache's metadata (its marker), checked by the one verifier; a version-1 cache's meta.json otherwise.

    Args:
        check_files: also check every listed file (presence, no link, size and sha256).
    """
    if not (directory / META_FILE).exists() and (directory / LEGACY_META_FILE).is_file():
        path = directory / LEGACY_META_FILE
        try:
            meta = json.loads(path.read_text())
        except ValueError as err:
            raise ValueError(f"Damaged code cache metadata {path}: {err}.") from err
        if meta.get("format") != FORMAT_NAME or meta.get("version") != 1:
            raise ValueError(f"{path} is not a cbinterp code cache (format {meta.get('format')!r}).")
        if not isinstance(meta.get("chunks"), list):
            raise ValueError(f"Damaged code cache metadata {path}: no valid 'chunks'.")
        integrity.check_marker(directory, meta)
        return meta
    meta = verify_dir(directory, (mf.CODE_CACHE,), "code cache", check_files=False)
    for key, kind in (("codebooks", dict), ("hooks", list), ("chunks", list), ("n_tokens", int), ("n_docs", int)):
        if not isinstance(meta.get(key), kind):
            raise ValueError(f"Damaged code cache marker {directory / META_FILE}: no valid {key!r}.")
    layout = meta.get("layout", 1)
    if not isinstance(layout, int) or layout > LAYOUT:
        raise ValueError(
            f"The code cache at {directory} has layout {layout!r}, newer than this cbinterp reads (up to {LAYOUT}); "
            "upgrade cbinterp."
        )
    integrity.check_marker(directory, meta)
    if "run_sha256" in meta and meta["run_sha256"] != run_fingerprint(meta):  # checked against every chunk's too
        raise ValueError(
            f"The metadata in {directory / META_FILE} was changed after cbinterp wrote it: the model, codebooks, "
            "hooks or conditions it records no longer give its run_sha256. Restore the marker, or delete the folder "
            "and run cache_codes again."
        )
    if check_files:  # presence, no link, size and sha256 of each, with an error naming the file and the fix
        for name in meta["files"]:
            integrity.check_member(directory, meta, name)
    return meta


def pending_chunks(path: Path, meta: dict) -> dict[str, dict]:
    """Finished chunks in the folder that the marker does not list yet: name -> chunk entry.

    Chunks written by other ranks, or by a run that was killed, of this cache's weights, not overlapping the listed
    ones or each other."""
    listed = {c["file"] for c in meta["chunks"]}
    taken = [(c["first_doc"], c["first_doc"] + c["n_docs"]) for c in meta["chunks"]]
    out = {}
    for file in sorted(path.iterdir()):
        if not CHUNK.match(file.name) or file.name in listed:
            continue
        info = chunk_info(file)
        if info is None or info["weights_sha256"] != meta.get("weights_sha256"):
            continue
        if info.get("run_sha256") is None or info.get("run_sha256") != meta.get("run_sha256"):
            continue  # made under other conditions (hooks, observed codebooks, settings), or by an older cbinterp
        start, end = info["first_doc"], info["first_doc"] + info["n_docs"]
        if any(start < b and a < end for a, b in taken):
            continue
        taken.append((start, end))
        out[file.name] = {"file": file.name, **{k: info[k] for k in ENTRY_KEYS}}
    return out


def list_chunks(path: Path, meta: dict, known: dict[str, dict], file_entries: dict[str, dict]) -> None:
    """Write the marker listing the chunks that cover documents 0.. without a gap (atomically).

    The cache that opens is always whole; chunks after a gap wait, unlisted, for the run that fills it.

    Args:
        meta: the marker to update (in place) and write.
        known: chunk name -> entry, of every chunk that may be listed.
        file_entries: chunk name -> its size and sha256, where known already (completed here for the others).
    """
    listed, end = [], 0
    for entry in sorted(known.values(), key=lambda e: e["first_doc"]):
        if entry["first_doc"] != end:
            break
        listed.append(entry)
        end += entry["n_docs"]
    for entry in listed:
        if entry["file"] not in file_entries:
            file_entries[entry["file"]] = mf.file_entry(path / entry["file"])
    meta["chunks"] = listed
    meta["files"] = {name: meta["files"][name] for name in meta.get("tokenizer_files", [])}
    meta["files"].update({e["file"]: file_entries[e["file"]] for e in listed})
    meta["n_docs"] = end
    meta["n_tokens"] = sum(e["n_tokens"] for e in listed)
    meta["data_sha256"] = combined_fingerprint(listed)
    meta["seq_lens"] = sorted({s for e in listed for s in e["seq_lens"]})
    write_marker(path, meta)


def _clean_debris(path: Path, meta: dict, keep: Iterable[str] = ()) -> None:
    """Remove what killed writers left in the cache folder.

    That is their temporaries, and chunks neither the marker lists nor `keep` (finished chunks to adopt)."""
    listed = set(meta.get("files", {})) | set(keep)
    for entry in path.iterdir():
        m = TEMPORARY.match(entry.name)
        chunk = LAYOUT1_CHUNK.match(entry.name) or CHUNK.match(entry.name)
        if (m and not _pid_alive(int(m.group(1)))) or (chunk and entry.name not in listed):
            entry.unlink(missing_ok=True)


def open_for_writing(path: Path, meta: dict, identity: dict, hooks: list[str]) -> dict:
    """The metadata to continue from at `path` (a new cache's, `meta`, when nothing is there).

    Refuses a folder that is no code cache, and a cache of another model, weights, hooks or conditions.

    Args:
        meta: the marker of this run's new cache (`new_marker`).
        identity: this run's `model_identity`.
    """
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"Refusing to write a code cache to {path}: a file is there, not a folder.")
    if path.is_dir() and not (path / META_FILE).exists():
        if (path / LEGACY_META_FILE).exists():
            raise ValueError(
                f"The code cache at {path} was written by an older cbinterp, without fingerprints of the weights and "
                "data, so it cannot be resumed safely. Read it with CodeCache.open, or delete it to cache again."
            )
        others = sorted(p.name for p in path.iterdir() if not TEMPORARY.match(p.name))
        if others:
            raise FileExistsError(
                f"Refusing to write a code cache to {path}: the folder holds other files ({others[:5]}) and is not a "
                f"code cache ({META_FILE} is missing). Use another directory, or empty it yourself."
            )
    if not (path / META_FILE).exists():
        path.mkdir(parents=True, exist_ok=True)
        _clean_debris(path, meta)
        write_marker(path, meta)
        return meta
    try:
        old = read_marker(path, check_files=True)
    except (OSError, ValueError) as err:
        raise ValueError(f"Cannot resume the code cache at {path}: {err}") from err
    if old.get("layout", 1) < LAYOUT and old["chunks"]:
        raise ValueError(
            f"The code cache at {path} has the older layout {old.get('layout', 1)} (two int32 coordinates per "
            f"token); this cbinterp writes layout {LAYOUT} (one offset per document) and does not append to it. "
            "Read it with CodeCache.open, or delete it (or use another directory) and run cache_codes again."
        )
    if {k: old.get(k) for k in identity} != identity:
        tokenizer_only = tokenizer_only_difference(old, identity)
        if tokenizer_only:
            raise ValueError(f"Cannot resume the code cache at {path}: {tokenizer_only}.")
        raise ValueError(
            f"The cache at {path} was made with a different model: {describe_mismatch(old, identity)}. "
            f"Use another directory, or delete this one to start over."
        )
    if old.get("weights_sha256") != meta["weights_sha256"]:
        raise ValueError(
            f"The cache at {path} was made with a different model: other weights (the weights fingerprint differs). "
            "Resuming would mix codes of two models; use another directory, or delete this one to start over."
        )
    if list(old.get("hooks", [])) != hooks:
        raise ValueError(
            f"The cache at {path} stores hooks {old.get('hooks')}, not {hooks}; use the same hooks to resume."
        )
    cond.check_same_run(path, old, meta)
    old["layout"] = LAYOUT
    _clean_debris(path, old, keep=pending_chunks(path, old))
    return old


def store_tokenizer(path: Path, meta: dict, tokenizer) -> None:
    """Keep the tokenizer's files in the cache folder, listed and checksummed like every other file."""
    names = write_tokenizer_files(tokenizer, path)
    meta["tokenizer_files"] = names
    for name in names:
        meta["files"][name] = mf.file_entry(path / name)
    write_marker(path, meta)
