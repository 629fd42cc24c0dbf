"""The tutorials run top to bottom (marked slow)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fsm.ipynb"])
def test_tutorial_runs_top_to_bottom(name, monkeypatch):
    monkeypatch.setenv("CBINTERP_TUTORIAL_TRAIN", "1")  # train the small model, whatever benchmarks/out holds
    notebook = nbformat.read(TUTORIALS / name, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(TUTORIALS)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("transition accuracy" in o.get("text", "") for o in outputs)
