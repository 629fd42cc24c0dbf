"""`train`'s loop: one optimizer step per batch, then logging, evaluation and checkpoints at their steps."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Callable
from pathlib import Path

import torch
from jaxtyping import Float, Int
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from cbinterp.core.codebooks.attach import get_codebooks, training_codebooks
from cbinterp.core.tl_compat import Model
from cbinterp.core.training import distributed as dd
from cbinterp.core.training.args import check_eval_result
from cbinterp.core.training.checkpoint import RunState, base_fingerprint, resume_settings, save_checkpoint
from cbinterp.core.training.config import AUTOCAST_DTYPES, TrainConfig
from cbinterp.core.training.data import DataRanOut, TrainData, check_batch, ran_out_message
from cbinterp.core.training.optim import set_learning_rates, trained_names
from cbinterp.core.training.progress import PendingLosses, Progress, non_finite_error

__all__ = ["LoopSetup", "run_loop"]


@dataclasses.dataclass
class LoopSetup:
    """What `train` sets up for the loop."""

    model: Model
    data: TrainData
    cfg: TrainConfig
    optimizer: torch.optim.Optimizer
    device: torch.device
    eval_fn: Callable[[Model, int], dict] | None
    checkpoint_dir: Path | None
    loggers: list  # rank 0's; empty on the other ranks


@dataclasses.dataclass
class _Loop:
    """What the loop's steps share, built once by `_start`."""

    setup: LoopSetup
    run: RunState
    forward: Callable | None  # the model, wrapped for data parallelism and compiled as configured
    ddp: DistributedDataParallel | None  # the wrapper under torchrun, else None
    codebooks: list  # (name, Codebook) pairs
    sync: dd.CodebookStepSync
    autocast: contextlib.AbstractContextManager
    params: list[torch.nn.Parameter]  # the trained ones, for gradient averaging and clipping
    trained: list[list[str]]  # their names by optimizer group, recorded in checkpoints
    check_each_step: bool
    losses: PendingLosses
    progress: Progress


def run_loop(setup: LoopSetup, run: RunState) -> None:
    """Train from `run.step` to `cfg.steps`, moving `run` on (step, losses, evals); leaves the model in eval mode."""
    cfg, model, data, ckpt = setup.cfg, setup.model, setup.data, setup.checkpoint_dir
    loop = _start(setup, run)
    start, saved_at, batch = run.step, run.step, None
    model.train()
    flags = [(cb, cb.in_train_loop, cb.step_sync) for _, cb in loop.codebooks]
    for cb, _, _ in flags:
        cb.in_train_loop = True  # training statistics and dead-code replacement: only in these forwards
        cb.step_sync = loop.sync
    try:
        while run.step < cfg.steps:
            try:
                got = data.get(run.step)
            except DataRanOut:
                if ckpt is not None and run.step > saved_at:  # keep the work done
                    _save(loop, batch)
                raise ValueError(ran_out_message(run.step, start, cfg, ckpt)) from None
            batch = check_batch(got, run.step, model, ids_checked=data.source == "tensor")
            local = data.local(batch, run.step)
            if run.step == 0:
                run.first_batch = data.fingerprint(batch, 0)
            loop.losses.add(_optimizer_step(loop, local))
            run.step += 1
            loop.progress.count(local.numel() * dd.world_size())

            step, last = run.step, run.step == cfg.steps
            log_now = step % cfg.log_every == 0 or last
            eval_now = setup.eval_fn is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or last)
            ckpt_now = ckpt is not None and ((cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or last)
            if log_now or eval_now or ckpt_now:
                loop.losses.flush(step, model, loop.codebooks)
            if log_now:
                loop.progress.log(step, setup.optimizer)
            loop.progress.bar.update(1)
            with loop.progress.paused():  # evaluation and checkpoints are left out of tokens/s
                if eval_now:
                    _evaluate(loop)
                if ckpt_now:
                    _save(loop, batch)
                    saved_at = step
    finally:
        for cb, was, had in flags:
            cb.in_train_loop, cb.step_sync = was, had
        loop.progress.close()
        model.eval()
        loop.forward = loop.ddp = None  # DDP's hooks on the parameters go with it


def _start(setup: LoopSetup, run: RunState) -> _Loop:
    """Wrap the model for data parallelism and compilation; gather what every step uses."""
    cfg, model, optimizer = setup.cfg, setup.model, setup.optimizer
    ddp = _data_parallel(model, setup.device) if dd.active() else None
    wrapped = model if ddp is None else ddp
    forward = torch.compile(wrapped) if cfg.compile else wrapped
    codebooks = list(get_codebooks(model).items())
    check_each_step = _checks_each_step(setup.device)
    autocast = (
        torch.autocast(setup.device.type, dtype=AUTOCAST_DTYPES[cfg.autocast])
        if cfg.autocast is not None
        else contextlib.nullcontext()
    )
    return _Loop(
        setup=setup,
        run=run,
        forward=forward,
        ddp=ddp,
        codebooks=codebooks,
        sync=dd.CodebookStepSync(),
        autocast=autocast,
        params=[p for g in optimizer.param_groups for p in g["params"]],
        trained=trained_names(model, optimizer),
        check_each_step=check_each_step,
        losses=PendingLosses(run.losses, check_each_step),
        progress=Progress(cfg, run.losses, run.step, codebooks, setup.loggers),
    )


def _data_parallel(model: Model, device: torch.device) -> DistributedDataParallel:
    """The model in DistributedDataParallel, leaving the codebooks' buffers to the codebooks."""
    # broadcast_buffers=False: the codebooks keep their buffers equal themselves (counts are summed over the ranks
    # by CodebookStepSync); DDP's default, rank 0's buffers copied over every forward, would drop the other ranks'
    # counts. The model's own buffers are constants.
    device_ids = [device.index] if device.type == "cuda" else None
    quiet_buffers = (
        {"forward_sync_buffers": False}  # torch >= 2.13 name; it still syncs at init, as broadcast_module_ did
        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
        else {"broadcast_buffers": False}
    )
    return DistributedDataParallel(model, device_ids=device_ids, **quiet_buffers)


def _checks_each_step(device: torch.device) -> bool:
    """Whether each step's loss is checked to be finite at once.

    Free on the CPU; on an accelerator it would wait for the device every step, so the losses are checked at log,
    eval and checkpoint steps instead."""
    return device.type == "cpu"


def _optimizer_step(loop: _Loop, local: Int[Tensor, "rows pos"]) -> Float[Tensor, ""]:
    """One optimizer step on this rank's rows, in `cfg.accumulate` micro-batches; returns its loss on the device."""
    cfg, optimizer, step = loop.setup.cfg, loop.setup.optimizer, loop.run.step
    set_learning_rates(optimizer, step, cfg)
    optimizer.zero_grad(set_to_none=True)
    micro = local.split(local.shape[0] // cfg.accumulate)
    step_loss = None
    for i, tokens in enumerate(micro):
        loop.sync.start_micro(step, i, len(micro))
        # gradients are averaged over the ranks once per step: in the backward of its last micro-batch
        quiet = loop.ddp.no_sync() if loop.ddp is not None and i < len(micro) - 1 else contextlib.nullcontext()
        with quiet:
            with loop.autocast:
                loss = loop.forward(tokens.to(loop.setup.device), return_type="loss")
            if loop.check_each_step and not torch.isfinite(loss):
                raise non_finite_error(loss.item(), step, loop.setup.model, loop.codebooks)
            loss.backward()
        step_loss = loss.detach().float() if step_loss is None else step_loss + loss.detach().float()
    if len(micro) > 1:
        # each micro-batch's gradient is its own mean (and the codebooks' reconstruction gradient, added in their
        # backward, is not scaled by the loss): the mean of the n is the whole batch's gradient
        for p in loop.params:
            if p.grad is not None:
                p.grad.div_(len(micro))
        step_loss = step_loss / len(micro)
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(loop.params, cfg.grad_clip)
    optimizer.step()
    return step_loss


def _evaluate(loop: _Loop) -> None:
    """`eval_fn(model, step)` in eval mode, without the codebooks' training statistics; its numbers are logged."""
    model, step = loop.setup.model, loop.run.step
    model.eval()
    with training_codebooks(model, on=False):
        loop.run.evals.append((step, check_eval_result(loop.setup.eval_fn(model, step), step)))
    loop.progress.log_eval(step, loop.run.evals[-1][1])
    model.train()


def _save(loop: _Loop, batch: Int[Tensor, "batch pos"] | None) -> None:
    """Write the checkpoint of the steps done (on rank 0; the other ranks wait for it)."""
    setup, run = loop.setup, loop.run
    loop.losses.flush(run.step, setup.model, loop.codebooks)
    last_batch = setup.data.fingerprint(batch, run.step - 1)
    if dd.is_main():
        save_checkpoint(
            setup.checkpoint_dir,
            setup.model,
            setup.optimizer,
            run.step,
            run.losses,
            settings=resume_settings(setup.cfg),
            init_weights=run.init_weights,
            weights=base_fingerprint(setup.model),
            data=setup.data.record(run.first_batch, last_batch),
            world_size=dd.world_size(),
            accumulate=setup.cfg.accumulate,
            trained=loop.trained,
        )
    dd.barrier(f"waiting for rank 0 to write the checkpoint of step {run.step}", run.step)
