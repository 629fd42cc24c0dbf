"""Atomic writes: a file or a directory appears whole under its final name, or the old one stays.

Temporaries sit beside the target as `.<name>.cbinterp-<host>.<pid>-<random>.tmp`; a folder being replaced is set
aside as `.<name>.cbinterp-<host>.<pid>-<random>.old` until the new one is in place. The name is the marker: it
says that cbinterp wrote the entry, on which machine (`<host>`: 8 hex digits of the sha256 of the host name) and in
which process. Only such entries written on this host by a process that is gone are ever removed (temporaries, and
a folder set aside once its replacement is in place) or renamed (a folder set aside by a writer killed between its
two renames, put back). Anything else beside the target, however it is named (`.<name>.old`, `.<name>.x.tmp`), is
left alone. Cleanup the file system refuses (a read-only folder) is skipped. Files and folders are created with the
process's umask applied (mode 0o666 / 0o777 before the umask), like any other file the user writes.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = [
    "ConcurrentWriteError",
    "atomic_dir",
    "atomic_file",
    "readable_dir",
    "recover_dir",
    "remove_stale_temps",
    "stale_temps",
    "user_path",
    "writer_entries",
    "writer_is_swapping",
]


class ConcurrentWriteError(FileExistsError):
    """Another process wrote the same path at the same time and its write won; this one was discarded."""


def user_path(path) -> Path:
    """`path` as an absolute Path with `~` expanded (`.` and `..` resolved by name, symbolic links kept)."""
    try:
        text = os.fspath(path)
    except TypeError:
        raise TypeError(f"A path must be a str or os.PathLike, got {type(path).__name__}.") from None
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if not text:
        raise ValueError("The path is empty; name a folder, e.g. 'model' or '~/models/model'.")
    return Path(os.path.abspath(os.path.expanduser(text)))


def _target(path) -> Path:
    path = user_path(path)
    if not path.name:
        raise ValueError(f"Cannot write to {path}: it is a file system root. Name a folder below it.")
    return path


def current_umask() -> int:
    """The process's umask, read without changing it where the platform tells (Linux), else set and restored."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _apply_umask(path: Path, directory: bool = False) -> None:
    """Mode 0o666 (0o777 for a folder) less the umask: some writers (safetensors) create their files 0o600."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


HOST = _host_tag()


def _entry_name(path: Path, suffix: str) -> Path:
    return path.with_name(f".{path.name}.cbinterp-{HOST}.{os.getpid()}-{secrets.token_hex(4)}.{suffix}")


def _temp_name(path: Path) -> Path:
    return _entry_name(path, "tmp")


def _aside_name(path: Path) -> Path:
    return _entry_name(path, "old")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # our own: maybe another thread's write in progress
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def writer_entries(path: str | os.PathLike) -> list[tuple[Path, str, bool]]:
    """The temporaries ("tmp") and folders set aside ("old") that cbinterp writers of `path` left beside it.

    As (entry, kind, writer_gone); `writer_gone` only for a writer on this host whose process has exited."""
    path = user_path(path)
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.cbinterp-([0-9a-f]{{8}})\.(\d+)-[0-9a-f]{{8}}\.(tmp|old)$")
    try:
        names = os.listdir(path.parent)
    except OSError:
        return []
    out = []
    for name in sorted(names):
        m = pattern.match(name)
        if m:
            host, pid, kind = m.group(1), int(m.group(2)), m.group(3)
            out.append((path.parent / name, kind, host == HOST and not _pid_alive(pid)))
    return out


def stale_temps(path: str | os.PathLike) -> list[Path]:
    """Temporaries of writes of `path` whose writer (on this host) is gone."""
    return [entry for entry, kind, gone in writer_entries(path) if kind == "tmp" and gone]


def writer_is_swapping(path: str | os.PathLike) -> bool:
    """True while a live writer (or one on another host) may be between the two renames of a folder swap of `path`.

    A reader that finds no `path` then should wait for the new one rather than report it missing."""
    return any(kind == "old" and not gone for _, kind, gone in writer_entries(path))


def _remove(p: Path) -> None:
    """Remove a file or folder tree; what the file system refuses (read-only) stays."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            p.unlink()


def remove_stale_temps(path: str | os.PathLike) -> int:
    """Delete the temporaries that killed writers of `path` left; returns how many were found."""
    found = stale_temps(path)
    for p in found:
        _remove(p)
    return len(found)


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform or file system can sync a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _exists(path: Path) -> bool:
    return os.path.lexists(path)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed onto `path`."""
    path = _target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = _temp_name(path)
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # umask applies
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _apply_umask(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _sync_tree(root: Path) -> None:
    """Flush (fsync) every file and folder under `root` to disk, and give each file the umask's mode."""
    for folder, _, files in os.walk(root):
        for name in files:
            entry = Path(folder) / name
            if entry.is_symlink():
                continue
            with open(entry, "rb") as f:
                os.fsync(f.fileno())
            _apply_umask(entry)
        fsync_dir(Path(folder))


def _is_cwd(path: Path) -> bool:
    try:
        return os.path.isdir(path) and os.path.samefile(os.getcwd(), path)
    except OSError:
        return False


def _swap_in(tmp: Path, path: Path) -> None:
    """Put the finished folder `tmp` at `path`, setting a previous `path` aside until the new one is in place."""
    in_cwd = _is_cwd(path)
    aside = None
    if _exists(path):
        aside = _aside_name(path)
        try:
            os.replace(path, aside)
        except FileNotFoundError:
            aside = None  # another writer set it aside first
    try:
        os.replace(tmp, path)
    except OSError as err:
        if aside is not None:
            try:
                os.replace(aside, path)  # put the previous one back
            except OSError:
                _remove(aside)  # another writer's folder is at `path` now, newer than the one set aside
        if err.errno in (errno.ENOTEMPTY, errno.EEXIST) and _exists(path):
            raise ConcurrentWriteError(
                f"Another process wrote {path} at the same time and its write won: {path} holds what that process "
                "wrote, and this write was discarded. Write again (after the other writer is done) if yours should "
                "replace it."
            ) from err
        raise
    fsync_dir(path.parent)
    if aside is not None:
        _remove(aside)
    if in_cwd:
        os.chdir(path)  # the process ran in the folder replaced: keep '.' naming the same path


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, check: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success it replaces `path`.

    `check(path)` is called before anything is written and may refuse to replace what is there (see
    `manifest.check_replaceable`). A directory cannot be swapped in one rename, so a previous `path` is first set
    aside and removed only once the new one is in place; if the swap fails it is put back, and `recover_dir`
    restores it after a crash between the two renames. If another process puts its own folder at `path` in
    between, this write is discarded with `ConcurrentWriteError`.
    """
    path = _target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    if check is not None:
        check(path)
    tmp = _temp_name(path)
    os.mkdir(tmp, 0o777)  # umask applies
    try:
        yield tmp
        _sync_tree(tmp)
        _swap_in(tmp, path)
    finally:
        if _exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def recover_dir(path: str | os.PathLike) -> Path:
    """Put back the last good copy of `path` that a killed `atomic_dir` write left aside, and clean up after it.

    The copy is left aside when the writer is killed between its two renames; what killed writers of `path` left
    (temporaries; copies set aside once `path` is back) is removed. Only entries named by cbinterp whose writer on
    this host is gone are touched; what cannot be changed (a read-only folder) is left as it is. Returns `path`."""
    path = user_path(path)
    for entry, kind, gone in writer_entries(path):
        if not gone:
            continue
        if kind == "old" and not _exists(path):
            with contextlib.suppress(OSError):
                os.replace(entry, path)
                continue
        if kind == "tmp" or _exists(path):
            _remove(entry)
    return path


def readable_dir(path: str | os.PathLike) -> Path:
    """What a reader should open: `path`, or where its last good copy lies.

    The last good copy, when a writer killed between its renames left it aside and the folder could not be put back
    (read-only)."""
    path = user_path(path)
    if not _exists(path):
        asides = [entry for entry, kind, gone in writer_entries(path) if kind == "old" and gone]
        if asides:
            return asides[-1]
    return path
