"""The notebooks run top to bottom (nbclient, in a fresh kernel each) and are kept stripped.

Each notebook checks its own results with asserts (a loss that falls, kernels that match their
references, the same loss on every mesh), so a notebook that runs but computes nonsense fails
here too.
"""

from __future__ import annotations

import pathlib

import nbformat
import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert {p.stem for p in NOTEBOOKS} >= {"quickstart", "generative_zoo", "kernels", "sharding"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stripped(path):
    """Outputs stay out of git: a notebook is source, its figures are made by running it."""
    nb = nbformat.read(path, as_version=4)
    with_outputs = [i for i, c in enumerate(nb.cells)
                    if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not with_outputs, f"{path.name}: cells {with_outputs} keep outputs (clear them)"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    # The kernel inherits this process's environment (the session's classifier cache, JAX on
    # the CPU even where an accelerator is installed: the notebooks are sized for it and
    # sharding.ipynb simulates 8 CPU devices) and writes its runs/ in a temporary directory.
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
