"""`train`'s optimizer (AdamW, the codebooks in their own group) and learning-rate schedule."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

from cbinterp.core import tl_compat as tc
from cbinterp.core.codebooks.attach import get_codebooks
from cbinterp.core.tl_compat import Model
from cbinterp.core.training.config import TrainConfig

__all__ = ["lr_factor", "make_optimizer", "restored_requires_grad", "set_learning_rates", "trained_names"]


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Learning-rate multiplier at `step`: linear warmup, then cosine decay or constant."""
    if cfg.schedule not in ("cosine", "constant"):
        raise ValueError(f"Unknown schedule {cfg.schedule!r}; use 'cosine' or 'constant'.")
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: Model, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with the codebooks in their own parameter group (own lr and weight decay).

    Only parameters with `requires_grad` set are trained: one the caller froze is left out of the optimizer (so
    neither its gradient nor weight decay moves it). `cfg.freeze_model` clears the flag of every weight outside the
    codebooks; `train` restores all flags afterwards, calling this directly leaves them so. What the forward never
    reads (`tl_compat.unused_parameters`: a bridge's stale fused QKV matrix) is left out and its flag cleared too.
    """
    codebook_params = {id(cb.weight) for cb in get_codebooks(model).values()}
    cb_all = [p for p in model.parameters() if id(p) in codebook_params]
    cb = [p for p in cb_all if p.requires_grad]
    unused = {id(p): p for p in tc.unused_parameters(model)}
    rest = [p for p in model.parameters() if id(p) not in codebook_params and id(p) not in unused and p.requires_grad]
    if cfg.freeze_model and not cb:
        why = "all its codebooks are frozen (requires_grad=False)" if cb_all else "the model has no codebooks"
        raise ValueError(
            f"freeze_model=True but {why}, so nothing would be trained. Attach codebooks, or unfreeze them with "
            "requires_grad_(True)."
        )
    if not cb and not rest:
        raise ValueError(
            "Every parameter of the model is frozen (requires_grad=False), so train has nothing to update. Unfreeze "
            "what should be trained with requires_grad_(True)."
        )
    if cfg.freeze_model:
        for p in rest:
            p.requires_grad_(False)
    for p in unused.values():  # never read by the forward: no gradient, which DDP would take for a failed rank
        p.requires_grad_(False)
    groups = [
        {
            "params": cb,
            "lr": cfg.codebook_lr if cfg.codebook_lr is not None else cfg.lr,
            "weight_decay": cfg.codebook_weight_decay if cfg.codebook_weight_decay is not None else cfg.weight_decay,
        }
    ]
    if not cfg.freeze_model:
        groups.append({"params": rest, "lr": cfg.lr, "weight_decay": cfg.weight_decay})
    groups = [g for g in groups if g["params"]]
    for g in groups:
        g["base_lr"] = g["lr"]
    # The fused kernel updates all tensors in one pass (CPU and CUDA); it needs floating-point weights on one of them.
    params = [p for g in groups for p in g["params"]]
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, betas=cfg.betas, fused=fused or None)


def set_learning_rates(optimizer: torch.optim.Optimizer, step: int, cfg: TrainConfig) -> None:
    """Every group's learning rate for `step`: its base rate times the schedule's factor."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * lr_factor(step, cfg)


def trained_names(model: Model, optimizer) -> list[list[str]]:
    """The names of the parameters each optimizer group trains, in the optimizer's order."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]


@contextlib.contextmanager
def restored_requires_grad(model: Model) -> Iterator[None]:
    """Put every parameter's `requires_grad` flag back as it was (`freeze_model` clears them)."""
    before = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    finally:
        for p, flag in before:
            p.requires_grad_(flag)
