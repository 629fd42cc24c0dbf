"""Language models shipped with the package (trained by `benchmarks/lm_train.py`), loaded by name, offline.

    list_pretrained()                    name -> summary of every shipped model (its card, shortened)
    load_pretrained(name_or_path)        a HookedTransformer with its codebooks and tokenizer attached
    pretrained_card(name_or_path)        the full card: settings, held-out metrics, corpus hash, token counts, timings
    heldout_documents(name_or_path)      the held-out corpus documents the model was evaluated on (never trained on)

A model folder holds ``model/`` (written by `cbinterp.save`, with the model's tokenizer among its checksummed files)
and ``card.json``; a ``tokenizer/`` folder beside them (as `lm_train.py` writes one) is not read: the tokenizer
attached is the one saved, and checked, with the model. `load_pretrained` also opens such a folder by path, or the
output folder of a `lm_train.py` run (its codebook model; ``<out>/baseline`` and ``<out>/finetuned`` are the other
two). Nothing here touches the network or runs code from a folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cbinterp.core.device import default_device
from cbinterp.core.storage.atomic import user_path
from cbinterp.core.storage.io import load
from cbinterp.core.tl_compat import Model
from cbinterp.recipes.model_card import CARD_FILE, MODEL_DIR

__all__ = [
    "BASELINE_MODEL",
    "DEFAULT_MODEL",
    "MODELS_DIR",
    "heldout_documents",
    "list_pretrained",
    "load_pretrained",
    "pretrained_card",
    "pretrained_path",
]

MODELS_DIR = Path(__file__).resolve().parent / "assets" / "models"
#: The shipped codebook model: codebooks after every attention head (k = 8), trained end to end with aeloss.
DEFAULT_MODEL = "english-codebook"
#: The same network before codebooks were attached (phase (a) of the recipe), without codebooks.
BASELINE_MODEL = "english-baseline"

PathLike = str | os.PathLike


def _shipped() -> dict[str, Path]:
    if not MODELS_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(MODELS_DIR.iterdir()) if (p / CARD_FILE).is_file()}


def _is_model_folder(path: Path) -> bool:
    return (path / MODEL_DIR).is_dir()


def _read_card(card_path: Path) -> dict[str, Any]:
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(
            f"Damaged model card {card_path}: {err}. Write it again (benchmarks/lm_train.py writes it), or reinstall "
            "cbinterp for a shipped model."
        ) from err
    if not isinstance(card, dict):
        raise ValueError(f"Damaged model card {card_path}: not a JSON object. Write it again, or reinstall cbinterp.")
    return card


def pretrained_path(name_or_path: PathLike) -> Path:
    """The folder of a shipped model name, of a model folder, or of a `lm_train.py` run's codebook model."""
    shipped = _shipped()
    if isinstance(name_or_path, str) and name_or_path in shipped:
        return shipped[name_or_path]
    path = user_path(name_or_path)
    if path.is_dir():
        if _is_model_folder(path):
            return path.resolve()
        if _is_model_folder(path / "codebook"):  # the --out folder of benchmarks/lm_train.py
            return (path / "codebook").resolve()
        raise FileNotFoundError(
            f"{path} is not a model folder: expected {MODEL_DIR}/ in it (as benchmarks/lm_train.py writes under "
            f"<out>/codebook, <out>/baseline, <out>/finetuned), or a codebook/ subfolder."
        )
    known = ", ".join(shipped) or "none (the package was installed without its model assets)"
    raise ValueError(
        f"Unknown pretrained model {str(name_or_path)!r}. Shipped models: {known}. A folder path also works."
    )


def pretrained_card(name_or_path: PathLike = DEFAULT_MODEL) -> dict[str, Any]:
    """The card of a model: how it was made (recipe, command, corpus sha256) and its held-out metrics."""
    path = pretrained_path(name_or_path)
    card_path = path / CARD_FILE
    if not card_path.is_file():
        raise FileNotFoundError(f"{path} has no {CARD_FILE}; it is written by benchmarks/lm_train.py.")
    return _read_card(card_path)


def _summary(card: dict) -> dict[str, Any]:
    recipe = card.get("recipe", {})
    heldout = card.get("heldout", {})
    return {
        "description": card.get("description"),
        "has_codebooks": card.get("has_codebooks"),
        "sites": list(card.get("codebooks", {})),
        "n_codes": recipe.get("n_codes") if card.get("has_codebooks") else None,
        "k": recipe.get("k") if card.get("has_codebooks") else None,
        "n_layers": recipe.get("n_layers"),
        "d_model": recipe.get("d_model"),
        "vocab_size": card.get("data", {}).get("vocab_size"),
        "n_ctx": recipe.get("seq_len"),
        "n_parameters": card.get("n_parameters"),
        "heldout_loss": heldout.get("loss"),
        "heldout_accuracy": heldout.get("accuracy"),
        "corpus_sha256": card.get("corpus", {}).get("sha256"),
    }


def list_pretrained() -> dict[str, dict[str, Any]]:
    """Every shipped model by name, with a summary of its card (settings and held-out loss / accuracy)."""
    return {name: _summary(_read_card(path / CARD_FILE)) for name, path in _shipped().items()}


def load_pretrained(name_or_path: PathLike = DEFAULT_MODEL, device: str | None = None) -> Model:
    """Load a shipped model by name (see `list_pretrained`) or a model folder, with its tokenizer attached.

    `model.to_tokens`, `to_string`, `to_str_tokens` and `generate` then work offline; a codebook model has its
    codebooks in place (`cbinterp.get_codebooks(model)`). The tokenizer is the one saved in ``model/``, checked
    against its checksum like every other file there. `device` defaults to CUDA when present, else the CPU. The
    model is returned in eval mode.
    """
    path = pretrained_path(name_or_path)
    if device is None:
        device = default_device()
    model = load(path / MODEL_DIR, device=device)
    if getattr(model, "tokenizer", None) is None:
        raise ValueError(
            f"{path / MODEL_DIR} was saved without its tokenizer. Attach it (cbinterp.attach_tokenizer) and save the "
            "model again: the tokenizer is then saved, and checked, with the model."
        )
    return model.eval()


def heldout_documents(name_or_path: PathLike = DEFAULT_MODEL) -> list:
    """The held-out documents (`cbinterp.tasks.corpus.Document`) that the model's card reports metrics on.

    They come from ``load_corpus(split="heldout")`` after checking that the installed corpus is the one the model
    was trained and evaluated on (the card's corpus sha256 against the corpus manifest).
    """
    card = pretrained_card(name_or_path)
    corpus = card.get("corpus") or {}
    if corpus.get("name") != "english":
        raise ValueError(
            f"{card.get('name')} was not trained on the shipped English corpus (its card says corpus "
            f"{corpus.get('name')!r}), so it has no held-out documents there."
        )
    from cbinterp.tasks import corpus as corpus_module

    manifest = json.loads((corpus_module.CORPUS_DIR / corpus_module.MANIFEST_FILE).read_text())
    if manifest.get("sha256") != corpus.get("sha256"):
        raise ValueError(
            f"The installed corpus (sha256 {manifest.get('sha256')}) is not the one {card.get('name')} was trained "
            f"on (sha256 {corpus.get('sha256')}); its held-out split would differ. Retrain with benchmarks/"
            f"lm_train.py or install the matching corpus."
        )
    return corpus_module.load_corpus(split="heldout", heldout_fraction=corpus.get("heldout_fraction", 0.05))
