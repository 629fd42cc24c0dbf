"""What identifies the run that made a code cache (model, weights, hooks, conditions, settings).

Also the messages that say how another model or run differs."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import torch

from cbinterp.codecache import conditions as cond
from cbinterp.codecache.inputs import check_token_strings
from cbinterp.codecache.layout import FORMAT_NAME, FORMAT_VERSION, LAYOUT, combined_fingerprint
from cbinterp.core.codebooks.attach import get_codebooks
from cbinterp.core.storage import manifest as mf
from cbinterp.core.tl_compat import Model

__all__ = ["describe_mismatch", "model_identity", "new_marker", "run_fingerprint", "tokenizer_only_difference"]


def model_identity(model: Model, tokenizer_name: str | None = None) -> dict:
    """What identifies a model for a cache: its codebooks, the basics of its config, and its tokenizer's name.

    The tokenizer's name is `tokenizer_name` when given, for a tokenizer that lives outside the model."""
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


def tokenizer_only_difference(stored: dict, current: dict) -> str | None:
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


def describe_mismatch(stored: dict, current: dict) -> str:
    """The fields of two model identities that differ (the first eight), as "key.field: cache has .., model has .."."""
    diffs = []
    for key in ("codebooks", "model"):
        a, b = stored.get(key, {}), current.get(key, {})
        for field in sorted(set(a) | set(b)):
            if a.get(field) != b.get(field):
                diffs.append(f"{key}.{field}: cache has {a.get(field)!r}, model has {b.get(field)!r}")
    return "; ".join(diffs[:8]) + (" ..." if len(diffs) > 8 else "")


def run_fingerprint(meta: dict) -> str:
    """What a chunk's header records of the run that made it, beside the weights: model, hooks, conditions, settings.

    A chunk is adopted by a later run only when they are the same."""
    keys = ("codebooks", "model", "weights_sha256", "hooks", "conditions", "activation_dtype", "token_strings")
    body = json.dumps({k: meta.get(k) for k in keys}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


def new_marker(
    model: Model,
    identity: dict,
    hooks: list[str],
    activation_dtype: torch.dtype,
    token_strings: Sequence[str] | None,
) -> dict:
    """The marker of an empty cache made by this run.

    It holds `identity` (from `model_identity`), the weights' and the run's fingerprints, the hooks, the conditions
    and settings (`token_strings` checked against the model)."""
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
        "data_sha256": combined_fingerprint([]),
        "seq_lens": [],
        "conditions": cond.run_conditions(model),
        "activation_dtype": str(activation_dtype).removeprefix("torch."),
    }
    if token_strings is not None:
        meta["token_strings"] = check_token_strings(token_strings, model.cfg.d_vocab)
    meta["run_sha256"] = run_fingerprint(meta)
    return meta
