"""Codebooks saved on their own, to attach to another instance of the same architecture.

`save_codebook(cb, path)` writes one codebook as a cbinterp folder of kind "cbinterp-codebook": `codebook.json`
(its `CodebookConfig` and hook name) and `codebook.safetensors` (weights and usage buffers). `save_codebooks(model,
directory)` writes every codebook of a model as one set, atomically: `directory` holds one such folder per codebook,
named by its hook name, and a marker of kind "cbinterp-codebooks" naming them with the sha256 of their markers, so
a save replaces the whole set and a load reads exactly that set. Folders of single codebooks side by side (what
`save_codebooks` wrote before sets had a marker) still load, as long as no two record the same hook name.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from cbinterp.core.codebooks.attach import get_codebooks, require_hooked_transformer
from cbinterp.core.codebooks.codebook import Codebook, CodebookConfig
from cbinterp.core.storage import folder as fd
from cbinterp.core.storage import manifest as mf
from cbinterp.core.storage.atomic import atomic_dir, readable_dir, recover_dir, user_path
from cbinterp.core.storage.manifest import MANIFEST_FILE, sha256_of
from cbinterp.core.storage.tensorfile import check_shapes, load_tensors, read_header, skeleton_shapes
from cbinterp.core.tl_compat import Model

__all__ = ["CODEBOOK_CONFIG", "CODEBOOK_WEIGHTS", "load_codebook", "load_codebooks", "save_codebook", "save_codebooks"]

CODEBOOK_CONFIG = "codebook.json"
CODEBOOK_WEIGHTS = "codebook.safetensors"
ONE, SET = "cbinterp codebook", "set of saved codebooks"


def _write_codebook(codebook: Codebook, folder: Path, hook_name: str | None) -> None:
    """The files and marker of one codebook, into the existing (temporary) `folder`."""
    state = {k: v.detach().contiguous().cpu() for k, v in codebook.state_dict().items()}
    config = {
        "format": mf.CODEBOOK,
        "version": mf.VERSION,
        "config": dataclasses.asdict(codebook.cfg),
        "hook_name": hook_name,
    }
    save_file(state, folder / CODEBOOK_WEIGHTS)
    mf.write_json(folder / CODEBOOK_CONFIG, json.loads(json.dumps(config)))
    mf.write_manifest(folder, mf.CODEBOOK, [CODEBOOK_CONFIG, CODEBOOK_WEIGHTS], hasher=sha256_of)


def save_codebook(codebook: Codebook, path: str | os.PathLike, hook_name: str | None = None) -> Path:
    """Write one codebook (its `CodebookConfig` as JSON beside its weights and usage buffers) to `path`, atomically.

    `hook_name` (default: where it is attached) is recorded so `load_codebooks` can place it again."""
    if not isinstance(codebook, Codebook):
        raise TypeError(f"save_codebook needs a Codebook, got {type(codebook).__name__}.")
    path = user_path(path)
    check = lambda p: mf.check_replaceable(p, (mf.CODEBOOK,), ONE)
    with atomic_dir(path, check=check) as tmp:
        _write_codebook(codebook, tmp, hook_name or getattr(codebook, "name", None))
    return path


def _check_set_replaceable(path: Path) -> None:
    """Raise unless `save_codebooks` may replace `path`.

    It may replace nothing or an empty folder, or saved codebooks only (a set, or single codebook folders side by
    side), each holding only its own files."""
    if not os.path.lexists(path) or (path.is_dir() and not path.is_symlink() and not any(path.iterdir())):
        return
    if path.is_symlink() or not path.is_dir():
        mf.check_replaceable(path, (mf.CODEBOOK_SET,), SET)  # refuses a file, with its message
    entries = sorted(os.listdir(path))
    members = None
    if MANIFEST_FILE in entries:
        try:
            members = set(fd.read_manifest(path, (mf.CODEBOOK_SET,), SET).get("codebooks") or {})
        except (OSError, ValueError) as err:
            raise FileExistsError(
                f"Refusing to replace {path}: it is not a {SET} cbinterp may replace ({err})."
            ) from err
    foreign = []
    for name in entries:
        if name == MANIFEST_FILE and members is not None:
            continue
        entry = path / name
        if (members is not None and name not in members) or not (entry / MANIFEST_FILE).is_file():
            foreign.append(name)
            continue
        try:
            mf.check_replaceable(entry, (mf.CODEBOOK,), ONE)
        except FileExistsError:
            foreign.append(name)
    if foreign:
        raise FileExistsError(
            f"Refusing to replace {path}: besides saved codebooks it holds {foreign[:5]}, which replacing the set "
            "would delete. Move them away, or save the codebooks to another folder."
        )


def save_codebooks(model: Model, directory: str | os.PathLike) -> Path:
    """Write every codebook of `model` as one set into `directory`, atomically. Returns the directory.

    A folder per codebook (as `save_codebook` writes it, named by its hook name); a later save replaces the set as a
    whole."""
    require_hooked_transformer(model)
    codebooks = get_codebooks(model)
    if not codebooks:
        raise ValueError("The model has no codebooks to save; attach some with attach_codebooks first.")
    directory = user_path(directory)
    with atomic_dir(directory, check=_check_set_replaceable) as tmp:
        members = {}
        for name, codebook in codebooks.items():
            (tmp / mf.check_name(name)).mkdir()
            _write_codebook(codebook, tmp / name, name)
            members[name] = {"marker_sha256": sha256_of(tmp / name / MANIFEST_FILE)}
        mf.write_manifest(tmp, mf.CODEBOOK_SET, [], extra={"codebooks": members})
    return directory


def _codebook_from(folder: fd.Folder, device) -> tuple[Codebook, str | None]:
    """The codebook in the checked `folder`, and the hook name it records."""
    where = folder.path / CODEBOOK_CONFIG
    config = mf.parse_json_object(folder.read_bytes(CODEBOOK_CONFIG), where, "codebook")
    fix = "Save the codebook again."
    try:
        cfg = CodebookConfig(**config["config"])
        expected = skeleton_shapes(lambda: Codebook.from_config(cfg, device="meta"))
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"Damaged codebook config {where}: {err}. {fix}") from err
    check_shapes(expected, read_header(folder, CODEBOOK_WEIGHTS), folder.path / CODEBOOK_WEIGHTS, fix)
    codebook = Codebook.from_config(cfg, device=device)
    try:
        codebook.load_state_dict(load_tensors(folder, CODEBOOK_WEIGHTS, device))
    except RuntimeError as err:
        raise ValueError(f"The weights in {folder.path / CODEBOOK_WEIGHTS} do not fit its config: {err}.") from err
    hook_name = config.get("hook_name")
    if hook_name is not None and not isinstance(hook_name, str):
        raise ValueError(f"Damaged codebook config {where}: hook_name {hook_name!r} is not a string. {fix}")
    return codebook, hook_name


def load_codebook(path: str | os.PathLike, device: str | torch.device | None = None) -> Codebook:
    """A codebook saved with `save_codebook`, checked against its recorded checksums, on `device`."""
    path = user_path(path)
    recover_dir(path)
    with fd.open_folder(readable_dir(path), (mf.CODEBOOK,), ONE) as folder:
        return _codebook_from(folder, device)[0]


def _read_set(path: Path, device) -> dict[str, Codebook]:
    with fd.open_folder(path, (mf.CODEBOOK_SET,), SET) as folder:
        members = folder.manifest.get("codebooks")
        if not isinstance(members, dict) or not all(isinstance(m, dict) for m in members.values()):
            raise ValueError(f"Damaged marker file {path / MANIFEST_FILE}: no codebook list. Save the set again.")
        extra = [name for name in folder.entries() if name != MANIFEST_FILE and name not in members]
        if extra:
            raise ValueError(
                f"The {SET} at {path} holds entries its marker does not list ({extra[:5]}): it is mixed with other "
                "data. Remove them, or save the set again with save_codebooks."
            )
        out = {}
        for name, entry in members.items():
            with folder.subfolder(name, (mf.CODEBOOK,), ONE, entry.get("marker_sha256")) as sub:
                codebook, hook_name = _codebook_from(sub, device)
            if hook_name != name:
                raise ValueError(
                    f"{path / name} records the hook name {hook_name!r}, but {path / MANIFEST_FILE} lists it as "
                    f"{name!r}: the set was edited. Save it again with save_codebooks."
                )
            out[name] = codebook
        return out


def _read_side_by_side(path: Path, device) -> dict[str, Codebook]:
    """Single codebook folders side by side (no set marker); two recording one hook name are an error."""
    folders = sorted(
        p
        for p in (path.iterdir() if path.is_dir() else ())
        if not p.name.startswith(".") and not p.is_symlink() and (p / MANIFEST_FILE).is_file()
    )
    if not folders:
        raise FileNotFoundError(f"No saved codebooks in {path}; write them with save_codebooks(model, directory).")
    out, found_in = {}, {}
    for folder in folders:
        recover_dir(folder)
        with fd.open_folder(folder, (mf.CODEBOOK,), ONE) as opened:
            codebook, hook_name = _codebook_from(opened, device)
        key = hook_name or folder.name
        if key in out:
            raise ValueError(
                f"Two saved codebooks in {path} record the hook name {key!r} ({found_in[key]} and {folder.name}), so "
                "which one belongs there is unknown. Remove one, or save the set again with save_codebooks."
            )
        out[key], found_in[key] = codebook, folder.name
    return out


def load_codebooks(directory: str | os.PathLike, device: str | torch.device | None = None) -> dict[str, Codebook]:
    """The codebooks `save_codebooks` wrote, keyed by hook name. Every file is checked first.

    Attach them to another instance of the same architecture with `attach_codebooks(model,
    load_codebooks(directory))`."""
    directory = user_path(directory)
    recover_dir(directory)
    source = readable_dir(directory)
    if os.path.lexists(source / MANIFEST_FILE):
        return fd.read_consistently(lambda: _read_set(source, device), source, SET)
    return _read_side_by_side(source, device)
