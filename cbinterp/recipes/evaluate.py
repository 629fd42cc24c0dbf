"""Held-out evaluation of a language model: next-token loss and accuracy, and which codes fire (dead codes).

`heldout_sequences` packs held-out text the way training text is packed; `evaluate` measures a model on the rows.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Int
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from cbinterp.core.codebooks.attach import get_codebooks
from cbinterp.core.tl_compat import Model
from cbinterp.tasks.text import TextSource, pack_documents

__all__ = ["evaluate", "heldout_sequences"]


def heldout_sequences(texts: TextSource, tokenizer: PreTrainedTokenizerBase, seq_len: int) -> Int[Tensor, "rows pos"]:
    """Held-out text packed the way training text is (`pack_documents`), for `evaluate`."""
    rows = list(pack_documents(texts, tokenizer, seq_len))
    if not rows:
        raise ValueError(f"The held-out text does not fill one window of {seq_len} tokens; add documents.")
    return torch.stack(rows)


def _count_codes(counts: Tensor, codes: Tensor, hook) -> None:
    groups, n_codes = counts.shape
    flat = codes.reshape(-1, groups, codes.shape[-1]) if groups > 1 else codes.reshape(-1, 1, codes.shape[-1])
    flat = flat + torch.arange(groups, device=codes.device).view(1, groups, 1) * n_codes
    flat = flat[flat >= 0] if bool((codes < 0).any()) else flat.flatten()
    counts += torch.bincount(flat, minlength=groups * n_codes).view(groups, n_codes).to(counts.device)


@torch.no_grad()
def evaluate(
    model: Model,
    sequences: Int[Tensor, "rows pos"],
    batch_size: int = 64,
    count_codes: bool = True,
) -> dict[str, Any]:
    """Held-out metrics of `model` on `sequences` (rows that start with BOS, e.g. from `heldout_sequences`).

    Returns ``loss`` (mean cross-entropy in nats over every predicted position: each token after the first of a
    row, the document separators included), ``accuracy`` (share of those positions where the argmax is the next
    token), ``n_tokens`` (predicted positions) and, for a model with active codebooks and `count_codes`,
    ``codebooks``: per codebook the number of held-out positions, how many of its codes (per head for attention
    codebooks) fired at least once, and the dead fraction.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    codebooks = {name: cb for name, cb in get_codebooks(model).items() if not cb.bypass} if count_codes else {}
    counts = {name: torch.zeros(cb.cfg.groups, cb.n_codes, dtype=torch.long) for name, cb in codebooks.items()}
    hooks = [(f"{name}.hook_codes", partial(_count_codes, counts[name])) for name in codebooks]
    total, correct, n = 0.0, 0, 0
    try:
        for batch in torch.as_tensor(sequences).long().split(batch_size):
            batch = batch.to(device)
            logits = model.run_with_hooks(batch, fwd_hooks=hooks) if hooks else model(batch)
            logits, targets = logits[:, :-1].float(), batch[:, 1:]
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"))
            correct += int((logits.argmax(-1) == targets).sum())
            n += targets.numel()
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("evaluate needs sequences of at least 2 tokens.")
    out: dict[str, Any] = {"loss": total / n, "accuracy": correct / n, "n_tokens": n}
    if codebooks:
        out["codebooks"] = {name: _dead_summary(c, codebooks[name]) for name, c in counts.items()}
        dead = sum(s["n_dead"] for s in out["codebooks"].values())
        out["dead_fraction"] = dead / sum(s["n_codes_total"] for s in out["codebooks"].values())
    return out


def _dead_summary(counts: Tensor, codebook) -> dict:
    alive = (counts > 0).sum(-1)
    total = counts.numel()
    summary = {
        "n_codes_total": total,
        "n_dead": int(total - alive.sum()),
        "dead_fraction": float(1 - alive.sum() / total),
        "k": codebook.k,
    }
    if codebook.grouped:
        summary["dead_fraction_per_head"] = [float(1 - a / counts.shape[1]) for a in alive.tolist()]
    return summary
