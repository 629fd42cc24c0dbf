"""The one on-disk format of cbinterp folders (models, checkpoints, code caches, codebooks): a marker listing files.

A cbinterp folder holds `cbinterp.json` (the marker and manifest)::

    {"format": "cbinterp-model" | "cbinterp-checkpoint" | "cbinterp-code-cache" | "cbinterp-codebook"
               | "cbinterp-codebooks",
     "version": 2,
     "files": {"<name>": {"sha256": "<hex>", "bytes": <size>}, ...},
     ...}                                   # anything else the kind of folder records (a code cache's metadata)

`open_folder` is the one reader: it checks the marker, format and version, and the size and sha256 of every listed
file, reading each file through one open directory handle, never through a symbolic link, and only files the
marker lists; the returned `Folder` hands out the very files it checked, so what is read is what was checked even
while another process replaces the folder. A folder replaced during the check is read again (a bounded number of
times), so a concurrent writer never makes a good folder look corrupt. `verify_dir` (marker and checksums, used by
`train` on resume and by the code cache) is built on it. `check_replaceable` decides whether a write may replace
what is at a path: only a cbinterp folder of an allowed kind, holding nothing it does not list, or an empty folder.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import time
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Optional, Sequence, TypeVar

import torch

from cbinterp.core.atomic import user_path, writer_is_swapping


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

#: How often a folder that keeps being replaced while it is read is read again before giving up.
READ_ATTEMPTS = 20

T = TypeVar("T")


def sha256_of(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return _sha256_stream(f)


def _sha256_stream(f: BinaryIO) -> str:
    digest = hashlib.sha256()
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
    """`name` if it names an entry directly inside a folder (no separator, not '.', '..' or the marker), else
    ValueError: a marker's names never lead out of its folder."""
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


# -- reading a folder --------------------------------------------------------------------------------------------
class FolderChanged(Exception):
    """A folder was replaced (or its marker rewritten) while it was being read: read it again."""


_FILE_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
#: Files are opened relative to an open directory where the platform can (POSIX), by path elsewhere.
_DIR_FD = os.open in os.supports_dir_fd and hasattr(os, "O_DIRECTORY") and hasattr(os, "O_NOFOLLOW")


def _open_entry(dfd: Optional[int], folder: Path, name: str, what: str, directory: bool = False) -> int:
    """A descriptor of the entry `name` of `folder` (through `dfd` when given), never through a symbolic link."""
    link = (
        f"{folder / name} is a symbolic link: a {what} holds its files themselves (cbinterp never writes links), and "
        "a link may lead anywhere, so it is refused. Put the file itself there, or write the folder again."
    )
    flags = (_DIR_FLAGS | getattr(os, "O_NOFOLLOW", 0)) if directory else _FILE_FLAGS
    try:
        if dfd is not None:
            fd = os.open(name, flags, dir_fd=dfd)
        else:
            if os.path.islink(folder / name):
                raise ValueError(link)
            fd = os.open(folder / name, flags)
    except OSError as err:
        if err.errno == errno.ELOOP or (directory and err.errno == errno.ENOTDIR and os.path.islink(folder / name)):
            raise ValueError(link) from None
        raise
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISDIR(mode) if directory else stat.S_ISREG(mode)):
        os.close(fd)
        kind = "folder" if directory else "regular file"
        raise ValueError(f"{folder / name} is not a {kind}; the {what} is damaged. Write it again.")
    return fd


class Folder:
    """A cbinterp folder opened for reading (see `open_folder`): its `manifest` and the files it lists.

    `file(name)` and `read_bytes(name)` give a listed file, checked against its size and sha256 when it is first
    opened; a name the marker does not list is refused. Close it (or use it as a context manager) when done.
    """

    def __init__(self, path: Path, what: str, dfd: Optional[int], check_files: bool, parent: "Folder" = None):
        self.path, self.what, self.check_files, self.parent = path, what, check_files, parent
        self.manifest: dict = {}
        self.marker_bytes = b""
        self._dfd = dfd
        self._marker_id = None
        self._files: dict[str, BinaryIO] = {}
        self._children: list[Folder] = []

    def __enter__(self) -> "Folder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for child in self._children:
            child.close()
        for f in self._files.values():
            f.close()
        self._files.clear()
        if self._dfd is not None:
            os.close(self._dfd)
            self._dfd = None

    def changed(self) -> bool:
        """Whether the folder at `path` is no longer the one opened (replaced, or its marker rewritten)."""
        if self.parent is not None and self.parent.changed():
            return True
        try:
            now = os.stat(self.path)
            if self._dfd is not None:
                opened = os.fstat(self._dfd)
                if (now.st_dev, now.st_ino) != (opened.st_dev, opened.st_ino):
                    return True
            if self._marker_id is None:
                return False
            marker = os.stat(self.path / MANIFEST_FILE, follow_symlinks=False)
        except OSError:
            return True
        return (marker.st_ino, marker.st_mtime_ns, marker.st_size) != self._marker_id

    def _read_marker(self, kinds: Sequence[str]) -> dict:
        try:
            fd = _open_entry(self._dfd, self.path, MANIFEST_FILE, self.what)
        except FileNotFoundError:
            if self.changed():
                raise FolderChanged from None
            raise FileNotFoundError(
                f"No {self.what} at {self.path}: its marker file {MANIFEST_FILE} is missing."
            ) from None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            self.marker_bytes = f.read()
        self._marker_id = (st.st_ino, st.st_mtime_ns, st.st_size)
        self.manifest = parse_manifest(self.marker_bytes, self.path, kinds, self.what)
        return self.manifest

    def _open(self, name: str) -> BinaryIO:
        entry = self.manifest["files"][name]
        try:
            fd = _open_entry(self._dfd, self.path, name, self.what)
        except FileNotFoundError:
            if self.changed():
                raise FolderChanged from None
            raise FileNotFoundError(
                f"The {self.what} at {self.path} is incomplete: its file {name} is missing."
            ) from None
        f = os.fdopen(fd, "rb")
        if self.check_files and (os.fstat(fd).st_size != entry["bytes"] or _sha256_stream(f) != entry["sha256"]):
            f.close()
            if self.changed():
                raise FolderChanged
            raise ValueError(
                f"{self.path / name} does not match the checksum recorded in {MANIFEST_FILE} (checksum differs): "
                f"the file is truncated, corrupt, or from another save. Write the {self.what} again."
            )
        self._files[name] = f
        return f

    def file(self, name: str) -> BinaryIO:
        """The listed file `name`, checked, positioned at its start (it stays open until the folder is closed)."""
        if name not in self.manifest["files"]:
            raise ValueError(
                f"{self.path / name} is not listed in {self.path / MANIFEST_FILE}: every file cbinterp reads must be "
                f"listed there with its checksum, so the {self.what} is incomplete or was edited. Write it again."
            )
        f = self._files.get(name)
        if f is None:
            try:
                f = self._open(name)
            except FolderChanged:
                raise RuntimeError(
                    f"The {self.what} at {self.path} was replaced while it was being read; read it again."
                ) from None
        f.seek(0)
        return f

    def read_bytes(self, name: str) -> bytes:
        return self.file(name).read()

    def local_path(self, name: str) -> Optional[str]:
        """A path that opens the very file `file(name)` checked (a /proc or /dev/fd link), where the platform has
        one; else None."""
        fd = self.file(name).fileno()
        for base in ("/proc/self/fd", "/dev/fd"):
            if os.path.isdir(base):
                return f"{base}/{fd}"
        return None

    def entries(self) -> list[str]:
        """The names in the folder (as opened)."""
        if self._dfd is not None and os.listdir in os.supports_fd:
            return sorted(os.listdir(self._dfd))
        return sorted(os.listdir(self.path))

    def subfolder(self, name: str, kinds: Sequence[str], what: str, marker_sha256: Optional[str] = None) -> "Folder":
        """The cbinterp folder `name` inside this one, opened and checked like `open_folder` does (all its files);
        `marker_sha256`, when given, is what its marker must hash to."""
        check_name(name)
        try:
            fd = _open_entry(self._dfd, self.path, name, what, directory=True) if self._dfd is not None else None
            if fd is None and not (self.path / name).is_dir():
                raise FileNotFoundError(name)
        except FileNotFoundError:
            if self.changed():
                raise FolderChanged from None
            raise FileNotFoundError(
                f"The {self.what} at {self.path} is incomplete: its folder {name} is missing."
            ) from None
        sub = Folder(self.path / name, what, fd, self.check_files, parent=self)
        self._children.append(sub)
        sub._read_marker(kinds)
        if marker_sha256 is not None and hashlib.sha256(sub.marker_bytes).hexdigest() != marker_sha256:
            if sub.changed():
                raise FolderChanged
            raise ValueError(
                f"{sub.path / MANIFEST_FILE} does not match the checksum recorded in {self.path / MANIFEST_FILE}: "
                f"the folder {name} is from another save or was edited. Write the {self.what} again."
            )
        for listed in sub.manifest["files"]:
            sub._open(listed)
        return sub


def read_consistently(read: Callable[[], T], path: Path, what: str) -> T:
    """`read()`, again while it raises FolderChanged (a writer replaced the folder meanwhile), a bounded number of
    times with short waits."""
    for attempt in range(READ_ATTEMPTS):
        try:
            return read()
        except FolderChanged:
            time.sleep(min(0.2, 0.002 * 2**attempt))
    raise RuntimeError(
        f"The {what} at {path} was replaced {READ_ATTEMPTS} times while it was being read: another process keeps "
        "writing it. Read it again once that process is done."
    )


def _open_dir(path: Path, what: str) -> Optional[int]:
    """A descriptor of the folder `path` (None where files are opened by path); clear errors when it is missing."""
    try:
        if _DIR_FD:
            return os.open(path, _DIR_FLAGS)
        if not path.is_dir():
            raise NotADirectoryError(path) if path.exists() else FileNotFoundError(path)
        return None
    except FileNotFoundError:
        if writer_is_swapping(path):
            raise FolderChanged from None  # between the two renames of a save: the new folder is on its way
        raise FileNotFoundError(f"No {what} at {path}: the folder does not exist.") from None
    except NotADirectoryError:
        raise NotADirectoryError(f"{path} is a file, not a {what} (a folder).") from None


def open_folder(
    path: str | os.PathLike,
    kinds: Sequence[str],
    what: str = "cbinterp folder",
    check_files: bool = True,
    strict: bool = False,
    open_files: bool = True,
) -> Folder:
    """Open the cbinterp folder `path`: its marker (format, version, entries) and, with `check_files`, the size and
    sha256 of every listed file, each read once through one directory handle.

    `open_files` keeps every listed file open in the returned `Folder` (a consistent snapshot); without it each is
    closed once checked. `strict` also refuses files the marker does not list. A folder replaced while it is read is
    read again (see `read_consistently`).
    """
    path = user_path(path)

    def once() -> Folder:
        folder = Folder(path, what, _open_dir(path, what), check_files)
        try:
            folder._read_marker(kinds)
            if check_files or open_files:
                for name in folder.manifest["files"]:
                    folder._open(name)
                    if not open_files:
                        folder._files.pop(name).close()
            if strict:
                listed = set(folder.manifest["files"]) | {MANIFEST_FILE}
                extra = [name for name in folder.entries() if name not in listed]
                if extra:
                    raise ValueError(
                        f"The {what} at {path} holds files its marker does not list ({extra[:5]}): it is mixed with "
                        "other data. Remove them, or write it again."
                    )
            return folder
        except BaseException:
            folder.close()
            raise

    return read_consistently(once, path, what)


def read_manifest(path: Path, kinds: Sequence[str], what: str = "cbinterp folder") -> dict:
    """The parsed marker of the folder `path`, checked for format and version (the files are not read)."""
    with open_folder(path, kinds, what, check_files=False, open_files=False) as folder:
        return folder.manifest


def verify_file(path: Path, manifest: dict, name: str, what: str = "cbinterp folder") -> Path:
    """Check one listed file of the folder `path` against its recorded size and sha256 (never through a link)."""
    path = user_path(path)
    entry = manifest["files"].get(name)
    target = path / name
    if entry is None:
        raise ValueError(f"{target} is not listed in {path / MANIFEST_FILE}; the {what} is incomplete or mixed.")
    try:
        fd = _open_entry(None, path, check_name(name), what)
    except FileNotFoundError:
        raise FileNotFoundError(f"The {what} at {path} is incomplete: its file {name} is missing.") from None
    with os.fdopen(fd, "rb") as f:
        if os.fstat(fd).st_size != entry["bytes"] or _sha256_stream(f) != entry["sha256"]:
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
    """The marker, format version, and (with `check_files`) the size and sha256 of every listed file of `path`
    (see `open_folder`, which it uses). `strict` also refuses files the marker does not list (a checkpoint must be
    exactly what was written). Returns the manifest."""
    with open_folder(path, kinds, what, check_files=check_files, strict=strict, open_files=False) as folder:
        return folder.manifest


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
