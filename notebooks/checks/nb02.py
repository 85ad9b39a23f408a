"""Checkers for notebook 02's exercises: the prefix's share of attention (against a softmax over
all keys), the prefix's size with grouped-query attention and the fold of the MLP (against
pelib.prefix on tiny random models)."""
import math

import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from pelib.prefix import apply_prefix, fold


def exercise_1(prefix_share):
    """prefix_share(q, k, P_K, mask) -> (T,): the attention share lambda(q) of the prefix keys."""
    torch.manual_seed(0)
    for T, L_p, d_h in [(5, 3, 8), (7, 4, 64)]:
        q, k = (3 * torch.randn(2, T, d_h)).unbind(0)                  # (T, d_h); large scores
        P_K = 3 * torch.randn(L_p, d_h)                              # (L_p, d_h)
        mask = torch.ones(T, dtype=torch.bool)
        mask[-2:] = False                                            # two padding keys
        scores = torch.cat([q @ P_K.T, (q @ k.T).masked_fill(~mask, float("-inf"))], -1) / math.sqrt(d_h)
        ref = scores.softmax(-1)[:, :L_p].sum(-1)                    # (T,)
        got = torch.as_tensor(prefix_share(q, k, P_K, mask)).reshape(-1)
        assert got.shape == ref.shape, f"expected one share per query, shape {tuple(ref.shape)}"
        err = (got - ref).abs().max().item()
        assert err < 1e-5, f"T={T}, L_p={L_p}, d_h={d_h}: max |lambda - reference| = {err:.2e}"
        print(f"exercise_1: T={T}, L_p={L_p}, d_h={d_h}: lambda = {[round(x, 3) for x in ref.tolist()]}")
    print("exercise_1: correct")


def _models():
    bert = BertForSequenceClassification(BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=16, num_labels=3))
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=50, hidden_size=36, num_hidden_layers=3, intermediate_size=48,
        num_attention_heads=9, num_key_value_heads=3))
    return [("BERT, 4 heads", bert, 4, 4), ("Llama, 9 query / 3 KV heads", llama, 9, 3)]


def exercise_2(prefix_numbers):
    """prefix_numbers(n_layers, n_heads, n_kv_heads, d, L_p, hidden) -> (trained, kept): numbers
    trained through the MLP (P' and the MLP), and numbers of the folded prefix."""
    torch.manual_seed(0)
    for L_p, hidden in [(4, 16), (6, 40)]:
        for label, model, n_heads, n_kv in _models():  # fresh models: apply_prefix changes the config
            cfg = model.config
            m = apply_prefix(model, prefix_length=L_p, hidden=hidden)
            trained = sum(p.numel() for p in m.prefix_encoder.parameters())
            kept = fold(m).prefix_encoder.prefix.numel()
            got = tuple(prefix_numbers(cfg.num_hidden_layers, n_heads, n_kv, cfg.hidden_size, L_p, hidden))
            assert got == (trained, kept), f"{label}, L_p={L_p}, hidden={hidden}: you say {got}, " \
                f"pelib's prefix trains {trained:,} and keeps {kept:,}"
            print(f"exercise_2: {label}, L_p={L_p}, hidden={hidden}: trains {trained:,}, keeps {kept:,}")
    print("exercise_2: correct")


def exercise_3(fold_prefix):
    """fold_prefix(P_prime, mlp, n_layers, n_kv, d_h) -> (n_layers, 2, n_kv, L_p, d_h): the prefix
    the MLP computes, laid out as the attention wants it (peft's and pelib's output order)."""
    torch.manual_seed(0)
    for label, model, _, _ in _models():
        m = apply_prefix(model, prefix_length=5, hidden=24)
        enc = m.prefix_encoder
        with torch.no_grad():
            got = fold_prefix(enc.embedding, enc.mlp, enc.n_layers, enc.n_kv_heads, enc.head_dim)
            ref = torch.stack([torch.stack(enc.layer_kv(i)) for i in range(enc.n_layers)])
        assert tuple(got.shape) == tuple(ref.shape), f"{label}: shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
        err = (got - ref).abs().max().item()
        assert err < 1e-5, f"{label}: max |yours - pelib's layer_kv| = {err:.2e} (the order of the axes?)"
        print(f"exercise_3: {label}: folded prefix {tuple(ref.shape)} equals pelib's, layer by layer")
    print("exercise_3: correct")
