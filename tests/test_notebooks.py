"""Every notebook runs top to bottom on a real LocalCluster in a headless Jupyter kernel.

Cells tagged ``needs-cluster`` (a real Kubernetes cluster or bucket) are left out, but must still
be valid Python.  Notebooks are executed in memory: outputs are never written back.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
SKIP_TAG = "needs-cluster"
BUDGET_SECONDS = 120  # the limit per notebook; they take about 15-20 s here


def _tags(cell) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def test_the_three_notebooks_are_there():
    assert [p.name for p in NOTEBOOKS] == ["custom-models.ipynb", "quickstart.ipynb", "scale-out.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_clean(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: clear the outputs"
    skipped = [c for c in nb.cells if SKIP_TAG in _tags(c)]
    for cell in skipped:
        assert cell.cell_type == "code" and "Needs a real cluster" in cell.source, cell.source[:80]
        compile(cell.source, f"{path.name}:{SKIP_TAG}", "exec")  # at least valid Python
    assert bool(skipped) == (path.stem == "scale-out")


@pytest.mark.slow
@pytest.mark.timeout(2 * BUDGET_SECONDS)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    nb.cells = [c for c in nb.cells if SKIP_TAG not in _tags(c)]
    client = nbclient.NotebookClient(nb, timeout=BUDGET_SECONDS, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    t0 = time.perf_counter()
    client.execute()  # raises CellExecutionError, with the cell and the traceback, on the first error
    took = time.perf_counter() - t0
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    stderr = "".join(o.text for o in outputs if o.output_type == "stream" and o.name == "stderr")
    assert "Traceback" not in stderr and not re.search(r"\b[A-Z]\w*Warning: ", stderr), stderr[-2000:]
    pictures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert pictures, "every notebook shows at least one plot of a series"
    assert took < BUDGET_SECONDS


@pytest.mark.timeout(BUDGET_SECONDS)
def test_the_progress_bar_in_a_notebook_says_no_tqdm_warning(tmp_path):
    """progress=True in Jupyter, without ipywidgets (no dependency of ours): tqdm.auto's notebook bar
    warned "IProgress not found. Please update jupyter and ipywidgets" before falling back."""
    source = ("import modelfactory.run\n"
              "bar = modelfactory.run.Progress(3, 'train seasonal')\n"
              "bar.close()\n")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)])
    nbclient.NotebookClient(nb, timeout=BUDGET_SECONDS, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    stderr = "".join(o.text for o in nb.cells[0].outputs if o.output_type == "stream" and o.name == "stderr")
    assert "train seasonal" in stderr and "Warning" not in stderr, stderr
