"""Shared by the language-model analysis benchmarks (lm_probes, lm_steering): load a model by name or path, the
held-out documents and their halves, and a few output helpers."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Optional

import torch

import cbinterp
from cbinterp.tasks.text import attach_tokenizer, load_tokenizer

OUT = Path(__file__).resolve().parent / "out"


def default_model() -> Optional[str]:
    """`cbinterp.pretrained.DEFAULT_MODEL`, or None where the pretrained registry is not installed."""
    try:
        from cbinterp.pretrained import DEFAULT_MODEL
    except ImportError:
        return None
    return DEFAULT_MODEL


def baseline_name() -> Optional[str]:
    """The registry's name of the no-codebook baseline LM, when it has one."""
    try:
        import cbinterp.pretrained as pretrained
    except ImportError:
        return None
    for attr in ("BASELINE_MODEL", "DEFAULT_BASELINE", "BASELINE"):
        if isinstance(getattr(pretrained, attr, None), str):
            return getattr(pretrained, attr)
    return None


def _load_folder(path: Path):
    """A model folder: `model/` (cbinterp.save) + `tokenizer/`, or a cbinterp.save folder with `tokenizer/` in it."""
    model_dir = path / "model" if (path / "model").is_dir() else path
    model = cbinterp.load(model_dir, device="cpu")
    for tok_dir in (path / "tokenizer", model_dir / "tokenizer"):
        if (tok_dir / "tokenizer.json").is_file():
            attach_tokenizer(model, load_tokenizer(tok_dir))
            break
    else:
        raise FileNotFoundError(f"No tokenizer/ folder beside the model at {path}.")
    return model.eval()


def load_model(name_or_path: Optional[str]):
    """A HookedTransformer with its tokenizer, by pretrained name (`cbinterp.pretrained.load_pretrained`) or folder."""
    if name_or_path is None:
        raise SystemExit("No --model given and cbinterp.pretrained is not available: pass a model folder.")
    path = Path(name_or_path)
    if path.is_dir():
        try:
            from cbinterp.pretrained import load_pretrained

            return load_pretrained(str(path)).eval()
        except (ImportError, FileNotFoundError, ValueError, KeyError):
            return _load_folder(path)
    from cbinterp.pretrained import load_pretrained

    return load_pretrained(name_or_path).eval()


def heldout_halves(name_or_path: Optional[str]):
    """The held-out documents (never trained on), as the two halves of `split_halves`: (choose half A, score B)."""
    from cbinterp.tasks.corpus import load_corpus, split_halves

    docs = None
    try:
        from cbinterp.pretrained import heldout_documents

        docs = heldout_documents(name_or_path)
    except (ImportError, FileNotFoundError, ValueError, KeyError, TypeError):
        docs = None
    if not docs or not hasattr(docs[0], "source"):  # plain strings carry no id/source to split by
        docs = load_corpus(split="heldout")
    return split_halves(docs)


def take_chars(docs, max_chars: Optional[int]):
    """Texts of `docs` (all when `max_chars` is None), else about `max_chars` characters taken round-robin over the
    sources, at most a quarter of a source's share from any one document, so that every source is represented."""
    if max_chars is None:
        return [d.text for d in docs]
    by_source: dict[str, list] = {}
    for d in docs:
        by_source.setdefault(d.source, []).append(d)
    piece = max(500, max_chars // (4 * len(by_source)))
    out, total = [], 0
    queues = [list(v) for v in by_source.values()]
    while total < max_chars and any(queues):
        for q in queues:
            if q and total < max_chars:
                text = q.pop(0).text[: min(piece, max_chars - total)]
                out.append(text)
                total += len(text)
    return out


def write_json(path: Path, data) -> None:
    """Strict JSON (NaN/inf written as null)."""

    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        if hasattr(x, "item") and not isinstance(x, (str, bytes)):
            return clean(x.item())
        return x

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(clean(data), indent=2, allow_nan=False))
    os.replace(tmp, path)


def save_figure(fig, out: Path, stem: str) -> list[str]:
    """figure HTML always, PNG when kaleido is installed; returns the files written."""
    files = [str(out / f"{stem}.html")]
    fig.write_html(files[0], include_plotlyjs=True)
    try:
        import kaleido  # noqa: F401

        fig.write_image(str(out / f"{stem}.png"), scale=2)
        files.append(str(out / f"{stem}.png"))
    except Exception:  # kaleido absent (or without a browser): HTML only
        pass
    return files


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()
        self.marks: dict[str, float] = {}

    def mark(self, name: str) -> float:
        now = time.perf_counter()
        self.marks[name] = round(now - self.t0 - sum(self.marks.values()), 2)
        return self.marks[name]


def set_threads(n: Optional[int]) -> None:
    if n:
        torch.set_num_threads(n)
