"""What `train` reports as it goes.

The steps' losses (checked to be finite), metrics for the progress bar and the loggers, and tokens per second."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from cbinterp.core.checks import is_real
from cbinterp.core.tl_compat import Model
from cbinterp.core.training import distributed as dd
from cbinterp.core.training.config import TrainConfig

__all__ = ["PendingLosses", "Progress", "non_finite_error"]


def non_finite_error(loss: float, step: int, model: Model, codebooks, where_steps: str = "") -> Exception:
    """The error for a non-finite loss at `step`: which codebook input went non-finite first, and what to do."""
    sites = [name for name, cb in codebooks if not torch.isfinite(cb.last_mse)]
    where = f" (first non-finite codebook input: {sites[0]})" if sites else ""
    bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    hint = f"; the weights are already non-finite ({bad[:3]})" if bad else "; lower the learning rate or clip gradients"
    return FloatingPointError(f"Loss is {loss} at step {step}{where_steps}{where}{hint}.")


class PendingLosses:
    """The steps' losses kept on the device and copied to `losses` only at log, eval and checkpoint steps.

    Copied as floats, averaged over the ranks: one host synchronisation per `log_every` steps instead of per step."""

    def __init__(self, losses: list[float], check_each_step: bool):
        self.losses, self.pending, self.check_each_step = losses, [], check_each_step

    def add(self, loss: Tensor) -> None:
        """Keep a step's loss (a device scalar) until the next `flush`."""
        self.pending.append(loss)

    def flush(self, step: int, model, codebooks) -> None:
        """Append the kept losses to `losses`, refusing a non-finite one (a collective under torchrun)."""
        if not self.pending:
            return
        values = torch.stack(self.pending)
        if dd.active():  # through the group's own device, as every collective here (gloo takes CPU tensors)
            values = dd.all_reduce_(values.to(dd._comm_device()), "the averaging of the losses", step)
        values = (values / dd.world_size() if dd.active() else values).tolist()
        first = step - len(values)
        self.pending = []
        for i, value in enumerate(values):
            if not math.isfinite(value):  # on CUDA, found here rather than at once
                span = f" (checked every log_every steps, here {first}..{step - 1}; lower log_every to stop sooner)"
                raise non_finite_error(value, first + i, model, codebooks, "" if self.check_each_step else span)
        self.losses.extend(values)


class Progress:
    """The progress bar (rank 0, `cfg.progress`) and the loggers: metrics at log steps, eval results, tokens/s."""

    def __init__(self, cfg: TrainConfig, losses: list[float], step: int, codebooks, loggers: list):
        self.show = cfg.progress and dd.is_main()
        self.watch = self.show or bool(loggers)
        self.codebooks, self.loggers, self.losses = codebooks, loggers, losses
        # each code's count when last logged: a code whose count has not moved since was unused in between
        self.window = {name: cb.counts.clone() for name, cb in codebooks} if self.watch else {}
        self.logged_at, self.tokens_seen, self.since = len(losses), 0, time.perf_counter()
        self.bar = tqdm(total=cfg.steps, initial=step, disable=not self.show, desc="train", dynamic_ncols=True)

    def count(self, tokens: int) -> None:
        """Count a step's tokens (all ranks') towards tokens/s."""
        self.tokens_seen += tokens

    def log(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        """Show and log the metrics since the last log step (every rank calls it: the MSE is averaged over them)."""
        mse = _mean_mse(self.codebooks, step)  # a collective: every rank, whoever shows or logs
        if not self.watch:
            return
        now = time.perf_counter()
        metrics = _metrics(self.losses[self.logged_at :], self.codebooks, self.window, mse, optimizer)
        metrics["tokens_per_s"] = self.tokens_seen / max(now - self.since, 1e-9)
        self.tokens_seen, self.since, self.logged_at = 0, now, len(self.losses)
        if self.show:
            self.bar.set_postfix(_postfix(metrics, self.codebooks))
        for logger in self.loggers:
            logger.log(step, metrics)

    def log_eval(self, step: int, result: dict) -> None:
        """Log the numbers of an eval result, as "eval/<name>"."""
        for logger in self.loggers:
            numbers = {f"eval/{k}": float(v) for k, v in result.items() if is_real(v)}
            if numbers:
                logger.log(step, numbers)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Leave the time spent inside out of tokens/s (evaluation, checkpoints)."""
        start = time.perf_counter()
        yield
        self.since += time.perf_counter() - start

    def close(self) -> None:
        """Close the progress bar."""
        self.bar.close()


def _mean_mse(codebooks, step: int) -> list[float]:
    """Every codebook's last reconstruction MSE, averaged over the ranks."""
    if not codebooks:
        return []
    mse = torch.stack([cb.last_mse.detach().float() for _, cb in codebooks])
    if dd.active():
        mse = dd.all_reduce_(mse.to(dd._comm_device()), "the averaging of the codebook MSE", step) / dd.world_size()
    return mse.tolist()


def _metrics(recent: list[float], codebooks, window: dict, mse: list[float], optimizer) -> dict:
    """The logged metrics (see `cbinterp.core.training.loggers`); moves the dead-code window on."""
    groups = optimizer.param_groups
    metrics = {"loss": float(np.mean(recent)) if recent else float("nan"), "lr": float(groups[-1]["lr"])}
    if codebooks and any(groups[0]["params"][0] is cb.weight for _, cb in codebooks):  # frozen codebooks: no group
        metrics["lr/codebooks"] = float(groups[0]["lr"])
    dead_total, codes_total = 0, 0
    for (name, cb), value in zip(codebooks, mse):
        unused = int(((cb.counts - window[name]) == 0).sum())
        window[name] = cb.counts.clone()
        metrics[f"mse/{name}"] = value
        metrics[f"dead_fraction/{name}"] = unused / cb.counts.numel()
        dead_total, codes_total = dead_total + unused, codes_total + cb.counts.numel()
    if codes_total:
        metrics["dead_fraction"] = dead_total / codes_total
    return metrics


def _postfix(metrics: dict, codebooks) -> dict:
    """The progress bar's summary: loss, mean codebook MSE, dead-code fraction."""
    stats = {"loss": f"{metrics['loss']:.4f}"}
    if codebooks:
        stats["mse"] = f"{np.mean([metrics[f'mse/{name}'] for name, _ in codebooks]):.4g}"
        stats["dead"] = f"{metrics['dead_fraction']:.1%}"
    return stats
