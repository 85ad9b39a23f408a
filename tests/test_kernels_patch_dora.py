"""patch(model) leaves DoRA's layers alone: DoRALinear is a LoRALinear subclass with a magnitude
and a column norm the fused LoRA kernel does not have, and the registry does not list it as
fusable. A patched DoRA model computes what it computes unpatched (the Triton interpreter runs
the other swapped kernels: RMSNorm, RoPE, SwiGLU)."""
import pytest
import torch
from conftest import assert_close, loss_and_grads
from conftest import tiny_llama as _model

import pelib
from pelib.dora import DoRALinear, dora_layers
from pelib.lora import LoRALinear
from pelib.methods import fusable_layers
from pelib.patch import patch, unpatch

pytestmark = pytest.mark.integration  # Triton kernels in the interpreter

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_dora_is_not_fused_and_patch_on_equals_patch_off():
    assert issubclass(DoRALinear, LoRALinear) and DoRALinear not in fusable_layers()
    model = pelib.apply_dora(_model(), TARGETS, r=4)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, m in dora_layers(model):  # B and m away from init: every term of DoRA counts
            m.lora_B.weight.copy_(0.05 * torch.randn(m.lora_B.weight.shape, generator=gen))
            m.lora_magnitude_vector.mul_(1 + 0.2 * torch.randn(m.out_features, generator=gen))
    ids = torch.randint(0, 1003, (2, 17), generator=gen)
    ref_loss, ref = loss_and_grads(model, ids)

    patch(model)
    assert not any("forward" in m.__dict__ for _, m in dora_layers(model))  # DoRA's own forward
    assert "forward" in model.model.norm.__dict__  # the rest of the model is patched
    loss, grads = loss_and_grads(model, ids)
    unpatch(model)

    mags = [n for n in ref if n.endswith(".lora_magnitude_vector")]
    assert len(mags) == 2 * len(TARGETS)  # 2 decoder layers
    assert_close(loss, ref_loss, 1e-5, 1e-5, "loss")
    for n, g in ref.items():
        assert g.abs().max() > 0, n
        assert_close(grads[n], g, 1e-6, 1e-4, n)
