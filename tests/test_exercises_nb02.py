"""Notebook 02's exercise 3 cannot be passed by handing the work to PyTorch's fused attention:
the checker disables `scaled_dot_product_attention` while the answer runs."""
import importlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


@pytest.fixture
def nb02(monkeypatch):
    monkeypatch.syspath_prepend(str(NOTEBOOKS))  # as in a notebook, whose cwd is notebooks/
    return importlib.import_module("checks.nb02")


def calls_sdpa(q, k, v, P_K, P_V):
    B, T_q, T, L_p = q.shape[0], q.shape[2], k.shape[2], P_K.shape[1]
    keys = torch.cat([P_K.expand(B, -1, -1, -1), k], dim=2)
    values = torch.cat([P_V.expand(B, -1, -1, -1), v], dim=2)
    pos = torch.arange(T - T_q, T)[:, None]
    mask = torch.cat([torch.ones(T_q, L_p, dtype=torch.bool), torch.arange(T)[None, :] <= pos], 1)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)


def test_the_sdpa_answer_is_right_outside_the_checker(nb02):
    """So the rejection below is for calling the reference, not for a wrong result."""
    q = torch.randn(1, 6, 3, 4, dtype=torch.float64)
    k, v = torch.randn(2, 1, 2, 5, 4, dtype=torch.float64).unbind(0)
    P_K, P_V = torch.randn(2, 2, 3, 4, dtype=torch.float64).unbind(0)
    assert torch.allclose(calls_sdpa(q, k, v, P_K, P_V), nb02._reference(q, k, v, P_K, P_V))


def test_exercise_3_rejects_an_answer_that_calls_sdpa(nb02):
    with pytest.raises(AssertionError, match="the answer calls"):
        nb02.exercise_3(calls_sdpa)
    assert F.scaled_dot_product_attention.__name__ == "scaled_dot_product_attention"
