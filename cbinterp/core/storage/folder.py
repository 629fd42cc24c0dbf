"""The one reader of cbinterp folders (see `cbinterp.core.storage.manifest` for the format).

`open_folder` checks the marker (format, version, entries) and the size and sha256 of every listed file, reading
each through one open directory handle, never through a symbolic link, and only files the marker lists. The
returned `Folder` hands out the very files it checked, so what is read is what was checked even while another
process replaces the folder; a folder replaced during the check is read again (a bounded number of times), so a
concurrent writer never makes a good folder look corrupt. `verify_dir`, `verify_file` and `read_manifest` are
built on it.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO, TypeVar

from cbinterp.core.storage.atomic import user_path, writer_is_swapping
from cbinterp.core.storage.manifest import MANIFEST_FILE, check_name, parse_manifest, sha256_stream

__all__ = ["Folder", "FolderChanged", "open_folder", "read_consistently", "read_manifest", "verify_dir", "verify_file"]

#: How often a folder that keeps being replaced while it is read is read again before giving up.
READ_ATTEMPTS = 20

T = TypeVar("T")


class FolderChanged(Exception):
    """A folder was replaced (or its marker rewritten) while it was being read: read it again."""


_FILE_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
#: Files are opened relative to an open directory where the platform can (POSIX), by path elsewhere.
_DIR_FD = os.open in os.supports_dir_fd and hasattr(os, "O_DIRECTORY") and hasattr(os, "O_NOFOLLOW")


def _open_entry(dfd: int | None, folder: Path, name: str, what: str, directory: bool = False) -> int:
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

    def __init__(self, path: Path, what: str, dfd: int | None, check_files: bool, parent: Folder = None):
        self.path, self.what, self.check_files, self.parent = path, what, check_files, parent
        self.manifest: dict = {}
        self.marker_bytes = b""
        self._dfd = dfd
        self._marker_id = None
        self._files: dict[str, BinaryIO] = {}
        self._children: list[Folder] = []

    def __enter__(self) -> Folder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close every file opened from this folder and from the folders opened inside it."""
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

    def _open_fd(self, name: str, missing: str) -> int:
        """A descriptor of the entry `name` (never through a link).

        A missing one raises FileNotFoundError(`missing`), or FolderChanged where a writer replaced the folder meanwhile
        (then it is not missing: read again)."""
        try:
            return _open_entry(self._dfd, self.path, name, self.what)
        except FileNotFoundError:
            if self.changed():
                raise FolderChanged from None
            raise FileNotFoundError(missing) from None

    def _read_marker(self, kinds: Sequence[str]) -> dict:
        fd = self._open_fd(MANIFEST_FILE, f"No {self.what} at {self.path}: its marker file {MANIFEST_FILE} is missing.")
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            self.marker_bytes = f.read()
        self._marker_id = (st.st_ino, st.st_mtime_ns, st.st_size)
        self.manifest = parse_manifest(self.marker_bytes, self.path, kinds, self.what)
        return self.manifest

    def _open(self, name: str) -> BinaryIO:
        entry = self.manifest["files"][name]
        fd = self._open_fd(name, f"The {self.what} at {self.path} is incomplete: its file {name} is missing.")
        f = os.fdopen(fd, "rb")
        if self.check_files and (os.fstat(fd).st_size != entry["bytes"] or sha256_stream(f) != entry["sha256"]):
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
        """The bytes of the listed file `name`, checked against its size and sha256 (see `file`)."""
        return self.file(name).read()

    def local_path(self, name: str) -> str | None:
        """A path that opens the very file `file(name)` checked (a /proc or /dev/fd link); None where there is none."""
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

    def subfolder(self, name: str, kinds: Sequence[str], what: str, marker_sha256: str | None = None) -> Folder:
        """The cbinterp folder `name` inside this one, opened and checked (all its files) as `open_folder` does.

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
    """`read()`, again while it raises FolderChanged (a writer replaced the folder meanwhile).

    A bounded number of times, with short waits."""
    for attempt in range(READ_ATTEMPTS):
        try:
            return read()
        except FolderChanged:
            time.sleep(min(0.2, 0.002 * 2**attempt))
    raise RuntimeError(
        f"The {what} at {path} was replaced {READ_ATTEMPTS} times while it was being read: another process keeps "
        "writing it. Read it again once that process is done."
    )


def _open_dir(path: Path, what: str) -> int | None:
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
    """Open the cbinterp folder `path`: its marker (format, version, entries) and, with `check_files`, its files.

    Every listed file is checked against its size and sha256, each read once through one directory handle.

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
        if os.fstat(fd).st_size != entry["bytes"] or sha256_stream(f) != entry["sha256"]:
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
    """Check the marker, format version, and (with `check_files`) every listed file of `path`; returns the manifest.

    Files are checked against their size and sha256 (see `open_folder`, which it uses). `strict` also refuses files
    the marker does not list (a checkpoint must be exactly what was written)."""
    with open_folder(path, kinds, what, check_files=check_files, strict=strict, open_files=False) as folder:
        return folder.manifest
