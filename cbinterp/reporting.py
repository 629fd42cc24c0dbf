"""The report of a benchmark or experiment: the machine it ran on, strict JSON written atomically, a text table.

Every script under benchmarks/ ends the same way, and a user's own measurement can too::

    from cbinterp.reporting import environment, print_table, write_report

    load = os.getloadavg()
    ...  # the measurement
    print_table(["variant", "ms"], [["ours", f"{t * 1e3:.1f}"]])
    write_report(out, {"benchmark": "mine", **environment(device, load_average_start=load), "results": rows})

Only the standard library is imported here; torch when `environment` is called, pandas never (a `pd.NA` in the
data is recognised when pandas is already imported, which is the only way one can be there).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cbinterp.core.storage.atomic import atomic_file

__all__ = [
    "Timer",
    "environment",
    "format_table",
    "json_ready",
    "print_table",
    "save_figure",
    "write_json",
    "write_report",
]

PathLike = str | os.PathLike


def environment(device: Any | None = None, load_average_start: Sequence[float] | None = None) -> dict:
    """The machine a measurement ran on, as the keys every benchmark report shares.

    Args:
        device: the torch device measured (recorded as its string); omitted from the record when None.
        load_average_start: `os.getloadavg()` taken before the measurement (other jobs on the machine slow it
            down); the record holds it beside the load average now, at the end.

    Returns:
        {"device", "torch_version", "threads", "cpu_count", "platform", "python", "load_average_start",
        "load_average_end"} ("device" only when given, "load_average_start" None when not given).
    """
    import torch

    record = {} if device is None else {"device": str(device)}
    record.update(
        torch_version=torch.__version__,
        threads=torch.get_num_threads(),
        cpu_count=os.cpu_count(),
        platform=platform.platform(),
        python=platform.python_version(),
        load_average_start=None if load_average_start is None else list(load_average_start),
        load_average_end=list(os.getloadavg()),
    )
    return record


def _is_pandas_na(value: Any) -> bool:
    pandas = sys.modules.get("pandas")
    return pandas is not None and value is pandas.NA


def json_ready(value: Any, default: Callable[[Any], Any] | None = None) -> Any:
    """`value` as plain JSON data.

    NaN, infinities and `pd.NA` become None, numpy and torch values Python numbers and lists, dataclasses dicts,
    paths strings; dict keys that are numpy scalars become Python scalars.

    Args:
        default: called on any other value for something JSON can hold (as `json.dumps`'s `default`, e.g. `str`);
            without it such a value is a TypeError.
    """
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):  # numpy's float64 too
        return float(value) if math.isfinite(value) else None
    if _is_pandas_na(value):
        return None
    if isinstance(value, dict):
        return {_json_key(k): json_ready(v, default) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v, default) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return json_ready(dataclasses.asdict(value), default)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist"):  # numpy arrays and scalars, torch tensors
        return json_ready(value.tolist(), default)
    if default is not None:
        return json_ready(default(value))
    raise TypeError(
        f"{type(value).__name__} is not JSON data; convert it (e.g. to a dict, list, str or number) before writing."
    )


def _json_key(key: Any) -> Any:
    if key is None or isinstance(key, (str, int, float, bool)):
        return key  # json writes these as it always does
    if hasattr(key, "item"):
        return key.item()
    return str(key)


def write_json(path: PathLike, data: Any, indent: int | None = 2, default: Callable[[Any], Any] | None = None) -> Path:
    """Write `data` (through `json_ready(data, default)`) as strict JSON (no NaN), atomically; returns `path`.

    The folder is created if needed."""
    path = Path(path)
    text = json.dumps(json_ready(data, default), indent=indent, allow_nan=False)
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return path


def write_report(
    path: PathLike, data: Any, indent: int | None = 2, default: Callable[[Any], Any] | None = None
) -> Path:
    """`write_json`, then print "wrote <path>"."""
    path = write_json(path, data, indent=indent, default=default)
    print(f"wrote {path}")
    return path


def format_table(header: Sequence[Any], rows: Sequence[Sequence[Any]], left: int = 1) -> str:
    """A text table: a header, a rule and one line per row; the first `left` columns flush left, the rest right."""
    if any(len(row) != len(header) for row in rows):
        raise ValueError(
            f"every row needs {len(header)} cells, one per header; got rows of {sorted(set(map(len, rows)))}"
        )
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return "\n".join([line(cells[0]), line(["-" * w for w in widths]), *map(line, cells[1:])])


def print_table(header: Sequence[Any], rows: Sequence[Sequence[Any]], left: int = 1) -> None:
    """Print `format_table(header, rows, left)` after a blank line."""
    print()
    print(format_table(header, rows, left))


def save_figure(fig: Any, folder: PathLike, stem: str, include_plotlyjs: bool | str = True) -> list[str]:
    """A plotly figure as `<folder>/<stem>.html`, and `.png` too when kaleido can draw it; each file atomically.

    Returns the paths written. `include_plotlyjs`: as plotly's `write_html` (True embeds plotly.js, "cdn" links it).
    """
    folder = Path(folder)
    html = folder / f"{stem}.html"
    with atomic_file(html) as tmp:
        fig.write_html(str(tmp), include_plotlyjs=include_plotlyjs)
    files = [str(html)]
    try:
        import kaleido  # noqa: F401

        png = folder / f"{stem}.png"
        with atomic_file(png) as tmp:
            fig.write_image(str(tmp), format="png", scale=2)
        files.append(str(png))
    except Exception:  # kaleido absent, or without a browser to draw with: the HTML is the figure
        pass
    return files


class Timer:
    """Seconds per stage: `mark(name)` records the time since the previous mark (or since the Timer was made)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.marks: dict[str, float] = {}

    def mark(self, name: str) -> float:
        """Seconds since the last mark, rounded to 0.01 s, recorded under `name` and returned."""
        now = time.perf_counter()
        self.marks[name] = round(now - self.t0 - sum(self.marks.values()), 2)
        return self.marks[name]
