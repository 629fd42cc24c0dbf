"""One training loop for any HookedTransformer, with or without codebooks.

Checkpoints are cbinterp folders (see `cbinterp.core.manifest`) of kind "cbinterp-checkpoint": the model's
`config.json` and `model.safetensors`, plus `trainer.safetensors` (optimizer and RNG tensors) and `trainer.json`
(everything else: step, losses, optimizer settings, numpy and Python RNG state, and the fingerprints a resume is
checked against). Nothing is ever unpickled.

Under `torchrun` (any initialised `torch.distributed` group) `train` is data parallel: see `train` and
`cbinterp.core.distributed`. A checkpoint holds the global step and the global batches' fingerprints, so it resumes
with any number of ranks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import math
import random
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from cbinterp.core import distributed as dd
from cbinterp.core import manifest as mf
from cbinterp.core.atomic import atomic_dir, recover_dir
from cbinterp.core.attach import get_codebooks, require_hooked_transformer, training_codebooks
from cbinterp.core.checks import check_token_ids, is_int, is_real
from cbinterp.core.determinism import deterministic_on_cpu
from cbinterp.core.fastpath import fast_kernels
from cbinterp.core.io import MODEL_FILES, WEIGHTS_FILE, load_weights, model_description, read_config, write_model
from cbinterp.core.manifest import ResumeWarning
from cbinterp.core.metrics import TrainLogger
from cbinterp.core.train_args import (
    DataRanOut,
    check_call,
    check_eval_result,
    check_frozen_codebooks,
    known_length,
    trained_names,
)

__all__ = ["TrainConfig", "TrainResult", "train"]

Batches = Union[Callable[[int], Tensor], Iterable[Tensor], Tensor]
TRAINER_FILE = "trainer.json"
TRAINER_TENSORS = "trainer.safetensors"
CHECKPOINT_FILES = (*MODEL_FILES, TRAINER_TENSORS, TRAINER_FILE)

#: TrainConfig fields that do not change what training computes (display, bookkeeping): not checked on resume.
#: `accumulate` is among them: micro-batches (like the number of ranks) change how a step is computed, not what it is.
NOT_CHECKED_ON_RESUME = (
    "progress",
    "log_every",
    "eval_every",
    "checkpoint_every",
    "checkpoint_dir",
    "compile",
    "fast_kernels",
    "accumulate",
)
AUTOCAST_DTYPES = {"bf16": torch.bfloat16}


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
        fast_kernels: fused attention and layer norm in the training forwards (`cbinterp.core.fastpath`): the same
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
    codebook_lr: Optional[float] = None
    codebook_weight_decay: Optional[float] = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: Optional[float] = 1.0
    warmup_steps: int = 0
    schedule: str = "cosine"  # "cosine" (to min_lr_ratio * lr) or "constant", after warmup
    min_lr_ratio: float = 0.1
    freeze_model: bool = False  # train the codebooks only
    compile: bool = False
    fast_kernels: bool = True
    eval_every: int = 0
    checkpoint_every: int = 0
    checkpoint_dir: Optional[str] = None
    log_every: int = 10
    seed: int = 0
    progress: bool = True
    batch_size: Optional[int] = None
    accumulate: int = 1
    autocast: Optional[str] = None

    def __post_init__(self) -> None:
        """The one place training settings are validated; numbers become plain Python int and float (numpy scalars
        would not go into the checkpoint's JSON, nor into the seeding) and flags plain bool."""
        if not isinstance(self.schedule, str) or self.schedule not in ("cosine", "constant"):
            raise ValueError(f"Unknown schedule {self.schedule!r}; use 'cosine' or 'constant'.")
        self.schedule = str(self.schedule)
        for field, least in (
            ("steps", 0),
            ("warmup_steps", 0),
            ("eval_every", 0),
            ("checkpoint_every", 0),
            ("log_every", 1),
            ("accumulate", 1),
            ("batch_size", 1),
            ("seed", None),
        ):
            value = getattr(self, field)
            if field == "batch_size" and value is None:
                continue
            if not is_int(value) or (least is not None and value < least):
                what = "an int" if least is None else f"an int >= {least}"
                what = f"None or {what}" if field == "batch_size" else what
                why = " (micro-batches per step)" if field == "accumulate" else ""
                raise ValueError(f"{field} must be {what}{why}, got {value!r}.")
            setattr(self, field, int(value))
        for field, least, optional in (
            ("lr", None, False),
            ("codebook_lr", 0, True),
            ("weight_decay", 0, False),
            ("codebook_weight_decay", 0, True),
            ("grad_clip", 0, True),
        ):
            value = getattr(self, field)
            if optional and value is None:
                continue
            if not is_real(value) or (value <= 0 if least is None else value < least):
                what = "a finite number > 0" if least is None else "a finite number >= 0"
                what = f"None or {what}" if optional else what
                why = " (0: no clipping)" if field == "grad_clip" else ""
                raise ValueError(f"{field} must be {what}{why}, got {value!r}.")
            setattr(self, field, float(value))
        if not is_real(self.min_lr_ratio) or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be a number in [0, 1], got {self.min_lr_ratio!r}.")
        self.min_lr_ratio = float(self.min_lr_ratio)
        betas = tuple(self.betas) if isinstance(self.betas, (tuple, list, np.ndarray)) else None
        if betas is None or len(betas) != 2 or not all(is_real(b) and 0 <= b < 1 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}.")
        self.betas = (float(betas[0]), float(betas[1]))
        for field in ("freeze_model", "compile", "fast_kernels", "progress"):
            if not isinstance(getattr(self, field), (bool, np.bool_)):
                raise ValueError(f"{field} must be True or False, got {getattr(self, field)!r}.")
            setattr(self, field, bool(getattr(self, field)))
        if self.checkpoint_dir is not None and (
            not isinstance(self.checkpoint_dir, (str, Path)) or not str(self.checkpoint_dir)
        ):
            raise ValueError(f"checkpoint_dir must be None or a non-empty path, got {self.checkpoint_dir!r}.")
        if self.checkpoint_every and not self.checkpoint_dir:
            raise ValueError(
                f"checkpoint_every={self.checkpoint_every} needs a checkpoint_dir to write the checkpoints to."
            )
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
    """AdamW with the codebooks in their own parameter group (own lr and weight decay).

    Only parameters with `requires_grad` set are trained: one the caller froze is left out of the optimizer (so
    neither its gradient nor weight decay moves it). `cfg.freeze_model` clears the flag of every weight outside the
    codebooks; `train` restores all flags afterwards, calling this directly leaves them so.
    """
    codebook_params = {id(cb.weight) for cb in get_codebooks(model).values()}
    cb_all = [p for p in model.parameters() if id(p) in codebook_params]
    cb = [p for p in cb_all if p.requires_grad]
    rest = [p for p in model.parameters() if id(p) not in codebook_params and p.requires_grad]
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


# -- state as JSON + tensors (no pickle) ---------------------------------------------------------------------------
def _encode(value, key: str, tensors: dict):
    """`value` as JSON, its tensors moved into `tensors` (referenced by name)."""
    if isinstance(value, Tensor):
        tensors[key] = value.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v, f"{key}.{k}", tensors) for k, v in value.items()}
        return {"__items__": [[k, _encode(v, f"{key}.{k}", tensors)] for k, v in value.items()]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"Cannot store {type(value).__name__} at {key} in a checkpoint.")


def _decode(obj, tensors: dict):
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return np.asarray(obj["__ndarray__"], dtype=np.dtype(obj["dtype"]))
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {k: _decode(v, tensors) for k, v in obj["__items__"]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj


def _rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        # this process's own device only: a checkpoint then resumes on another number of GPUs or ranks
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):  # older checkpoints hold every visible device's state
            cuda = cuda[min(torch.cuda.current_device(), len(cuda) - 1)]
        torch.cuda.set_rng_state(cuda)


def _settings(cfg: TrainConfig) -> dict:
    """The settings that decide the result (with a constant schedule, `steps` does not: a run may be extended)."""
    skip = set(NOT_CHECKED_ON_RESUME) | ({"steps"} if cfg.schedule == "constant" else set())
    return json.loads(json.dumps({f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in skip}))


def save_checkpoint(path: Path, model: HookedTransformer, optimizer, step: int, losses: list[float], **record) -> None:
    """Model (cbinterp format) plus optimizer, step and RNG state, written atomically as one directory."""
    tensors: dict[str, Tensor] = {}
    state = {
        "step": step,
        "losses": losses,
        "optimizer": _encode(optimizer.state_dict(), "optimizer", tensors),
        "rng": _encode(_rng_state(), "rng", tensors),
        **record,
    }
    check = lambda p: mf.check_replaceable(p, (mf.CHECKPOINT,), "training checkpoint")
    with atomic_dir(path, check=check) as tmp:
        write_model(model, tmp, extra={"step": step})
        save_file(tensors, tmp / TRAINER_TENSORS)
        mf.write_json(tmp / TRAINER_FILE, state)
        mf.write_manifest(tmp, mf.CHECKPOINT, CHECKPOINT_FILES)


def is_checkpoint(path: Path) -> bool:
    return (path / mf.MANIFEST_FILE).is_file() or mf.legacy_kind(path) == mf.CHECKPOINT


def read_checkpoint(path: Path) -> tuple[dict, dict, dict]:
    """(config, trainer state with tensors in place, manifest) of a verified checkpoint; clear errors otherwise."""
    if not (path / mf.MANIFEST_FILE).exists() and mf.legacy_kind(path) == mf.CHECKPOINT:
        raise ValueError(
            f"Cannot resume from {path}: it is a checkpoint of an older cbinterp, whose trainer state (trainer.pt) is "
            "a pickle, which cbinterp never loads. Pass resume=False to start over (it is then replaced), or use "
            "another checkpoint_dir."
        )
    try:
        manifest = mf.verify_dir(path, (mf.CHECKPOINT,), "training checkpoint", strict=True)
        config = read_config(path, verify=False)
        state = json.loads((path / TRAINER_FILE).read_text())
        tensors = load_file(path / TRAINER_TENSORS)
        state = _decode(state, tensors)
        for key, kind in (("step", int), ("losses", list), ("optimizer", dict), ("rng", dict)):
            if not isinstance(state.get(key), kind):
                raise ValueError(f"{TRAINER_FILE} has no valid {key!r}")
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:
        raise ValueError(
            f"Cannot resume from {path}: the checkpoint is unreadable ({err}). Delete it to start over."
        ) from err
    return config, state, manifest


def base_fingerprint(model: HookedTransformer) -> str:
    """Fingerprint of the model's own weights, codebooks left out: a resumed run may skip its codebook initialisation
    (e.g. k-means), since the checkpoint's codebooks replace it, but not start from another model."""
    return mf.weights_fingerprint(model, skip=[f"{name}.weight" for name in get_codebooks(model)])


def _diff(a: dict, b: dict) -> list[str]:
    return [f"{k}: checkpoint {a.get(k)!r}, now {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _check_fits(path: Path, config: dict, state: dict, model: HookedTransformer, cfg: TrainConfig, init: str) -> None:
    """Refuse a checkpoint made with other settings, another model or other codebooks."""
    now = model_description(model)
    stored_cb, now_cb = config.get("codebooks", {}), now["codebooks"]
    if set(stored_cb) != set(now_cb):
        raise ValueError(
            f"Checkpoint {path} does not fit this model: it has codebooks at {sorted(stored_cb)}, the model at "
            f"{sorted(now_cb)}. Use another checkpoint_dir, or resume=False to start over."
        )
    for name in now_cb:
        changed = _diff(stored_cb[name], now_cb[name])
        if changed:
            raise ValueError(
                f"Checkpoint {path} does not fit this model: codebook {name} differs ({'; '.join(changed)}). Use "
                "another checkpoint_dir, or resume=False to start over."
            )
    changed = _diff(config.get("model_config", {}), now["model_config"])
    if changed:
        raise ValueError(
            f"Checkpoint {path} does not fit this model: its config differs ({'; '.join(changed[:5])}). Use another "
            "checkpoint_dir, or resume=False to start over."
        )
    changed = _diff(state.get("settings", {}), _settings(cfg))
    if changed:
        raise ValueError(
            f"Cannot resume from {path}: it was made with other training settings ({'; '.join(changed)}); resuming "
            "would mix two runs. Use the same settings, another checkpoint_dir, or resume=False to start over."
        )
    if init not in (state.get("init_weights"), state.get("weights")):
        raise ValueError(
            f"Checkpoint {path} does not fit this model: the run it holds started from other weights than this "
            "model's (fingerprints of the weights outside the codebooks differ). Build the model as for that run, use "
            "another checkpoint_dir, or resume=False to start over."
        )
    if state["step"] > cfg.steps:
        raise ValueError(f"Cannot resume from {path}: it is at step {state['step']}, beyond steps={cfg.steps}.")


def _check_trained(path: Path, state: dict, trained: list[list[str]]) -> None:
    """Refuse a checkpoint whose run trained other parameters (other `requires_grad` flags) than this one would."""
    stored = state.get("trained")
    if stored is None or stored == trained:  # None: a checkpoint of a cbinterp that did not record them
        return
    before, now = {n for g in stored for n in g}, {n for g in trained for n in g}
    diff = [f"{n} trained only by the checkpoint's run" for n in sorted(before - now)]
    diff += [f"{n} trained only now" for n in sorted(now - before)]
    raise ValueError(
        f"Cannot resume from {path}: its run trained other parameters than this one would "
        f"({'; '.join(diff[:4]) or 'other groups'}): the requires_grad flags differ. Freeze the same parameters as for "
        "that run, use another checkpoint_dir, or resume=False to start over."
    )


# -- data ----------------------------------------------------------------------------------------------------------
def batch_fingerprint(tokens: Tensor) -> str:
    return mf.tensor_fingerprint(tokens.detach().to("cpu", torch.int64))


def _takes_rank(fn: Callable) -> bool:
    """Whether `fn` can be called as `fn(step, rank, world_size)` (it then returns this rank's rows itself)."""
    try:
        inspect.signature(fn).bind(0, 0, 1)
    except (TypeError, ValueError):
        return False
    return True


class _Data:
    """Batches by step from a callable, an iterable, or a token tensor (seeded shuffled batches).

    Every source gives the global batch of a step, of which each rank trains on its contiguous share of rows (rank r:
    rows r*b to (r+1)*b), except `fn(step, rank, world_size)`, which gives the rank's rows itself. Fingerprints are
    always of the global batch, so that a checkpoint resumes with any number of ranks.
    """

    def __init__(self, batches: Batches, cfg: TrainConfig):
        self.source = "callable"
        self.chain = None
        self.sharded = False  # fn(step, rank, world_size): each rank draws its own rows
        self.rank, self.world, self.accumulate = dd.rank(), dd.world_size(), cfg.accumulate
        if isinstance(batches, np.ndarray):  # a token array, not an iterable of one-row batches
            batches = torch.from_numpy(batches)
        if isinstance(batches, Tensor):
            if cfg.batch_size is None:
                raise TypeError(
                    "train got a bare token tensor. Set TrainConfig(batch_size=...) to draw seeded shuffled batches "
                    "of its rows, or pass `lambda step: tokens[...]` (one batch per step) or a list of batches."
                )
            if batches.dim() != 2 or batches.shape[0] < cfg.batch_size:
                raise ValueError(
                    f"A token tensor for train must be (n_sequences, seq) with at least batch_size={cfg.batch_size} "
                    f"rows, got shape {tuple(batches.shape)}."
                )
            if cfg.batch_size % (self.world * self.accumulate):  # refused before any work
                raise ValueError(self._split_error(cfg.batch_size, "batch_size"))
            self.source, self.tokens, self.batch_size, self.seed = "tensor", batches, cfg.batch_size, cfg.seed
            self._epoch, self._perm = None, None
            self.get = self._from_tensor
        elif callable(batches):
            if _takes_rank(batches):
                self.sharded = True
                self.get = lambda step: batches(step, self.rank, self.world)
            else:
                self.get = batches
        elif isinstance(batches, Iterable):
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
        else:
            raise TypeError(
                "batches must be fn(step) -> tokens, fn(step, rank, world_size) -> this rank's tokens, an iterable "
                f"of batches or a tensor, got {batches!r}."
            )
        self.steps = cfg.steps

    def _split_error(self, rows: int, what: str) -> str:
        parts = self.world * self.accumulate
        how = f"{self.world} rank{'s' if self.world > 1 else ''} x accumulate={self.accumulate}"
        return (
            f"The {what} of {rows} rows does not split evenly into {parts} parts ({how}): every rank trains on "
            f"an equal share of each batch, in equal micro-batches. Use a batch size that is a multiple of {parts}, or "
            "another number of processes (torchrun --nproc_per_node) or accumulate."
        )

    def local(self, tokens: Tensor, step: int) -> Tensor:
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

    def _from_tensor(self, step: int) -> Tensor:
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

    def record(self, first: Optional[str], last: Optional[str]) -> dict:
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


def _check_batch(tokens, step: int, model: HookedTransformer, ids_checked: bool = False) -> Tensor:
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


def _check_trainable_dtype(model: HookedTransformer) -> None:
    half = sorted({str(p.dtype) for p in model.parameters() if p.dtype == torch.float16})
    if half:
        raise TypeError(
            "train cannot update float16 parameters: AdamW's state and updates under- and overflow in float16, and "
            "the weights turn NaN after a step or two. Build the model in float32 (or bfloat16), e.g. "
            "HookedTransformerConfig(dtype=torch.float32), and use torch.autocast for float16 compute."
        )


@contextlib.contextmanager
def _restored_requires_grad(model: HookedTransformer):
    before = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    finally:
        for p, flag in before:
            p.requires_grad_(flag)


def train(
    model: HookedTransformer,
    batches: Batches,
    cfg: TrainConfig,
    eval_fn: Optional[Callable[[HookedTransformer, int], dict]] = None,
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
        loggers: objects with `log(step, metrics)` and `close()` (`cbinterp.core.metrics`), called on rank 0 only.

    Data parallel: when a `torch.distributed` process group is initialised (e.g. under `torchrun`, see
    `cbinterp.core.distributed.init_from_env`), every rank runs `train` with the same arguments; rank 0's model is
    copied to all ranks first, the gradients are averaged (DistributedDataParallel), codebook usage is summed over the
    ranks, and rank 0 alone writes checkpoints, shows progress and logs, while the others wait for it.
    """
    require_hooked_transformer(model)
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"train takes its settings as a TrainConfig, got {type(cfg).__name__}: TrainConfig(steps=...).")
    check_call(eval_fn, resume, loggers)
    cfg = dataclasses.replace(cfg)  # checked again: a setting changed after construction is normalised or refused
    _check_trainable_dtype(model)
    check_frozen_codebooks(model)
    data = _Data(batches, cfg)
    if data.source == "tensor":  # once, for all the batches drawn from it
        check_token_ids(data.tokens, model.cfg.d_vocab, "The token tensor given to train")
    ckpt = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
    if ckpt is not None:
        if dd.is_main():
            recover_dir(ckpt)  # a crash between the two renames of a checkpoint write left it aside
        dd.barrier("the recovery of the checkpoint directory", 0)
        mf.check_replaceable(ckpt, (mf.CHECKPOINT,), "training checkpoint")  # refuse before any work
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    device = next(model.parameters()).device
    dd.broadcast_module_(model)  # one model on every rank: rank 0's (its k-means codes, its initial weights)
    with _restored_requires_grad(model):
        optimizer = make_optimizer(model, cfg)
        init_weights = base_fingerprint(model)
        step, losses, evals, resumed_from, first_batch = 0, [], [], None, None
        if resume and ckpt is not None and is_checkpoint(ckpt):
            config, state, _ = read_checkpoint(ckpt)
            _check_fits(ckpt, config, state, model, cfg, init_weights)
            _check_trained(ckpt, state, trained_names(model, optimizer))
            data.check_resume(ckpt, state.get("data", {}), state["step"])
            try:
                load_weights(model, ckpt / WEIGHTS_FILE)
                optimizer.load_state_dict(state["optimizer"])
                _set_rng_state(state["rng"])
            except (ValueError, KeyError, TypeError, RuntimeError) as err:
                raise ValueError(f"Checkpoint {ckpt} does not fit this model: {err}. Delete it to start over.") from err
            step, losses = state["step"], list(state["losses"])
            init_weights, first_batch = state.get("init_weights", init_weights), state.get("data", {}).get("first")
            resumed_from = step
            left = cfg.steps - step
            if dd.is_main():
                warnings.warn(
                    f"Resuming from the checkpoint at {ckpt} (step {step} of {cfg.steps}): "
                    + (
                        f"{left} steps to go."
                        if left
                        else "training is already complete; no steps are run and the model now holds the checkpoint's "
                        "weights. Pass resume=False or another checkpoint_dir to train again."
                    ),
                    ResumeWarning,
                    stacklevel=2,
                )
        dd.check_same_on_ranks(
            step,
            "the step to resume from",
            f"Every rank must see the same checkpoint_dir ({ckpt}): put it on a file system all nodes share.",
        )
        try:
            with fast_kernels(model, enabled=cfg.fast_kernels), deterministic_on_cpu(device):
                result = _loop(
                    model,
                    data,
                    cfg,
                    optimizer,
                    step,
                    losses,
                    evals,
                    eval_fn,
                    ckpt,
                    init_weights,
                    first_batch,
                    device,
                    list(loggers) if dd.is_main() else [],
                )
        finally:
            if dd.is_main():
                for logger in loggers:
                    logger.close()
    return TrainResult(steps=result, losses=losses, evals=evals, resumed_from=resumed_from)


def _non_finite_error(loss: float, step: int, model: HookedTransformer, codebooks, where_steps: str = "") -> Exception:
    sites = [name for name, cb in codebooks if not torch.isfinite(cb.last_mse)]
    where = f" (first non-finite codebook input: {sites[0]})" if sites else ""
    bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    hint = f"; the weights are already non-finite ({bad[:3]})" if bad else "; lower the learning rate or clip gradients"
    return FloatingPointError(f"Loss is {loss} at step {step}{where_steps}{where}{hint}.")


def _checks_each_step(device: torch.device) -> bool:
    """Whether each step's loss is checked to be finite at once: free on the CPU; on an accelerator it would wait for
    the device every step, so the losses are checked at log, eval and checkpoint steps instead."""
    return device.type == "cpu"


class _Losses:
    """The steps' losses kept on the device and copied to `losses` (as floats, averaged over the ranks) only at
    log, eval and checkpoint steps: one host synchronisation per `log_every` steps instead of per step."""

    def __init__(self, losses: list[float], check_each_step: bool):
        self.losses, self.pending, self.check_each_step = losses, [], check_each_step

    def flush(self, step: int, model, codebooks) -> None:
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
                raise _non_finite_error(value, first + i, model, codebooks, "" if self.check_each_step else span)
        self.losses.extend(values)


def _loop(
    model, data, cfg, optimizer, step, losses, evals, eval_fn, ckpt, init_weights, first_batch, device, loggers
) -> int:
    distributed = dd.active()
    wrapped = model
    if distributed:
        # broadcast_buffers=False: the codebooks keep their buffers equal themselves (counts are summed over the ranks
        # by CodebookStepSync); DDP's default, rank 0's buffers copied over every forward, would drop the other ranks'
        # counts. The model's own buffers are constants.
        device_ids = [device.index] if device.type == "cuda" else None
        ddp = torch.nn.parallel.DistributedDataParallel
        quiet_buffers = (
            {"forward_sync_buffers": False}  # torch >= 2.13 name; it still syncs at init, as broadcast_module_ did
            if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters
            else {"broadcast_buffers": False}
        )
        wrapped = ddp(model, device_ids=device_ids, **quiet_buffers)
    forward = torch.compile(wrapped) if cfg.compile else wrapped
    codebooks = list(get_codebooks(model).items())
    show = cfg.progress and dd.is_main()
    watch = show or bool(loggers)
    window = {name: cb.counts.clone() for name, cb in codebooks} if watch else {}
    sync = dd.CodebookStepSync()
    check_each_step = _checks_each_step(device)
    pending = _Losses(losses, check_each_step)
    autocast = (
        torch.autocast(device.type, dtype=AUTOCAST_DTYPES[cfg.autocast])
        if cfg.autocast is not None
        else contextlib.nullcontext()
    )
    params = [p for g in optimizer.param_groups for p in g["params"]]
    trained = trained_names(model, optimizer)
    tokens_seen, since, start, saved_at, batch = 0, time.perf_counter(), step, step, None

    def save(step: int, batch) -> None:
        pending.flush(step, model, codebooks)
        last_fp = data.fingerprint(batch, step - 1)
        if dd.is_main():
            save_checkpoint(
                ckpt,
                model,
                optimizer,
                step,
                losses,
                settings=_settings(cfg),
                init_weights=init_weights,
                weights=base_fingerprint(model),
                data=data.record(first_batch, last_fp),
                world_size=dd.world_size(),
                accumulate=cfg.accumulate,
                trained=trained,
            )
        dd.barrier(f"waiting for rank 0 to write the checkpoint of step {step}", step)

    logged_at = len(losses)
    model.train()
    bar = tqdm(total=cfg.steps, initial=step, disable=not show, desc="train", dynamic_ncols=True)
    flags = [(cb, cb.in_train_loop, cb.step_sync) for _, cb in codebooks]
    for cb, _, _ in flags:
        cb.in_train_loop = True  # training statistics and dead-code replacement: only in these forwards
        cb.step_sync = sync
    try:
        while step < cfg.steps:
            try:
                got = data.get(step)
            except DataRanOut:
                if ckpt is not None and step > saved_at:  # keep the work done
                    save(step, batch)
                raise ValueError(_ran_out_message(step, start, cfg, ckpt)) from None
            batch = _check_batch(got, step, model, ids_checked=data.source == "tensor")
            local = data.local(batch, step)
            if step == 0:
                first_batch = data.fingerprint(batch, 0)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * lr_factor(step, cfg)
            optimizer.zero_grad(set_to_none=True)
            micro = local.split(local.shape[0] // cfg.accumulate)
            step_loss = None
            for i, tokens in enumerate(micro):
                sync.start_micro(step, i, len(micro))
                # gradients are averaged over the ranks once per step: in the backward of its last micro-batch
                quiet = wrapped.no_sync() if distributed and i < len(micro) - 1 else contextlib.nullcontext()
                with quiet:
                    with autocast:
                        loss = forward(tokens.to(device), return_type="loss")
                    if check_each_step and not torch.isfinite(loss):
                        raise _non_finite_error(loss.item(), step, model, codebooks)
                    loss.backward()
                step_loss = loss.detach().float() if step_loss is None else step_loss + loss.detach().float()
            if len(micro) > 1:
                # each micro-batch's gradient is its own mean (and the codebooks' reconstruction gradient, added in
                # their backward, is not scaled by the loss): the mean of the n is the whole batch's gradient
                for p in params:
                    if p.grad is not None:
                        p.grad.div_(len(micro))
                step_loss = step_loss / len(micro)
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            step += 1
            tokens_seen += local.numel() * dd.world_size()
            pending.pending.append(step_loss)
            log_now = step % cfg.log_every == 0 or step == cfg.steps
            eval_now = eval_fn is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps)
            ckpt_now = ckpt is not None and (
                (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == cfg.steps
            )
            if log_now or eval_now or ckpt_now:
                pending.flush(step, model, codebooks)
            if log_now:
                mse = _mean_mse(codebooks, step)  # a collective: every rank, whoever shows or logs
                if watch:
                    now = time.perf_counter()
                    metrics = _metrics(losses[logged_at:], codebooks, window, mse, optimizer, cfg)
                    metrics["tokens_per_s"] = tokens_seen / max(now - since, 1e-9)
                    tokens_seen, since, logged_at = 0, now, len(losses)
                    if show:
                        bar.set_postfix(_postfix(metrics, codebooks))
                    for logger in loggers:
                        logger.log(step, metrics)
            bar.update(1)
            paused = time.perf_counter()  # evaluation and checkpoints are left out of tokens/s
            if eval_now:
                model.eval()
                with training_codebooks(model, on=False):
                    evals.append((step, check_eval_result(eval_fn(model, step), step)))
                for logger in loggers:
                    numbers_ = {f"eval/{k}": float(v) for k, v in evals[-1][1].items() if is_real(v)}
                    if numbers_:
                        logger.log(step, numbers_)
                model.train()
            if ckpt_now:
                save(step, batch)
                saved_at = step
            since += time.perf_counter() - paused
    finally:
        for cb, was, had in flags:
            cb.in_train_loop, cb.step_sync = was, had
        bar.close()
        model.eval()
        del forward, wrapped  # DDP's hooks on the parameters go with it
    return step


def _ran_out_message(step: int, start: int, cfg: TrainConfig, ckpt: Optional[Path]) -> str:
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


def _mean_mse(codebooks, step: int) -> list[float]:
    """Every codebook's last reconstruction MSE, averaged over the ranks."""
    if not codebooks:
        return []
    mse = torch.stack([cb.last_mse.detach().float() for _, cb in codebooks])
    if dd.active():
        mse = dd.all_reduce_(mse.to(dd._comm_device()), "the averaging of the codebook MSE", step) / dd.world_size()
    return mse.tolist()


def _metrics(recent: list[float], codebooks, window: dict, mse: list[float], optimizer, cfg: TrainConfig) -> dict:
    """The logged metrics (see `cbinterp.core.metrics`); moves the dead-code window on."""
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
