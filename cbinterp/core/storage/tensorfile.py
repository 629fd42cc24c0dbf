"""Safetensors files of a checked cbinterp folder.

Their header (names and shapes) before any tensor is allocated, a module built on the meta device to compare against
it, and the tensors read from the very file that was checked.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file

from cbinterp.core.storage.folder import Folder

__all__ = ["check_shapes", "load_tensors", "read_header", "skeleton_shapes"]

#: The safetensors format caps its JSON header at 100 MB.
MAX_HEADER_BYTES = 100_000_000


def read_header(folder: Folder, name: str) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} of the safetensors file `name` of `folder`, from its header alone."""
    f = folder.file(name)
    where = folder.path / name
    prefix = f.read(8)
    if len(prefix) != 8:
        raise ValueError(f"Corrupt weights file {where}: too short for a safetensors header. Write it again.")
    (size,) = struct.unpack("<Q", prefix)
    if size > MAX_HEADER_BYTES:
        raise ValueError(f"Corrupt weights file {where}: a header of {size} bytes. Write it again.")
    try:
        header = json.loads(f.read(size))
        shapes = {key: tuple(int(n) for n in value["shape"]) for key, value in header.items() if key != "__metadata__"}
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise ValueError(f"Corrupt weights file {where}: unreadable header ({err}). Write it again.") from err
    return shapes


def skeleton_shapes(build: Callable[[], torch.nn.Module]) -> dict[str, tuple[int, ...]]:
    """{name: shape} of the state dict of the module `build()` makes on the meta device (nothing is allocated)."""
    with torch.device("meta"):
        module = build()
    return {key: tuple(value.shape) for key, value in module.state_dict().items()}


def check_shapes(expected: dict, found: dict, where: Path, fix: str) -> None:
    """ValueError unless the tensors `found` in the file `where` are exactly those `expected`, shape for shape."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    differ = [
        f"{key}: {found[key]} in the file, {expected[key]} by the config"
        for key in sorted(set(expected) & set(found))
        if tuple(found[key]) != tuple(expected[key])
    ]
    if missing or unexpected or differ:
        raise ValueError(
            f"Weights in {where} do not match the model its config describes (missing: {missing[:5]}, unexpected: "
            f"{unexpected[:5]}, other shapes: {differ[:5]}). {fix}"
        )


def load_tensors(folder: Folder, name: str, device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """The tensors of the checked safetensors file `name` of `folder` (read from the file that was checked)."""
    where = folder.path / name
    local = folder.local_path(name)
    try:
        if local is not None:
            return load_file(local, device=str(device or "cpu"))
        tensors = load_bytes(folder.read_bytes(name))
        return {key: value.to(device or "cpu") for key, value in tensors.items()}
    except SafetensorError as err:
        raise ValueError(f"Corrupt weights file {where}: {err}. Write it again.") from err
