"""Notebook 11's checkers reject the answers that pass by calling the reference, or by doing what
the exercise rules out (all logits kept for the backward, one forward per answer, no packing)."""
import importlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


@pytest.fixture()
def nb11(monkeypatch):
    monkeypatch.syspath_prepend(str(NOTEBOOKS))
    return importlib.import_module("checks.nb11"), importlib.import_module("solutions.nb11")


def test_left_pad_that_calls_pelib_is_rejected(nb11):
    checks, _ = nb11
    from pelib import sft

    with pytest.raises(AssertionError, match="calls"):
        checks.exercise_1(lambda prompts, pad_id: sft.collate_prompts(prompts, pad_id))


def test_smoothed_loss_that_calls_cross_entropy_is_rejected(nb11):
    checks, _ = nb11

    def via_torch(h, W, y, eps, chunk):
        return F.cross_entropy(h @ W.T, y, ignore_index=-100, label_smoothing=eps)

    with pytest.raises(AssertionError, match="calls"):
        checks.exercise_2(via_torch)


def test_smoothed_loss_that_keeps_all_logits_is_rejected(nb11):
    checks, _ = nb11

    def all_logits(h, W, y, eps, chunk):  # right values, but autograd keeps the N x V logits
        keep = y != -100
        logp = (h[keep] @ W.T).log_softmax(-1)                         # (n, V)
        V = W.shape[0]
        nll = -logp.gather(1, y[keep][:, None])[:, 0]
        return ((1 - eps) * nll - eps / V * logp.sum(1)).mean()

    with pytest.raises(AssertionError, match="saved"):
        checks.exercise_2(all_logits)


def test_answer_scores_with_one_forward_per_answer_are_rejected(nb11):
    checks, sol = nb11

    def one_by_one(model, prompt, answers):
        return torch.cat([sol.answer_logprobs(model, prompt, [a]) for a in answers])

    with pytest.raises(AssertionError, match="forward calls"):
        checks.exercise_3(one_by_one)


def test_one_conversation_per_pack_is_rejected(nb11):
    checks, sol = nb11

    def no_packing(examples, capacity):
        return [sol.pack([e], capacity)[0] for e in examples]

    with pytest.raises(AssertionError, match="packs"):
        checks.exercise_4(no_packing)
