"""`train`'s data: batches by step from a callable, an iterable or a token tensor, checked and fingerprinted."""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from cbinterp.core.checks import check_token_ids
from cbinterp.core.storage import manifest as mf
from cbinterp.core.tl_compat import Model
from cbinterp.core.training import distributed as dd
from cbinterp.core.training.config import TrainConfig

__all__ = [
    "Batches",
    "DataRanOut",
    "TrainData",
    "batch_fingerprint",
    "check_batch",
    "known_length",
    "ran_out_message",
]

Batches = Callable[[int], Tensor] | Iterable[Tensor] | Tensor


class DataRanOut(Exception):
    """The batches of an iterable ran out before `cfg.steps` (raised inside the loop, turned into a ValueError)."""


def batch_fingerprint(tokens: Tensor) -> str:
    """Fingerprint of a batch's token ids, whatever their int dtype or device."""
    return mf.tensor_fingerprint(tokens.detach().to("cpu", torch.int64))


def known_length(batches) -> int | None:
    """How many batches an iterable holds, when it says so (`len()`); None for a tensor, callable or plain iterator."""
    if isinstance(batches, (Tensor, str, bytes, Path)) or callable(batches):
        return None
    try:
        return int(len(batches))
    except TypeError:  # no __len__, or one that refuses (e.g. a DataLoader over an IterableDataset)
        return None


def _takes_rank(fn: Callable) -> bool:
    """Whether `fn` can be called as `fn(step, rank, world_size)` (it then returns this rank's rows itself)."""
    try:
        inspect.signature(fn).bind(0, 0, 1)
    except (TypeError, ValueError):
        return False
    return True


class TrainData:
    """Batches by step from a callable, an iterable, or a token tensor (seeded shuffled batches).

    Every source gives the global batch of a step, of which each rank trains on its contiguous share of rows (rank r:
    rows r*b to (r+1)*b), except `fn(step, rank, world_size)`, which gives the rank's rows itself. Fingerprints are
    always of the global batch, so that a checkpoint resumes with any number of ranks.

    Attributes:
        source: "tensor", "callable" or "iterable".
        get: `get(step) -> tokens`, the step's batch as the source gives it (unchecked).
        chain: for an iterable, a running hash of all the batches drawn so far; else None.
    """

    def __init__(self, batches: Batches, cfg: TrainConfig):
        self.source = "callable"
        self.chain = None
        self.sharded = False  # fn(step, rank, world_size): each rank draws its own rows
        self.rank, self.world, self.accumulate = dd.rank(), dd.world_size(), cfg.accumulate
        if isinstance(batches, np.ndarray):  # a token array, not an iterable of one-row batches
            batches = torch.from_numpy(batches)
        if isinstance(batches, Tensor):
            self._use_tensor(batches, cfg)
        elif callable(batches):
            if _takes_rank(batches):
                self.sharded = True
                self.get = lambda step: batches(step, self.rank, self.world)
            else:
                self.get = batches
        elif isinstance(batches, Iterable):
            self._use_iterable(batches, cfg)
        else:
            raise TypeError(
                "batches must be fn(step) -> tokens, fn(step, rank, world_size) -> this rank's tokens, an iterable "
                f"of batches or a tensor, got {batches!r}."
            )
        self.steps = cfg.steps

    def _use_tensor(self, tokens: Tensor, cfg: TrainConfig) -> None:
        """Seeded shuffled batches of `cfg.batch_size` rows of `tokens`, a new order each epoch."""
        if cfg.batch_size is None:
            raise TypeError(
                "train got a bare token tensor. Set TrainConfig(batch_size=...) to draw seeded shuffled batches "
                "of its rows, or pass `lambda step: tokens[...]` (one batch per step) or a list of batches."
            )
        if tokens.dim() != 2 or tokens.shape[0] < cfg.batch_size:
            raise ValueError(
                f"A token tensor for train must be (n_sequences, seq) with at least batch_size={cfg.batch_size} "
                f"rows, got shape {tuple(tokens.shape)}."
            )
        if cfg.batch_size % (self.world * self.accumulate):  # refused before any work
            raise ValueError(self._split_error(cfg.batch_size, "batch_size"))
        self.source, self.tokens, self.batch_size, self.seed = "tensor", tokens, cfg.batch_size, cfg.seed
        self._epoch, self._perm = None, None
        self.get = self._from_tensor

    def _use_iterable(self, batches: Iterable, cfg: TrainConfig) -> None:
        """One batch per step, in order; one with a `len()` shorter than `cfg.steps` is refused here."""
        # Every step takes one batch (accumulate splits it), and a resumed run reads the batches already trained
        # on again to check them: a run needs `steps` batches in all, resumed or not.
        n = known_length(batches)
        if n is not None and n < cfg.steps:
            raise ValueError(
                f"train got {n} batches for steps={cfg.steps}: every step takes one batch (a resumed run reads "
                f"the ones already trained on again, to check them), so it needs {cfg.steps}. Give more batches "
                "(e.g. itertools.cycle(batches)) or lower steps."
            )
        self.source, self.iterator, self.chain = "iterable", iter(batches), hashlib.sha256(b"").hexdigest()
        self.get = self._next

    def _split_error(self, rows: int, what: str) -> str:
        parts = self.world * self.accumulate
        how = f"{self.world} rank{'s' if self.world > 1 else ''} x accumulate={self.accumulate}"
        return (
            f"The {what} of {rows} rows does not split evenly into {parts} parts ({how}): every rank trains on "
            f"an equal share of each batch, in equal micro-batches. Use a batch size that is a multiple of {parts}, or "
            "another number of processes (torchrun --nproc_per_node) or accumulate."
        )

    def local(self, tokens: Int[Tensor, "batch pos"], step: int) -> Int[Tensor, "rows pos"]:
        """This rank's rows of the step's batch (the batch itself when the source gave this rank's rows)."""
        if self.sharded:
            if tokens.shape[0] % self.accumulate:
                raise ValueError(
                    f"The batch of step {step} on rank {self.rank} has {tokens.shape[0]} rows, which "
                    f"accumulate={self.accumulate} does not divide. Give each rank a multiple of {self.accumulate} "
                    "rows, or change accumulate."
                )
            return tokens
        if tokens.shape[0] % (self.world * self.accumulate):
            raise ValueError(self._split_error(tokens.shape[0], f"batch of step {step}"))
        per = tokens.shape[0] // self.world
        return tokens[self.rank * per : (self.rank + 1) * per]

    def fingerprint(self, tokens: Tensor, step: int) -> str:
        """Fingerprint of the step's global batch (gathered from the ranks when each drew its own rows)."""
        tokens = torch.as_tensor(tokens)
        if self.sharded and dd.active():
            dd.check_same_on_ranks(
                tokens.shape[0], f"the rows of the batch of step {step}", "Give every rank as many rows."
            )
            comm = dd._comm_device()
            tokens = dd.all_gather_cat(tokens.to(comm), f"the gathering of the batch of step {step}", step)
        return batch_fingerprint(tokens)

    def _from_tensor(self, step: int) -> Int[Tensor, "batch pos"]:
        per_epoch = self.tokens.shape[0] // self.batch_size
        epoch, i = divmod(step, per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) & 0x7FFF_FFFF_FFFF_FFFF)
            self._epoch, self._perm = epoch, torch.randperm(self.tokens.shape[0], generator=generator)
        rows = self._perm[i * self.batch_size : (i + 1) * self.batch_size].to(self.tokens.device)
        return self.tokens[rows]

    def _next(self, step: int) -> Tensor:
        try:
            tokens = next(self.iterator)
        except StopIteration:
            raise DataRanOut(step) from None
        self.chain = hashlib.sha256((self.chain + batch_fingerprint(torch.as_tensor(tokens))).encode()).hexdigest()
        return tokens

    def record(self, first: str | None, last: str | None) -> dict:
        """What a checkpoint keeps of the data to check a resume against: first and last fingerprints, chain."""
        return {"source": self.source, "first": first, "last": last, "chain": self.chain}

    def check_resume(self, path: Path, recorded: dict, step: int) -> None:
        """Skip (iterable) or look again at (callable, tensor) the batches already trained on; refuse other data."""
        if step == 0:
            return
        if self.source == "iterable":
            seen = {}
            for i in range(step):
                try:
                    tokens = self.get(i)
                except DataRanOut:
                    raise ValueError(
                        f"Cannot resume from {path}: the batches ran out at step {i}, before the {step} batches the "
                        f"checkpoint was trained on (steps={self.steps} needs {self.steps} batches). Give the same "
                        "batches as that run, and more."
                    ) from None
                if i in (0, step - 1):
                    seen[i] = batch_fingerprint(torch.as_tensor(tokens))
            first, last = seen[0], seen[step - 1]
        else:
            first = self.fingerprint(self.get(0), 0)
            last = self.fingerprint(self.get(step - 1), step - 1)
        problem = None
        if recorded.get("first") not in (None, first):
            problem = "the batch of step 0 differs from the one the checkpoint was trained on"
        elif recorded.get("last") not in (None, last):
            problem = f"the batch of step {step - 1} differs from the one the checkpoint was trained on"
        elif self.chain is not None and recorded.get("chain") not in (None, self.chain):
            problem = f"the first {step} batches differ from those the checkpoint was trained on"
        if problem:
            raise ValueError(
                f"Cannot resume from {path}: {problem} (other data). Use the same data, another checkpoint_dir, or "
                "resume=False to start over."
            )


def check_batch(tokens, step: int, model: Model, ids_checked: bool = False) -> Int[Tensor, "batch pos"]:
    """The step's batch as a tensor, refused with a clear error unless it is (batch, seq) token ids the model takes.

    `ids_checked`: the ids were all checked already (rows of a token tensor checked once), which saves the per-step
    host synchronisation of the check on an accelerator.
    """
    if not isinstance(tokens, Tensor):
        tokens = torch.as_tensor(tokens)
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool or tokens.dim() != 2:
        raise ValueError(
            f"The batch of step {step} must be an int tensor of token ids (batch, seq), got {tokens.dtype} "
            f"{tuple(tokens.shape)}."
        )
    if tokens.numel() == 0:
        raise ValueError(
            f"The batch of step {step} is empty (shape {tuple(tokens.shape)}): it has no tokens to train on."
        )
    if tokens.shape[1] > model.cfg.n_ctx:
        raise ValueError(
            f"The batch of step {step} has sequences of {tokens.shape[1]} tokens, longer than the model's context "
            f"n_ctx={model.cfg.n_ctx}. Cut the sequences, or build the model with a larger n_ctx."
        )
    if not ids_checked:
        check_token_ids(tokens, model.cfg.d_vocab, f"The tokens of the batch of step {step}")
    return tokens


def ran_out_message(step: int, start: int, cfg: TrainConfig, ckpt: Path | None) -> str:
    """What happened when an iterable of unknown length ran out at `step`, and how to go on."""
    ran = f"{step - start} step{'s' if step - start != 1 else ''} ran in this call" + (
        f" (resumed at step {start})" if start else ""
    )
    if step == 0:
        kept = "No step ran, so nothing was written."
    elif ckpt is None:
        kept = (
            f"The model holds the weights of step {step}, but no checkpoint was written (no checkpoint_dir); set "
            "one to be able to resume."
        )
    else:
        kept = (
            f"The checkpoint of step {step} is in {ckpt}: call train again with the same settings and checkpoint_dir "
            f"and batches that repeat these {step} and go on (it checks them, skips them and resumes at step {step})."
        )
    return (
        f"The batches ran out at step {step}: the iterable gave {step} batches, but steps={cfg.steps} needs "
        f"{cfg.steps}. {ran}. {kept} Give enough batches (e.g. itertools.cycle(batches)) or lower steps."
    )
