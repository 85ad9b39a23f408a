"""Notebook 08's checkers reject more wrong answers than the one solutions/nb08.py keeps."""
import importlib
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "notebooks"))
checks = importlib.import_module("checks.nb08")
sol = importlib.import_module("solutions.nb08")
sys.path.pop(0)


def _lasso_only(v, lam1, lam2):  # forgets the L2 part of the elastic net
    return sol.prox_elastic(v, lam1, 0.0)


def _elementwise(A, B, lam):     # plain lasso on every entry: zeros entries, not ranks
    return sol.prox_elastic(A, lam, 0.0), sol.prox_elastic(B, lam, 0.0)


def _rank_by_gate_norm(g, budget):  # the budget-th largest magnitude: keeps one rank too few
    mags = g.abs().sort(descending=True).values
    return float(mags[max(budget - 1, 0)])


@pytest.mark.parametrize("k,wrong", [(1, _lasso_only), (2, _elementwise), (3, _rank_by_gate_norm)])
def test_checker_rejects_another_wrong_answer(k, wrong):
    with pytest.raises(AssertionError):
        getattr(checks, f"exercise_{k}")(wrong)


def test_group_prox_removes_whole_ranks():
    A, B = torch.randn(6, 5, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    A[2] *= 1e-3
    B[:, 2] *= 1e-3
    A2, B2 = sol.group_prox(A, B, 0.5)
    assert (A2[2] == 0).all() and (B2[:, 2] == 0).all()
    assert (A2[0] != 0).all() and (B2[:, 0] != 0).all()
