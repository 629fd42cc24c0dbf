"""Shared parts of the speed benchmarks: interleaved timing, and the authors' library run in its own venv."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REFERENCE_PYTHON = Path("/tmp/refvenv/bin/python")
REFERENCE_REQUIREMENTS = Path(__file__).resolve().parent / "reference" / "requirements.txt"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(
    fns: dict[str, Callable[[], Optional[float]]], warmup: int, repeats: int, device: torch.device
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


def resolve_reference(args) -> tuple[Optional[Path], str]:
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


def ms(seconds: Optional[float]) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None else a / b
