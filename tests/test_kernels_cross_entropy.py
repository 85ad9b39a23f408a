"""Chunked cross-entropy: Triton vs F.cross_entropy (loss and d logits), ignore_index, memory."""
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

from pelib.kernels.cross_entropy_kernel import cross_entropy_ref, cross_entropy_triton

pytestmark = pytest.mark.integration  # Triton kernels in the interpreter

LOSS_TOL = (1e-5, 1e-5)  # the loss is fp32 whatever the logits' dtype
GRAD_TOL = {torch.float32: (1e-7, 1e-5), torch.float16: (1e-6, 2e-3), torch.bfloat16: (1e-5, 1.6e-2)}


def _data(N, V, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (4 * torch.randn(N, V, generator=gen)).to(dtype)
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[::5] = -100
    return logits, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_v", [None, 256])  # 256 < V: the running logsumexp over 4 chunks
def test_ce_vs_torch(dtype, block_v):
    logits, labels = _data(37, 1003, dtype)
    lr = logits.clone().requires_grad_()
    ref = F.cross_entropy(lr.float(), labels, ignore_index=-100)             # what HF's loss does
    ref.backward()
    lt = logits.clone().requires_grad_()
    loss = cross_entropy_triton(lt, labels, block_v=block_v)
    loss.backward()
    assert loss.dtype == torch.float32
    assert_close(loss.detach(), ref.detach(), *LOSS_TOL, "loss")
    assert_close(lt.grad, lr.grad, *GRAD_TOL[dtype], "dlogits")
    assert_close(cross_entropy_ref(logits, labels), ref.detach(), 0, 0, "ref")


def test_ce_smollm2_vocab_inplace_and_saved_tensors():
    logits, labels = _data(4, 49152, torch.bfloat16, seed=1)
    lr = logits.clone().requires_grad_()
    F.cross_entropy(lr.float(), labels).backward()
    lt = logits.clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = cross_entropy_triton(lt, labels, inplace_backward=True)
    # nothing of the logits' size is saved in fp32; the logits are saved as themselves
    big = [t for t in saved if t.numel() == logits.numel()]
    assert len(big) == 1 and big[0].dtype == torch.bfloat16 and big[0].data_ptr() == lt.data_ptr()
    assert sum(t.numel() * t.element_size() for t in saved if t.numel() != logits.numel()) < 100
    (g,) = torch.autograd.grad(loss, lt)
    assert g.data_ptr() == lt.data_ptr()                                       # written over the logits
    assert_close(g, lr.grad, *GRAD_TOL[torch.bfloat16], "in-place dlogits")


def test_ce_reductions_and_all_ignored():
    logits, labels = _data(9, 1001, torch.float32)
    s = F.cross_entropy(logits, labels, reduction="sum")
    assert_close(cross_entropy_triton(logits, labels, reduction="sum"), s, *LOSS_TOL, "sum")
    assert_close(cross_entropy_triton(logits, labels, num_items=13), s / 13, *LOSS_TOL, "num_items")
    none = torch.full((9,), -100)
    assert torch.isnan(cross_entropy_triton(logits, none)) and torch.isnan(F.cross_entropy(logits, none))
