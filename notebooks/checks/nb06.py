"""Checkers for notebook 06 (QLoRA): a 4-bit linear whose backward keeps only the packed bytes,
and the training ledger of QLoRA."""
import torch
import torch.nn.functional as F

from pelib.quant import dequantize_4bit, quantize_4bit
from pelib.quant.ledger import quantized_nbytes


def _saved_bytes(fn):
    sizes = []

    def pack(t):
        sizes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn()
    return y, sum(sizes)


def exercise_1(apply):
    torch.manual_seed(6)
    W = 0.02 * torch.randn(96, 80)  # (out, in)
    packed, state = quantize_4bit(W, 64, "nf4", double_quant=True)
    W_t = dequantize_4bit(packed, state).view(96, 80)  # W~
    x = torch.randn(3, 7, 80, requires_grad=True)
    y, saved = _saved_bytes(lambda: apply(x, packed, state))
    y_ref = F.linear(x, W_t)
    assert y.shape == y_ref.shape, f"output shape {tuple(y.shape)}, expected {tuple(y_ref.shape)}"
    assert torch.allclose(y, y_ref, rtol=1e-5, atol=1e-6), "forward differs from x @ W~^T"
    g = torch.randn_like(y_ref)
    (grad,) = torch.autograd.grad(y, x, g)
    (grad_ref,) = torch.autograd.grad(y_ref, x, g)
    assert torch.allclose(grad, grad_ref, rtol=1e-5, atol=1e-6), "dL/dx differs from the dense one"
    limit = packed.numel() * packed.element_size()
    assert saved <= limit, (f"autograd saved {saved} bytes; the packed weight is {limit} "
                            f"(a dequantised W~ would be {W_t.numel() * 4})")
    print(f"forward and dL/dx == dense F.linear; saved for backward: {saved} bytes "
          f"(packed weight {limit}, W~ in fp32 {W_t.numel() * 4})")


def exercise_2(qlora_training_bytes):
    shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576),
              (576, 1536)] * 2 + [(77, 383)]  # two SmolLM2 blocks and a ragged one
    for r in (1, 8):
        got = qlora_training_bytes(shapes, r)
        frozen = sum(quantized_nbytes(o * i, 64, double_quant=True) for o, i in shapes)
        lora = sum(4 * 4 * r * (o + i) for o, i in shapes)  # weight, grad, two moments: fp32
        assert int(got["frozen"]) == frozen, f"r={r}: frozen {got['frozen']} != {frozen} (pelib)"
        assert int(got["lora"]) == lora, f"r={r}: lora {got['lora']} != {lora}"
    print(f"ledger == pelib.quant.quantized_nbytes + 16 bytes per LoRA weight (r=8: frozen "
          f"{frozen / 1e6:.2f} MB, LoRA {lora / 1e6:.2f} MB)")
