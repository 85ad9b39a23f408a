"""Notebook 01's checkers compare with a library function; an answer that just calls that
function must be rejected (the checker disables it while the answer runs)."""
import importlib
from pathlib import Path

import pytest
import torch.nn.functional as F

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


@pytest.fixture
def nb01(monkeypatch):
    monkeypatch.syspath_prepend(str(NOTEBOOKS))  # as in a notebook, whose cwd is notebooks/
    return importlib.import_module("checks.nb01")


def test_exercise_4_rejects_torchs_label_smoothing(nb01):
    def calls_torch(logits, labels, eps):
        return F.cross_entropy(logits, labels, label_smoothing=eps)

    with pytest.raises(AssertionError, match="the answer calls"):
        nb01.exercise_4(calls_torch)
    assert F.cross_entropy.__name__ == "cross_entropy"  # restored after the check


def test_exercise_3_rejects_transformers_schedule(nb01):
    import torch
    import transformers

    def calls_transformers(s, S, w):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = transformers.get_cosine_schedule_with_warmup(opt, w, S)
        return sched.lr_lambdas[0](s) if s >= w else (s + 1) / w

    with pytest.raises(AssertionError, match="the answer calls"):
        nb01.exercise_3(calls_transformers)


def test_exercise_5_accepts_torch_kron(nb01):
    """torch.kron is a building block, not the reference (a block-by-block assembly is)."""
    import torch

    def with_kron(A, s, t):
        B = s[:, :, None] * t[:, None, :]
        return sum(torch.kron(A[i], B[i]) for i in range(A.shape[0]))

    nb01.exercise_5(with_kron)


def test_exercise_3_rejects_pelibs_own_schedule(nb01):
    import pelib.schedule

    def via_pelib(s, S, w):
        return pelib.schedule.lr_schedule(S, w, "cosine")(s)

    import math

    assert abs(via_pelib(30, 50, 5) - 0.5 * (1 + math.cos(math.pi * 25 / 45))) < 1e-12  # the right answer
    with pytest.raises(AssertionError, match="the answer calls"):
        nb01.exercise_3(via_pelib)
