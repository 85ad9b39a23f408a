"""patch(model) on LoRA and QLoRA models: pelib's LoRALinear runs through the fused lora_linear.

A tiny random Llama with LoRA r=4 on all seven projections, B randomised so the LoRA path carries
weight: patched and unpatched give the same loss and the same gradient for every trainable
parameter (fp32), with dense and with 4-bit (pelib.quant.Linear4bit) base layers.
"""
import pytest
import torch
from conftest import assert_close
from conftest import grad_fns as _grad_fns
from conftest import tiny_llama as _model

import pelib
from pelib.lora import LoRALinear, lora_layers
from pelib.patch import patch, unpatch
from pelib.quant import Linear4bit

pytestmark = pytest.mark.integration  # Triton kernels in the interpreter

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N_LAYERS = 2 * len(TARGETS)                                                     # 2 decoder layers


def _lora_model(base="dense", double_quant=True):
    model = pelib.apply_lora(_model(), TARGETS, r=4)
    gen = torch.Generator().manual_seed(2)
    for _, m in lora_layers(model):
        with torch.no_grad():
            m.lora_B.weight.copy_(0.05 * torch.randn(m.lora_B.weight.shape, generator=gen))
        if base == "nf4":   # QLoRA by hand (apply_qlora is written elsewhere): swap the base layer
            m.base_layer = Linear4bit.from_linear(m.base_layer, double_quant=double_quant)
    return model


def _batch():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1003, (2, 17), generator=gen)
    labels = ids.clone()
    labels[0, :5] = -100                                                        # a masked prompt
    return ids, labels


def _loss_and_grads(model, ids, labels):
    model.zero_grad()
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.loss.detach(), grads, out.loss


def _count(loss, name):
    seen, stack, n = set(), [loss.grad_fn], 0
    while stack:
        f = stack.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        n += type(f).__name__.startswith(name)
        stack.extend(g for g, _ in f.next_functions)
    return n


@pytest.mark.parametrize("base,double_quant", [("dense", None), ("nf4", True), ("nf4", False)])
def test_patch_lora_same_loss_and_grads_then_unpatch(base, double_quant):
    model = _lora_model(base, double_quant)
    ids, labels = _batch()
    ref_loss, ref_grads, ref_graph = _loss_and_grads(model, ids, labels)
    assert len(ref_grads) == 2 * N_LAYERS                                         # A and B of each
    assert _count(ref_graph, "LoRALinearFunction") == 0

    patch(model)
    assert all("forward" in m.__dict__ for _, m in lora_layers(model))
    loss, grads, graph = _loss_and_grads(model, ids, labels)
    assert _count(graph, "LoRALinearFunction") == N_LAYERS                       # every projection fused
    assert "Dequant4bitLinearBackward" not in _grad_fns(graph)
    assert_close(loss, ref_loss, 1e-5, 1e-5, "loss")
    for n, g in ref_grads.items():
        assert g.abs().max() > 0, n
        assert_close(grads[n], g, 1e-6, 1e-4, n)

    unpatch(model)
    assert not any("forward" in m.__dict__ for _, m in lora_layers(model))
    loss2, grads2, _ = _loss_and_grads(model, ids, labels)
    assert torch.equal(loss2, ref_loss)                                          # exactly as before
    assert all(torch.equal(grads2[n], g) for n, g in ref_grads.items())


def test_qlora_patch_saves_no_dense_weight():
    model = _lora_model("nf4")
    ids, labels = _batch()
    patch(model)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    unpatch(model)

    bases = [m.base_layer for _, m in lora_layers(model)]
    w_numel = {b.out_features * b.in_features for b in bases}                   # {2048, 4096, 8192}
    floats = [t for t in saved if t.is_floating_point()]
    assert not [tuple(t.shape) for t in floats if t.numel() in w_numel]
    saved_ptrs = {t.data_ptr() for t in saved}
    assert all(b.packed.data_ptr() in saved_ptrs for b in bases)                 # the 4-bit bytes instead
    # the hook does see a dense weight where one is saved: lm_head's, for d(hidden)
    assert any(t.data_ptr() == model.lm_head.weight.data_ptr() for t in floats)


def test_lora_falls_back_to_the_class_forward():
    model = _lora_model("dense")
    patch(model)
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 64, requires_grad=True)
    fused = layer(x)
    assert type(fused.grad_fn).__name__.startswith("LoRALinearFunction")
    assert_close(fused, LoRALinear.forward(layer, x), 1e-6, 1e-5, "y")

    layer.lora_dropout = torch.nn.Dropout(0.1)                                 # active in training:
    assert not type(layer(x).grad_fn).__name__.startswith("LoRALinearFunction")  # the class's path
    layer.lora_dropout.eval()                                                  # identity in eval
    assert type(layer(x).grad_fn).__name__.startswith("LoRALinearFunction")
    layer.lora_dropout = torch.nn.Identity()

    layer.base_layer.weight.requires_grad_(True)                               # W unfrozen: the fused
    assert not type(layer(x).grad_fn).__name__.startswith("LoRALinearFunction")  # node would drop dW
    layer.base_layer.weight.requires_grad_(False)

    layer.merge()                                                              # merged: W holds s*BA
    assert torch.equal(layer(x), layer.base_layer(x))
    layer.unmerge()
    assert type(layer(x).grad_fn).__name__.startswith("LoRALinearFunction")
    unpatch(model)


@pytest.mark.parametrize("base", ["dense", "nf4"])
def test_patch_lora_under_bf16_autocast(base):
    """What the GPU bench runs: fp32 LoRA weights, bf16 matmuls by autocast."""
    model = _lora_model(base)
    ids, labels = _batch()
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(3, 128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_dtype = layer(x).dtype
        ref_loss, ref_grads, _ = _loss_and_grads(model, ids, labels)
        patch(model)
        assert layer(x).dtype == ref_dtype                                     # the class's dtype rule
        loss, grads, graph = _loss_and_grads(model, ids, labels)
        unpatch(model)
    assert _count(graph, "LoRALinearFunction") == N_LAYERS
    assert_close(loss, ref_loss, 0, 1e-2, "loss")
    for n, g in ref_grads.items():                                             # bf16 rounding: compare norms
        assert grads[n].dtype == torch.float32
        rel = ((grads[n] - g).norm() / g.norm()).item()
        assert rel < 3e-2, (n, rel)
