"""Training metrics loggers.

`train(..., loggers=[...])` calls `log(step, metrics)` every `log_every` steps, then `close()`.

Metrics (all floats): `loss` (mean since the last call), `lr` (the model's, or the codebooks' when the model is frozen),
`lr/codebooks`, `tokens_per_s` (global: all ranks), per codebook `mse/<hook name>` (reconstruction MSE of the last
step, averaged over ranks) and `dead_fraction/<hook name>` (share of its (head, code) pairs unused since the last
call), and `dead_fraction` over all codebooks; `eval/<key>` for the numbers an `eval_fn` returns. Only rank 0 logs.
Nothing is logged or uploaded unless a logger is passed.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Protocol, runtime_checkable

__all__ = ["JSONLLogger", "TrainLogger", "WandbLogger", "read_jsonl"]


@runtime_checkable
class TrainLogger(Protocol):
    """What `train` calls: `log` every `log_every` steps (and at eval steps), `close` once at the end."""

    def log(self, step: int, metrics: dict) -> None:
        """Record the metrics of step `step` (name -> number)."""

    def close(self) -> None:
        """Flush and release what the logger holds; called once, when training ends."""


def _jsonable(value):
    """A metric as strict JSON: non-finite floats become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class JSONLLogger:
    """One JSON object per call, `{"step": ..., **metrics}`, appended to `path`.

    A line at a time, flushed and fsynced, so that a crash loses at most the line being written."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")

    def log(self, step: int, metrics: dict) -> None:
        """Append one JSON line `{"step": step, **metrics}` (non-finite numbers as null)."""
        line = json.dumps({"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}, allow_nan=False)
        # one write of a whole line in append mode: readers never see two records interleaved
        self._file.write(line + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        """Close the file (again is a no-op)."""
        if not self._file.closed:
            self._file.close()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a `JSONLLogger` file; a last line cut short by a crash is left out."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class WandbLogger:
    """Metrics to Weights & Biases; only what `train` passes is logged.

    `wandb.init(**init_kwargs)` runs on the first call; `mode="offline"` needs no network and writes under `dir`."""

    def __init__(
        self,
        project: str | None = None,
        mode: str | None = None,
        dir: str | os.PathLike | None = None,
        config: dict | None = None,
        **init_kwargs,
    ):
        try:
            import wandb
        except ImportError as err:
            raise ImportError("WandbLogger needs wandb: pip install wandb (transformer-lens installs it).") from err
        self._wandb = wandb
        self._kwargs = dict(project=project, mode=mode, dir=None if dir is None else str(dir), config=config)
        self._kwargs.update(init_kwargs)
        self.run = None

    def log(self, step: int, metrics: dict) -> None:
        """Send the metrics to the wandb run, starting the run on the first call."""
        if self.run is None:  # started on rank 0's first log only: other ranks never touch wandb
            self.run = self._wandb.init(**{k: v for k, v in self._kwargs.items() if v is not None})
        self.run.log(dict(metrics), step=int(step))

    def close(self) -> None:
        """Finish the wandb run, if one was started."""
        if self.run is not None:
            self.run.finish()
            self.run = None
