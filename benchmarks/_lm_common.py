"""Shared by the language-model analysis benchmarks (lm_probes, lm_steering): load a model by name or path, the
held-out documents and their halves, and a few output helpers."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Optional

import pandas as pd
import torch

OUT = Path(__file__).resolve().parent / "out"


def default_model() -> str:
    """The shipped codebook LM's name (`cbinterp.pretrained.DEFAULT_MODEL`)."""
    from cbinterp.pretrained import DEFAULT_MODEL

    return DEFAULT_MODEL


def baseline_name() -> str:
    """The shipped no-codebook baseline LM's name (`cbinterp.pretrained.BASELINE_MODEL`)."""
    from cbinterp.pretrained import BASELINE_MODEL

    return BASELINE_MODEL


def load_model(name_or_path: str):
    """A HookedTransformer with its tokenizer, on the CPU, by shipped name or folder (`load_pretrained`)."""
    from cbinterp.pretrained import load_pretrained

    return load_pretrained(name_or_path, device="cpu").eval()


def heldout_halves(name_or_path: str):
    """The held-out documents the model never trained on (`heldout_documents`; the corpus' held-out split for a
    folder without a card), as the two halves of `split_halves`: (choose half A, score half B)."""
    from cbinterp.pretrained import heldout_documents
    from cbinterp.tasks.corpus import load_corpus, split_halves

    try:
        docs = heldout_documents(name_or_path)
    except FileNotFoundError:  # a model folder without card.json (e.g. the tests' tiny model)
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
    """Strict JSON (NaN/inf and missing values such as the `pd.NA` head of an MLP codebook written as null)."""

    def clean(x):
        if x is pd.NA or (isinstance(x, float) and not math.isfinite(x)):
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
