"""patch(model): a tiny random Llama gives the same loss and gradients with pelib's kernels."""
import torch
import transformers.models.llama.modeling_llama as llama
from kernel_tol import assert_close
from transformers import LlamaConfig, LlamaForCausalLM

import pelib.kernels as K
from pelib.patch import patch, unpatch


def _model():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=1003, max_position_embeddings=64)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    return model


def _loss_and_grads(model, ids, labels):
    model.zero_grad()
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, out.loss


def _grad_fns(loss):
    seen, stack, names = set(), [loss.grad_fn], set()
    while stack:
        f = stack.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        names.add(type(f).__name__)
        stack.extend(g for g, _ in f.next_functions)
    return names


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
