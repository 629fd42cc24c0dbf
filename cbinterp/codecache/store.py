"""Cache the code ids of every codebook (and optionally some activations) over a data set, in memory or on disk.

Codes are stored in the smallest integer dtype that holds ids ``0 .. n_codes - 1`` *and* a "no code" value that no
real id can take (the -1 that `ablate_codes` / `replace_codes` write, or a non-finite activation): ``uint8`` for
``n_codes <= 255`` (no code = 255), ``uint16`` for ``n_codes <= 65535`` (no code = 65535; 2 bytes per code, the
budget of the analysis issue) and ``int32`` above (no code = -1); ``uint16`` is only stored, concatenated and
widened, which torch supports. `CodeCache.codes` gives int64 ids with -1 for no code, which every query and probe
skips. Token ids, document index and position are ``int32`` on disk; activations of extra hooks are ``float16``.
`CodeCache` accessors return codes, tokens, doc and pos as ``int64``.

On disk (``directory=...``) the cache is a cbinterp folder (see `cbinterp.core.manifest`) of kind
"cbinterp-code-cache": chunk files, each holding consecutive whole documents and written atomically, and the marker
``cbinterp.json``, rewritten atomically, which holds the metadata, the sha256 of every chunk, and the fingerprints
of the model's weights and of the documents cached, the whole covered by its own ``meta_sha256``
(`cbinterp.codecache.integrity`: edited metadata, chunk names leaving the folder, links and damaged chunks are
refused). Layout 2 (``"layout": 2`` in the marker, this version): ``chunk_d<first doc, 12 digits>.safetensors``
holds ``doc_lengths`` (int64, one per document: the document offsets), ``tokens``, ``codes/<codebook>``,
``act/<hook>`` and, in caches of older versions that took masks with holes, ``pos``; its safetensors header records
its documents, their fingerprint and the run's, so a finished chunk that the marker does not list yet (another
rank's, or a killed run's) is adopted by the next run of the same kind. Layout 1 (older caches:
``chunk_000000.safetensors`` with int32 ``doc`` and ``pos`` per token) is still read, but not resumed.

The marker lists the chunks that cover documents 0.. without a gap, so what opens is always a whole cache of the
first ``n_docs`` documents. An interrupted run keeps its finished chunks; running `cache_codes` again on the same
folder with the same model, weights, data, hooks on the model, codebook modes and settings
(`cbinterp.codecache.conditions`; any batch size, any number of ranks) skips the documents already cached (checking
that they are the same) and caches the rest; anything else is refused. Under `torch.distributed` the ranks write
disjoint chunks into the same folder and rank 0 alone writes the marker, once all are done.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import torch
from jaxtyping import Bool
from safetensors import safe_open
from safetensors.torch import save as save_tensors
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from cbinterp.codecache import conditions as cond
from cbinterp.codecache import integrity
from cbinterp.codecache._dist import barrier, broadcast_from_zero, gather_all, rank_and_world
from cbinterp.codecache.inputs import batches as _batches
from cbinterp.codecache.vocab import Vocabulary
from cbinterp.core import manifest as mf
from cbinterp.core.atomic import _pid_alive, atomic_file
from cbinterp.core.attach import get_codebooks, require_hooked_transformer
from cbinterp.core.codes import NO_CODE
from cbinterp.core.manifest import ResumeWarning
from cbinterp.core.naming import CODES_SUFFIX, codes_hook_name, did_you_mean
from cbinterp.core.tokenizer import load_tokenizer, write_tokenizer_files

FORMAT_NAME = mf.CODE_CACHE
FORMAT_VERSION = mf.VERSION
META_FILE = mf.MANIFEST_FILE
LEGACY_META_FILE = mf.LEGACY_CACHE_META
DEFAULT_CHUNK_TOKENS = 1 << 18
_CHUNK = re.compile(r"^chunk_\d{6}\.safetensors$")
_TEMP = re.compile(r"^\..+\.(\d+)-[0-9a-f]+\.tmp$")
#: The chunk layout this version writes (the marker's "layout"; absent means 1: per-token doc and pos).
LAYOUT = 2
_NEW_CHUNK = re.compile(r"^chunk_d\d{12}\.safetensors$")
_CHUNK_INFO = "cbinterp_chunk"  # the safetensors header key of a chunk's own description
_ENTRY_KEYS = ("first_doc", "n_docs", "n_tokens", "data_sha256", "seq_lens")

__all__ = ["CodeCache", "cache_codes", "cached_codes", "code_dtype", "no_code_value"]


def code_dtype(n_codes: int) -> torch.dtype:
    """The smallest dtype that stores code ids 0..n_codes-1 and a "no code" value none of them can take (uint8,
    uint16, then int32)."""
    if n_codes < 256:
        return torch.uint8
    if n_codes < 65536:
        return torch.uint16
    if n_codes <= 2**31 - 1:
        return torch.int32
    raise ValueError(f"n_codes={n_codes} is too large to cache.")


def no_code_value(dtype: torch.dtype) -> int:
    """How "no code" (-1) is stored in `dtype`: its largest value for the unsigned ones, -1 for int32."""
    return {torch.uint8: 255, torch.uint16: 65535}.get(dtype, NO_CODE)


def _stored_codes(codes: Tensor, dtype: torch.dtype) -> Tensor:
    """int32 code ids (-1 = no code) as stored in `dtype`."""
    if dtype == torch.int32:
        return codes.to(torch.int32)
    return codes.masked_fill(codes < 0, no_code_value(dtype)).to(dtype)


def _read_codes(raw: Tensor, n_codes: int) -> Tensor:
    """Stored codes back as int64 ids, -1 for no code (any stored value that is no code id)."""
    out = raw.long()
    return out.masked_fill_((out >= n_codes) | (out < 0), NO_CODE)


def _chain_docs(chain: str, batch: Tensor) -> str:
    """The running fingerprint of the documents cached so far, extended by the rows of `batch` (length and ids)."""
    rows = batch.detach().to("cpu", torch.int32).contiguous().numpy()
    length = int(rows.shape[1]).to_bytes(8, "little")
    for row in rows:
        chain = hashlib.sha256(chain.encode() + length + row.tobytes()).hexdigest()
    return chain


EMPTY_CHAIN = hashlib.sha256(b"cbinterp-docs").hexdigest()


def _model_meta(model: HookedTransformer, tokenizer_name: Optional[str] = None) -> dict:
    """What identifies a model for a cache: its codebooks, the basics of its config, and its tokenizer's name
    (`tokenizer_name` when given, for a tokenizer that lives outside the model)."""
    cfg = model.cfg
    tokenizer = getattr(model, "tokenizer", None)
    codebooks = {
        name: {
            "n_codes": cb.n_codes,
            "k": cb.k,
            "groups": cb.cfg.groups,
            "dim": cb.cfg.dim,
            "shape": [cb.cfg.groups, cb.k] if cb.grouped else [cb.k],
        }
        for name, cb in get_codebooks(model).items()
    }
    return {
        "codebooks": codebooks,
        "model": {
            "n_layers": cfg.n_layers,
            "d_model": cfg.d_model,
            "d_vocab": cfg.d_vocab,
            "model_name": getattr(cfg, "model_name", None),
            "tokenizer_name": tokenizer_name
            or getattr(cfg, "tokenizer_name", None)
            or (getattr(tokenizer, "name_or_path", None) if tokenizer is not None else None),
        },
    }


def _tokenizer_only(stored: dict, current: dict) -> Optional[str]:
    """The message when the model matches and only the recorded tokenizer name differs (e.g. one was forgotten)."""
    a, b = dict(stored.get("model") or {}), dict(current.get("model") or {})
    old, new = a.pop("tokenizer_name", None), b.pop("tokenizer_name", None)
    if a != b or stored.get("codebooks") != current.get("codebooks") or old == new:
        return None
    hint = f" pass tokenizer_name={old!r} if it is the same tokenizer," if old is not None else ""
    return (
        f"the model matches but the cache records the tokenizer {old!r} and this call {new!r}:{hint} or use the "
        "tokenizer the cache was made with"
    )


def _describe_mismatch(stored: dict, current: dict) -> str:
    diffs = []
    for key in ("codebooks", "model"):
        a, b = stored.get(key, {}), current.get(key, {})
        for field in sorted(set(a) | set(b)):
            if a.get(field) != b.get(field):
                diffs.append(f"{key}.{field}: cache has {a.get(field)!r}, model has {b.get(field)!r}")
    return "; ".join(diffs[:8]) + (" ..." if len(diffs) > 8 else "")


def _check_hooks(model: HookedTransformer, hooks: Sequence[str]) -> list[str]:
    hooks = [hooks] if isinstance(hooks, str) else list(hooks)
    for name in hooks:
        if name not in model.hook_dict:
            raise ValueError(
                f"Unknown hook name {name!r}{did_you_mean(name, model.hook_dict, n=5)} "
                "`model.hook_dict` lists every hook name."
            )
    if len(set(hooks)) != len(hooks):
        raise ValueError(f"A hook is listed twice in {hooks}.")
    return hooks


def _chunk_name(first_doc: int) -> str:
    return f"chunk_d{first_doc:012d}.safetensors"


def _run_fingerprint(meta: dict) -> str:
    """What a chunk's header records of the run that made it, beside the weights: model, hooks, conditions,
    settings (a chunk is adopted by a later run only when they are the same)."""
    keys = ("codebooks", "model", "weights_sha256", "hooks", "conditions", "activation_dtype", "token_strings")
    body = json.dumps({k: meta.get(k) for k in keys}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


def _combined_fingerprint(entries: Sequence[dict]) -> str:
    """The data fingerprint of a whole cache: its chunks' fingerprints, in document order."""
    digest = hashlib.sha256(b"cbinterp-chunks")
    for entry in entries:
        digest.update(entry["data_sha256"].encode())
    return digest.hexdigest()


class _Writer:
    """Collects one contiguous run of documents at a time and writes it as one chunk (directory mode), or keeps
    every piece (memory mode)."""

    def __init__(self, directory: Optional[Path], weights_sha256: str, run_sha256: Optional[str], on_chunk=None):
        self.directory, self.weights_sha256, self.on_chunk = directory, weights_sha256, on_chunk
        self.run_sha256 = run_sha256
        self.kept: list[dict[str, Tensor]] = []
        self._reset()

    def _reset(self) -> None:
        self.pieces: list[dict[str, Tensor]] = []
        self.first_doc: Optional[int] = None
        self.n_docs = self.n_tokens = 0
        self.chain = EMPTY_CHAIN
        self.seq_lens: set[int] = set()
        self.need_pos = False

    @property
    def end(self) -> Optional[int]:
        return None if self.first_doc is None else self.first_doc + self.n_docs

    def add(self, first: int, arrays: dict[str, Tensor], rows: Tensor, seq: int, need_pos: bool) -> None:
        """Buffer documents `first ..` (`rows` their cached ids, for the fingerprint); a gap starts a new chunk."""
        if self.directory is None:
            self.kept.append(arrays)
            return
        if self.first_doc is not None and first != self.end:
            self.flush()  # a chunk holds consecutive documents only: the ones between are cached already
        if self.first_doc is None:
            self.first_doc = first
        self.pieces.append(arrays)
        self.n_docs += rows.shape[0]
        self.n_tokens += int(arrays["doc_lengths"].sum())
        self.chain = _chain_docs(self.chain, rows)
        self.seq_lens.add(int(seq))
        self.need_pos |= need_pos

    def flush(self) -> None:
        if self.directory is None or self.first_doc is None:
            return
        merged = _concat(self.pieces)
        if not self.need_pos:  # every document's tokens are its positions 0, 1, ...: derived from doc_lengths
            merged.pop("pos", None)
        if self.n_tokens == 0:  # documents without tokens: only their (zero) lengths are stored
            merged = {"doc_lengths": merged["doc_lengths"]}
        info = {
            "first_doc": self.first_doc,
            "n_docs": self.n_docs,
            "n_tokens": self.n_tokens,
            "data_sha256": self.chain,
            "seq_lens": sorted(self.seq_lens),
        }
        name = _chunk_name(self.first_doc)
        with atomic_file(self.directory / name) as tmp:
            # serialised here and written to our own temporary: safetensors' save_file makes a temporary of its
            # own (".tmpXXXXXX") beside the target, which a killed writer would leave in the cache folder
            run = {"weights_sha256": self.weights_sha256, "run_sha256": self.run_sha256}
            header = {_CHUNK_INFO: json.dumps({**info, **run})}
            tmp.write_bytes(save_tensors({k: v.contiguous() for k, v in merged.items()}, metadata=header))
            entry = mf.file_entry(tmp)
        self._reset()
        if self.on_chunk is not None:
            self.on_chunk({"file": name, **info}, entry)


def _write_meta(directory: Path, meta: dict) -> None:
    with atomic_file(directory / META_FILE) as tmp:
        tmp.write_text(json.dumps(integrity.seal(meta), indent=2))


def _read_meta(directory: Path, check_files: bool = False) -> dict:
    """The cache's metadata (its marker), checked by the one verifier; a version-1 cache's meta.json otherwise."""
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
    meta = mf.verify_dir(directory, (mf.CODE_CACHE,), "code cache", check_files=False)
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
    if "run_sha256" in meta and meta["run_sha256"] != _run_fingerprint(meta):  # checked against every chunk's too
        raise ValueError(
            f"The metadata in {directory / META_FILE} was changed after cbinterp wrote it: the model, codebooks, "
            "hooks or conditions it records no longer give its run_sha256. Restore the marker, or delete the folder "
            "and run cache_codes again."
        )
    if check_files:  # presence, no link, size and sha256 of each, with an error naming the file and the fix
        for name in meta["files"]:
            integrity.check_member(directory, meta, name)
    return meta


def _chunk_info(file: Path) -> Optional[dict]:
    """What a chunk file of this layout says about itself (its header), or None if it is not one."""
    if file.is_symlink():  # never read through a link, not even to adopt it
        return None
    try:
        with safe_open(str(file), framework="pt") as f:
            info = json.loads((f.metadata() or {})[_CHUNK_INFO])
    except Exception:  # noqa: BLE001 - anything unreadable is not a chunk we can adopt
        return None
    keys = ("first_doc", "n_docs", "n_tokens", "data_sha256", "seq_lens", "weights_sha256")
    if not isinstance(info, dict) or any(k not in info for k in keys) or file.name != _chunk_name(info["first_doc"]):
        return None
    return info


def _pending_chunks(path: Path, meta: dict) -> dict[str, dict]:
    """Finished chunks in the folder that the marker does not list yet (written by other ranks, or by a run that
    was killed), of this cache's weights, not overlapping the listed ones or each other: name -> chunk entry."""
    listed = {c["file"] for c in meta["chunks"]}
    taken = [(c["first_doc"], c["first_doc"] + c["n_docs"]) for c in meta["chunks"]]
    out = {}
    for file in sorted(path.iterdir()):
        if not _NEW_CHUNK.match(file.name) or file.name in listed:
            continue
        info = _chunk_info(file)
        if info is None or info["weights_sha256"] != meta.get("weights_sha256"):
            continue
        if info.get("run_sha256") is None or info.get("run_sha256") != meta.get("run_sha256"):
            continue  # made under other conditions (hooks, observed codebooks, settings), or by an older cbinterp
        start, end = info["first_doc"], info["first_doc"] + info["n_docs"]
        if any(start < b and a < end for a, b in taken):
            continue
        taken.append((start, end))
        out[file.name] = {"file": file.name, **{k: info[k] for k in _ENTRY_KEYS}}
    return out


def _relist(path: Path, meta: dict, known: dict[str, dict], file_entries: dict[str, dict]) -> None:
    """Write the marker listing the chunks that cover documents 0.. without a gap (atomically): the cache that
    opens is always whole; chunks after a gap wait, unlisted, for the run that fills it."""
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
    meta["data_sha256"] = _combined_fingerprint(listed)
    meta["seq_lens"] = sorted({s for e in listed for s in e["seq_lens"]})
    _write_meta(path, meta)


def _clean_debris(path: Path, meta: dict, keep: Iterable[str] = ()) -> None:
    """Remove what killed writers left in the cache folder: their temporaries, and chunks neither the marker lists
    nor `keep` (finished chunks to adopt)."""
    listed = set(meta.get("files", {})) | set(keep)
    for entry in path.iterdir():
        m = _TEMP.match(entry.name)
        chunk = _CHUNK.match(entry.name) or _NEW_CHUNK.match(entry.name)
        if (m and not _pid_alive(int(m.group(1)))) or (chunk and entry.name not in listed):
            entry.unlink(missing_ok=True)


def _open_for_writing(path: Path, meta: dict, identity: dict, hooks: list[str]) -> dict:
    """The metadata to continue from at `path` (a new cache's when nothing is there); refuses anything else."""
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"Refusing to write a code cache to {path}: a file is there, not a folder.")
    if path.is_dir() and not (path / META_FILE).exists():
        if (path / LEGACY_META_FILE).exists():
            raise ValueError(
                f"The code cache at {path} was written by an older cbinterp, without fingerprints of the weights and "
                "data, so it cannot be resumed safely. Read it with CodeCache.open, or delete it to cache again."
            )
        others = sorted(p.name for p in path.iterdir() if not _TEMP.match(p.name))
        if others:
            raise FileExistsError(
                f"Refusing to write a code cache to {path}: the folder holds other files ({others[:5]}) and is not a "
                f"code cache ({META_FILE} is missing). Use another directory, or empty it yourself."
            )
    if not (path / META_FILE).exists():
        path.mkdir(parents=True, exist_ok=True)
        _clean_debris(path, meta)
        _write_meta(path, meta)
        return meta
    try:
        old = _read_meta(path, check_files=True)
    except (OSError, ValueError) as err:
        raise ValueError(f"Cannot resume the code cache at {path}: {err}") from err
    if old.get("layout", 1) < LAYOUT and old["chunks"]:
        raise ValueError(
            f"The code cache at {path} has the older layout {old.get('layout', 1)} (two int32 coordinates per "
            f"token); this cbinterp writes layout {LAYOUT} (one offset per document) and does not append to it. "
            "Read it with CodeCache.open, or delete it (or use another directory) and run cache_codes again."
        )
    if {k: old.get(k) for k in identity} != identity:
        tokenizer_only = _tokenizer_only(old, identity)
        if tokenizer_only:
            raise ValueError(f"Cannot resume the code cache at {path}: {tokenizer_only}.")
        raise ValueError(
            f"The cache at {path} was made with a different model: {_describe_mismatch(old, identity)}. "
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
    _clean_debris(path, old, keep=_pending_chunks(path, old))
    return old


def _checked_strings(token_strings: Sequence[str], d_vocab: int) -> list[str]:
    strings = list(token_strings)
    if isinstance(token_strings, str) or not all(isinstance(t, str) for t in strings):
        raise TypeError("token_strings must be a sequence of str, one per token id.")
    if len(strings) < d_vocab:
        raise ValueError(f"token_strings has {len(strings)} entries but the model has d_vocab={d_vocab} token ids.")
    return strings


def _store_tokenizer(path: Path, meta: dict, tokenizer) -> None:
    """Keep the tokenizer's files in the cache folder, listed and checksummed like every other file."""
    names = write_tokenizer_files(tokenizer, path)
    meta["tokenizer_files"] = names
    for name in names:
        meta["files"][name] = mf.file_entry(path / name)
    _write_meta(path, meta)


@torch.no_grad()
def cache_codes(
    model: HookedTransformer,
    tokens_or_iterable: Union[Tensor, Iterable[Tensor]],
    batch_size: int = 32,
    hooks: Sequence[str] = (),
    directory: Optional[Union[str, os.PathLike]] = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    progress: bool = True,
    tokenizer_name: Optional[str] = None,
    mask: Optional[Tensor] = None,
    token_strings: Optional[Sequence[str]] = None,
    activation_dtype: torch.dtype = torch.float16,
) -> "CodeCache":
    """Run `model` over documents and record every codebook's code ids for every token.

    Args:
        tokens_or_iterable: a `(n_docs, seq)` int tensor of token ids, or an iterable of such batches (or of
            single documents of any length: tensors or lists of ids).
        batch_size: documents per forward pass.
        hooks: hook names whose activations are stored too (as `activation_dtype`), e.g. "blocks.0.mlp.hook_post".
        directory: stream to this folder in chunk files (resuming a previous, interrupted run there);
            None keeps everything in memory.
        chunk_tokens: tokens per chunk file (at least; chunks hold whole batches). Bounds memory on disk mode.
        progress: show a tqdm progress bar (rank 0 only under torch.distributed).
        tokenizer_name: recorded with the model's metadata when the tokenizer is not the model's own
            (`model.tokenizer`), so that a cache resumed or checked with another tokenizer is refused.
        mask: bool `(n_docs, seq)` beside a token tensor, False on padding (e.g. `tokenize_documents(...).mask`);
            for an iterable, give `(tokens, mask)` pairs. Padding must come after a row's real tokens (each row's
            True positions a prefix; left padding and holes are refused, see `cbinterp.codecache.inputs`); it is run
            as token 0 (after the real tokens of a causal model, it changes nothing of theirs), may hold any id, and
            is not cached. Without a mask every id must lie in [0, d_vocab).
        token_strings: one string per token id, kept in the cache as its text, for models without a tokenizer
            (e.g. the FSM's digits). Otherwise the model's tokenizer is kept (its files, on disk), so queries,
            probes and views read the cache's text without being told how.
        activation_dtype: dtype of the stored hook activations (float16 by default; float32 where thresholds on
            them must not tie, e.g. neuron baselines).

    Under `torch.distributed` (e.g. `torchrun`; any initialised process group) every rank passes the same input
    and the same `directory`: the batches are taken in blocks of about `chunk_tokens` tokens, block `i` cached by
    rank `i % world_size` as its own chunk files, and rank 0 lists them in the marker once every rank is done. The
    cache is the one a single process makes (same batches, same codes, same order). A resumed cache may use another
    world size.

    Returns a `CodeCache`. Documents are numbered in input order from 0; `doc`/`pos` give each token's place.
    """
    require_hooked_transformer(model)
    hooks = _check_hooks(model, hooks)
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}.")
    codebooks = get_codebooks(model)
    if not codebooks:
        raise ValueError("The model has no codebooks; attach some with attach_codebooks(model, ...) first.")
    rank, world = rank_and_world()
    if world > 1 and directory is None:
        raise ValueError(
            f"cache_codes runs under torch.distributed ({world} ranks) and needs directory=...: the ranks write "
            "their shares into one cache folder. Pass a directory (the same on every rank), or cache in one process."
        )
    cond.check_runnable(model)
    if not isinstance(activation_dtype, torch.dtype) or not activation_dtype.is_floating_point:
        raise ValueError(
            f"activation_dtype must be a floating torch dtype (e.g. torch.float32), got {activation_dtype!r}."
        )
    # token ids and masks are checked here, a tensor's whole before anything is written; an iterable's per batch
    causal = getattr(model.cfg, "attention_dir", "causal") != "bidirectional"
    batches, total = _batches(tokens_or_iterable, batch_size, mask, model.cfg.d_vocab, causal)
    identity = _model_meta(model, tokenizer_name)
    meta = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "layout": LAYOUT,
        **identity,
        "weights_sha256": mf.weights_fingerprint(model),
        "hooks": hooks,
        "n_tokens": 0,
        "n_docs": 0,
        "chunks": [],
        "files": {},
        "data_sha256": _combined_fingerprint([]),
        "seq_lens": [],
        "conditions": cond.run_conditions(model),
        "activation_dtype": str(activation_dtype).removeprefix("torch."),
    }
    tokenizer = getattr(model, "tokenizer", None) if token_strings is None else None
    if token_strings is not None:
        meta["token_strings"] = _checked_strings(token_strings, model.cfg.d_vocab)
    meta["run_sha256"] = _run_fingerprint(meta)
    path = None
    known: dict[str, dict] = {}  # chunk name -> entry: listed, adoptable and (rank 0, one process) new ones
    file_entries: dict[str, dict] = {}
    if directory is not None:
        path = Path(directory)
        failure = None
        if rank == 0:
            try:
                meta = _open_for_writing(path, meta, identity, hooks)
                if tokenizer is not None and not meta.get("tokenizer_files"):
                    _store_tokenizer(path, meta, tokenizer)
            except (OSError, ValueError) as err:
                failure = (type(err).__name__, str(err))
                if world == 1:
                    raise
        if world > 1:  # the others wait here until rank 0 has checked (and maybe cleaned) the folder
            failure = broadcast_from_zero(failure)
            if failure is not None:
                kind, message = failure
                raise (FileExistsError if kind == "FileExistsError" else ValueError)(message)
            if rank != 0:
                meta = _read_meta(path)
        file_entries = dict(meta["files"])
        known = {c["file"]: c for c in meta["chunks"]}
        known.update(_pending_chunks(path, meta))
        if world > 1:  # every rank has seen the folder as it was before anyone writes a chunk into it
            barrier()

    covered = sorted(known.values(), key=lambda e: e["first_doc"])
    resumed = bool(covered)
    already = sum(e["n_docs"] for e in covered)
    code_names = [codes_hook_name(name) for name in codebooks]
    wanted = set(code_names) | set(hooks)
    dtypes = {name: code_dtype(cb.n_codes) for name, cb in codebooks.items()}
    device = model.cfg.device
    n_ctx = model.cfg.n_ctx

    def chunk_done(entry: dict, file_entry: dict) -> None:
        known[entry["file"]] = entry
        file_entries[entry["file"]] = file_entry
        if world == 1:  # one process: the marker follows every chunk, so an interrupted run keeps its prefix
            _relist(path, meta, known, file_entries)

    writer = _Writer(path, meta["weights_sha256"], meta.get("run_sha256"), on_chunk=chunk_done)
    doc_index = 0  # documents seen so far in the input (including skipped ones)
    seen_tokens = 0
    block, block_tokens = 0, 0  # blocks of ~chunk_tokens cached tokens, block i cached by rank i % world
    checking: dict[str, str] = {}  # covered chunk -> fingerprint of this input's documents seen in it so far
    seen_lens: dict[str, set] = {}
    bar = tqdm(total=total, disable=not progress or rank != 0, unit="doc", desc="caching codes")
    pending = None  # the last piece's host arrays, whose device-to-host copies may still be running
    reported = False  # whether this rank has told the others how it ended (exactly once)

    def check_covered(entry: dict, rows: Tensor, end: int, seq: int) -> None:
        name = entry["file"]
        checking[name] = _chain_docs(checking.get(name, EMPTY_CHAIN), rows)
        seen_lens.setdefault(name, set()).add(int(seq))
        if end == entry["first_doc"] + entry["n_docs"] and checking[name] != entry["data_sha256"]:
            raise ValueError(
                f"Cannot resume the code cache at {path}: documents {entry['first_doc']}..{end - 1} of this input "
                f"differ from those cached there (other data, or another sequence length: cached lengths "
                f"{entry['seq_lens']}, these {sorted(seen_lens[name])}). Resuming would mix two data sets; use "
                "another directory, or delete this one to start over."
            )

    def land(arrays, first, rows, seq, need_pos, event, keep) -> None:
        if event is not None:
            event.synchronize()
        if keep is not None:  # only now: on CUDA the host copies are complete after the event
            flat = keep.reshape(-1).cpu()
            arrays = {key: (value if key == "doc_lengths" else value[flat]) for key, value in arrays.items()}
        for key in [k for k in arrays if k.startswith("codes/")]:
            arrays[key] = _stored_codes(arrays[key], dtypes[key.removeprefix("codes/")])
        writer.add(first, arrays, rows, seq, need_pos)

    def run_piece(batch: Tensor, keep: Optional[Tensor], first: int) -> None:
        nonlocal pending
        n, seq = batch.shape
        lengths = torch.full((n,), seq, dtype=torch.int64) if keep is None else keep.sum(1).to(torch.int64)
        need_pos = keep is not None and bool((keep != (torch.arange(seq) < lengths[:, None])).any())
        arrays = {"doc_lengths": lengths, "pos": torch.arange(seq, dtype=torch.int32).expand(n, seq).reshape(-1)}
        event = None
        if seq > 0:
            run = batch if keep is None else batch.clamp_min(0)  # padding is run as token 0 and then dropped
            _, cache = model.run_with_cache(run.to(device), names_filter=lambda name: name in wanted)
            arrays["tokens"] = batch.reshape(-1).to(torch.int32).cpu()
            # Codes cross to the host as int32 (every device casts to it) and shrink there; on CUDA the copies
            # run asynchronously and are collected after the next batch has been queued.
            for name in codebooks:
                codes = cache[codes_hook_name(name)]
                arrays[f"codes/{name}"] = _to_host(codes.reshape(n * seq, *codes.shape[2:]).to(torch.int32))
            for hook in hooks:
                act = cache[hook]
                arrays[f"act/{hook}"] = _to_host(act.reshape(n * seq, *act.shape[2:]).to(activation_dtype))
            del cache
            if torch.device(device).type == "cuda":
                event = torch.cuda.Event()
                event.record()
        previous, pending = pending, None  # cleared first: a failed landing must not be retried after a gap
        if previous is not None:
            land(*previous)
        pending = (arrays, first, batch, seq, need_pos, event, keep)

    def report(status) -> list:
        nonlocal reported
        reported = True
        try:
            return gather_all(status)
        except RuntimeError as err:
            raise RuntimeError(
                f"cache_codes on rank {rank}: another rank stopped before finishing its share ({err}). The cache at "
                f"{path} still lists only what was complete before this run; the finished chunks are kept. Fix what "
                "stopped it and run cache_codes again: it resumes (with any number of ranks)."
            ) from err

    try:
        for batch, keep in batches:
            if keep is not None:  # the fingerprint covers what is cached: padding reads as -1 whatever its id
                batch = batch.masked_fill(~keep.to(batch.device), -1)
            n, seq = batch.shape
            if seq > n_ctx:
                raise ValueError(
                    f"Documents of {seq} tokens are longer than the model's context n_ctx={n_ctx} (documents "
                    f"{doc_index}..{doc_index + n - 1}). Cut them to at most {n_ctx} tokens."
                )
            seen_tokens += n * seq
            first = doc_index
            doc_index += n
            block_tokens += n * seq if keep is None else int(keep.sum())
            end_block = block_tokens >= chunk_tokens
            mine = block % world == rank
            # Split the batch where cached chunks begin and end: cached documents are checked, the rest cached.
            start = first
            while start < doc_index:
                while covered and covered[0]["first_doc"] + covered[0]["n_docs"] <= start:
                    covered.pop(0)
                entry = covered[0] if covered and covered[0]["first_doc"] <= start else None
                if entry is not None:
                    stop = min(doc_index, entry["first_doc"] + entry["n_docs"])
                    check_covered(entry, batch[start - first : stop - first], stop, seq)
                else:
                    stop = min(doc_index, covered[0]["first_doc"]) if covered else doc_index
                    if mine:
                        part = slice(start - first, stop - first)
                        run_piece(batch[part], None if keep is None else keep[part], start)
                start = stop
            if end_block:
                if mine:  # the block's chunk ends here (its last batch landed first, so one overlap is lost)
                    previous, pending = pending, None
                    if previous is not None:
                        land(*previous)
                    writer.flush()
                block, block_tokens = block + 1, 0
            bar.update(n)
        previous, pending = pending, None
        if previous is not None:
            land(*previous)
        if covered and covered[0]["first_doc"] + covered[0]["n_docs"] > doc_index:
            raise ValueError(
                f"Cannot resume the code cache at {path}: this input has {doc_index} documents, fewer than the "
                f"{covered[-1]['first_doc'] + covered[-1]['n_docs']} already cached there (other data). Use another "
                "directory, or delete this one to start over."
            )
        if seen_tokens == 0:
            raise ValueError("cache_codes got no tokens: the input is empty (no documents, or documents of length 0).")
        writer.flush()
        if world > 1:
            failures = [(r, s) for r, s in enumerate(report(None)) if s is not None]
            if failures:
                r, message = failures[0]
                raise RuntimeError(
                    f"cache_codes: rank {r} failed ({message}). The cache at {path} still lists only what was complete "
                    "before this run; the finished chunks are kept. Fix it and run cache_codes again: it resumes."
                )
    except BaseException as err:
        if pending is not None:  # an interruption keeps the last finished batch, as without the deferred copy
            previous, pending = pending, None
            land(*previous)
        if world > 1 and not reported:
            with contextlib.suppress(RuntimeError):  # tell the others, so that they stop too instead of waiting
                report(f"{type(err).__name__}: {err}")
        raise
    finally:
        bar.close()
    if path is not None and rank == 0:  # every rank is done: rank 0 lists every chunk (the others' too) at once
        known.update(_pending_chunks(path, {**meta, "chunks": list(known.values())}))
        _relist(path, meta, known, file_entries)
    if world > 1:  # then everyone opens the same cache
        barrier()
        meta = _read_meta(path)
    if resumed and path is not None and rank == 0:
        warnings.warn(
            f"Resumed the code cache at {path}: {already} documents were already cached (checked to be the same "
            "documents, made by the same model, weights, hooks and codebook modes), "
            f"{meta['n_docs'] - already} added.",
            ResumeWarning,
            stacklevel=3,
        )
    if path is not None:
        return CodeCache.open(path)
    parts = _concat(writer.kept)
    if not any(_needs_pos(p) for p in writer.kept):
        parts.pop("pos", None)
    meta.update(n_docs=doc_index, n_tokens=int(parts["doc_lengths"].sum()), layout=LAYOUT)
    return CodeCache(meta, arrays=parts, tokenizer=tokenizer)


def _needs_pos(piece: dict[str, Tensor]) -> bool:
    """Whether a piece's positions are not just 0, 1, ... in each document (a mask with holes or left padding)."""
    if "pos" not in piece:
        return False
    lengths = piece["doc_lengths"]
    starts = torch.cumsum(lengths, 0) - lengths
    expected = torch.arange(int(lengths.sum())) - torch.repeat_interleave(starts, lengths)
    return not torch.equal(piece["pos"].long(), expected)


def _to_host(t: Tensor) -> Tensor:
    """`t` on the CPU; from CUDA through pinned memory without waiting (synchronise before reading it)."""
    if t.device.type != "cuda":
        return t.cpu()
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t, non_blocking=True)
    return out


def _concat(parts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Key-wise concatenation of pieces (a key some pieces lack, e.g. tokens of empty documents, joins the rest)."""
    keys = list(dict.fromkeys(key for p in parts for key in p))
    return {key: torch.cat([p[key] for p in parts if key in p]) for key in keys}


class _Part:
    """One chunk of a cache (or the whole of an in-memory one): documents `first_doc ..` and their arrays."""

    def __init__(self, first_doc: int, n_docs: int, n_tokens: int, keys: Optional[set] = None, file=None, arrays=None):
        self.first_doc, self.n_docs, self.n_tokens = first_doc, n_docs, n_tokens
        self.file, self.arrays, self._keys = file, arrays, keys
        self.opener = None  # set by CodeCache: opens the file once it is checked

    @property
    def keys(self) -> set:
        if self._keys is None:
            with self.opener(self) as f:
                self._keys = set(f.keys())
        return self._keys


class CodeCache:
    """Code ids (and optional activations) of every token of a data set, with the token ids and their places.

    Made by `cache_codes`, or reopened from disk with `CodeCache.open(directory)` (no model needed). On disk,
    nothing is read until asked for, and then only the arrays asked for (each chunk's sha256 checked the first time
    it is read), kept in their stored dtypes; `doc` and `pos` are derived from one offset per document.
    """

    def __init__(
        self,
        meta: dict,
        arrays: Optional[dict[str, Tensor]] = None,
        directory: Optional[Path] = None,
        tokenizer=None,
    ):
        self.meta = meta
        self.directory = directory
        self._arrays = arrays
        self._tokenizer = tokenizer
        self._vocabulary: Optional[Vocabulary] = None
        self._part_list: Optional[list[_Part]] = None
        self._memo: dict[str, Tensor] = {}
        self._verified: set[str] = set()
        self._offsets: Optional[Tensor] = None

    # -- text ----------------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        """The tokenizer the cache was made with (kept from the model), or None."""
        if self._tokenizer is None and self.meta.get("tokenizer_files") and self.directory is not None:
            for name in self.meta["tokenizer_files"]:
                integrity.check_member(self.directory, self.meta, name)
            self._tokenizer = load_tokenizer(self.directory)
        return self._tokenizer

    @property
    def vocabulary(self) -> Optional[Vocabulary]:
        """How the cached token ids read as text (from the tokenizer or the stored token strings), or None."""
        if self._vocabulary is None:
            if self.tokenizer is not None:
                self._vocabulary = Vocabulary(self.tokenizer)
            elif self.meta.get("token_strings"):
                self._vocabulary = Vocabulary(self.meta["token_strings"])
        return self._vocabulary

    @classmethod
    def open(cls, directory: Union[str, os.PathLike]) -> "CodeCache":
        """The cache in `directory`: reads its marker only; arrays are read when first asked for."""
        path = Path(directory)
        return cls(_read_meta(path), directory=path)

    # -- loading -------------------------------------------------------------------------------------------
    def _parts(self) -> list[_Part]:
        if self._part_list is None:
            if self._arrays is not None:
                n_tokens = int(self._arrays["tokens"].shape[0]) if "tokens" in self._arrays else 0
                n_docs = int(self.meta.get("n_docs", 0))
                self._part_list = [_Part(0, n_docs, n_tokens, keys=set(self._arrays), arrays=self._arrays)]
            else:
                parts, first = [], 0
                for chunk in self.meta["chunks"]:  # checked on open: in document order, names inside the folder
                    first = chunk.get("first_doc", first)  # layout 1 chunks follow each other in listed order
                    part = _Part(first, chunk["n_docs"], chunk["n_tokens"], file=self.directory / chunk["file"])
                    part.opener = self._open_part
                    parts.append(part)
                    first += chunk["n_docs"]
                self._part_list = parts
        return self._part_list

    def _open_part(self, part: _Part):
        """The chunk file of `part`, opened; checked first (the first time): a file of the folder, no link, its
        recorded size and sha256, and a header that agrees with the marker."""
        name = part.file.name
        if name not in self._verified:
            integrity.check_member(self.directory, self.meta, name)
            header = _chunk_info(part.file) if self.meta.get("layout", 1) >= 2 else None
            entry = {"first_doc": part.first_doc, "n_docs": part.n_docs, "n_tokens": part.n_tokens}
            integrity.check_header(self.directory, name, entry, header, self.meta)
            self._verified.add(name)
        return integrity.open_chunk(part.file)

    def _read(self, part: _Part, key: str) -> Tensor:
        """One array of one part, as stored."""
        if part.arrays is not None:
            return part.arrays[key]
        with self._open_part(part) as f:
            return f.get_tensor(key)

    def _raw(self, key: str) -> Tensor:
        """`key` ("tokens", "codes/<name>", "act/<hook>") over the whole cache, in its stored dtype (kept)."""
        if key not in self._memo:
            if self.n_tokens == 0:
                raise ValueError("This cache holds no tokens yet.")
            parts = [p for p in self._parts() if p.n_tokens > 0]
            if any(key not in p.keys for p in parts):
                raise KeyError(key)
            tensors = [self._read(p, key) for p in parts]
            self._memo[key] = tensors[0] if len(tensors) == 1 else torch.cat(tensors)
        return self._memo[key]

    def _get(self, key: str) -> Tensor:
        """An array as stored (`doc` and `pos` as int32, derived when the layout stores offsets)."""
        if key in ("doc", "pos"):
            return getattr(self, key).to(torch.int32)
        return self._raw(key)

    def _part_lengths(self, part: _Part) -> Optional[Tensor]:
        if "doc_lengths" not in part.keys:
            return None
        lengths = self._read(part, "doc_lengths").long()
        if lengths.shape != (part.n_docs,) or int(lengths.sum()) != part.n_tokens:
            raise ValueError(
                f"The chunk {part.file} holds {lengths.numel()} documents of {int(lengths.sum())} tokens, but the "
                f"marker lists it with {part.n_docs} documents of {part.n_tokens} tokens. Restore the cache, or delete "
                "the folder and run cache_codes again."
            )
        return lengths

    @property
    def doc_offsets(self) -> Optional[Tensor]:
        """Int64 `(n_docs + 1,)`: document `d`'s tokens are the flat indices `doc_offsets[d]:doc_offsets[d + 1]`,
        in position order; None for a cache that stores coordinates per token (older layout, `subset_cache`)."""
        if self._offsets is None:
            parts = self._parts()
            if not all("doc_lengths" in p.keys for p in parts if p.n_tokens > 0 or p.arrays is not None):
                return None
            lengths = torch.zeros(self.n_docs, dtype=torch.int64)
            for p in parts:
                if "doc_lengths" in p.keys:
                    lengths[p.first_doc : p.first_doc + p.n_docs] = self._part_lengths(p)
            self._offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths, 0)])
        return self._offsets

    # -- metadata ------------------------------------------------------------------------------------------
    @property
    def codebook_names(self) -> list[str]:
        return list(self.meta["codebooks"])

    @property
    def hook_names(self) -> list[str]:
        return list(self.meta["hooks"])

    def n_codes(self, name: str) -> int:
        return self._codebook(name)["n_codes"]

    @property
    def n_tokens(self) -> int:
        return (
            int(self.meta["n_tokens"])
            if self._arrays is None
            else int(self._arrays.get("tokens", torch.zeros(0)).shape[0])
        )

    @property
    def n_docs(self) -> int:
        return int(self.meta["n_docs"])

    def _codebook(self, name: str) -> dict:
        if name not in self.meta["codebooks"]:
            raise KeyError(
                f"No codebook {name!r} in this cache{did_you_mean(name, self.codebook_names)} "
                f"It has {self.codebook_names}."
            )
        return self.meta["codebooks"][name]

    def bytes_per_token(self, name: str) -> int:
        """Bytes the codes of codebook `name` take per token on disk (k ids, per head for attention)."""
        info = self._codebook(name)
        count = 1
        for size in info["shape"]:
            count *= size
        return count * torch.empty(0, dtype=self.storage_dtype(name)).element_size()

    def storage_dtype(self, name: str) -> torch.dtype:
        if self._arrays is not None and f"codes/{name}" in self._arrays:
            return self._arrays[f"codes/{name}"].dtype
        return code_dtype(self._codebook(name)["n_codes"])

    # -- arrays --------------------------------------------------------------------------------------------
    def codes(self, name: str) -> Tensor:
        """Code ids of codebook `name`: int64 `(n_tokens, k)`, or `(n_tokens, heads, k)` for per-head codebooks."""
        info = self._codebook(name)
        return _read_codes(self._raw(f"codes/{name}"), info["n_codes"])

    def stored_codes(self, name: str) -> Tensor:
        """Code ids of codebook `name` as stored (`storage_dtype`; any value >= n_codes, or < 0, is no code): what
        a query compares against without widening every id to int64."""
        self._codebook(name)
        return self._raw(f"codes/{name}")

    def stored_tokens(self) -> Tensor:
        """Token ids as stored (int32)."""
        return self._raw("tokens")

    @property
    def tokens(self) -> Tensor:
        return self._raw("tokens").long()

    @property
    def doc(self) -> Tensor:
        """Int64 `(n_tokens,)`: each token's document."""
        offsets = self.doc_offsets
        if offsets is not None:
            return torch.repeat_interleave(torch.arange(self.n_docs), offsets.diff())
        return self._raw("doc").long()

    @property
    def pos(self) -> Tensor:
        """Int64 `(n_tokens,)`: each token's place in its document's row."""
        if self.doc_offsets is None:
            return self._raw("pos").long()
        out = []
        for p in self._parts():
            if p.n_tokens == 0:
                continue
            if "pos" in p.keys:  # stored where positions are not 0, 1, ... (masks with holes)
                out.append(self._read(p, "pos").long())
            else:
                lengths = self._part_lengths(p)
                starts = torch.cumsum(lengths, 0) - lengths
                out.append(torch.arange(p.n_tokens) - torch.repeat_interleave(starts, lengths))
        if not out:
            raise ValueError("This cache holds no tokens yet.")
        return torch.cat(out)

    def doc_pos(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """Int64 (doc, pos) of the tokens at flat `index`, without building them for every token when the layout
        stores offsets (and no chunk stores positions)."""
        index = torch.as_tensor(index, dtype=torch.int64).reshape(-1)
        offsets = self.doc_offsets
        if offsets is None or any("pos" in p.keys for p in self._parts() if p.n_tokens > 0):
            return self.doc[index], self.pos[index]
        doc = torch.searchsorted(offsets, index, right=True) - 1
        return doc, index - offsets[doc]

    def activations(self, hook_name: str) -> Tensor:
        """Stored activations of `hook_name`, `(n_tokens, ...)` (float16 unless cached with another dtype)."""
        if hook_name not in self.meta["hooks"]:
            raise KeyError(f"Hook {hook_name!r} was not cached; this cache has activations of {self.hook_names}.")
        return self._raw(f"act/{hook_name}")

    def check_model(self, model: HookedTransformer, tokenizer_name: Optional[str] = None, weights: bool = True) -> None:
        """Raise ValueError if `model` (and `tokenizer_name`, as given to `cache_codes`) is not what this cache was
        made with: codebooks, n_codes, vocabulary, size, tokenizer, and (with `weights`, when the cache recorded
        them) the weights themselves."""
        current = _model_meta(require_hooked_transformer(model), tokenizer_name)
        stored = {k: self.meta.get(k) for k in current}
        if stored != current:
            tokenizer_only = _tokenizer_only(stored, current)
            if tokenizer_only:
                raise ValueError(f"This cache does not match: {tokenizer_only}.")
            raise ValueError(f"This cache was made with a different model: {_describe_mismatch(stored, current)}.")
        recorded = self.meta.get("weights_sha256")
        if weights and recorded is not None and recorded != mf.weights_fingerprint(model):
            raise ValueError("This cache was made with a different model: other weights (fingerprints differ).")

    def __repr__(self) -> str:
        where = f", directory={str(self.directory)!r}" if self.directory else ""
        return (
            f"CodeCache(n_tokens={self.n_tokens}, n_docs={self.n_docs}, codebooks={self.codebook_names}, "
            f"hooks={self.hook_names}{where})"
        )


def cached_codes(cache, mask: Optional[Bool[Tensor, "batch pos"]] = None) -> dict[str, Tensor]:
    """The code ids of every codebook in an `ActivationCache` (or any name -> tensor mapping), positions flattened.

    Returns `{codebook name: codes}` keyed by the codebook's hook name (".hook_codes" removed, as in
    `get_codebooks`), each `(n_positions, k)` or `(n_positions, n_heads, k)`. `mask (batch, pos)` keeps only the
    positions where it is True (e.g. to drop BOS or padding); without it all `batch * pos` positions are kept.
    """
    out = {}
    for name in list(cache.keys()):
        if not name.endswith(CODES_SUFFIX):
            continue
        codes = cache[name]
        if mask is not None:
            if mask.dtype != torch.bool or tuple(mask.shape) != tuple(codes.shape[:2]):
                raise ValueError(
                    f"mask must be a bool tensor of shape (batch, pos) = {tuple(codes.shape[:2])}, "
                    f"got {mask.dtype} {tuple(mask.shape)}."
                )
            out[name.removesuffix(CODES_SUFFIX)] = codes[mask.to(codes.device)]
        else:
            out[name.removesuffix(CODES_SUFFIX)] = codes.flatten(0, 1)
    if not out:
        raise ValueError(
            "The cache holds no '*.hook_codes' activations; run_with_cache a model with codebooks attached."
        )
    return out
