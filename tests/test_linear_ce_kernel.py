"""On a GPU the fused linear cross-entropy computes each chunk's softmax and dz with notebook 09's
Triton cross-entropy kernels (`ce_loss_and_grad_`); here they run in Triton's interpreter
(kernels backend "triton") and must give the torch path's loss and gradients."""
import pytest
import torch

import pelib.kernels
import pelib.kernels.cross_entropy_kernel as ck
from pelib.linear_ce import linear_cross_entropy, linear_cross_entropy_ref

pytestmark = pytest.mark.integration  # Triton kernels in the interpreter


def _case(N=37, H=24, V=101, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g) / H**0.5).to(dtype).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g)
    y[torch.rand(N, generator=g) < 0.3] = -100
    return h, w, y


def _loss_and_grads(backend, h, w, y, chunk, wrt):
    with pelib.kernels.backend(backend):
        loss = linear_cross_entropy(h, w, y, chunk=chunk)
    return (loss, *torch.autograd.grad(2.0 * loss, wrt))


@pytest.fixture
def calls(monkeypatch):
    """How many chunks went through the kernels."""
    n = [0]
    original = ck.ce_loss_and_grad_

    def counting(*args, **kwargs):
        n[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(ck, "ce_loss_and_grad_", counting)
    return n


@pytest.mark.parametrize("chunk", [5, 37])
@pytest.mark.parametrize("head_trains", [True, False])
def test_kernel_chunks_equal_the_torch_chunks(calls, chunk, head_trains):
    h, w, y = _case()
    w.requires_grad_(head_trains)
    wrt = (h, w) if head_trains else (h,)
    ours = _loss_and_grads("triton", h, w, y, chunk, wrt)
    assert calls[0] == -(-len(y) // chunk)                    # every chunk (each has a label here)
    theirs = _loss_and_grads("ref", h, w, y, chunk, wrt)
    assert calls[0] == -(-len(y) // chunk)                    # the torch path calls no kernel
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_kernel_chunks_match_the_unfused_bf16_loss():
    h, w, y = _case(dtype=torch.bfloat16)
    loss, dh = _loss_and_grads("triton", h, w, y, 16, (h,))
    ref = linear_cross_entropy_ref(h, w, y)
    (dh_ref,) = torch.autograd.grad(2.0 * ref, (h,))
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(dh.float(), dh_ref.float(), rtol=5e-2, atol=5e-3)


def test_the_chunk_step_overwrites_the_logits_with_the_scaled_gradient():
    g = torch.Generator().manual_seed(1)
    z, y = torch.randn(6, 50, generator=g), torch.tensor([3, -100, 0, 49, 7, -100])
    want_z = z.clone().requires_grad_()
    keep = y != -100
    want = torch.nn.functional.cross_entropy(want_z[keep], y[keep], reduction="sum")
    (want_dz,) = torch.autograd.grad(0.25 * want, (want_z,))
    with pelib.kernels.backend("triton"):
        got = ck.ce_loss_and_grad_(z, y, 0.25)
    torch.testing.assert_close(got, want.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(z, want_dz, rtol=1e-5, atol=1e-7)     # ignored rows: 0
    with pytest.raises(ValueError, match="contiguous"):
        ck.ce_loss_and_grad_(torch.randn(50, 6).T, y, 1.0)
