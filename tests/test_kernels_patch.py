"""patch(model): a tiny random Llama gives the same loss and gradients with pelib's kernels."""
import pytest
import torch
import transformers.models.llama.modeling_llama as llama
from conftest import assert_close
from conftest import grad_fns as _grad_fns
from conftest import tiny_llama as _model

import pelib.kernels as K
from pelib.patch import patch, unpatch

pytestmark = pytest.mark.integration  # Triton kernels in the interpreter


def _loss_and_grads(model, ids, labels):
    model.zero_grad()
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, out.loss


def test_patch_same_loss_and_grads_then_unpatch():
    model = _model()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1003, (2, 17), generator=gen)
    labels = ids.clone()
    labels[0, :5] = -100                                                        # a masked prompt
    ref_loss, ref_grads, _ = _loss_and_grads(model, ids, labels)

    original_rope = llama.apply_rotary_pos_emb
    patch(model)
    assert llama.apply_rotary_pos_emb is K.apply_rope
    loss, grads, graph = _loss_and_grads(model, ids, labels)
    used = _grad_fns(graph)
    for fn in ("RMSNormFunction", "SwiGLUFunction", "RoPEFunction", "CrossEntropyFunction"):
        assert any(name.startswith(fn) for name in used), (fn, sorted(used))
    assert_close(loss, ref_loss, 1e-5, 1e-5, "loss")
    for n, g in ref_grads.items():
        assert_close(grads[n], g, 1e-6, 1e-4, n)

    unpatch(model)
    assert llama.apply_rotary_pos_emb is original_rope
    loss2, grads2, graph2 = _loss_and_grads(model, ids, labels)
    assert torch.equal(loss2, ref_loss)                                          # exactly as before
    assert not any(n.startswith("RMSNormFunction") for n in _grad_fns(graph2))
