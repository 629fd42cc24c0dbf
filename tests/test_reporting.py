"""cbinterp.reporting: the report tail of the benchmarks (environment, strict atomic JSON, tables, figures)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cbinterp.reporting import Timer, environment, format_table, json_ready, save_figure, write_json, write_report


@dataclasses.dataclass
class _Point:
    x: int
    y: float


def test_json_ready_makes_plain_strict_data():
    data = {
        "nan": float("nan"),
        "inf": -math.inf,
        "np_nan": np.float64("nan"),
        "na": pd.NA,
        "np_int": np.int64(3),
        "np_float32": np.float32(0.5),
        "np_bool": np.bool_(True),
        "array": np.arange(3),
        "tensor": torch.tensor([[1, 2]]),
        "scalar_tensor": torch.tensor(2.5),
        "tuple": (1, "a"),
        "point": _Point(1, float("nan")),
        "path": Path("a") / "b",
        np.int64(7): "numpy key",
        1: "int key",
    }
    assert json_ready(data) == {
        "nan": None,
        "inf": None,
        "np_nan": None,
        "na": None,
        "np_int": 3,
        "np_float32": 0.5,
        "np_bool": True,
        "array": [0, 1, 2],
        "tensor": [[1, 2]],
        "scalar_tensor": 2.5,
        "tuple": [1, "a"],
        "point": {"x": 1, "y": None},
        "path": str(Path("a") / "b"),
        7: "numpy key",
        1: "int key",
    }
    assert type(json_ready(np.int64(3))) is int and type(json_ready(np.float32(0.5))) is float


def test_json_ready_refuses_what_is_not_data():
    with pytest.raises(TypeError, match="object is not JSON data"):
        json_ready({"x": object()})


def test_write_json_is_strict_atomic_and_keeps_plain_output(tmp_path):
    data = {"a": [1, 2.5, None], "b": {"c": "d"}}
    path = write_json(tmp_path / "sub" / "out.json", {**data, "bad": float("nan")}, indent=1)
    text = path.read_text()
    assert "NaN" not in text and json.loads(text) == {**data, "bad": None}
    # what needs no cleaning is written exactly as json.dumps writes it
    write_json(tmp_path / "plain.json", data)
    assert (tmp_path / "plain.json").read_text() == json.dumps(data, indent=2)
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["out.json"]  # no temporary left behind


def test_write_json_leaves_the_old_file_when_the_data_is_bad(tmp_path):
    path = write_json(tmp_path / "out.json", {"ok": 1})
    with pytest.raises(TypeError):
        write_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"ok": 1} and [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_write_report_says_what_it_wrote(tmp_path, capsys):
    path = write_report(tmp_path / "r.json", {"x": 1})
    assert capsys.readouterr().out == f"wrote {path}\n"


def test_format_table_aligns_columns():
    table = format_table(["name", "shape", "ms"], [["ours", "2x3", "1.5"], ["reference", "2x3", "12.0"]], left=2)
    assert table.splitlines() == [
        "name       shape    ms",
        "---------  -----  ----",
        "ours       2x3     1.5",
        "reference  2x3    12.0",
    ]
    with pytest.raises(ValueError, match="every row needs 3 cells"):
        format_table(["a", "b", "c"], [["1", "2"]])


def test_environment_records_the_machine():
    env = environment(torch.device("cpu"), load_average_start=(1.0, 2.0, 3.0))
    assert env["device"] == "cpu" and env["load_average_start"] == [1.0, 2.0, 3.0]
    assert env["threads"] == torch.get_num_threads() and env["torch_version"] == torch.__version__
    assert {"cpu_count", "platform", "python", "load_average_end"} <= env.keys()
    assert "device" not in environment() and environment()["load_average_start"] is None
    json.dumps(env, allow_nan=False)  # JSON as it is


def test_save_figure_writes_html_atomically(tmp_path):
    import plotly.graph_objects as go

    files = save_figure(go.Figure(go.Bar(x=[1, 2], y=[3, 4])), tmp_path / "figs", "fig", include_plotlyjs="cdn")
    assert files[0] == str(tmp_path / "figs" / "fig.html") and "plotly" in Path(files[0]).read_text()
    assert not [p for p in (tmp_path / "figs").iterdir() if p.name.endswith(".tmp")]


def test_timer_marks_stages():
    timer = Timer()
    first = timer.mark("a")
    timer.mark("b")
    assert list(timer.marks) == ["a", "b"] and first >= 0.0 and timer.marks["a"] == first


def test_a_default_turns_other_values_into_data(tmp_path):
    path = write_json(tmp_path / "out.json", {"dtype": torch.float32, "nested": [torch.device("cpu")]}, default=str)
    assert json.loads(path.read_text()) == {"dtype": "torch.float32", "nested": ["cpu"]}
