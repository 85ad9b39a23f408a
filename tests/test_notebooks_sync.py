"""Each notebooks/NN_name.py (py:percent, the source of truth) has its .ipynb, with the same cells.

nbval executes the .ipynb files (`make test`), so a drift between the pair would test something
other than what people read. Fix a failure with `make notebooks` (jupytext --sync).
"""
from pathlib import Path

import jupytext
import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py"))


def test_every_source_has_its_notebook_and_no_notebook_is_orphaned():
    assert len(NOTEBOOKS) >= 2
    sources = {p.stem for p in NOTEBOOKS}
    notebooks = {p.stem for p in (ROOT / "notebooks").glob("*.ipynb")}
    assert not sources - notebooks, f"no .ipynb for {sorted(sources - notebooks)}: run `make notebooks`"
    assert not notebooks - sources, f"no NN_name.py source for {sorted(notebooks - sources)}"
    assert len(notebooks) == len(NOTEBOOKS)


def test_readme_table_lists_every_notebook():
    """README's course table is one contiguous block of `|` rows with a row per notebook."""
    lines = (ROOT / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| notebook |"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    rows = [line.split("|")[1].strip() for line in lines[start + 2:end]]
    assert rows == [p.stem for p in NOTEBOOKS], \
        "README's notebook table should list every notebook, in order, with no blank line"


@pytest.mark.parametrize("py", NOTEBOOKS, ids=lambda p: p.stem)
def test_pair_in_sync(py):
    ipynb = py.with_suffix(".ipynb")
    assert ipynb.exists(), f"{ipynb.name} is missing: run `make notebooks`"
    source, paired = jupytext.read(py), nbformat.read(ipynb, as_version=4)
    assert [(c.cell_type, c.source) for c in source.cells] == \
        [(c.cell_type, c.source) for c in paired.cells], \
        f"{py.name} and {ipynb.name} drifted: run `make notebooks`"
    assert source.metadata["kernelspec"]["name"] == "python3"  # needed to execute in a fresh venv


@pytest.mark.parametrize("py", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_ends_by_checking_pelib(py):
    """The lesson ends by asserting pelib equals what it built; the Exercises come after."""
    cells = jupytext.read(py).cells
    end = next((i for i, c in enumerate(cells)
                if c.cell_type == "markdown" and c.source.startswith("## Exercises")), len(cells))
    code = [c.source for c in cells[:end] if c.cell_type == "code"]
    last = "\n".join(code[-2:])
    assert "pelib" in last and "assert" in last, \
        f"{py.name} should end by asserting pelib equals what it built"
