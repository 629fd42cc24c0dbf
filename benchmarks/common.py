"""What the benchmark scripts share and no user of cbinterp needs: where they write, the authors' library run as a
timing reference in its own venv (codebook_speed, train_speed), and the inputs of the language-model benchmarks
(lm_probes, lm_steering), and the ends of a report script: its command line (`parser`) and its report (`settings`,
`finish`). The report's own pieces (environment, strict JSON, tables, figures) are `cbinterp.reporting`.

A script imports this module by the way it was started, without touching sys.path::

    if __package__:  # python -m benchmarks.<name>
        from . import common
    else:  # python benchmarks/<name>.py: this folder is sys.path[0]
        import common
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cbinterp.reporting import write_report

__all__ = [
    "DEFAULT_REFERENCE_PYTHON",
    "OUT",
    "REFERENCE_DIR",
    "REFERENCE_REQUIREMENTS",
    "ROOT",
    "ReferenceRunner",
    "add_reference_options",
    "as_flags",
    "baseline_name",
    "default_model",
    "finish",
    "heldout_halves",
    "load_model",
    "ms",
    "parser",
    "ratio",
    "reference_works",
    "resolve_reference",
    "set_threads",
    "settings",
    "step_rows",
    "setup_reference",
    "sync",
    "take_chars",
    "time_interleaved",
]

#: The repository root (the folder above benchmarks/).
ROOT = Path(__file__).resolve().parents[1]
#: Where the scripts write by default (ignored by git).
OUT = ROOT / "benchmarks" / "out"
#: Scripts run by the authors' old-stack Python (time_codebook.py, time_train.py) and that venv's pins.
REFERENCE_DIR = ROOT / "benchmarks" / "reference"
REFERENCE_REQUIREMENTS = REFERENCE_DIR / "requirements.txt"
DEFAULT_REFERENCE_PYTHON = Path("/tmp/refvenv/bin/python")


# -- a report script's command line and report ----------------------------------------------------------------
def parser(name: str, doc: str, **int_options: int) -> argparse.ArgumentParser:
    """A report script's parser: `doc`'s first line, `--out` (default benchmarks/out/<name>.json), then one
    integer option per keyword in that order (`seq_len=64` is `--seq-len`, default 64)."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--out", default=str(OUT / f"{name}.json"))
    for key, default in int_options.items():
        p.add_argument("--" + key.replace("_", "-"), type=int, default=default)
    return p


def settings(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """The run's settings `names` as report fields, in that order: `{name: args.<name>}`."""
    return {name: getattr(args, name) for name in names}


def as_flags(args: argparse.Namespace, *names: str) -> list[str]:
    """The run's settings `names` as a command line for another script: `--seq-len 64` for `seq_len`, in order."""
    return [part for name in names for part in ("--" + name.replace("_", "-"), str(getattr(args, name)))]


def finish(out: str | Path, report: dict) -> dict:
    """A report script's last step: write `report` to `out` (strict JSON, atomically; prints where) and return it."""
    write_report(out, report)
    return report


# -- timing --------------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously), so that a timer measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_rows(times: dict[str, list[float]], tokens_per_step: int) -> dict[str, dict]:
    """Per timed function: median and least seconds, tokens/s at the median, and every time measured."""
    return {
        name: {
            "median_s": statistics.median(t),
            "min_s": min(t),
            "tokens_per_s": tokens_per_step / statistics.median(t),
            "times_s": t,
        }
        for name, t in times.items()
    }


def time_interleaved(
    fns: dict[str, Callable[[], float | None]], warmup: int, repeats: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds per call of each function, one call of each per round in rotating order. A function that returns
    a number (the reference, timed in its own process) reports its own time; the others are timed here."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            own = fns[name]()
            sync(device)
            times[name].append(own if own is not None else time.perf_counter() - start)
    return times


def ms(seconds: float | None) -> str:
    """Seconds as milliseconds for a table ("-" when not measured)."""
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, None when either was not measured."""
    return None if a is None or b is None else a / b


# -- the authors' library as a reference -----------------------------------------------------------------------
class ReferenceRunner:
    """A reference script (`cmd`, run with `--serve`) in a long-lived subprocess; `step()` times one step there."""

    def __init__(self, cmd: list[str]):
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True)
        self.meta = self._read()
        if not self.meta.get("ready"):
            raise RuntimeError(f"reference did not start: {self.meta}")

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.stderr.seek(0)
            raise RuntimeError(f"reference process ended (exit {self.proc.returncode}):\n{self.stderr.read()[-2000:]}")
        return json.loads(line)

    def step(self) -> float:
        self.proc.stdin.write("1\n")
        self.proc.stdin.flush()
        return self._read()["times_s"][0]

    def close(self) -> None:
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()


def reference_works(python: Path) -> bool:
    """Whether `python` can import the authors' library."""
    if not python.exists():
        return False
    probe = subprocess.run([str(python), "-c", "import codebook_features.models"], capture_output=True, text=True)
    return probe.returncode == 0


def setup_reference(python: Path) -> None:
    """Build the authors' old-stack venv (idempotent): `python -m venv` + `pip install --no-deps -r <notes list>`."""
    if reference_works(python):
        print(f"reference environment ready: {python}")
        return
    venv = python.parent.parent
    if not REFERENCE_REQUIREMENTS.is_file():
        raise SystemExit(f"cannot build the reference environment: {REFERENCE_REQUIREMENTS} is missing")
    if not python.exists():
        print(f"creating {venv}")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    print(f"installing codebook-features 0.1.2 and its pinned old stack into {venv} (this takes a few minutes)")
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--no-deps", "-r", str(REFERENCE_REQUIREMENTS)], check=True, cwd=ROOT
    )
    if not reference_works(python):
        raise SystemExit(f"{python} still cannot import codebook_features.models after installing")


def add_reference_options(parser: argparse.ArgumentParser) -> None:
    """The flags `resolve_reference` reads: --reference-python, --setup-reference, --no-reference."""
    parser.add_argument(
        "--reference-python",
        default=None,
        help=f"Python of the codebook-features 0.1.2 venv (default: {DEFAULT_REFERENCE_PYTHON} if it exists)",
    )
    parser.add_argument(
        "--setup-reference", action="store_true", help="build the reference venv first if it is not ready"
    )
    parser.add_argument("--no-reference", action="store_true", help="do not time the authors' library")


def resolve_reference(args) -> tuple[Path | None, str]:
    """The reference's Python from the flags --no-reference, --reference-python, --setup-reference, and a note for
    the report; (None, why) when the reference is not timed."""
    if args.no_reference:
        return None, "skipped (--no-reference)"
    python = Path(args.reference_python) if args.reference_python else DEFAULT_REFERENCE_PYTHON
    if args.setup_reference:
        setup_reference(python)
    if not python.exists():
        return None, (
            f"skipped: {python} does not exist (run with --setup-reference to build it, or pass --reference-python)"
        )
    if not reference_works(python):
        return None, f"skipped: {python} cannot import codebook_features.models (try --setup-reference)"
    return python, f"codebook-features via {python}"


# -- the language-model benchmarks' inputs ---------------------------------------------------------------------
def default_model() -> str:
    """The shipped codebook LM's name (`cbinterp.pretrained.DEFAULT_MODEL`)."""
    from cbinterp.pretrained import DEFAULT_MODEL

    return DEFAULT_MODEL


def baseline_name() -> str:
    """The shipped no-codebook baseline LM's name (`cbinterp.pretrained.BASELINE_MODEL`)."""
    from cbinterp.pretrained import BASELINE_MODEL

    return BASELINE_MODEL


def load_model(name_or_path: str):
    """A HookedTransformer with its tokenizer, on the CPU, by shipped name or folder (`load_pretrained`)."""
    from cbinterp.pretrained import load_pretrained

    return load_pretrained(name_or_path, device="cpu").eval()


def heldout_halves(name_or_path: str):
    """The held-out documents the model never trained on (`heldout_documents`; the corpus' held-out split for a
    folder without a card), as the two halves of `split_halves`: (choose half A, score half B)."""
    from cbinterp.pretrained import heldout_documents
    from cbinterp.tasks.corpus import load_corpus, split_halves

    try:
        docs = heldout_documents(name_or_path)
    except FileNotFoundError:  # a model folder without card.json (e.g. the tests' tiny model)
        docs = load_corpus(split="heldout")
    return split_halves(docs)


def take_chars(docs, max_chars: int | None):
    """Texts of `docs` (all when `max_chars` is None), else about `max_chars` characters taken round-robin over the
    sources, at most a quarter of a source's share from any one document, so that every source is represented."""
    if max_chars is None:
        return [d.text for d in docs]
    by_source: dict[str, list] = {}
    for d in docs:
        by_source.setdefault(d.source, []).append(d)
    piece = max(500, max_chars // (4 * len(by_source)))
    out, total = [], 0
    queues = [list(v) for v in by_source.values()]
    while total < max_chars and any(queues):
        for q in queues:
            if q and total < max_chars:
                text = q.pop(0).text[: min(piece, max_chars - total)]
                out.append(text)
                total += len(text)
    return out


def set_threads(n: int | None) -> None:
    """torch's thread count, when `n` is given."""
    if n:
        torch.set_num_threads(n)
