"""How a code cache is stored: the dtypes of code ids, the chunk files and their headers, the data fingerprints.

Codes are stored in the smallest integer dtype that holds ids ``0 .. n_codes - 1`` *and* a "no code" value that no
real id can take (the -1 that `ablate_codes` / `replace_codes` write, or a non-finite activation): ``uint8`` for
``n_codes <= 255`` (no code = 255), ``uint16`` for ``n_codes <= 65535`` (no code = 65535; 2 bytes per code) and
``int32`` above (no code = -1); ``uint16`` is only stored, concatenated and widened, which torch supports.
`CodeCache.codes` gives int64 ids with -1 for no code, which every query and probe skips. Token ids, document
index and position are ``int32`` on disk; activations of extra hooks are ``float16``. `CodeCache` accessors return
codes, tokens, doc and pos as ``int64``.

On disk (``directory=...``) the cache is a cbinterp folder (see `cbinterp.core.storage.manifest`) of kind
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
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from jaxtyping import Int, Integer
from safetensors import safe_open
from torch import Tensor

from cbinterp.core.codebooks.codes import NO_CODE
from cbinterp.core.storage import manifest as mf

__all__ = [
    "CHUNK",
    "DEFAULT_CHUNK_TOKENS",
    "EMPTY_CHAIN",
    "LAYOUT",
    "chain_docs",
    "chunk_info",
    "chunk_name",
    "code_dtype",
    "combined_fingerprint",
    "no_code_value",
    "read_codes",
    "stored_codes",
]

FORMAT_NAME = mf.CODE_CACHE
FORMAT_VERSION = mf.VERSION
META_FILE = mf.MANIFEST_FILE
LEGACY_META_FILE = mf.LEGACY_CACHE_META
DEFAULT_CHUNK_TOKENS = 1 << 18
#: The chunk layout this version writes (the marker's "layout"; absent means 1: per-token doc and pos).
LAYOUT = 2
LAYOUT1_CHUNK = re.compile(r"^chunk_\d{6}\.safetensors$")
CHUNK = re.compile(r"^chunk_d\d{12}\.safetensors$")
#: A temporary of `atomic_file`, with the pid of the process that writes it.
TEMPORARY = re.compile(r"^\..+\.(\d+)-[0-9a-f]+\.tmp$")
#: The safetensors header key of a chunk's own description.
CHUNK_INFO_KEY = "cbinterp_chunk"
#: What the marker lists of each chunk (besides its file name).
ENTRY_KEYS = ("first_doc", "n_docs", "n_tokens", "data_sha256", "seq_lens")


def code_dtype(n_codes: int) -> torch.dtype:
    """The smallest dtype that stores code ids 0..n_codes-1 and a "no code" value none of them can take.

    That is uint8, uint16, then int32."""
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


def stored_codes(codes: Int[Tensor, "n ..."], dtype: torch.dtype) -> Integer[Tensor, "n ..."]:
    """int32 code ids (-1 = no code) as stored in `dtype`."""
    if dtype == torch.int32:
        return codes.to(torch.int32)
    return codes.masked_fill(codes < 0, no_code_value(dtype)).to(dtype)


def read_codes(raw: Integer[Tensor, "n ..."], n_codes: int) -> Int[Tensor, "n ..."]:
    """Stored codes back as int64 ids, -1 for no code (any stored value that is no code id)."""
    out = raw.long()
    return out.masked_fill_((out >= n_codes) | (out < 0), NO_CODE)


#: The fingerprint of no documents, which `chain_docs` extends.
EMPTY_CHAIN = hashlib.sha256(b"cbinterp-docs").hexdigest()


def chain_docs(chain: str, batch: Int[Tensor, "rows pos"]) -> str:
    """The running fingerprint of the documents cached so far, extended by the rows of `batch` (length and ids)."""
    rows = batch.detach().to("cpu", torch.int32).contiguous().numpy()
    length = int(rows.shape[1]).to_bytes(8, "little")
    for row in rows:
        chain = hashlib.sha256(chain.encode() + length + row.tobytes()).hexdigest()
    return chain


def combined_fingerprint(entries: Sequence[dict]) -> str:
    """The data fingerprint of a whole cache: its chunks' fingerprints, in document order."""
    digest = hashlib.sha256(b"cbinterp-chunks")
    for entry in entries:
        digest.update(entry["data_sha256"].encode())
    return digest.hexdigest()


def chunk_name(first_doc: int) -> str:
    """The file name of the layout-2 chunk whose documents start at `first_doc`."""
    return f"chunk_d{first_doc:012d}.safetensors"


def chunk_info(file: Path) -> dict | None:
    """What a chunk file of this layout says about itself (its header), or None if it is not one."""
    if file.is_symlink():  # never read through a link, not even to adopt it
        return None
    try:
        with safe_open(str(file), framework="pt") as f:
            info = json.loads((f.metadata() or {})[CHUNK_INFO_KEY])
    except Exception:  # noqa: BLE001 - anything unreadable is not a chunk we can adopt
        return None
    keys = ("first_doc", "n_docs", "n_tokens", "data_sha256", "seq_lens", "weights_sha256")
    if not isinstance(info, dict) or any(k not in info for k in keys) or file.name != chunk_name(info["first_doc"]):
        return None
    return info
