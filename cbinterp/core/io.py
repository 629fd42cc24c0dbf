"""Save and load a HookedTransformer with its codebooks: safetensors weights beside a JSON config."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformer_lens import HookedTransformer, HookedTransformerConfig

from cbinterp.core.atomic import atomic_dir
from cbinterp.core.attach import get_codebooks, insert_codebook, refresh_hooks, require_hooked_transformer
from cbinterp.core.codebook import Codebook, CodebookConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "cbinterp-model"
VERSION = 1


def model_config_to_dict(cfg: HookedTransformerConfig) -> dict:
    """The constructor arguments of a HookedTransformerConfig as JSON-safe values (device left out)."""
    out = {}
    for field in dataclasses.fields(cfg):
        if not field.init or field.name == "device":
            continue
        value = getattr(cfg, field.name)
        if isinstance(value, torch.dtype):
            value = str(value).removeprefix("torch.")
        out[field.name] = value
    return out


def model_config_from_dict(data: dict, device: Optional[str | torch.device] = None) -> HookedTransformerConfig:
    data = dict(data)
    if isinstance(data.get("dtype"), str):
        data["dtype"] = getattr(torch, data["dtype"])
    if device is not None:
        data["device"] = str(device)
    return HookedTransformerConfig(**data)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_model(model: HookedTransformer, directory: Path, extra: Optional[dict] = None) -> None:
    """Write the weights and config files of `model` into an existing `directory` (not atomic by itself)."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, directory / WEIGHTS_FILE)
    config = {
        "format": FORMAT,
        "version": VERSION,
        "model_config": model_config_to_dict(model.cfg),
        "codebooks": {name: dataclasses.asdict(cb.cfg) for name, cb in get_codebooks(model).items()},
        "weights_sha256": sha256_of(directory / WEIGHTS_FILE),
        "extra": extra or {},
    }
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))


def save(model: HookedTransformer, path: str | os.PathLike, extra: Optional[dict] = None) -> Path:
    """Write `model` (with its codebooks) to the directory `path`, atomically. Returns the path.

    `extra` is any JSON-serialisable metadata kept in the config (e.g. how the model was trained).
    """
    require_hooked_transformer(model)
    path = Path(path)
    with atomic_dir(path) as tmp:
        write_model(model, tmp, extra)
    return path


def read_config(path: str | os.PathLike) -> dict:
    """The JSON config of a saved model, checked for format."""
    path = Path(path)
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(
            f"No cbinterp model at {path}: {CONFIG_FILE} is missing. Save one with cbinterp.save(model, path)."
        )
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(
            f"Corrupt cbinterp config {config_path}: {err}. Re-save the model with cbinterp.save."
        ) from err
    if config.get("format") != FORMAT:
        raise ValueError(f"{config_path} is not a cbinterp model config (format {config.get('format')!r}).")
    if config.get("version", 0) > VERSION:
        raise ValueError(
            f"{config_path} was written by a newer cbinterp (version {config['version']}); upgrade cbinterp."
        )
    return config


def load(path: str | os.PathLike, device: Optional[str | torch.device] = None) -> HookedTransformer:
    """Rebuild a model saved with `save`, on `device` (default: the config's default, CUDA when present)."""
    path = Path(path)
    config = read_config(path)
    weights_path = path / WEIGHTS_FILE
    if not weights_path.is_file():
        raise FileNotFoundError(f"No weights at {weights_path}; the checkpoint is incomplete. Re-save the model.")
    if sha256_of(weights_path) != config["weights_sha256"]:
        raise ValueError(
            f"{weights_path} does not match its config (checksum differs): the file is truncated, corrupt, or from "
            f"another save. Re-save the model with cbinterp.save."
        )
    try:
        state = load_file(weights_path)
    except SafetensorError as err:
        raise ValueError(f"Corrupt weights file {weights_path}: {err}. Re-save the model.") from err
    model = HookedTransformer(model_config_from_dict(config["model_config"], device))
    for name, cb_config in config["codebooks"].items():
        codebook = Codebook.from_config(CodebookConfig(**cb_config), device=model.cfg.device, dtype=model.cfg.dtype)
        insert_codebook(model, name, codebook, setup=False)
    refresh_hooks(model)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches: the config describes other codebooks or another model
        raise ValueError(
            f"Weights in {weights_path} do not match the model its config describes: {err}. Re-save the model with "
            "cbinterp.save."
        ) from err
    if missing or unexpected:
        raise ValueError(
            f"Weights in {weights_path} do not match the model its config describes "
            f"(missing: {missing[:5]}, unexpected: {unexpected[:5]}). Re-save the model with cbinterp.save."
        )
    return model.eval()
