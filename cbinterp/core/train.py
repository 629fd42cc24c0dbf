"""One training loop for any HookedTransformer, with or without codebooks."""

from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from cbinterp.core.atomic import atomic_dir, recover_dir
from cbinterp.core.attach import get_codebooks, require_hooked_transformer
from cbinterp.core.io import WEIGHTS_FILE, read_config, sha256_of, write_model

Batches = Union[Callable[[int], Tensor], Iterable[Tensor]]
TRAINER_FILE = "trainer.pt"


@dataclasses.dataclass
class TrainConfig:
    """Settings of `train`. `codebook_lr` / `codebook_weight_decay` default to the model's when None."""

    steps: int
    lr: float = 1e-3
    weight_decay: float = 0.01
    codebook_lr: Optional[float] = None
    codebook_weight_decay: Optional[float] = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: Optional[float] = 1.0
    warmup_steps: int = 0
    schedule: str = "cosine"  # "cosine" (to min_lr_ratio * lr) or "constant", after warmup
    min_lr_ratio: float = 0.1
    freeze_model: bool = False  # train the codebooks only
    compile: bool = False
    eval_every: int = 0
    checkpoint_every: int = 0
    checkpoint_dir: Optional[str] = None
    log_every: int = 10
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"Unknown schedule {self.schedule!r}; use 'cosine' or 'constant'.")
        if self.steps < 0 or self.warmup_steps < 0:
            raise ValueError(f"steps and warmup_steps must be >= 0, got {self.steps} and {self.warmup_steps}.")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}.")


@dataclasses.dataclass
class TrainResult:
    steps: int
    losses: list[float]
    evals: list[tuple[int, dict]]
    resumed_from: Optional[int] = None


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


def make_optimizer(model: HookedTransformer, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with the codebooks in their own parameter group (own lr and weight decay)."""
    codebook_params = {id(cb.weight) for cb in get_codebooks(model).values()}
    cb = [p for p in model.parameters() if id(p) in codebook_params]
    rest = [p for p in model.parameters() if id(p) not in codebook_params]
    if cfg.freeze_model and not cb:
        raise ValueError("freeze_model=True but the model has no codebooks to train; attach codebooks first.")
    for p in rest:
        p.requires_grad_(not cfg.freeze_model)
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
    return torch.optim.AdamW(groups, betas=cfg.betas)


def _rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, model: HookedTransformer, optimizer, step: int, losses: list[float]) -> None:
    """Model (cbinterp format) plus optimizer, step and RNG state, written atomically as one directory."""
    with atomic_dir(path) as tmp:
        write_model(model, tmp, extra={"step": step})
        torch.save(
            {"optimizer": optimizer.state_dict(), "step": step, "losses": losses, "rng": _rng_state()},
            tmp / TRAINER_FILE,
        )


def load_checkpoint(path: Path, model: HookedTransformer, optimizer) -> tuple[int, list[float]]:
    """Restore `model` and `optimizer` in place from a checkpoint; returns (step, losses so far)."""
    from safetensors.torch import load_file

    try:
        config = read_config(path)
        if sha256_of(path / WEIGHTS_FILE) != config["weights_sha256"]:
            raise ValueError("the weights do not match their recorded checksum")
        state = torch.load(path / TRAINER_FILE, map_location="cpu", weights_only=False)
        weights = load_file(path / WEIGHTS_FILE)
    except Exception as err:
        raise ValueError(
            f"Cannot resume from {path}: the checkpoint is unreadable ({err}). Delete it to start over."
        ) from err
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(
            f"Checkpoint {path} does not fit this model: {err}. Delete it or build the model it was made with."
        ) from err
    if missing or unexpected:
        raise ValueError(
            f"Checkpoint {path} does not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]})."
        )
    optimizer.load_state_dict(state["optimizer"])
    _set_rng_state(state["rng"])
    return state["step"], state["losses"]


def train(
    model: HookedTransformer,
    batches: Batches,
    cfg: TrainConfig,
    eval_fn: Optional[Callable[[HookedTransformer, int], dict]] = None,
    resume: bool = True,
) -> TrainResult:
    """Train `model` on next-token loss.

    Args:
        batches: `fn(step) -> tokens` (resumes exactly), or an iterable of token batches (on resume, the
            batches already used are skipped).
        eval_fn: called as `eval_fn(model, step)` every `cfg.eval_every` steps and at the end, in eval mode.
        resume: continue from `cfg.checkpoint_dir` when it holds a checkpoint.
    """
    require_hooked_transformer(model)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    device = next(model.parameters()).device
    optimizer = make_optimizer(model, cfg)
    step, losses, evals, resumed_from = 0, [], [], None
    ckpt = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
    if ckpt is not None:
        recover_dir(ckpt)  # a crash between the two renames of a checkpoint write left it aside
    if resume and ckpt is not None and (ckpt / TRAINER_FILE).exists():
        step, losses = load_checkpoint(ckpt, model, optimizer)
        resumed_from = step
    get_batch = batches if callable(batches) else _skipping(iter(batches), step)
    forward = torch.compile(model) if cfg.compile else model
    codebooks = list(get_codebooks(model).items())
    model.train()
    bar = tqdm(total=cfg.steps, initial=step, disable=not cfg.progress, desc="train", dynamic_ncols=True)
    try:
        while step < cfg.steps:
            tokens = (get_batch(step) if callable(batches) else next(get_batch)).to(device)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * lr_factor(step, cfg)
            loss = forward(tokens, return_type="loss")
            if not torch.isfinite(loss):
                sites = [name for name, cb in codebooks if not torch.isfinite(cb.last_mse)]
                where = f" (first non-finite codebook input: {sites[0]})" if sites else ""
                raise FloatingPointError(
                    f"Loss is {loss.item()} at step {step}{where}; lower the learning rate or clip gradients."
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.grad_clip)
            optimizer.step()
            step += 1
            losses.append(loss.item())
            if step % cfg.log_every == 0 or step == cfg.steps:
                bar.set_postfix(_progress_stats(losses, codebooks, cfg.log_every))
            bar.update(1)
            if eval_fn is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
                model.eval()
                evals.append((step, eval_fn(model, step)))
                model.train()
            if ckpt is not None and ((cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == cfg.steps):
                save_checkpoint(ckpt, model, optimizer, step, losses)
    finally:
        bar.close()
        model.eval()
    return TrainResult(steps=step, losses=losses, evals=evals, resumed_from=resumed_from)


def _progress_stats(losses: list[float], codebooks, window: int) -> dict:
    stats = {"loss": f"{np.mean(losses[-window:]):.4f}"}
    if codebooks:
        stats["mse"] = f"{np.mean([float(cb.last_mse) for _, cb in codebooks]):.4g}"
        stats["dead"] = sum(cb.n_dead for _, cb in codebooks)
        for _, cb in codebooks:
            cb.reset_usage()  # so "dead" counts codes unused in the last window
    return stats


def _skipping(iterator, n: int):
    for _ in range(n):
        next(iterator)
    return iterator
