"""Notebook 03's checkers compare with peft's layers; an answer that runs peft's own DoRA norm or
PiSSA initialisation must be rejected (the checker disables them while the answer runs)."""
import importlib
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


@pytest.fixture
def nb03(monkeypatch):
    monkeypatch.syspath_prepend(str(NOTEBOOKS))  # as in a notebook, whose cwd is notebooks/
    return importlib.import_module("checks.nb03")


def peft_pissa(W, r, scaling):
    """Runs peft's PiSSA on a copy of W: the 'calls the reference' answer."""
    lin = nn.Sequential(nn.Linear(W.shape[1], W.shape[0]))
    with torch.no_grad():
        lin[0].weight.copy_(W)
    model = get_peft_model(lin, LoraConfig(r=r, lora_alpha=scaling * r, target_modules=["0"],
                                           init_lora_weights="pissa"))
    layer = model.base_model.model[0]
    return (layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach(),
            layer.base_layer.weight.detach())


def peft_dora_norm(W, A, B, magnitude, scaling):
    from peft.tuners.lora.dora import DoraLinearLayer

    norm = DoraLinearLayer(fan_in_fan_out=False).get_weight_norm(W, B @ A, scaling)  # (d_out,)
    return magnitude[:, None] * (W + scaling * B @ A) / norm[:, None]


def test_the_peft_answers_are_right_outside_the_checker():
    """So the rejections below are for calling the reference, not for a wrong result."""
    torch.manual_seed(0)
    W = torch.randn(12, 10)
    A, B, W_res = peft_pissa(W, 3, 2.0)
    assert torch.allclose(W_res + 2.0 * B @ A, W, atol=1e-5)
    A, B, mag = torch.randn(3, 10), torch.randn(12, 3), torch.rand(12)
    V = W + 2.0 * B @ A
    assert torch.allclose(peft_dora_norm(W, A, B, mag, 2.0), mag[:, None] * V / V.norm(dim=1, keepdim=True))


def test_exercise_3_rejects_peft_pissa(nb03):
    with pytest.raises(AssertionError, match="the answer calls"):
        nb03.exercise_3(peft_pissa)


def test_exercise_2_rejects_peft_dora(nb03):
    with pytest.raises(AssertionError, match="the answer calls"):
        nb03.exercise_2(peft_dora_norm)


def pelib_dora_merge(W, A, B, magnitude, scaling):
    """pelib's DoRA layer with these tensors, merged: the weight the exercise asks for."""
    from pelib.dora import DoRALinear

    lin = nn.Linear(W.shape[1], W.shape[0], bias=False)
    layer = DoRALinear(lin, r=A.shape[0], alpha=scaling * A.shape[0])
    with torch.no_grad():
        lin.weight.copy_(W)
        layer.lora_A.weight.copy_(A)
        layer.lora_B.weight.copy_(B)
        layer.lora_magnitude_vector.copy_(magnitude)
    layer.merge()
    return layer.base_layer.weight.detach().clone()


def test_exercise_2_rejects_pelibs_dora(nb03):
    torch.manual_seed(1)
    W, A, B, mag = torch.randn(12, 10), torch.randn(3, 10), torch.randn(12, 3), torch.rand(12)
    assert torch.allclose(pelib_dora_merge(W, A, B, mag, 2.0), peft_dora_norm(W, A, B, mag, 2.0), atol=1e-5)
    with pytest.raises(AssertionError, match="the answer calls"):
        nb03.exercise_2(pelib_dora_merge)
