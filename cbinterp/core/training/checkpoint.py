"""`train`'s checkpoints: their format, writing, reading, and the checks a resume must pass.

A checkpoint is a cbinterp folder (see `cbinterp.core.storage.manifest`) of kind "cbinterp-checkpoint": the model's
`config.json` and `model.safetensors`, plus `trainer.safetensors` (optimizer and RNG tensors) and `trainer.json`
(everything else: step, losses, optimizer settings, numpy and Python RNG state, and the fingerprints a resume is
checked against). Nothing is ever unpickled. It holds the global step and the global batches' fingerprints, so it
resumes with any number of ranks.
"""

from __future__ import annotations

import dataclasses
import json
import random
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from cbinterp.core.codebooks.attach import get_codebooks
from cbinterp.core.storage import manifest as mf
from cbinterp.core.storage.atomic import atomic_dir, recover_dir
from cbinterp.core.storage.folder import verify_dir
from cbinterp.core.storage.io import (
    MODEL_FILES,
    WEIGHTS_FILE,
    load_weights,
    model_description,
    read_config,
    write_model,
)
from cbinterp.core.storage.manifest import ResumeWarning
from cbinterp.core.tl_compat import Model
from cbinterp.core.training import distributed as dd
from cbinterp.core.training.config import TrainConfig
from cbinterp.core.training.data import TrainData
from cbinterp.core.training.optim import trained_names

__all__ = [
    "CHECKPOINT_FILES",
    "NOT_CHECKED_ON_RESUME",
    "TRAINER_FILE",
    "TRAINER_TENSORS",
    "RunState",
    "base_fingerprint",
    "is_checkpoint",
    "prepare_checkpoint_dir",
    "read_checkpoint",
    "resume_settings",
    "save_checkpoint",
    "start_or_resume",
]

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


@dataclasses.dataclass
class RunState:
    """A run's progress: where `train` starts (step 0, or a checkpoint's) and what the loop moves on.

    Attributes:
        step: the steps done.
        losses: every done step's loss, from step 0.
        evals: `(step, eval_fn(model, step))` of the evaluations of this call.
        init_weights: fingerprint of the weights outside the codebooks at step 0 (`base_fingerprint`).
        first_batch: fingerprint of the batch of step 0, once drawn (None until then).
        resumed_from: the checkpoint's step when the run resumed from one.
    """

    step: int = 0
    losses: list[float] = dataclasses.field(default_factory=list)
    evals: list[tuple[int, dict]] = dataclasses.field(default_factory=list)
    init_weights: str = ""
    first_batch: str | None = None
    resumed_from: int | None = None


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
    """The value `_encode` stored as `obj`, its tensors taken from `tensors`."""
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
    """The torch, numpy, Python and CUDA random states, to resume the same random draws."""
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        # this process's own device only: a checkpoint then resumes on another number of GPUs or ranks
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def _set_rng_state(state: dict) -> None:
    """Restore the random states `_rng_state` returned."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):  # older checkpoints hold every visible device's state
            cuda = cuda[min(torch.cuda.current_device(), len(cuda) - 1)]
        torch.cuda.set_rng_state(cuda)


def resume_settings(cfg: TrainConfig) -> dict:
    """The settings that decide the result (with a constant schedule, `steps` does not: a run may be extended)."""
    skip = set(NOT_CHECKED_ON_RESUME) | ({"steps"} if cfg.schedule == "constant" else set())
    return json.loads(json.dumps({f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in skip}))


def save_checkpoint(path: Path, model: Model, optimizer, step: int, losses: list[float], **record) -> None:
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
    """Whether `path` holds a checkpoint (of this cbinterp or, to be refused clearly, of an older one)."""
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
        manifest = verify_dir(path, (mf.CHECKPOINT,), "training checkpoint", strict=True)
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


def base_fingerprint(model: Model) -> str:
    """Fingerprint of the model's own weights, codebooks left out.

    A resumed run may skip its codebook initialisation (e.g. k-means), since the checkpoint's codebooks replace it,
    but not start from another model."""
    return mf.weights_fingerprint(model, skip=[f"{name}.weight" for name in get_codebooks(model)])


def _diff(a: dict, b: dict) -> list[str]:
    """The keys on which `a` (the checkpoint's) and `b` (now) differ, with both values."""
    return [f"{k}: checkpoint {a.get(k)!r}, now {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _check_fits(path: Path, config: dict, state: dict, model: Model, cfg: TrainConfig, init: str) -> None:
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
    changed = _diff(state.get("settings", {}), resume_settings(cfg))
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


def prepare_checkpoint_dir(cfg: TrainConfig) -> Path | None:
    """`cfg.checkpoint_dir` as a path (None without one), recovered and checked before any work.

    Recovered from a crashed write, and checked to be replaceable."""
    if not cfg.checkpoint_dir:
        return None
    ckpt = Path(cfg.checkpoint_dir)
    if dd.is_main():
        recover_dir(ckpt)  # a crash between the two renames of a checkpoint write left it aside
    dd.barrier("the recovery of the checkpoint directory", 0)
    mf.check_replaceable(ckpt, (mf.CHECKPOINT,), "training checkpoint")  # refuse before any work
    return ckpt


def start_or_resume(
    model: Model,
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    data: TrainData,
    ckpt: Path | None,
    resume: bool,
) -> RunState:
    """A fresh run at step 0; or, with `resume` and a checkpoint in `ckpt`, that run, checked and loaded.

    The checkpoint is checked to fit this model, settings, frozen parameters and data, and loaded into the model,
    optimizer and RNGs (with a `ResumeWarning`)."""
    run = RunState(init_weights=base_fingerprint(model))
    if resume and ckpt is not None and is_checkpoint(ckpt):
        config, state, _ = read_checkpoint(ckpt)
        _check_fits(ckpt, config, state, model, cfg, run.init_weights)
        _check_trained(ckpt, state, trained_names(model, optimizer))
        data.check_resume(ckpt, state.get("data", {}), state["step"])
        try:
            load_weights(model, ckpt / WEIGHTS_FILE)
            optimizer.load_state_dict(state["optimizer"])
            _set_rng_state(state["rng"])
        except (ValueError, KeyError, TypeError, RuntimeError) as err:
            raise ValueError(f"Checkpoint {ckpt} does not fit this model: {err}. Delete it to start over.") from err
        run.step, run.losses = state["step"], list(state["losses"])
        run.init_weights = state.get("init_weights", run.init_weights)
        run.first_batch = state.get("data", {}).get("first")
        run.resumed_from = run.step
        left = cfg.steps - run.step
        if dd.is_main():
            warnings.warn(
                f"Resuming from the checkpoint at {ckpt} (step {run.step} of {cfg.steps}): "
                + (
                    f"{left} steps to go."
                    if left
                    else "training is already complete; no steps are run and the model now holds the checkpoint's "
                    "weights. Pass resume=False or another checkpoint_dir to train again."
                ),
                ResumeWarning,
                stacklevel=3,  # the caller of train
            )
    dd.check_same_on_ranks(
        run.step,
        "the step to resume from",
        f"Every rank must see the same checkpoint_dir ({ckpt}): put it on a file system all nodes share.",
    )
    return run
