"""One training loop for any HookedTransformer, with or without codebooks: `train(model, batches, TrainConfig(...))`.

The parts live beside this module: settings and result in `config`, argument checks in `args`, optimizer and schedule
in `optim`, data in `data`, checkpoints and resume checks in `checkpoint`, the loop in `loop` and its losses, metrics
and progress bar in `progress`. Their public names are re-exported here.

Under `torchrun` (any initialised `torch.distributed` group) `train` is data parallel: see `train` and
`cbinterp.core.training.distributed`.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence

import numpy as np
import torch

from cbinterp.core.checks import check_token_ids
from cbinterp.core.codebooks.attach import require_hooked_transformer
from cbinterp.core.storage.manifest import ResumeWarning
from cbinterp.core.tl_compat import Model
from cbinterp.core.training import distributed as dd
from cbinterp.core.training.args import check_call, check_frozen_codebooks, check_trainable_dtype
from cbinterp.core.training.checkpoint import (
    CHECKPOINT_FILES,
    NOT_CHECKED_ON_RESUME,
    TRAINER_FILE,
    TRAINER_TENSORS,
    base_fingerprint,
    is_checkpoint,
    prepare_checkpoint_dir,
    read_checkpoint,
    save_checkpoint,
    start_or_resume,
)
from cbinterp.core.training.config import AUTOCAST_DTYPES, TrainConfig, TrainResult
from cbinterp.core.training.data import Batches, TrainData, batch_fingerprint
from cbinterp.core.training.determinism import deterministic_on_cpu
from cbinterp.core.training.fastpath import fast_kernels
from cbinterp.core.training.loggers import TrainLogger
from cbinterp.core.training.loop import LoopSetup, run_loop
from cbinterp.core.training.optim import lr_factor, make_optimizer, restored_requires_grad

__all__ = [
    "AUTOCAST_DTYPES",
    "CHECKPOINT_FILES",
    "NOT_CHECKED_ON_RESUME",
    "TRAINER_FILE",
    "TRAINER_TENSORS",
    "Batches",
    "ResumeWarning",
    "TrainConfig",
    "TrainResult",
    "base_fingerprint",
    "batch_fingerprint",
    "is_checkpoint",
    "lr_factor",
    "make_optimizer",
    "read_checkpoint",
    "save_checkpoint",
    "train",
]


def train(
    model: Model,
    batches: Batches,
    cfg: TrainConfig,
    eval_fn: Callable[[Model, int], dict] | None = None,
    resume: bool = True,
    loggers: Sequence[TrainLogger] = (),
) -> TrainResult:
    """Train `model` on next-token loss.

    Only the parameters with `requires_grad` set are trained (`cfg.freeze_model` adds the model's own weights to the
    frozen ones); the flags are left as they were.

    Args:
        batches: `fn(step) -> tokens` (resumes exactly), an iterable of token batches (on resume, the batches already
            used are skipped, and checked to be the same), or a `(n_sequences, seq)` token tensor with
            `cfg.batch_size` set (seeded shuffled batches of its rows, a new order each epoch). Each is the global
            batch of a step; with several ranks each trains on its contiguous share of the rows. `fn(step, rank,
            world_size) -> tokens` instead gives this rank's rows itself (for data that each rank should load alone).
            Every step takes one batch: an iterable with a `len()` shorter than `cfg.steps` is refused before any
            training; one that runs out mid-way writes a checkpoint of the last step (with `cfg.checkpoint_dir`) and
            raises a ValueError. Token ids outside [0, d_vocab) are refused, naming the step.
        eval_fn: `eval_fn(model, step) -> dict`, called every `cfg.eval_every` steps and at the end, in eval mode
            (on every rank).
        resume: continue from `cfg.checkpoint_dir` when it holds a checkpoint. A resume is announced with a
            `ResumeWarning`; it is refused (ValueError) when the checkpoint was made with other settings, another
            model (config, codebooks, or initial weights), other frozen parameters or other data. Any number of ranks
            resumes any checkpoint.
        loggers: objects with `log(step, metrics)` and `close()` (`training.loggers`), called on rank 0 only.

    Data parallel: when a `torch.distributed` process group is initialised (e.g. under `torchrun`, see
    `training.distributed.init_from_env`), every rank runs `train` with the same arguments; rank 0's model is
    copied to all ranks first, the gradients are averaged (DistributedDataParallel), codebook usage is summed over the
    ranks, and rank 0 alone writes checkpoints, shows progress and logs, while the others wait for it.
    """
    require_hooked_transformer(model)
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"train takes its settings as a TrainConfig, got {type(cfg).__name__}: TrainConfig(steps=...).")
    check_call(eval_fn, resume, loggers)
    cfg = dataclasses.replace(cfg)  # checked again: a setting changed after construction is normalised or refused
    check_trainable_dtype(model)
    check_frozen_codebooks(model)
    data = TrainData(batches, cfg)
    if data.source == "tensor":  # once, for all the batches drawn from it
        check_token_ids(data.tokens, model.cfg.d_vocab, "The token tensor given to train")
    ckpt = prepare_checkpoint_dir(cfg)

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    device = next(model.parameters()).device
    dd.broadcast_module_(model)  # one model on every rank: rank 0's (its k-means codes, its initial weights)
    with restored_requires_grad(model):
        optimizer = make_optimizer(model, cfg)
        run = start_or_resume(model, optimizer, cfg, data, ckpt, resume)
        setup = LoopSetup(
            model=model,
            data=data,
            cfg=cfg,
            optimizer=optimizer,
            device=device,
            eval_fn=eval_fn,
            checkpoint_dir=ckpt,
            loggers=list(loggers) if dd.is_main() else [],
        )
        try:
            with fast_kernels(model, enabled=cfg.fast_kernels), deterministic_on_cpu(device):
                run_loop(setup, run)
        finally:
            if dd.is_main():
                for logger in loggers:
                    logger.close()
    return TrainResult(steps=run.step, losses=run.losses, evals=run.evals, resumed_from=run.resumed_from)
