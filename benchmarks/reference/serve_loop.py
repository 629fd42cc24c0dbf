"""The request loop of the reference scripts (run with the old-stack venv's Python: standard library only).

After setup a script calls `serve(meta, timed)`: it prints {"ready": true, **meta}, then for every line N on stdin
prints {"times_s": timed(N)}; "quit" or an empty line ends it. benchmarks/common.py's ReferenceRunner is the client.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable


def reply(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def serve(meta: dict, timed: Callable[[int], list[float]]) -> None:
    reply({"ready": True, **meta})
    for line in sys.stdin:
        if not line.strip() or line.strip() == "quit":
            break
        reply({"times_s": timed(int(line))})
