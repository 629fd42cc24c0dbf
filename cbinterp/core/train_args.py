"""Checks of `train`'s arguments beyond `TrainConfig`: the call itself, frozen weights, how much data there is."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Optional

from torch import Tensor
from transformer_lens import HookedTransformer

from cbinterp.core.attach import get_codebooks

__all__ = ["DataRanOut", "check_call", "check_eval_result", "check_frozen_codebooks", "known_length", "trained_names"]


class DataRanOut(Exception):
    """The batches of an iterable ran out before `cfg.steps` (raised inside the loop, turned into a ValueError)."""


def check_call(eval_fn, resume, loggers) -> None:
    """Refuse, before any work, arguments of `train` that would fail only later (after steps already ran)."""
    if eval_fn is not None and not callable(eval_fn):
        raise TypeError(f"eval_fn must be None or a function eval_fn(model, step) -> dict, got {eval_fn!r}.")
    if not isinstance(resume, bool):
        raise TypeError(f"resume must be True or False, got {resume!r}.")
    if not isinstance(loggers, (list, tuple)):
        raise TypeError(
            f"loggers must be a list or tuple of loggers, got {type(loggers).__name__}: pass [logger] for one."
        )
    for logger in loggers:
        if not (callable(getattr(logger, "log", None)) and callable(getattr(logger, "close", None))):
            raise TypeError(f"Each logger needs log(step, metrics) and close() methods; {logger!r} has not both.")


def check_eval_result(result, step: int) -> dict:
    """`eval_fn`'s result, which must be a dict of named results."""
    if not isinstance(result, Mapping):
        raise TypeError(
            f"eval_fn(model, step) must return a dict of named results (e.g. {{'loss': 2.3}}); at step {step} it "
            f"returned {type(result).__name__}."
        )
    return dict(result)


def check_frozen_codebooks(model: HookedTransformer) -> None:
    """Refuse a frozen codebook that dead-code replacement would rewrite inside `train` all the same."""
    for name, cb in get_codebooks(model).items():
        if not cb.weight.requires_grad and cb.cfg.dead_after is not None:
            raise ValueError(
                f"Codebook {name} is frozen (requires_grad=False) but has dead_after={cb.cfg.dead_after}: dead-code "
                "replacement inside train would rewrite its codes. Set its dead_after to None to keep it fixed, or "
                "unfreeze it with requires_grad_(True)."
            )


def known_length(batches) -> Optional[int]:
    """How many batches an iterable holds, when it says so (`len()`); None for a tensor, callable or plain iterator."""
    if isinstance(batches, (Tensor, str, bytes, Path)) or callable(batches):
        return None
    try:
        return int(len(batches))
    except TypeError:  # no __len__, or one that refuses (e.g. a DataLoader over an IterableDataset)
        return None


def trained_names(model: HookedTransformer, optimizer) -> list[list[str]]:
    """The names of the parameters each optimizer group trains, in the optimizer's order."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
