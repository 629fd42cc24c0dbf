"""`train`'s settings (`TrainConfig`, checked on construction) and its result (`TrainResult`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from cbinterp.core.checks import is_int, is_real

__all__ = ["AUTOCAST_DTYPES", "TrainConfig", "TrainResult"]

AUTOCAST_DTYPES = {"bf16": torch.bfloat16}

#: The int settings, each with its least value (None: any int).
_INT_FIELDS = (
    ("steps", 0),
    ("warmup_steps", 0),
    ("eval_every", 0),
    ("checkpoint_every", 0),
    ("log_every", 1),
    ("accumulate", 1),
    ("batch_size", 1),
    ("seed", None),
)
#: The real-number settings: each with its least value (None: above 0) and whether None is allowed.
_REAL_FIELDS = (
    ("lr", None, False),
    ("codebook_lr", 0, True),
    ("weight_decay", 0, False),
    ("codebook_weight_decay", 0, True),
    ("grad_clip", 0, True),
)
_BOOL_FIELDS = ("freeze_model", "compile", "fast_kernels", "progress")


@dataclasses.dataclass
class TrainConfig:
    """Settings of `train`, all checked on construction.

    Attributes:
        steps: optimizer steps in all (a resumed run continues to this count).
        lr, weight_decay, betas: AdamW settings of the model's own weights.
        codebook_lr, codebook_weight_decay: the same for the codebooks (None: the model's).
        grad_clip: clip the global gradient norm to this (None: no clipping).
        warmup_steps: linear warmup from 0 to lr over this many steps.
        schedule: after warmup, "cosine" (decay to `min_lr_ratio * lr` at `steps`) or "constant".
        freeze_model: train the codebooks only; the model's `requires_grad` flags are restored afterwards. A
            parameter whose flag the caller cleared is never trained, with or without this.
        compile: run the forward through `torch.compile` (about 50 s to compile on CPU).
        fast_kernels: fused attention and layer norm in the training forwards (`training.fastpath`): the same
            results to float tolerance, 1.3-1.5x faster steps on a CPU; a forward that hooks what they skip does not
            take them.
        eval_every: call `eval_fn(model, step)` every this many steps (0: only at the end).
        checkpoint_every, checkpoint_dir: write a resumable checkpoint there every this many steps and at the end.
        log_every: steps between progress-bar updates and logger calls (display only: it changes no statistic); on
            CUDA also how often the losses are copied to the host and checked to be finite.
        seed: seeds torch, numpy and Python's `random` at the start (the same seed gives the same run).
        progress: show a tqdm progress bar.
        batch_size: only for a bare token tensor as data: seeded shuffled batches of this many rows (the global
            batch: under torchrun each rank trains on its share of the rows).
        accumulate: split each step's batch (each rank's share of it) into this many micro-batches, one forward and
            backward each, and step the optimizer once: the same update as the whole batch, in less memory. One
            exception: with `dead_after`, dead codes are replaced from the first micro-batch's inputs (each rank's
            first, under torchrun), so which vectors replace them depends on `accumulate`.
        autocast: None (full precision) or "bf16" (`torch.autocast` to bfloat16 in the forward; the codebooks'
            code search stays float32). On CUDA bf16 is faster; on a CPU it is usually slower, so the default is None.
    """

    steps: int
    lr: float = 1e-3
    weight_decay: float = 0.01
    codebook_lr: float | None = None
    codebook_weight_decay: float | None = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float | None = 1.0
    warmup_steps: int = 0
    schedule: str = "cosine"  # "cosine" (to min_lr_ratio * lr) or "constant", after warmup
    min_lr_ratio: float = 0.1
    freeze_model: bool = False  # train the codebooks only
    compile: bool = False
    fast_kernels: bool = True
    eval_every: int = 0
    checkpoint_every: int = 0
    checkpoint_dir: str | None = None
    log_every: int = 10
    seed: int = 0
    progress: bool = True
    batch_size: int | None = None
    accumulate: int = 1
    autocast: str | None = None

    def __post_init__(self) -> None:
        """The one place training settings are validated.

        Numbers become plain Python int and float (numpy scalars would not go into the checkpoint's JSON, nor into
        the seeding) and flags plain bool."""
        if not isinstance(self.schedule, str) or self.schedule not in ("cosine", "constant"):
            raise ValueError(f"Unknown schedule {self.schedule!r}; use 'cosine' or 'constant'.")
        self.schedule = str(self.schedule)
        _normalise_numbers(self)
        for field in _BOOL_FIELDS:
            if not isinstance(getattr(self, field), (bool, np.bool_)):
                raise ValueError(f"{field} must be True or False, got {getattr(self, field)!r}.")
            setattr(self, field, bool(getattr(self, field)))
        _check_checkpointing(self)
        if self.autocast is not None and (not isinstance(self.autocast, str) or self.autocast not in AUTOCAST_DTYPES):
            hint = (
                " float16 needs loss scaling, which train does not do;" if self.autocast in ("fp16", "float16") else ""
            )
            raise ValueError(
                f"autocast must be None (full precision) or one of {sorted(AUTOCAST_DTYPES)}, got {self.autocast!r}."
                f"{hint} Use autocast='bf16'."
            )


@dataclasses.dataclass
class TrainResult:
    """What `train` returns.

    Attributes:
        steps: the step the run reached (`cfg.steps` when it completed).
        losses: the training loss of every step from 0 (a resumed run's include the checkpoint's), averaged over the
            ranks.
        evals: `(step, eval_fn(model, step))` of every evaluation in this call.
        resumed_from: the checkpoint's step when the run resumed from one, else None.
    """

    steps: int
    losses: list[float]
    evals: list[tuple[int, dict]]
    resumed_from: int | None = None


def _normalise_numbers(cfg: TrainConfig) -> None:
    """Refuse ints and reals out of range; store them as plain int and float."""
    for field, least in _INT_FIELDS:
        value = getattr(cfg, field)
        if field == "batch_size" and value is None:
            continue
        if not is_int(value) or (least is not None and value < least):
            what = "an int" if least is None else f"an int >= {least}"
            what = f"None or {what}" if field == "batch_size" else what
            why = " (micro-batches per step)" if field == "accumulate" else ""
            raise ValueError(f"{field} must be {what}{why}, got {value!r}.")
        setattr(cfg, field, int(value))
    for field, least, optional in _REAL_FIELDS:
        value = getattr(cfg, field)
        if optional and value is None:
            continue
        if not is_real(value) or (value <= 0 if least is None else value < least):
            what = "a finite number > 0" if least is None else "a finite number >= 0"
            what = f"None or {what}" if optional else what
            why = " (0: no clipping)" if field == "grad_clip" else ""
            raise ValueError(f"{field} must be {what}{why}, got {value!r}.")
        setattr(cfg, field, float(value))
    if not is_real(cfg.min_lr_ratio) or not 0 <= cfg.min_lr_ratio <= 1:
        raise ValueError(f"min_lr_ratio must be a number in [0, 1], got {cfg.min_lr_ratio!r}.")
    cfg.min_lr_ratio = float(cfg.min_lr_ratio)
    betas = tuple(cfg.betas) if isinstance(cfg.betas, (tuple, list, np.ndarray)) else None
    if betas is None or len(betas) != 2 or not all(is_real(b) and 0 <= b < 1 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {cfg.betas!r}.")
    cfg.betas = (float(betas[0]), float(betas[1]))


def _check_checkpointing(cfg: TrainConfig) -> None:
    """Refuse a checkpoint_dir that is no path, and checkpoint_every without one."""
    if cfg.checkpoint_dir is not None and (
        not isinstance(cfg.checkpoint_dir, (str, Path)) or not str(cfg.checkpoint_dir)
    ):
        raise ValueError(f"checkpoint_dir must be None or a non-empty path, got {cfg.checkpoint_dir!r}.")
    if cfg.checkpoint_every and not cfg.checkpoint_dir:
        raise ValueError(f"checkpoint_every={cfg.checkpoint_every} needs a checkpoint_dir to write the checkpoints to.")
