"""Notebook 00's exercise 3 cannot be passed by measuring: a real optimizer step inside the
answer is refused, so the byte count must come from the update rules."""
import copy
import importlib
from pathlib import Path

import pytest
import torch

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


@pytest.fixture
def nb00(monkeypatch):
    monkeypatch.syspath_prepend(str(NOTEBOOKS))  # as in a notebook, whose cwd is notebooks/
    return importlib.import_module("checks.nb00")


def measures_with_a_real_step(model, optimizer):
    """Runs the optimizer the checker itself runs, then counts: the 'calls the reference' answer."""
    optimizers = importlib.import_module("checks.nb00").OPTIMIZERS
    model = copy.deepcopy(model)
    opt = optimizers[optimizer]([p for p in model.parameters() if p.requires_grad])
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    opt.step()
    tensors = list(model.parameters()) + [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [v for s in opt.state.values() for k, v in s.items() if k != "step"]
    return sum(t.numel() * t.element_size() for t in tensors)


def test_exercise_3_rejects_an_answer_that_steps_a_real_optimizer(nb00):
    with pytest.raises(AssertionError, match="the answer calls"):
        nb00.exercise_3(measures_with_a_real_step)


def test_the_optimizers_work_again_after_the_check(nb00):
    with pytest.raises(AssertionError):
        nb00.exercise_3(measures_with_a_real_step)
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    torch.optim.SGD([p], lr=0.5).step()
    assert torch.equal(p.detach(), torch.full((3,), 0.5))
