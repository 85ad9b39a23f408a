"""Every notebook's exercises: each checker accepts its solution and rejects a wrong answer.

notebooks/solutions/nbNN.py defines SOLUTIONS = {k: answer} and WRONG = {k: answer} for the
checkers notebooks/checks/nbNN.py defines as exercise_k(answer). A checker that accepts the wrong
answer could not fail, so it fails here.
"""
import importlib
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # runs every solution and wrong answer (Triton: interpreted)

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
SOLUTIONS = sorted((NOTEBOOKS / "solutions").glob("nb[0-9][0-9].py"))


@pytest.fixture(autouse=True)
def notebooks_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(NOTEBOOKS))  # as in a notebook, whose cwd is notebooks/


def _cases():
    for path in SOLUTIONS:
        sys.path.insert(0, str(NOTEBOOKS))
        try:
            sol = importlib.import_module(f"solutions.{path.stem}")
        finally:
            sys.path.remove(str(NOTEBOOKS))
        for k in sorted(sol.SOLUTIONS):
            yield pytest.param(path.stem, k, id=f"{path.stem}-exercise_{k}")


@pytest.mark.parametrize("nb,k", list(_cases()))
def test_checker_accepts_the_solution_and_rejects_a_wrong_answer(nb, k):
    checks = importlib.import_module(f"checks.{nb}")
    sol = importlib.import_module(f"solutions.{nb}")
    check = getattr(checks, f"exercise_{k}")
    check(sol.SOLUTIONS[k])
    assert k in sol.WRONG, f"solutions/{nb}.py: give exercise {k} a WRONG answer too"
    with pytest.raises(AssertionError):
        check(sol.WRONG[k])


def test_every_notebook_has_exercises_with_a_checked_solution():
    for nb in sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py")):
        text = nb.read_text()
        assert "# ## Exercises" in text, f"{nb.name} has no Exercises section"
        n = nb.name[:2]
        assert (NOTEBOOKS / "checks" / f"nb{n}.py").exists(), f"no checks/nb{n}.py for {nb.name}"
        assert (NOTEBOOKS / "solutions" / f"nb{n}.py").exists(), f"no solutions/nb{n}.py"
        assert f"checks.nb{n}" in text, f"{nb.name} does not call its checkers"
