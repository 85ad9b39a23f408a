"""Notebook 10's first checker rejects an answer that asks pelib's ledger instead of measuring."""
import importlib
import sys
from pathlib import Path

import pytest

from pelib.measure import memory_ledger

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "notebooks"))
checks = importlib.import_module("checks.nb10")
sys.path.pop(0)


def asks_the_ledger(model, batch):  # as a notebook would, with the name imported at its top
    return memory_ledger(model, batch)["activations saved for backward"]


def test_checker_rejects_an_answer_that_calls_the_ledger():
    with pytest.raises(AssertionError, match="calls"):
        checks.exercise_1(asks_the_ledger)


def test_pareto_tables_are_the_course_results():
    rows = checks.course_table("banking77_minilm.csv")
    assert len(rows) >= 5 and all(0 < v["f1"] < 1 and v["trainable"] > 0 for v in rows.values())
