"""Save and load a HookedTransformer with its codebooks: safetensors weights beside a JSON config.

A saved model is a cbinterp folder (see `manifest`): `config.json` (the model and codebook configs),
`model.safetensors` (the state dict), the tokenizer's files when one is attached, and the marker `cbinterp.json`
with the sha256 of each. Loading reads only files the marker lists, each checked first; it never runs code and
never touches the network (the model is built with no tokenizer name and `trust_remote_code=False`, then the saved
tokenizer is attached). Models saved by the previous format (config.json with `weights_sha256`, no marker) still
load. Codebooks on their own: `cbinterp.core.storage.codebook_io`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cbinterp.core import tl_compat as tc
from cbinterp.core.checks import is_int
from cbinterp.core.codebooks.attach import get_codebooks, insert_codebook, refresh_hooks, require_hooked_transformer
from cbinterp.core.codebooks.codebook import Codebook, CodebookConfig
from cbinterp.core.storage import folder as fd
from cbinterp.core.storage import manifest as mf
from cbinterp.core.storage.atomic import atomic_dir, readable_dir, recover_dir, user_path
from cbinterp.core.storage.codebook_io import (
    CODEBOOK_CONFIG,
    CODEBOOK_WEIGHTS,
    load_codebook,
    load_codebooks,
    save_codebook,
    save_codebooks,
)
from cbinterp.core.storage.manifest import MANIFEST_FILE, sha256_of
from cbinterp.core.storage.tensorfile import check_shapes, load_tensors, read_header, skeleton_shapes
from cbinterp.core.storage.tokenizer import (
    attach_tokenizer,
    load_tokenizer,
    tokenizer_fingerprint,
    write_tokenizer_files,
)
from cbinterp.core.tl_compat import Model

#: The class a saved HookedTransformer is rebuilt as (None on TransformerLens 4, where loading one says so).
HookedTransformer = tc.HookedTransformer
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
    "CODEBOOK_CONFIG",
    "CODEBOOK_WEIGHTS",
    "WEIGHTS_FILE",
    "MANIFEST_FILE",
]


def model_config_to_dict(cfg: tc.HookedTransformerConfig) -> dict:
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


def model_config_from_dict(data: dict, device: str | torch.device | None = None) -> tc.HookedTransformerConfig:
    data = dict(data)
    if isinstance(data.get("dtype"), str):
        data["dtype"] = getattr(torch, data["dtype"])
    if device is not None:
        data["device"] = str(device)
    tc.require_hooked("Loading a cbinterp model saved from a HookedTransformer")
    return tc.HookedTransformerConfig(**data)


def model_description(model: Model) -> dict:
    """The JSON config of `model`: its HookedTransformerConfig and its codebooks' configs (JSON-normalised)."""
    return json.loads(
        json.dumps(
            {
                **(
                    {"bridge": tc.bridge_description(model)}
                    if tc.is_bridge(model)
                    else {"model_config": model_config_to_dict(model.cfg)}
                ),
                "codebooks": {name: dataclasses.asdict(cb.cfg) for name, cb in get_codebooks(model).items()},
            }
        )
    )


def write_model(model: Model, directory: Path, extra: dict | None = None, with_tokenizer: bool = False) -> list[str]:
    """Write the weights and config files of `model` into an existing `directory`; returns the names written.

    Not atomic by itself, and no marker. The tokenizer's files are written too when `with_tokenizer` and one is
    attached."""
    # cloned: tied weights (a bridge's embedding and unembedding) share storage, which safetensors refuses
    state = {k: v.detach().cpu().clone().contiguous() for k, v in tc.state_dict(model).items()}
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


def save(model: Model, path: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write `model` (with its codebooks) to the directory `path`, atomically.

    Returns the path (absolute, `~` expanded).

    `extra` is any JSON-serialisable metadata kept in the config (e.g. how the model was trained). An attached
    tokenizer (`model.tokenizer`) is saved beside the weights, and `load` attaches it again. Only a previous
    cbinterp model or checkpoint (holding nothing but its own files) or an empty folder is ever replaced; anything
    else at `path` is refused with FileExistsError.
    """
    require_hooked_transformer(model)
    path = user_path(path)
    check = lambda p: mf.check_replaceable(p, (mf.MODEL, mf.CHECKPOINT), "cbinterp model")
    with atomic_dir(path, check=check) as tmp:
        names = write_model(model, tmp, extra, with_tokenizer=True)
        mf.write_manifest(tmp, mf.MODEL, names, hasher=sha256_of)
    return path


def _read_json(path: Path, what: str) -> dict:
    return mf.parse_json_object(path.read_bytes(), path, what)


def _legacy_config(path: Path) -> dict:
    """The config of a version-1 model (no marker; config.json records the weights' sha256)."""
    config_path = path / CONFIG_FILE
    config = _read_json(config_path, "model")
    if config.get("format") != FORMAT:
        raise ValueError(f"{config_path} is not a cbinterp model config (format {config.get('format')!r}).")
    if config.get("version", 0) > 1:
        raise ValueError(f"{config_path} has version {config['version']} but no {MANIFEST_FILE}; re-save the model.")
    weights = path / WEIGHTS_FILE
    if weights.is_symlink() or not weights.is_file():
        raise FileNotFoundError(f"The cbinterp model at {path} is incomplete: its file {WEIGHTS_FILE} is missing.")
    if not isinstance(config.get("weights_sha256"), str) or sha256_of(weights) != config["weights_sha256"]:
        raise ValueError(
            f"{weights} does not match its config (checksum differs): the file is truncated, corrupt, or from "
            "another save. Re-save the model with cbinterp.save."
        )
    return config


def _is_legacy(path: Path) -> bool:
    """Whether `path` is a version-1 model folder: a config.json of version 1 and no marker.

    The marker is looked for first and the config read second, so a save swapping the folder in between can show a
    new folder's config without a marker having been seen: a config of a later version is therefore never taken for
    the legacy format, but read as a marked folder, whose reader retries a folder swapped meanwhile (and names a
    missing marker as such)."""
    if os.path.lexists(path / MANIFEST_FILE) or not (path / CONFIG_FILE).is_file():
        return False
    try:
        version = json.loads((path / CONFIG_FILE).read_bytes()).get("version", 0)
    except (OSError, ValueError, AttributeError):
        return True  # unreadable: the legacy reader says what is wrong with it
    return not (is_int(version) and version > 1)


def _folder_config(folder: fd.Folder) -> dict:
    config = mf.parse_json_object(folder.read_bytes(CONFIG_FILE), folder.path / CONFIG_FILE, "model")
    if config.get("format") != FORMAT:
        raise ValueError(
            f"{folder.path / CONFIG_FILE} is not a cbinterp model config (format {config.get('format')!r})."
        )
    return config


def read_config(path: str | os.PathLike, verify: bool = True) -> dict:
    """The JSON config of a saved model or checkpoint, after checking the folder (marker, version, checksums)."""
    path = user_path(path)
    if _is_legacy(path):
        return _legacy_config(path)
    with fd.open_folder(path, (mf.MODEL, mf.CHECKPOINT), "cbinterp model", check_files=verify) as folder:
        return _folder_config(folder)


# -- building the model a config describes -------------------------------------------------------------------------
_DIMS = ("n_layers", "d_model", "n_ctx", "d_head", "n_heads", "d_vocab")
_OPTIONAL_DIMS = ("d_mlp", "d_vocab_out", "n_key_value_heads")


def _check_model_config(config: dict, where: Path, header: dict | None) -> dict:
    """The model config of `config`, its sizes checked before anything is built from it.

    The layer count is also checked against the weights' `header`."""
    damaged = f"Damaged cbinterp config {where}"
    data = config.get("model_config")
    if not isinstance(data, dict):
        raise ValueError(f"{damaged}: KeyError: no 'model_config' mapping. Re-save the model.")
    for key in _DIMS + _OPTIONAL_DIMS:
        value = data.get(key)
        if key in _OPTIONAL_DIMS and (value is None or (key == "d_vocab_out" and value == -1)):
            continue
        if not is_int(value) or value <= 0:
            raise ValueError(f"{damaged}: model_config.{key} is {value!r}, not a positive integer. Re-save the model.")
    if header is not None:  # bounds the model built to compare shapes with (one Python module per layer)
        blocks = {key.split(".")[1] for key in header if key.startswith("blocks.")}
        if data["n_layers"] > len(blocks):
            raise ValueError(
                f"Weights in {where.parent / WEIGHTS_FILE} do not match the model its config describes: the config "
                f"says n_layers={data['n_layers']}, the weights hold {len(blocks)} blocks. Re-save the model."
            )
    return data


def _construct(model_config: dict, codebooks: dict, device) -> Model:
    # Loading never runs code or downloads: no tokenizer name for TransformerLens to fetch (the saved tokenizer is
    # attached afterwards), and no remote code for a tokenizer or config to name.
    data = {**model_config, "tokenizer_name": None, "trust_remote_code": False}
    model = HookedTransformer(model_config_from_dict(data, device))
    for name, cb_config in codebooks.items():
        cb = Codebook.from_config(CodebookConfig(**cb_config), device=model.cfg.device, dtype=model.cfg.dtype)
        insert_codebook(model, name, cb, setup=False)
    return model


def _build_bridge(config: dict, where: Path, device, tokenizer) -> Model:
    """The TransformerBridge (with its codebooks) a saved bridge's config describes, weights not loaded yet."""
    codebooks = config.get("codebooks")
    if not isinstance(codebooks, dict) or not isinstance(config["bridge"], dict):
        raise ValueError(
            f"Damaged cbinterp config {where}: 'bridge' or 'codebooks' is not a mapping. Re-save the model."
        )
    try:
        model = tc.build_bridge(config["bridge"], tokenizer=tokenizer, device=device)
        for name, cb_config in codebooks.items():
            cb = Codebook.from_config(CodebookConfig(**cb_config), device=model.cfg.device, dtype=model.cfg.dtype)
            insert_codebook(model, name, cb, setup=False)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"Damaged cbinterp config {where}: {type(err).__name__}: {err}. Re-save the model.") from err
    refresh_hooks(model)
    return model


def build_model(config: dict, path: Path, device=None, header: dict | None = None, tokenizer=None) -> Model:
    """A model (with its codebooks) as `config` describes it, weights not loaded yet.

    With the weights' `header` ({name: shape}), the shapes the config implies are checked against it first, on the
    meta device, so that a config describing another (or a huge) model is refused before anything is allocated."""
    where = path / CONFIG_FILE
    if "bridge" in config:
        return _build_bridge(config, where, device, tokenizer)
    model_config = _check_model_config(config, where, header)
    codebooks = config.get("codebooks")
    if not isinstance(codebooks, dict):
        raise ValueError(f"Damaged cbinterp config {where}: 'codebooks' is not a mapping. Re-save the model.")
    damaged = (KeyError, TypeError, ValueError, AttributeError)
    if header is not None:
        try:
            expected = skeleton_shapes(lambda: _construct(model_config, codebooks, "meta"))
        except damaged as err:
            raise ValueError(
                f"Damaged cbinterp config {where}: {type(err).__name__}: {err}. Re-save the model."
            ) from err
        check_shapes(expected, header, path / WEIGHTS_FILE, "Re-save the model with cbinterp.save.")
    try:
        model = _construct(model_config, codebooks, device)
    except damaged as err:
        raise ValueError(f"Damaged cbinterp config {where}: {type(err).__name__}: {err}. Re-save the model.") from err
    refresh_hooks(model)
    if model_config.get("tokenizer_name") is not None:
        model.cfg.tokenizer_name = model_config["tokenizer_name"]  # a record of its name; nothing is fetched
    return model


def _load_state(model: Model, state: dict, weights_path: Path) -> None:
    try:
        missing, unexpected = tc.load_state_dict(model, state, strict=False)
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


def load_weights(model: Model, weights_path: Path) -> None:
    """Load the safetensors file `weights_path` into `model` (all of it, shape for shape)."""
    try:
        state = load_file(weights_path)
    except SafetensorError as err:
        raise ValueError(f"Corrupt weights file {weights_path}: {err}. Re-save the model.") from err
    _load_state(model, state, weights_path)


def _saved_tokenizer(folder: fd.Folder, record) -> object | None:
    """The tokenizer the config's `record` names, rebuilt from the folder's checked files only."""
    where = folder.path / CONFIG_FILE
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, list) or not files:
        raise ValueError(f"Damaged cbinterp config {where}: a bad 'tokenizer' entry {record!r}. Re-save the model.")
    with tempfile.TemporaryDirectory(prefix="cbinterp-tokenizer-") as tmp:
        for name in files:
            mf.check_name(name, f"Damaged cbinterp config {where}: tokenizer file: ")
            (Path(tmp) / name).write_bytes(folder.read_bytes(name))  # refused unless the marker lists it
        tokenizer = load_tokenizer(tmp)
    if tokenizer_fingerprint(tokenizer) != record.get("fingerprint"):
        raise ValueError(f"The tokenizer saved in {folder.path} is not the one its config records. Re-save the model.")
    return tokenizer


def _hooked_as_bridge(folder: fd.Folder, config: dict, header: dict, tokenizer, device) -> Model:
    """A folder saved from a HookedTransformer, on a TransformerLens without one: rebuilt as a bridge.

    Its weights become the Phi model `to_hf` writes; `cbinterp.models.hooked_as_bridge` says where hook names move."""
    from cbinterp.models.hooked_as_bridge import bridge_from_hooked

    where = folder.path / CONFIG_FILE
    model_config = _check_model_config(config, where, header)
    codebooks = config.get("codebooks")
    if not isinstance(codebooks, dict):
        raise ValueError(f"Damaged cbinterp config {where}: 'codebooks' is not a mapping. Re-save the model.")
    state = load_tensors(folder, WEIGHTS_FILE)
    try:
        return bridge_from_hooked(model_config, state, codebooks, tokenizer=tokenizer, device=device)
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as err:
        raise ValueError(
            f"{folder.path} was saved from a HookedTransformer, which transformer-lens {tc.TL_VERSION} does not have, "
            f"and cannot be rebuilt as a TransformerBridge: {type(err).__name__}: {err}. Load it with "
            f"transformer-lens 3.x."
        ) from err


def _load_folder(folder: fd.Folder, device) -> Model:
    config = _folder_config(folder)
    header = read_header(folder, WEIGHTS_FILE)
    tokenizer = _saved_tokenizer(folder, config["tokenizer"]) if config.get("tokenizer") else None
    if "bridge" not in config and not tc.HAS_HOOKED and tc.BRIDGE_SUPPORTED:
        return _hooked_as_bridge(folder, config, header, tokenizer, device)
    model = build_model(config, folder.path, device, header=header, tokenizer=tokenizer)
    _load_state(model, load_tensors(folder, WEIGHTS_FILE), folder.path / WEIGHTS_FILE)
    if tokenizer is not None and not tc.is_bridge(model):  # a bridge is booted with it
        attach_tokenizer(model, tokenizer)
    return model.eval()


def load(path: str | os.PathLike, device: str | torch.device | None = None) -> Model:
    """Rebuild a model saved with `save` (or the model of a `train` checkpoint), on `device`.

    `device` defaults to the config's default (CUDA when present).

    Every file is checked against its recorded sha256 first, and only files the marker lists are read. A save that
    was killed between its two renames is recovered; a save running meanwhile in another process is waited for, so
    the model read is the old or the new one, whole. A saved tokenizer is attached (`model.to_tokens` etc. work
    offline). Nothing is downloaded and no code from the folder is run; a read-only folder loads too.
    """
    path = user_path(path)
    recover_dir(path)
    source = readable_dir(path)
    if _is_legacy(source):
        config = _legacy_config(source)
        model = build_model(config, source, device)
        load_weights(model, source / WEIGHTS_FILE)
        return model.eval()
    with fd.open_folder(source, (mf.MODEL, mf.CHECKPOINT), "cbinterp model") as folder:
        return _load_folder(folder, device)
