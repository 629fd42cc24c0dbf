"""A trained language model as a folder that `cbinterp.pretrained.load_pretrained` opens, and the card in it.

A model folder holds ``model/`` (`cbinterp.save`), ``tokenizer/`` (`save_tokenizer`) and ``card.json``: how the
model was made and what it scores on held-out text. These names are defined here only; `cbinterp.pretrained`
reads folders by them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from cbinterp.core.codebooks.attach import get_codebooks
from cbinterp.core.storage.atomic import atomic_file
from cbinterp.core.storage.io import save
from cbinterp.core.storage.tokenizer import save_tokenizer
from cbinterp.core.tl_compat import Model

__all__ = ["CARD_FILE", "CARD_FORMAT", "MODEL_DIR", "TOKENIZER_DIR", "lm_card", "write_model_folder"]

MODEL_DIR, TOKENIZER_DIR, CARD_FILE = "model", "tokenizer", "card.json"
CARD_FORMAT = "cbinterp-lm-card"

_DESCRIPTIONS = {
    "baseline": "(a) the language model trained from scratch without codebooks",
    "codebook": "(b) (a) with codebooks attached, k-means initialised and trained end to end with aeloss",
    "finetuned": "(c) (a) trained as many further steps as (b), without codebooks",
}


def _lineage(phase: str) -> tuple[str, ...]:
    """The phases that trained the model of `phase`: (b) and (c) both continue (a)."""
    return ("baseline",) if phase == "baseline" else ("baseline", phase)


def lm_card(
    phase: str,
    model: Model,
    *,
    name: str,
    recipe: dict,
    evals: dict[str, dict],
    phases: dict[str, dict],
    check: dict | None,
    data: dict,
    names: dict[str, str],
    extra: dict | None = None,
) -> dict[str, Any]:
    """The card of the model of `phase` ("baseline", "codebook" or "finetuned") of `run_lm`.

    Args:
        recipe: `LMRecipe.to_dict()`.
        evals: `evaluate` results by phase, and ``codebook_bypassed`` (the codebook model with its codebooks off).
        phases: the training record of each phase (steps, tokens, wall time).
        check: the model's loss on a few held-out documents (``n_documents`` with `evaluate`'s numbers), or None.
        extra: more fields (the corpus, the command), written last.
    """
    return {
        "format": CARD_FORMAT,
        "name": name,
        "phase": phase,
        "description": _DESCRIPTIONS[phase],
        "recipe": recipe,
        "has_codebooks": bool(get_codebooks(model)),
        "codebooks": {n: dataclasses.asdict(cb.cfg) for n, cb in get_codebooks(model).items()},
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "heldout": {k: v for k, v in evals[phase].items() if k != "codebooks"},
        "heldout_codebooks": evals[phase].get("codebooks"),
        "heldout_bypassed": dict(evals["codebook_bypassed"]) if phase == "codebook" else None,
        "check": check,
        "training_tokens": {p: phases[p]["tokens"] for p in _lineage(phase)},
        "training_steps": {p: phases[p]["steps"] for p in _lineage(phase)},
        "wall_s": {p: phases[p]["wall_s_this_run"] for p in _lineage(phase)},
        "data": data,
        "names": names,
        **(extra or {}),
    }


def write_model_folder(model: Model, tokenizer: PreTrainedTokenizerBase, directory: str | Path, card: dict) -> Path:
    """Write ``model/``, ``tokenizer/`` and ``card.json`` into `directory` (each atomically)."""
    directory = Path(directory)
    save(model, directory / MODEL_DIR, extra={"card": card.get("name"), "recipe": card.get("recipe")})
    save_tokenizer(tokenizer, directory / TOKENIZER_DIR)
    with atomic_file(directory / CARD_FILE) as tmp:
        tmp.write_text(json.dumps(card, indent=1, sort_keys=True))
    return directory
