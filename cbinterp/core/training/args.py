"""Checks of `train`'s arguments beyond `TrainConfig`: the call itself, the model's weights, eval_fn's result."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from cbinterp.core.codebooks.attach import get_codebooks
from cbinterp.core.tl_compat import Model

__all__ = ["check_call", "check_eval_result", "check_frozen_codebooks", "check_trainable_dtype"]


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


def check_frozen_codebooks(model: Model) -> None:
    """Refuse a frozen codebook that dead-code replacement would rewrite inside `train` all the same."""
    for name, cb in get_codebooks(model).items():
        if not cb.weight.requires_grad and cb.cfg.dead_after is not None:
            raise ValueError(
                f"Codebook {name} is frozen (requires_grad=False) but has dead_after={cb.cfg.dead_after}: dead-code "
                "replacement inside train would rewrite its codes. Set its dead_after to None to keep it fixed, or "
                "unfreeze it with requires_grad_(True)."
            )


def check_trainable_dtype(model: Model) -> None:
    """Refuse float16 parameters, which AdamW cannot update."""
    half = sorted({str(p.dtype) for p in model.parameters() if p.dtype == torch.float16})
    if half:
        raise TypeError(
            "train cannot update float16 parameters: AdamW's state and updates under- and overflow in float16, and "
            "the weights turn NaN after a step or two. Build the model in float32 (or bfloat16), e.g. "
            "HookedTransformerConfig(dtype=torch.float32), and use torch.autocast for float16 compute."
        )
