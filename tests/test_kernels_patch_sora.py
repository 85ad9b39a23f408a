"""patch(model) fuses only the layer types the registry names, exactly (no subclasses).

SoRALinear is a LoRALinear with a gate between A and B; the fused LoRA kernel has no gate, so a
SoRA model patched for the GPU must keep SoRA's own forward: its gates get the gradient they get
unpatched (the Triton interpreter runs the other swapped kernels: RMSNorm, RoPE, SwiGLU).
"""
import pytest
import torch
from conftest import assert_close, loss_and_grads
from conftest import tiny_llama as _model

import pelib
from pelib.lora import LoRALinear, lora_layers
from pelib.methods import METHODS, fusable_layers
from pelib.patch import patch, unpatch
from pelib.sora import SoRALinear, sora_layers

pytestmark = pytest.mark.integration  # Triton kernels in the interpreter

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _batch():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1003, (2, 17), generator=gen)
    return ids, ids.clone()


def test_the_registry_names_the_exact_fusable_types():
    assert fusable_layers() == (LoRALinear,)
    assert SoRALinear not in fusable_layers() and issubclass(SoRALinear, LoRALinear)
    assert all(not m.fusable for name, m in METHODS.items() if name not in ("lora", "qlora"))


def test_sora_gates_get_the_same_gradients_with_patch_on():
    model = pelib.apply_sora(_model(), TARGETS, r=4)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, m in sora_layers(model):  # B and the gates away from init: every path carries
            m.lora_B.weight.copy_(0.05 * torch.randn(m.lora_B.weight.shape, generator=gen))
            m.gate.copy_(torch.randn(m.gate.shape, generator=gen))
    ids, labels = _batch()
    ref_loss, ref = loss_and_grads(model, ids, labels)

    patch(model)
    assert not any("forward" in m.__dict__ for _, m in sora_layers(model))  # SoRA's own forward
    assert "forward" in model.model.norm.__dict__  # the rest of the model is patched
    loss, grads = loss_and_grads(model, ids, labels)
    unpatch(model)

    gates = [n for n in ref if n.endswith(".gate")]
    assert len(gates) == 2 * len(TARGETS)  # 2 decoder layers
    assert_close(loss, ref_loss, 1e-5, 1e-5, "loss")
    for n, g in ref.items():
        assert g.abs().max() > 0, n
        assert_close(grads[n], g, 1e-6, 1e-4, n)


def test_a_subclass_of_a_fusable_layer_is_not_fused():
    class Scaled(LoRALinear):  # a layer the registry does not know
        def forward(self, x):
            return 2 * super().forward(x)

    model = pelib.apply_lora(_model(), ["q_proj"], r=4)
    layer = model.model.layers[0].self_attn.q_proj
    model.model.layers[0].self_attn.q_proj = Scaled.__new__(Scaled)
    model.model.layers[0].self_attn.q_proj.__dict__.update(layer.__dict__)
    patch(model)
    swapped = {n for n, m in lora_layers(model) if "forward" in m.__dict__}
    unpatch(model)
    assert swapped == {"model.layers.1.self_attn.q_proj"}
