"""The command line, timer and request loop of the reference scripts (run with the old-stack venv's Python:
standard library only).

After setup a script calls `serve(meta, timed)`: it prints {"ready": true, **meta}, then for every line N on stdin
prints {"times_s": timed(N)}; "quit" or an empty line ends it. benchmarks/common.py's ReferenceRunner is the client.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable


def parser(doc: str, **int_options: int) -> argparse.ArgumentParser:
    """A script's command line: ``--<name> N`` for each of `int_options` (the value is its default), then the
    options every reference script takes (--seed, --device, --serve)."""
    out = argparse.ArgumentParser(description=doc.splitlines()[0])
    for name, default in int_options.items():
        out.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    out.add_argument("--seed", type=int, default=0)
    out.add_argument("--device", default="cpu")
    out.add_argument("--serve", action="store_true", help="time steps on request from stdin (see the docstring)")
    return out


def timer(step: Callable[[], None], sync: Callable[[], None]) -> Callable[[int], list[float]]:
    """`timed(n)`: the seconds of each of n more calls of `step`, each waited for with `sync`."""

    def timed(n: int) -> list[float]:
        times = []
        for _ in range(n):
            start = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - start)
        return times

    return timed


def reply(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def serve(meta: dict, timed: Callable[[int], list[float]]) -> None:
    reply({"ready": True, **meta})
    for line in sys.stdin:
        if not line.strip() or line.strip() == "quit":
            break
        reply({"times_s": timed(int(line))})
