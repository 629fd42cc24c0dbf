"""What every piece of the corpus rebuild shares: paths, the loader's definitions, text helpers, SourceResult."""

from __future__ import annotations

import importlib.util
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _corpus_module():
    """This checkout's cbinterp/tasks/corpus.py, loaded alone: importing the package would pull in torch."""
    spec = importlib.util.spec_from_file_location("_cbinterp_tasks_corpus", REPO / "cbinterp" / "tasks" / "corpus.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


_corpus = _corpus_module()
CORPUS_FILE, CORPUS_SOURCES, MANIFEST_FILE = _corpus.CORPUS_FILE, _corpus.CORPUS_SOURCES, _corpus.MANIFEST_FILE
DEFAULT_HELDOUT_FRACTION, Document, assign_splits = (
    _corpus.DEFAULT_HELDOUT_FRACTION,
    _corpus.Document,
    _corpus.assign_splits,
)

OUT_DIR = REPO / "cbinterp" / "assets" / "corpus"


def join_paragraphs(paragraphs) -> str:
    """Collapse whitespace inside each paragraph, drop empty ones, one newline between paragraphs."""
    cleaned = (" ".join(p.split()) for p in paragraphs)
    return "\n".join(p for p in cleaned if p)


def slug(text: str) -> str:
    """Lower-case ASCII slug for ids."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


@dataclass
class SourceResult:
    """Documents from one source plus where they came from."""

    name: str
    docs: list[Document]
    package: dict
    member: str
    notes: list[str] = field(default_factory=list)
