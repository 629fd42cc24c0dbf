"""Save and load a HookedTransformer with its codebooks: safetensors weights beside a JSON config.

A saved model is a cbinterp folder (see `cbinterp.core.manifest`): `config.json` (the model and codebook configs),
`model.safetensors` (the state dict) and the marker `cbinterp.json` with the sha256 of both. Models saved by the
previous format (config.json with `weights_sha256`, no marker) still load.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformer_lens import HookedTransformer, HookedTransformerConfig

from cbinterp.core import manifest as mf
from cbinterp.core.atomic import atomic_dir, recover_dir
from cbinterp.core.attach import get_codebooks, insert_codebook, refresh_hooks, require_hooked_transformer
from cbinterp.core.codebook import Codebook, CodebookConfig
from cbinterp.core.manifest import MANIFEST_FILE, sha256_of
from cbinterp.core.tokenizer import attach_tokenizer, load_tokenizer, tokenizer_fingerprint, write_tokenizer_files

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = mf.MODEL
VERSION = mf.VERSION
MODEL_FILES = (CONFIG_FILE, WEIGHTS_FILE)

__all__ = [
    "load",
    "save",
    "load_codebook",
    "load_codebooks",
    "save_codebook",
    "save_codebooks",
    "read_config",
    "write_model",
    "sha256_of",
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "MANIFEST_FILE",
]


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


def model_description(model: HookedTransformer) -> dict:
    """The JSON config of `model`: its HookedTransformerConfig and its codebooks' configs (JSON-normalised)."""
    return json.loads(
        json.dumps(
            {
                "model_config": model_config_to_dict(model.cfg),
                "codebooks": {name: dataclasses.asdict(cb.cfg) for name, cb in get_codebooks(model).items()},
            }
        )
    )


def write_model(
    model: HookedTransformer, directory: Path, extra: Optional[dict] = None, with_tokenizer: bool = False
) -> list[str]:
    """Write the weights and config files of `model` into an existing `directory` (not atomic by itself, no
    marker), with its tokenizer's files when `with_tokenizer` and one is attached; returns the names written."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, directory / WEIGHTS_FILE)
    config = {"format": FORMAT, "version": VERSION, **model_description(model), "extra": extra or {}}
    names = list(MODEL_FILES)
    tokenizer = getattr(model, "tokenizer", None)
    if with_tokenizer and tokenizer is not None:
        files = write_tokenizer_files(tokenizer, directory)
        config["tokenizer"] = {"files": files, "fingerprint": tokenizer_fingerprint(tokenizer)}
        names += files
    mf.write_json(directory / CONFIG_FILE, config)
    return names


def save(model: HookedTransformer, path: str | os.PathLike, extra: Optional[dict] = None) -> Path:
    """Write `model` (with its codebooks) to the directory `path`, atomically. Returns the path.

    `extra` is any JSON-serialisable metadata kept in the config (e.g. how the model was trained). An attached
    tokenizer (`model.tokenizer`) is saved beside the weights, and `load` attaches it again. Only a previous
    cbinterp model or checkpoint (holding nothing but its own files) or an empty folder is ever replaced; anything
    else at `path` is refused with FileExistsError.
    """
    require_hooked_transformer(model)
    path = Path(path)
    check = lambda p: mf.check_replaceable(p, (mf.MODEL, mf.CHECKPOINT), "cbinterp model")
    with atomic_dir(path, check=check) as tmp:
        names = write_model(model, tmp, extra, with_tokenizer=True)
        mf.write_manifest(tmp, mf.MODEL, names, hasher=sha256_of)
    return path


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"Corrupt cbinterp config {path}: {err}. Re-save the model with cbinterp.save.") from err
    if not isinstance(data, dict):
        raise ValueError(f"Corrupt cbinterp config {path}: not a JSON object. Re-save the {what}.")
    return data


def _legacy_config(path: Path) -> dict:
    """The config of a version-1 model (no marker; config.json records the weights' sha256)."""
    config_path = path / CONFIG_FILE
    config = _read_json(config_path, "model")
    if config.get("format") != FORMAT:
        raise ValueError(f"{config_path} is not a cbinterp model config (format {config.get('format')!r}).")
    if config.get("version", 0) > 1:
        raise ValueError(f"{config_path} has version {config['version']} but no {MANIFEST_FILE}; re-save the model.")
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"The cbinterp model at {path} is incomplete: its file {WEIGHTS_FILE} is missing.")
    if not isinstance(config.get("weights_sha256"), str) or sha256_of(weights) != config["weights_sha256"]:
        raise ValueError(
            f"{weights} does not match its config (checksum differs): the file is truncated, corrupt, or from "
            "another save. Re-save the model with cbinterp.save."
        )
    return config


def read_config(path: str | os.PathLike, verify: bool = True) -> dict:
    """The JSON config of a saved model or checkpoint, after checking the folder (marker, version, checksums)."""
    path = Path(path)
    if not (path / MANIFEST_FILE).exists() and (path / CONFIG_FILE).is_file():
        return _legacy_config(path)
    mf.verify_dir(path, (mf.MODEL, mf.CHECKPOINT), "cbinterp model", check_files=verify)
    config = _read_json(path / CONFIG_FILE, "model")
    if config.get("format") != FORMAT:
        raise ValueError(f"{path / CONFIG_FILE} is not a cbinterp model config (format {config.get('format')!r}).")
    return config


def build_model(config: dict, path: Path, device=None) -> HookedTransformer:
    """A model (with its codebooks) as `config` describes it, weights not loaded yet."""
    try:
        model = HookedTransformer(model_config_from_dict(config["model_config"], device))
        codebooks = config["codebooks"]
        if not isinstance(codebooks, dict):
            raise TypeError(f"'codebooks' must be a mapping, got {type(codebooks).__name__}")
        for name, cb_config in codebooks.items():
            cb = Codebook.from_config(CodebookConfig(**cb_config), device=model.cfg.device, dtype=model.cfg.dtype)
            insert_codebook(model, name, cb, setup=False)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ValueError(
            f"Damaged cbinterp config {path / CONFIG_FILE}: {type(err).__name__}: {err}. Re-save the model."
        ) from err
    refresh_hooks(model)
    return model


def load_weights(model: HookedTransformer, weights_path: Path) -> None:
    try:
        state = load_file(weights_path)
    except SafetensorError as err:
        raise ValueError(f"Corrupt weights file {weights_path}: {err}. Re-save the model.") from err
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


def load(path: str | os.PathLike, device: Optional[str | torch.device] = None) -> HookedTransformer:
    """Rebuild a model saved with `save` (or the model of a `train` checkpoint), on `device` (default: the config's
    default, CUDA when present). Every file is checked against its recorded sha256 first; a save that was killed
    between its two renames is recovered. A saved tokenizer is attached (`model.to_tokens` etc. work offline)."""
    path = Path(path)
    recover_dir(path)
    config = read_config(path)
    model = build_model(config, path, device)
    load_weights(model, path / WEIGHTS_FILE)
    if config.get("tokenizer"):
        tokenizer = load_tokenizer(path)
        if tokenizer_fingerprint(tokenizer) != config["tokenizer"].get("fingerprint"):
            raise ValueError(f"The tokenizer saved in {path} is not the one its config records. Re-save the model.")
        attach_tokenizer(model, tokenizer)
    return model.eval()


# -- codebooks on their own ----------------------------------------------------------------------------------------
CODEBOOK_CONFIG = "codebook.json"
CODEBOOK_WEIGHTS = "codebook.safetensors"


def save_codebook(codebook: Codebook, path: str | os.PathLike, hook_name: Optional[str] = None) -> Path:
    """Write one codebook (its `CodebookConfig` as JSON beside its weights and usage buffers) to the folder `path`,
    atomically; `hook_name` (default: where it is attached) is recorded so `load_codebooks` can place it again."""
    if not isinstance(codebook, Codebook):
        raise TypeError(f"save_codebook needs a Codebook, got {type(codebook).__name__}.")
    path = Path(path)
    state = {k: v.detach().contiguous().cpu() for k, v in codebook.state_dict().items()}
    config = {
        "format": mf.CODEBOOK,
        "version": VERSION,
        "config": dataclasses.asdict(codebook.cfg),
        "hook_name": hook_name or getattr(codebook, "name", None),
    }
    check = lambda p: mf.check_replaceable(p, (mf.CODEBOOK,), "cbinterp codebook")
    with atomic_dir(path, check=check) as tmp:
        save_file(state, tmp / CODEBOOK_WEIGHTS)
        mf.write_json(tmp / CODEBOOK_CONFIG, json.loads(json.dumps(config)))
        mf.write_manifest(tmp, mf.CODEBOOK, [CODEBOOK_CONFIG, CODEBOOK_WEIGHTS], hasher=sha256_of)
    return path


def load_codebook(path: str | os.PathLike, device: Optional[str | torch.device] = None) -> Codebook:
    """A codebook saved with `save_codebook`, checked against its recorded checksums, on `device`."""
    return _read_codebook(Path(path), device)[0]


def _read_codebook(path: Path, device) -> tuple[Codebook, Optional[str]]:
    recover_dir(path)
    mf.verify_dir(path, (mf.CODEBOOK,), "cbinterp codebook")
    config = _read_json(path / CODEBOOK_CONFIG, "codebook")
    try:
        codebook = Codebook.from_config(CodebookConfig(**config["config"]), device=device)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"Damaged codebook config {path / CODEBOOK_CONFIG}: {err}. Save the codebook again.") from err
    try:
        codebook.load_state_dict(load_file(path / CODEBOOK_WEIGHTS, device=str(device or "cpu")))
    except (SafetensorError, RuntimeError) as err:
        raise ValueError(f"The weights in {path / CODEBOOK_WEIGHTS} do not fit its config: {err}.") from err
    return codebook, config.get("hook_name")


def save_codebooks(model: HookedTransformer, directory: str | os.PathLike) -> Path:
    """Every codebook of `model` with `save_codebook`, one folder each, named by its hook name, in `directory`."""
    require_hooked_transformer(model)
    codebooks = get_codebooks(model)
    if not codebooks:
        raise ValueError("The model has no codebooks to save; attach some with attach_codebooks first.")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, codebook in codebooks.items():
        save_codebook(codebook, directory / name, hook_name=name)
    return directory


def load_codebooks(directory: str | os.PathLike, device: Optional[str | torch.device] = None) -> dict[str, Codebook]:
    """The codebooks `save_codebooks` wrote, keyed by hook name: attach them to another instance of the same
    architecture with `attach_codebooks(model, load_codebooks(directory))`."""
    directory = Path(directory)
    folders = sorted(p for p in directory.iterdir() if (p / mf.MANIFEST_FILE).is_file()) if directory.is_dir() else []
    if not folders:
        raise FileNotFoundError(f"No saved codebooks in {directory}; write them with save_codebooks(model, directory).")
    out = {}
    for folder in folders:
        codebook, hook_name = _read_codebook(folder, device)
        out[hook_name or folder.name] = codebook
    return out
