"""The fused linear cross-entropy equals the unfused head + F.cross_entropy, and keeps less."""
import pytest
import torch
import torch.nn.functional as F

from pelib.linear_ce import (
    linear_cross_entropy,
    linear_cross_entropy_ref,
    shift_for_next_token,
)


def _case(N=37, H=24, V=101, dtype=torch.float64, ignore=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=dtype, requires_grad=True)
    w = (torch.randn(V, H, generator=g, dtype=dtype) / H**0.5).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g)
    y[torch.rand(N, generator=g) < ignore] = -100
    return h, w, y


@pytest.mark.parametrize("chunk", [1, 5, 16, 37, 1024])
def test_loss_and_gradients_equal_the_unfused_path(chunk):
    h, w, y = _case()
    loss = linear_cross_entropy(h, w, y, chunk=chunk)
    dh, dw = torch.autograd.grad(3.0 * loss, (h, w))               # a non-unit upstream grad
    ref = F.cross_entropy(h @ w.T, y, ignore_index=-100)           # the definition, in fp64
    dh_ref, dw_ref = torch.autograd.grad(3.0 * ref, (h, w))
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(dh, dh_ref, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(dw, dw_ref, rtol=1e-6, atol=1e-9)


def test_a_frozen_head_gets_no_gradient_and_h_still_does():
    h, w, y = _case(dtype=torch.float32)
    w.requires_grad_(False)
    loss = linear_cross_entropy(h, w, y, chunk=8)
    (dh,) = torch.autograd.grad(loss, (h,))
    (dh_ref,) = torch.autograd.grad(linear_cross_entropy_ref(h, w, y), (h,))
    torch.testing.assert_close(dh, dh_ref, rtol=1e-5, atol=1e-6)


def test_bf16_matches_the_unfused_bf16_path():
    h, w, y = _case(N=64, H=32, V=257, dtype=torch.float32, seed=3)
    hb = h.detach().bfloat16().requires_grad_()
    loss = linear_cross_entropy(hb, w, y, chunk=16)
    (dh,) = torch.autograd.grad(loss, (hb,))
    hr = h.detach().bfloat16().requires_grad_()
    ref = linear_cross_entropy_ref(hr, w, y)
    (dh_ref,) = torch.autograd.grad(ref, (hr,))
    assert dh.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(dh.float(), dh_ref.float(), rtol=2e-2, atol=1e-3)


def _saved_bytes(fn):
    """Bytes autograd keeps for the backward while fn's graph is alive."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total[0]


def test_the_fused_loss_keeps_no_logits_for_the_backward():
    N, H, V = 256, 32, 4096
    h, w, y = _case(N=N, H=H, V=V, dtype=torch.float32, ignore=0.0)
    w.requires_grad_(False)                                        # LoRA: a frozen head
    _, fused = _saved_bytes(lambda: linear_cross_entropy(h, w, y, chunk=32))
    _, unfused = _saved_bytes(lambda: linear_cross_entropy_ref(h, w, y))
    logits = N * V * 4
    assert fused <= N * H * 4 + 1024                               # dh alone
    assert unfused >= logits                                       # at least the logits
    assert fused * 4 <= unfused


def test_shift_pairs_each_position_with_the_next_token():
    hidden = torch.arange(2 * 4 * 1.0).reshape(2, 4, 1)
    labels = torch.tensor([[-100, 5, 6, 7], [-100, -100, 8, -100]])
    h, y = shift_for_next_token(hidden, labels)
    assert h.squeeze(1).tolist() == [0, 1, 2, 4, 5, 6]
    assert y.tolist() == [5, 6, 7, -100, 8, -100]


@pytest.mark.parametrize("h,w,y,chunk,message", [
    (torch.randn(2, 3, 4), torch.randn(5, 4), torch.zeros(6, dtype=torch.long), 8, "flatten"),
    (torch.randn(6, 4), torch.randn(5, 3), torch.zeros(6, dtype=torch.long), 8, "features"),
    (torch.randn(6, 4), torch.randn(5, 4), torch.zeros(4, dtype=torch.long), 8, "one label per row"),
    (torch.randn(6, 4), torch.randn(5, 4), torch.zeros(6), 8, "integer"),
    (torch.randn(6, 4), torch.randn(5, 4), torch.zeros(6, dtype=torch.long), 0, "chunk"),
    (torch.randn(6, 4), torch.randn(5, 4), torch.full((6,), -100), 8, "no row has a label"),
    (torch.randn(6, 4), torch.randn(5, 4), torch.full((6,), 5), 8, "outside the vocabulary"),
])
def test_bad_input_is_refused_with_the_fix(h, w, y, chunk, message):
    with pytest.raises(ValueError, match=message):
        linear_cross_entropy(h, w, y, chunk=chunk)
