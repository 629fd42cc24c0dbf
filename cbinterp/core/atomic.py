"""Atomic writes: a file or a directory appears whole under its final name, or the old one stays.

Temporaries sit beside the target as `.<name>.<pid>-<random>.tmp`, so a writer that was killed leaves something
recognisable: the next write (or `recover_dir`, which `load` calls) of the same path removes the temporaries of
that path whose writing process is gone, and nothing else. Files and folders are created with the process's
umask applied (mode 0o666 / 0o777 before the umask), like any other file the user writes.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Callable, Iterator, Optional

__all__ = ["atomic_dir", "atomic_file", "recover_dir", "remove_stale_temps", "stale_temps"]


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


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


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


def stale_temps(path: str | os.PathLike) -> list[Path]:
    """Temporaries of writes of `path` whose writer is gone (this format, and the pid-less one of before)."""
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        return []
    ours = re.compile(rf"^\.{re.escape(path.name)}\.(\d+)-[0-9a-f]+\.tmp$")
    older = re.compile(rf"^\.{re.escape(path.name)}\.[A-Za-z0-9_]{{8}}\.tmp$")  # tempfile's names, before pids
    out = []
    for entry in parent.iterdir():
        m = ours.match(entry.name)
        if (m and not _pid_alive(int(m.group(1)))) or older.match(entry.name):
            out.append(entry)
    return out


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def remove_stale_temps(path: str | os.PathLike) -> int:
    """Delete the temporaries that killed writers of `path` left; returns how many."""
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


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed onto `path`."""
    path = Path(path)
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
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, check: Optional[Callable[[Path], None]] = None) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success it replaces `path`.

    `check(path)` is called before anything is written and may refuse to replace what is there (see
    `manifest.check_replaceable`). A directory cannot be swapped in one rename, so a previous `path` is first renamed
    aside and removed only once the new one is in place; if the swap fails it is put back, and `recover_dir`
    restores it after a crash between the two renames.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    if check is not None:
        check(path)
    tmp = _temp_name(path)
    os.mkdir(tmp, 0o777)  # umask applies
    old = _aside(path)
    try:
        yield tmp
        for entry in tmp.iterdir():
            if entry.is_file():
                with open(entry, "rb") as f:
                    os.fsync(f.fileno())
                _apply_umask(entry)
        fsync_dir(tmp)
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old.exists() and not path.exists():
                os.replace(old, path)
            raise
        fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _aside(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def recover_dir(path: str | os.PathLike) -> Path:
    """Put back the last good copy of `path` left aside by an `atomic_dir` write that crashed mid-swap, and remove
    the temporaries that killed writers of `path` left."""
    path = Path(path)
    old = _aside(path)
    if old.exists():
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, path)
    remove_stale_temps(path)
    return path
