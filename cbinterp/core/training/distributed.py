"""Data-parallel training on `torch.distributed`: who this process is, and the codebook state kept equal on all ranks.

`train` is data parallel whenever a `torch.distributed` process group is initialised (e.g. under `torchrun`, which
`init_from_env` turns into one): the model runs under `DistributedDataParallel`, which averages the gradients, and
every codebook gets a `CodebookStepSync` that sums its usage counts over the ranks (and, with gradient accumulation,
over the micro-batches) before they decide anything, and makes dead-code replacement identical on every rank.

`cache_codes` uses the same process group through the object collectives at the end (`broadcast_object`,
`gather_objects`, `wait_for_all_ranks`): bookkeeping outside training, whose errors pass through unchanged for the
caller to explain.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from cbinterp.core.device import default_device

__all__ = [
    "CodebookStepSync",
    "RankFailure",
    "active",
    "backend_for",
    "barrier",
    "init_from_env",
    "is_main",
    "rank",
    "world_size",
]


def active() -> bool:
    """Whether a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank in the process group; 0 when not distributed."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """The number of processes in the group; 1 when not distributed."""
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0, or the only process: the one that writes checkpoints, shows progress and logs."""
    return rank() == 0


def backend_for(device: torch.device | str) -> str:
    """The process group backend for `device`: nccl for CUDA tensors, gloo for everything else."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_from_env(device: str | None = None, timeout_s: float = 600.0) -> torch.device:
    """Join the process group `torchrun` describes and return this rank's device.

    `torchrun` sets RANK, WORLD_SIZE, MASTER_ADDR, ...; the device is `cuda:LOCAL_RANK` for device "cuda", else the
    CPU. Without those variables: no group, one process."""
    device = device or default_device()
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group(backend_for(device), timeout=datetime.timedelta(seconds=timeout_s))
    return torch.device(device)


class RankFailure(RuntimeError):
    """A collective operation failed: another rank stopped (its own error says why) or the group broke."""


@contextlib.contextmanager
def collective(what: str, step: int) -> Iterator[None]:
    """Turn a failed collective into a `RankFailure` that says which rank saw it, where, and what to look at."""
    try:
        yield
    except RankFailure:
        raise
    except (RuntimeError, dist.DistBackendError) as err:
        raise RankFailure(
            f"Rank {rank()} of {world_size()}: {what} at step {step} failed ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}). Another rank most likely stopped; its own error says "
            "why. No checkpoint was written for this step: the last complete one is intact, and train resumes from it "
            "with any number of ranks."
        ) from err


def barrier(what: str, step: int) -> None:
    """Wait for every rank (no-op when not distributed); `what` and `step` name it in a timeout's error."""
    if active():
        with collective(what, step):
            dist.barrier()


def broadcast_(tensor: Tensor, what: str, step: int) -> Tensor:
    """Rank 0's `tensor` on every rank, in place (a no-op in one process)."""
    if active():
        with collective(what, step):
            dist.broadcast(tensor, src=0)
    return tensor


def all_reduce_(tensor: Tensor, what: str, step: int, op=None) -> Tensor:
    """`tensor` summed (or reduced with `op`) over the ranks, in place (a no-op in one process)."""
    if active():
        with collective(what, step):
            dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor


def all_gather_cat(tensor: Tensor, what: str, step: int) -> Tensor:
    """Every rank's `tensor` (all the same shape) concatenated along dim 0 in rank order."""
    if not active():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    with collective(what, step):
        dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


@torch.no_grad()
def broadcast_module_(module: torch.nn.Module, step: int = 0) -> None:
    """Rank 0's parameters and buffers on every rank (what k-means or a user's per-rank init may have set apart)."""
    if not active():
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        broadcast_(tensor.data, "the start-up copy of rank 0's model", step)


def check_same_on_ranks(value: int, what: str, fix: str) -> None:
    """Refuse to go on when `value` differs between ranks (every rank calls it, and every rank raises)."""
    if not active():
        return
    t = torch.tensor([value, -value], dtype=torch.long, device=_comm_device())
    all_reduce_(t, f"the check of {what}", 0, op=dist.ReduceOp.MAX)
    if int(t[0]) != -int(t[1]):
        raise ValueError(f"The ranks disagree on {what} (from {-int(t[1])} to {int(t[0])}). {fix}")


def _comm_device() -> torch.device:
    """The device collectives of small bookkeeping tensors run on: CUDA for nccl, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class CodebookStepSync:
    """Sums one optimizer step's usage counts over micro-batches and ranks; replaces dead codes once per step.

    Set on each codebook (`Codebook.step_sync`) by `train`. The counts are summed before they update the codebook's
    statistics (so that `counts`, `steps_since_used` and `train_steps` are those of the global batch, the same on
    every rank); dead codes are replaced on the first micro-batch, from the inputs of all ranks.

    Dead-code replacement needs no broadcast of random draws: every rank holds the same dead set (from the summed
    counts), the same gathered inputs (in rank order: the global batch's rows) and the same torch RNG state (seeded
    alike, and nothing rank-dependent draws from it), so every rank computes the same new codes; rank 0's codes are
    then broadcast anyway, so that the codebooks stay bit-identical even where a device's kernels are not
    deterministic. One rank with 2b rows and two ranks with b rows each thus replace the same codes the same way.
    """

    def __init__(self) -> None:
        self.micro, self.n_micro, self.step = 0, 1, 0
        self._pending: dict[int, Tensor] = {}

    def start_micro(self, step: int, micro: int, n_micro: int) -> None:
        """Note which micro-batch (of `n_micro`) of optimizer step `step` runs next."""
        self.step, self.micro, self.n_micro = step, micro, n_micro

    def reduce_counts(self, codebook, batch_counts: Tensor) -> Tensor | None:
        """The step's summed counts on its last micro-batch; None (nothing to update yet) on the others."""
        key = id(codebook)
        total = batch_counts if key not in self._pending else self._pending.pop(key) + batch_counts
        if self.micro < self.n_micro - 1:
            self._pending[key] = total
            return None
        if active():
            comm = _comm_device()
            reduced = all_reduce_(total.to(comm), f"the usage counts of codebook {codebook.name!r}", self.step)
            total = reduced.to(batch_counts.device)
        return total

    def may_replace(self) -> bool:
        """Dead codes are looked for once per optimizer step: on its first micro-batch."""
        return self.micro == 0

    def replacement_rows(self, codebook, xg: Tensor) -> Tensor:
        """The inputs of every rank at this codebook, in rank order (the global batch's rows at this site)."""
        if not active():
            return xg
        c = codebook.cfg
        rows = xg.detach().reshape(-1, c.groups, c.dim)
        comm = _comm_device()
        gathered = all_gather_cat(rows.to(comm), f"the inputs of codebook {codebook.name!r} for dead codes", self.step)
        return gathered.to(xg.device)

    def after_replace(self, codebook) -> None:
        """Rank 0's replaced codes and counters on every rank."""
        if not active():
            return
        for tensor in (codebook.weight.data, codebook.steps_since_used):
            comm = _comm_device()
            moved = broadcast_(tensor.to(comm), f"the replaced codes of codebook {codebook.name!r}", self.step)
            tensor.copy_(moved)


def broadcast_object(value: Any) -> Any:
    """Rank 0's `value` (any picklable object) on every rank; `value` itself in one process."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(value: Any) -> list:
    """Every rank's `value` (any picklable object), in rank order, on every rank; `[value]` in one process."""
    if not active():
        return [value]
    out: list[object | None] = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


def wait_for_all_ranks() -> None:
    """Return once every rank has called it (a no-op in one process); a failure is torch's own error."""
    if active():
        dist.barrier()
