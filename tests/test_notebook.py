"""notebooks/diagnosis.ipynb runs top to bottom (shortened by MMKIT_NOTEBOOK_QUICK) and is
stored with the outputs of its last full run, so a reader sees its tables and figures."""

from __future__ import annotations

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import ROOT

NOTEBOOK = ROOT / "notebooks" / "diagnosis.ipynb"


def code_cells(notebook):
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def test_the_notebook_is_stored_with_its_tables_and_figures():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    cells = code_cells(notebook)
    assert all(cell.get("execution_count") for cell in cells), "run the notebook and save it with its outputs"
    outputs = [output for cell in cells for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    figures = sum("image/png" in output.get("data", {}) for output in outputs)
    tables = sum("text/html" in output.get("data", {}) and "<table" in output["data"]["text/html"] for output in outputs)
    assert figures >= 4 and tables >= 3  # studies, ROC curves, retrievals, attention; AUROC, F1, ECE


@pytest.mark.slow
def test_the_notebook_executes_top_to_bottom(tmp_path, monkeypatch):
    monkeypatch.setenv("MMKIT_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("MMKIT_NOTEBOOK_RUNS", str(tmp_path))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()  # a cell's error fails the test
    outputs = [output for cell in code_cells(notebook) for output in cell.outputs]
    assert sum("image/png" in output.get("data", {}) for output in outputs) >= 4
    assert {path.name for path in tmp_path.iterdir()} == {"diagnosis_image", "diagnosis_report", "diagnosis_fused",
                                                          "diagnosis_contrastive"}
