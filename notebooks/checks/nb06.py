"""Checkers for notebook 06 (QLoRA): the QLoRA layer as one autograd.Function (against autograd
on a dense copy, and a bound on what it saves), LoftQ initialisation (against the alternating
algorithm of the paper), and the training ledger (against pelib's byte count).

While an answer runs, the library functions that would solve the task are poisoned: pelib's
4-bit autograd.Function, peft's LoftQ, pelib's ledger."""
import contextlib

import torch
import torch.nn.functional as F

import pelib.quant
import pelib.quant.ledger
from pelib.quant import dequantize_4bit, quantize_4bit
from pelib.quant.ledger import quantized_nbytes
from pelib.quant.linear4bit import Dequant4bitLinear, Linear4bit

from ._guard import forbidden


def _saved_bytes(fn):
    sizes = []

    def pack(t):
        sizes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn()
    return y, sum(sizes)


@contextlib.contextmanager
def _no_pelib_linear4bit():
    """pelib's Dequant4bitLinear raises while the answer runs (its forward is a staticmethod,
    so the class attribute is swapped and put back as it was)."""
    saved = Dequant4bitLinear.__dict__["forward"]

    def poisoned(*args, **kwargs):
        raise AssertionError("the answer calls pelib's Dequant4bitLinear: write the Function yourself")

    Dequant4bitLinear.forward = staticmethod(poisoned)
    try:
        yield
    finally:
        Dequant4bitLinear.forward = saved


def exercise_1(apply):
    """apply(x, A, B, packed, state, scaling) -> y = x W~^T + s (x A^T) B^T with a hand-written
    backward for x, A and B that never saves W~."""
    torch.manual_seed(6)
    d_out, d_in, r, s = 96, 80, 4, 2.0
    W = 0.02 * torch.randn(d_out, d_in)
    packed, state = quantize_4bit(W, 64, "nf4", double_quant=True)
    W_t = dequantize_4bit(packed, state).view(d_out, d_in)  # W~
    x = torch.randn(3, 7, d_in, requires_grad=True)
    A = (0.1 * torch.randn(r, d_in)).requires_grad_()
    B = (0.1 * torch.randn(d_out, r)).requires_grad_()
    with _no_pelib_linear4bit():
        y, saved = _saved_bytes(lambda: apply(x, A, B, packed, state, s))
    xr, Ar, Br = (t.detach().clone().requires_grad_() for t in (x, A, B))
    y_ref = F.linear(xr, W_t) + s * F.linear(F.linear(xr, Ar), Br)
    assert y.shape == y_ref.shape, f"output shape {tuple(y.shape)}, expected {tuple(y_ref.shape)}"
    assert torch.allclose(y, y_ref, rtol=1e-5, atol=1e-6), "forward differs from x W~^T + s (x A^T) B^T"
    g = torch.randn_like(y_ref)
    with _no_pelib_linear4bit():
        grads = torch.autograd.grad(y, (x, A, B), g, allow_unused=True)
    refs = torch.autograd.grad(y_ref, (xr, Ar, Br), g)
    for name, got, ref in zip(("dL/dx", "dL/dA", "dL/dB"), grads, refs):
        assert got is not None, f"{name} is None: return a gradient for it"
        assert torch.allclose(got, ref, rtol=1e-4, atol=1e-6), \
            f"{name} differs from autograd's by {(got - ref).abs().max():.2e}"
    nb = lambda *ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    limit = nb(packed, *state.tensors().values(), x, A, B) + nb(x[..., :r])  # + h = x A^T
    assert saved <= limit, (f"autograd saved {saved} bytes; packed weight, scales, x, A, B and x A^T "
                            f"are {limit} (W~ in fp32 alone is {nb(W_t)})")
    print(f"y, dL/dx, dL/dA, dL/dB == autograd on a dense copy; saved for backward {saved} bytes "
          f"(W~ in fp32 would be {nb(W_t)})")


def _dq(W):
    packed, state = quantize_4bit(W, 64, "nf4")
    return dequantize_4bit(packed, state).view_as(W)


def _loftq(W, r, steps):
    R = torch.zeros_like(W)
    for _ in range(steps):
        Q = _dq(W - R)
        U, S, Vh = torch.linalg.svd(W - Q, full_matrices=False)
        B, A = U[:, :r] * S[:r].sqrt(), S[:r].sqrt()[:, None] * Vh[:r]
        R = B @ A
    return Q, B, A


def exercise_2(loftq_init):
    """loftq_init(W, r, steps) -> (Q, B, A) after `steps` alternating rounds."""
    import peft.utils.loftq_utils as loftq_utils

    torch.manual_seed(8)
    W = 0.02 * torch.randn(192, 160)
    W += 0.0125 * torch.randn(192, 2) @ torch.randn(2, 160)  # and a strong low-rank part
    r = 8
    e0 = (W - _dq(W)).norm().item()  # QLoRA: B = 0
    lines = []
    for steps in (1, 5):
        with forbidden((loftq_utils, "loftq_init"), (loftq_utils, "_loftq_init_new")):
            Q, B, A = (torch.as_tensor(t).float() for t in loftq_init(W.clone(), r, steps))
        assert Q.shape == W.shape and B.shape == (192, r) and A.shape == (r, 160), \
            f"shapes Q {tuple(Q.shape)}, B {tuple(B.shape)}, A {tuple(A.shape)}: expected (192, 160), " \
            f"(192, {r}), ({r}, 160)"
        Qr, Br, Ar = _loftq(W, r, steps)
        err, ref = (W - Q - B @ A).norm().item(), (W - Qr - Br @ Ar).norm().item()
        assert abs(err - ref) <= 0.01 * ref, \
            f"steps={steps}: ||W - Q - BA|| = {err:.4e}, LoftQ gives {ref:.4e}"
        lines.append(f"LoftQ {steps} step{'s' if steps > 1 else ''} {err / W.norm():.4f}")
    print(f"||W - Q - BA|| / ||W||, r = {r}: QLoRA (B = 0) {e0 / W.norm():.4f}, " + ", ".join(lines))


def exercise_3(qlora_training_bytes):
    shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576),
              (576, 1536)] * 2 + [(77, 383)]  # two SmolLM2 blocks and a ragged one
    for r in (1, 8):
        with forbidden((pelib.quant, "quantized_nbytes"), (pelib.quant.ledger, "quantized_nbytes"),
                       (pelib.quant, "model_ledger"), (pelib.quant.ledger, "model_ledger"),
                       (Linear4bit, "from_linear"), (pelib.quant, "qlora_nbytes")):
            got = qlora_training_bytes(shapes, r)
        frozen = sum(quantized_nbytes(o * i, 64, double_quant=True) for o, i in shapes)
        lora = sum(4 * 4 * r * (o + i) for o, i in shapes)  # weight, grad, two moments: fp32
        assert int(got["frozen"]) == frozen, f"r={r}: frozen {got['frozen']} != {frozen} (pelib)"
        assert int(got["lora"]) == lora, f"r={r}: lora {got['lora']} != {lora}"
    print(f"ledger == pelib.quant.quantized_nbytes + 16 bytes per LoRA weight (r=8: frozen "
          f"{frozen / 1e6:.2f} MB, LoRA {lora / 1e6:.2f} MB)")
