"""The tutorials run top to bottom (marked slow). The FSM tutorial reads the session's quick FSM model
(`fsm_quick_run`, trained by the same recipe its own training cell runs) instead of training another."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"


def run_notebook(name: str) -> list[dict]:
    notebook = nbformat.read(TUTORIALS / name, as_version=4)
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(TUTORIALS)}}
    ).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    return outputs


@pytest.mark.slow
def test_fsm_tutorial_runs_on_the_shared_quick_model(fsm_quick_run, monkeypatch):
    out, _ = fsm_quick_run
    monkeypatch.setenv("CBINTERP_TUTORIAL_MODEL", str(out))
    monkeypatch.delenv("CBINTERP_TUTORIAL_TRAIN", raising=False)
    outputs = run_notebook("fsm.ipynb")
    text = "".join(o.get("text", "") for o in outputs)
    assert f"using the saved model in {out}" in text and "state accuracy (sampled" in text


@pytest.mark.slow
def test_analysis_tutorial_runs_top_to_bottom(monkeypatch):
    monkeypatch.setenv("CBINTERP_TUTORIAL_QUICK", "1")  # shorter training
    outputs = run_notebook("analysis.ipynb")
    assert any("loss with codebooks" in o.get("text", "") for o in outputs)


@pytest.mark.slow
def test_language_model_tutorial_runs_top_to_bottom():
    outputs = run_notebook("language_model.ipynb")
    text = "".join(o.get("text", "") for o in outputs)
    assert "mean held-out precision" in text and "steered" in text
    assert "active_in" in text  # the source-steering cell ran its window-level search
