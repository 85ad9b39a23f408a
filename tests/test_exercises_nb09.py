"""Notebook 09's checkers reject pure-torch answers: the numbers would be right, but no Triton
kernel ran (or the answer called the very reference the checker compares against)."""
import importlib
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "notebooks"))
checks = importlib.import_module("checks.nb09")
solutions = importlib.import_module("solutions.nb09")  # for a real kernel to launch on the side
sys.path.pop(0)


def layernorm_calls_torch(x, w, b, eps=1e-5):
    return F.layer_norm(x, x.shape[-1:], w, b, eps)


def layernorm_in_torch(x, w, b, eps=1e-5):  # right numbers, no kernel
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def geglu_calls_torch(g, u):
    return F.gelu(g, approximate="tanh") * u


def geglu_in_torch(g, u):  # right numbers, no kernel
    z = 0.7978845608028654 * (g + 0.044715 * g ** 3)
    return 0.5 * g * (1 + (2 * torch.sigmoid(2 * z) - 1)) * u


def swiglu_bwd_autograd(dh, g, u):
    g, u = g.clone().requires_grad_(), u.clone().requires_grad_()
    return torch.autograd.grad(F.silu(g) * u, (g, u), dh)


def swiglu_bwd_in_torch(dh, g, u):  # right numbers, no kernel
    s = torch.sigmoid(g)
    return dh * u * s * (1 + g * (1 - s)), dh * g * s


@pytest.mark.parametrize("k,answer", [(1, layernorm_calls_torch), (1, layernorm_in_torch),
                                      (2, geglu_calls_torch), (2, geglu_in_torch),
                                      (3, swiglu_bwd_autograd), (3, swiglu_bwd_in_torch)])
def test_checker_rejects_a_pure_torch_answer(k, answer):
    with pytest.raises(AssertionError):
        getattr(checks, f"exercise_{k}")(answer)


def test_the_pure_torch_answers_compute_the_right_numbers():
    """So the checkers reject them for not being kernels, not for a wrong result."""
    x, w, b = torch.randn(5, 33) + 3, torch.rand(33) + 0.5, torch.randn(33)
    assert torch.allclose(layernorm_in_torch(x, w, b), F.layer_norm(x, (33,), w, b, 1e-5), atol=1e-5)
    g, u, dh = torch.randn(4, 7), torch.randn(4, 7), torch.randn(4, 7)
    assert torch.allclose(geglu_in_torch(g, u), F.gelu(g, approximate="tanh") * u, atol=1e-6)
    for a, r in zip(swiglu_bwd_in_torch(dh, g, u), swiglu_bwd_autograd(dh, g, u)):
        assert torch.allclose(a, r, atol=1e-6)


def with_a_kernel_on_the_side(torch_answer):
    """torch maths for the result, and a real @triton.jit launch beside it on a tensor the answer
    does not return: it launches a kernel, but no kernel computed its result."""
    def answer(*args):
        solutions._layernorm(torch.randn(2, 8), torch.ones(8), torch.zeros(8), 1e-5, True)
        return torch_answer(*args)
    return answer


@pytest.mark.integration  # launches a kernel in Triton's interpreter
@pytest.mark.parametrize("k,answer", [(1, layernorm_in_torch), (2, geglu_in_torch),
                                      (3, swiglu_bwd_in_torch)])
def test_checker_rejects_torch_maths_beside_a_kernel(k, answer):
    with pytest.raises(AssertionError, match="no kernel was handed"):
        getattr(checks, f"exercise_{k}")(with_a_kernel_on_the_side(answer))
