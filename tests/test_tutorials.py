"""The tutorials run top to bottom (marked slow)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, expect",
    [
        ("fsm.ipynb", "transition accuracy"),
        ("analysis.ipynb", "loss with codebooks"),
        ("language_model.ipynb", "mean held-out precision"),
    ],
)
def test_tutorial_runs_top_to_bottom(name, expect, monkeypatch):
    monkeypatch.setenv("CBINTERP_TUTORIAL_TRAIN", "1")  # train the small model, whatever benchmarks/out holds
    monkeypatch.setenv("CBINTERP_TUTORIAL_QUICK", "1")  # shorter training
    notebook = nbformat.read(TUTORIALS / name, as_version=4)
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(TUTORIALS)}}
    ).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any(expect in o.get("text", "") for o in outputs)
