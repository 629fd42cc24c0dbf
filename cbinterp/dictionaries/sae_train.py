"""Training sparse autoencoders on activations handed out step by step (several SAEs can share one stream).

`SAETrainer(sae, cfg).step(x)` takes one optimiser step on a batch of activations `(..., [groups,] d_in)`; a loop
that runs the model once per step can feed every SAE of every site from that one forward (what
`benchmarks/codes_vs_sae.py` does). `train_sae(sae, batches, cfg)` is the loop for one SAE.

The losses, in the scaled units of `SparseAutoencoder` (inputs of mean squared norm d_in), each averaged over
tokens and groups:

* TopK: the squared reconstruction error, plus `aux_coefficient` times the AuxK loss of Gao et al. (2024): the
  latents that have not fired for `dead_steps` steps reconstruct the residual with their own top `aux_k`, which
  gives dead latents a gradient (normalised by the residual's squared norm).
* L1: the squared error plus `l1` times the sum of the latents (decoder rows have unit norm). With `target_l0`,
  each group's coefficient is adapted during the first `tune_fraction` of the steps, multiplicatively, towards
  that mean number of active latents per token, and then held fixed: an L1 SAE tuned to a given sparsity in one
  run (the coefficients reached are in `SAETrainer.l1`).

Adam (no weight decay), linear warmup then cosine decay to `min_lr_ratio` (`train`'s schedule); decoder rows are
renormalised after every step. Nothing here is random (the SAE's initial weights are seeded by its config), so a
run on the same batches is repeatable.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
from jaxtyping import Float
from torch import Tensor

from cbinterp.core.checks import is_int, is_real
from cbinterp.core.training.optim import lr_factor
from cbinterp.dictionaries.sae import SparseAutoencoder

__all__ = ["SAETrainConfig", "SAETrainer", "train_sae"]


@dataclasses.dataclass(frozen=True)
class SAETrainConfig:
    """How an SAE is trained (see the module docstring for the losses).

    Args:
        steps: optimiser steps (the schedule's length).
        lr, warmup_steps, schedule, min_lr_ratio: Adam's learning rate and its schedule, as `TrainConfig`'s.
        l1_coefficient: L1 SAEs: the penalty's coefficient (the start value when `target_l0` is set).
        target_l0: L1 SAEs: adapt the coefficient of each group towards this mean number of active latents.
        tune_fraction, tune_rate: over which share of the steps, and how fast: the log-coefficient changes by
            `tune_rate * clamp(log(L0 / target_l0), -1, 1)` per step.
        aux_coefficient, aux_k, dead_steps: TopK SAEs: the AuxK loss's weight, how many dead latents it uses per
            token (default d_in // 2), and after how many steps without firing a latent counts as dead.
    """

    steps: int
    lr: float = 1e-3
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    l1_coefficient: float = 1.0
    target_l0: float | None = None
    tune_fraction: float = 0.5
    tune_rate: float = 0.03
    aux_coefficient: float = 1 / 32
    aux_k: int | None = None
    dead_steps: int = 25

    def __post_init__(self) -> None:
        for name in ("steps", "dead_steps"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ValueError(f"SAETrainConfig.{name} must be an int >= 1, got {getattr(self, name)!r}.")
        if not is_int(self.warmup_steps) or self.warmup_steps < 0:
            raise ValueError(f"SAETrainConfig.warmup_steps must be an int >= 0, got {self.warmup_steps!r}.")
        for name in ("lr", "l1_coefficient", "tune_rate"):
            if not is_real(getattr(self, name)) or getattr(self, name) <= 0:
                raise ValueError(f"SAETrainConfig.{name} must be a number > 0, got {getattr(self, name)!r}.")
        for name in ("aux_coefficient", "min_lr_ratio", "tune_fraction"):
            value = getattr(self, name)
            if not is_real(value) or value < 0 or (name != "aux_coefficient" and value > 1):
                raise ValueError(f"SAETrainConfig.{name} must be a number >= 0 (<= 1 for ratios), got {value!r}.")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"SAETrainConfig.schedule must be 'cosine' or 'constant', got {self.schedule!r}.")
        if self.target_l0 is not None and (not is_real(self.target_l0) or self.target_l0 <= 0):
            raise ValueError(f"SAETrainConfig.target_l0 must be None or a number > 0, got {self.target_l0!r}.")
        if self.aux_k is not None and (not is_int(self.aux_k) or self.aux_k < 1):
            raise ValueError(f"SAETrainConfig.aux_k must be None or an int >= 1, got {self.aux_k!r}.")


class SAETrainer:
    """One SAE's optimiser and training state; `step(x)` trains on one batch and returns its metrics."""

    def __init__(self, sae: SparseAutoencoder, cfg: SAETrainConfig):
        if not isinstance(sae, SparseAutoencoder):
            raise TypeError(f"SAETrainer trains a SparseAutoencoder, got {type(sae).__name__}.")
        if not isinstance(cfg, SAETrainConfig):
            raise TypeError(f"SAETrainer takes an SAETrainConfig, got {type(cfg).__name__}.")
        self.sae, self.cfg = sae, cfg
        self.optimizer = torch.optim.Adam(sae.parameters(), lr=cfg.lr)
        groups, n = sae.cfg.groups, sae.cfg.n_latents
        device = sae.W_dec.device
        #: L1 SAEs: each group's coefficient now (adapted while tuning).
        self.l1 = torch.full((groups,), float(cfg.l1_coefficient), device=device, dtype=torch.float64)
        self.last_fired = torch.zeros(groups, n, dtype=torch.long, device=device)
        self.n_steps = 0
        self.history: list[dict] = []

    @property
    def tuning(self) -> bool:
        """Whether this step still adapts the L1 coefficients."""
        cfg = self.cfg
        return (
            self.sae.cfg.architecture == "l1"
            and cfg.target_l0 is not None
            and self.n_steps < cfg.tune_fraction * cfg.steps
        )

    def dead(self) -> Tensor:
        """Bool `(groups, n_latents)`: latents that have not fired for `dead_steps` steps."""
        return (self.n_steps - self.last_fired) >= self.cfg.dead_steps

    def step(self, x: Float[Tensor, "... dim"]) -> dict:
        """One optimiser step on the activations `x`; returns that step's metrics (also kept in `history`)."""
        sae, cfg = self.sae, self.cfg
        xg = sae._grouped(x.to(sae.W_dec.dtype))
        xg = xg.reshape(-1, sae.cfg.groups, sae.cfg.d_in)
        if self.n_steps == 0:
            sae.init_from_data_(xg)
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(self.n_steps, cfg)
        scaled = xg / sae.input_scale[:, None]
        pre = _pre(sae, scaled)
        aux = torch.zeros((), device=xg.device)
        if sae.cfg.architecture == "topk":
            values, ids = pre.topk(sae.cfg.k, dim=-1)
            values = torch.relu(values)
            recon = sae.sparse_sum(values, ids) + sae.b_dec
            n = sae.cfg.n_latents
            slot = torch.where(values > 0, ids, n).transpose(0, 1).reshape(sae.cfg.groups, -1)  # n: not active
            fired = torch.zeros(sae.cfg.groups, n + 1, dtype=torch.bool, device=xg.device)
            fired = fired.scatter_(1, slot, True)[:, :n]
            active = (values > 0).sum(-1).float()
            penalty = torch.zeros((), device=xg.device)
            dead = self.dead()
            if cfg.aux_coefficient > 0 and bool(dead.any()):
                aux = self._aux_loss(pre, dead, (scaled - recon).detach())
        else:
            latents = torch.relu(pre)
            recon = torch.einsum("mgn,gnd->mgd", latents, sae.W_dec) + sae.b_dec
            fired = (latents > 0).any(0)
            active = (latents > 0).sum(-1).float()
            penalty = (latents.sum(-1) * self.l1.to(latents.dtype)).mean()
        err = (recon - scaled).pow(2).sum(-1)  # (m, g)
        mse = err.mean()
        loss = mse + penalty + cfg.aux_coefficient * aux
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        sae.normalize_decoder_()
        with torch.no_grad():
            self.last_fired[fired] = self.n_steps
            l0 = active.mean(0)  # (groups,)
            if self.tuning:
                # in log space, so that twice and half the target pull equally hard; clamped against early swings
                ratio = torch.log(l0.double().clamp_min(1e-3) / cfg.target_l0).clamp(-1.0, 1.0)
                self.l1 *= torch.exp(cfg.tune_rate * ratio)
            variance = (scaled - scaled.mean(0)).pow(2).sum(-1).mean(0)
            fvu = err.mean(0) / variance.clamp_min(1e-12)
        record = {
            "step": self.n_steps,
            "loss": float(loss.detach()),
            "mse": float(mse.detach()),
            "aux": float(aux.detach()),
            "fvu": fvu.tolist(),
            "l0": l0.tolist(),
            "n_dead": int(self.dead().sum()),
        }
        if sae.cfg.architecture == "l1":
            record["l1"] = self.l1.tolist()
        self.history.append(record)
        self.n_steps += 1
        return record

    def _aux_loss(self, pre: Tensor, dead: Tensor, residual: Tensor) -> Tensor:
        """AuxK: the dead latents' top `aux_k` reconstruct `residual`; squared error over the residual's."""
        sae = self.sae
        k = min(self.cfg.aux_k or max(1, sae.cfg.d_in // 2), sae.cfg.n_latents)
        masked = pre.masked_fill(~dead, -math.inf)
        values, ids = masked.topk(k, dim=-1)
        values = torch.relu(values)  # -inf (a live latent, when too few are dead) gives 0
        approx = sae.sparse_sum(values, ids)
        return (approx - residual).pow(2).sum(-1).mean() / residual.pow(2).sum(-1).mean().clamp_min(1e-12)

    def summary(self, last: int = 20) -> dict:
        """The mean of the last `last` steps' metrics (per group where they are per group), and the L1 coefficients."""
        tail = self.history[-last:]
        if not tail:
            return {}
        mean = lambda key: torch.tensor([r[key] for r in tail], dtype=torch.float64).mean(0).tolist()  # noqa: E731
        out = {"steps": self.n_steps, "loss": mean("loss"), "fvu": mean("fvu"), "l0": mean("l0")}
        out["n_dead"] = tail[-1]["n_dead"]
        if self.sae.cfg.architecture == "l1":
            out["l1"] = self.l1.tolist()
        return out


def _pre(sae: SparseAutoencoder, scaled: Tensor) -> Tensor:
    """Pre-activations `(m, groups, n_latents)` of already scaled inputs `(m, groups, d_in)`."""
    return torch.einsum("mgd,gdn->mgn", scaled - sae.b_dec, sae.W_enc) + sae.b_enc


def train_sae(
    sae: SparseAutoencoder,
    batches: Callable[[int], Tensor],
    cfg: SAETrainConfig,
    log: Callable[[dict], None] | None = None,
) -> SAETrainer:
    """Train `sae` for `cfg.steps` steps on `batches(step)` (activations); returns the trainer (its `history`)."""
    trainer = SAETrainer(sae, cfg)
    for step in range(cfg.steps):
        record = trainer.step(batches(step))
        if log is not None:
            log(record)
    return trainer
