"""Fused LoRA linear (dense and NF4 W): manual backward vs torch autograd; what is saved."""
import pytest
import torch
from conftest import assert_close

from pelib.kernels.lora import lora_linear_fused, lora_linear_ref
from pelib.quant import QuantState

pytestmark = pytest.mark.integration  # Triton kernels in the interpreter

bnbF = pytest.importorskip("bitsandbytes.functional")

# (atol as a fraction of max|ref|, rtol). Matmul outputs are sums of hundreds of products and
# dA sums over dxa, itself rounded to the input dtype: an element near zero after cancellation
# carries the rounding error of its big terms, so atol scales with the tensor's magnitude.
TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}


def _check(o, r, dtype, name):
    atol_frac, rtol = TOL[dtype]
    assert_close(o, r, atol_frac * r.abs().max().item(), rtol, name)
IN, OUT, R, S = 577, 129, 8, 2.0


def _setup(dtype, bias, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 13, IN, generator=gen).to(dtype)                       # N = 39 tokens
    W = (torch.randn(OUT, IN, generator=gen) / IN**0.5).to(dtype)
    A = (torch.randn(R, IN, generator=gen) / IN**0.5).to(dtype)
    B = torch.randn(OUT, R, generator=gen).to(dtype)
    b = torch.randn(OUT, generator=gen).to(dtype) if bias else None
    dy = torch.randn(3, 13, OUT, generator=gen).to(dtype)
    return x, W, A, B, b, dy


def _run(f, x, W, A, B, b, dy):
    x, A, B = (t.clone().requires_grad_() for t in (x, A, B))
    y = f(x, W, A, B, S, b)
    y.backward(dy)
    return y.detach(), x.grad, A.grad, B.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_lora_dense_vs_autograd(dtype, bias):
    args = _setup(dtype, bias)
    ours = _run(lora_linear_fused, *args)
    # peer: fp32 autograd on the same (rounded) inputs, compared in the input dtype
    x, W, A, B, b, dy = args
    ref = _run(lora_linear_ref, x.float(), W.float(), A.float(), B.float(),
               None if b is None else b.float(), dy.float())
    for name, o, r in zip(("y", "dx", "dA", "dB"), ours, ref):
        _check(o, r.to(dtype), dtype, name)


@pytest.mark.parametrize("double", [True, False])
def test_lora_nf4_equals_dense_and_saves_no_dense_w(double):
    x, W, A, B, b, dy = _setup(torch.float16, bias=True)
    packed, qs = bnbF.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=double)
    w4 = (packed, QuantState.from_bnb(qs))
    W_dq = bnbF.dequantize_4bit(packed, qs)                                   # (OUT, IN) fp16

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ours = _run(lora_linear_fused, x, w4, A, B, b, dy)
    dense = _run(lora_linear_fused, x, W_dq, A, B, b, dy)
    for o, d in zip(ours, dense):       # same W values, same torch ops: identical results
        assert torch.equal(o, d)
    ref = _run(lora_linear_ref, x, w4, A, B, b, dy)
    for name, o, r in zip(("y", "dx", "dA", "dB"), ours, ref):
        _check(o, r, torch.float16, name)

    # saved: exactly x, A, B and the NF4 tensors; nothing with W's number of elements
    assert all(t.numel() != W.numel() for t in saved)
    stats = (qs.absmax, qs.state2.absmax, qs.state2.code, qs.offset) if double else (qs.absmax,)
    expected = sum(t.numel() * t.element_size() for t in (x, A, B, packed, qs.code) + stats)
    assert sum(t.numel() * t.element_size() for t in saved) == expected
    nf4_bytes = expected - sum(t.numel() * t.element_size() for t in (x, A, B))
    assert nf4_bytes < W.numel() * 2 / 3                                     # < 1/3 of the fp16 W
