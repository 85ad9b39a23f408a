"""Linear4bit: exact forward and input gradient, nothing of W's size saved for backward."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pelib.quant import Linear4bit, dequantize_4bit, quantize_4bit


def make(bias=True, **kw):
    torch.manual_seed(0)
    linear = nn.Linear(301, 130, bias=bias)  # 39130 weights: a ragged last block
    return linear, Linear4bit.from_linear(linear, **kw)


@pytest.mark.parametrize("kw", [{}, dict(quant_type="fp4", double_quant=False, blocksize=128)])
def test_forward_and_grad_are_exact(kw):
    linear, layer = make(**kw)
    x = torch.randn(4, 7, 301, requires_grad=True)
    W = dequantize_4bit(layer.packed, layer.quant_state)
    y = layer(x)
    assert torch.equal(y, F.linear(x, W, linear.bias))

    g = torch.randn_like(y)
    (grad_x,) = torch.autograd.grad(y, x, g)
    x_ref = x.detach().requires_grad_()
    (grad_ref,) = torch.autograd.grad(F.linear(x_ref, W, linear.bias), x_ref, g)
    assert torch.equal(grad_x, grad_ref)


def test_matches_quantize_4bit():
    linear, layer = make()
    packed, state = quantize_4bit(linear.weight.detach(), 64, "nf4", True)
    assert torch.equal(layer.packed, packed)
    assert torch.equal(layer.dequantized_weight(), dequantize_4bit(packed, state))
    rel = (layer.dequantized_weight() - linear.weight).norm() / linear.weight.norm()
    assert rel < 0.12  # NF4: about 20 dB SQNR


def test_saves_no_weight_sized_tensor():
    _, layer = make()
    x = torch.randn(5, 301, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = layer(x)
    assert saved and max(saved) < layer.in_features * layer.out_features  # the largest is packed: n/2
    y.sum().backward()  # and backward still works (it dequantises again)
    assert x.grad.shape == x.shape


def test_frozen_base_and_bias_grad():
    linear, layer = make()
    assert not any(p.requires_grad for p in layer.parameters())
    layer.bias.requires_grad_(True)
    x = torch.randn(3, 2, 301)
    layer(x).square().sum().backward()
    W = layer.dequantized_weight()
    b = linear.bias.detach().requires_grad_()
    F.linear(x, W, b).square().sum().backward()
    assert torch.allclose(layer.bias.grad, b.grad, atol=1e-5, rtol=1e-5)


def test_state_dict_round_trip():
    _, layer = make()
    sd = layer.state_dict()
    assert {"packed", "qabsmax", "absmax2", "offset", "code", "code2", "bias"} <= set(sd)
    fresh = Linear4bit(301, 130)
    fresh.load_state_dict(sd)
    x = torch.randn(2, 301)
    assert torch.equal(fresh(x), layer(x))


def test_no_bias_and_compute_dtype():
    _, layer = make(bias=False, compute_dtype=torch.bfloat16)
    x = torch.randn(2, 301)
    y = layer(x)
    assert y.dtype == torch.float32
    W = layer.dequantized_weight(torch.bfloat16)
    assert torch.equal(y, F.linear(x.bfloat16(), W).float())


def test_scales_must_stay_float32():
    _, layer = make()
    layer.half()
    with pytest.raises(TypeError, match="must stay float32"):
        layer(torch.randn(2, 301))


def test_reused_workspace_does_not_leak_between_layers():
    """Three stacked 4-bit layers (two shapes) share one W~ workspace; outputs and input
    gradients still equal the same stack of plain nn.Linear holding the dequantised weights."""
    from pelib.quant.linear4bit import free_workspace, workspace

    torch.manual_seed(0)
    dims = [(48, 96), (96, 33), (33, 96)]
    q = [Linear4bit.from_linear(nn.Linear(i, o)) for i, o in dims]
    plain = [nn.Linear(i, o) for i, o in dims]
    with torch.no_grad():
        for a, b in zip(plain, q):
            a.weight.copy_(b.dequantized_weight())
            a.bias.copy_(b.bias)
            a.weight.requires_grad_(False)
    x1 = torch.randn(5, 48, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    free_workspace()
    y1, y2 = nn.Sequential(*q)(x1), nn.Sequential(*plain)(x2)
    (y1 ** 2).sum().backward()
    (y2 ** 2).sum().backward()
    assert torch.equal(y1, y2) and torch.equal(x1.grad, x2.grad)
    ptr = workspace(torch.Size([96, 33]), torch.float32, torch.device("cpu")).data_ptr()
    assert workspace(torch.Size([10, 10]), torch.float32, torch.device("cpu")).data_ptr() == ptr


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_under_autocast_as_nn_linear_on_the_dequantised_weight(x_dtype):
    """Under bf16 autocast the layer computes what nn.Linear holding W~ (fp32) computes there:
    the same bf16 output and the same input and bias gradients (W~ is dequantised straight
    into bf16, which must round as autocast's cast of the fp32 W~ does)."""
    linear, layer = make()
    layer.bias.requires_grad_(True)
    dense = nn.Linear(301, 130)
    with torch.no_grad():
        dense.weight.copy_(layer.dequantized_weight(torch.float32))
        dense.bias.copy_(linear.bias)
    x = torch.randn(4, 7, 301).to(x_dtype)
    grads = []
    for module in (layer, dense):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = module(xi)
        assert y.dtype == torch.bfloat16
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).bfloat16()
        grads.append((y, *torch.autograd.grad(y, (xi, module.bias), g)))
    for ours, ref in zip(*grads):
        assert ours.dtype == ref.dtype and torch.equal(ours, ref)
