"""Each notebooks/NN_name.py (py:percent, the source of truth) has its .ipynb, with the same cells.

nbval executes the .ipynb files (`make test`), so a drift between the pair would test something
other than what people read. Fix a failure with `make notebooks` (jupytext --sync).
"""
from pathlib import Path

import jupytext
import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("[0-9][0-9]_*.py"))


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 2


@pytest.mark.parametrize("py", NOTEBOOKS, ids=lambda p: p.stem)
def test_pair_in_sync(py):
    ipynb = py.with_suffix(".ipynb")
    assert ipynb.exists(), f"{ipynb.name} is missing: run `make notebooks`"
    source, paired = jupytext.read(py), nbformat.read(ipynb, as_version=4)
    assert [(c.cell_type, c.source) for c in source.cells] == \
        [(c.cell_type, c.source) for c in paired.cells], f"{py.name} and {ipynb.name} drifted: run `make notebooks`"
    assert source.metadata["kernelspec"]["name"] == "python3"  # needed to execute in a fresh venv


@pytest.mark.parametrize("py", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_ends_by_checking_pelib(py):
    code = [c.source for c in jupytext.read(py).cells if c.cell_type == "code"]
    last = "\n".join(code[-2:])
    assert "pelib" in last and "assert" in last, f"{py.name} should end by asserting pelib equals what it built"
