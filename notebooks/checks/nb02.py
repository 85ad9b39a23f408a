"""Checkers for notebook 02's exercises: prompt tuning (against the model run on real tokens
written before the text), the prefix's size with grouped-query attention (against pelib.prefix
on tiny random models) and a GQA attention over a prefix (against a head-by-head loop, with
PyTorch's fused attention disabled while the answer runs)."""
import math

import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from checks._guard import forbidden
from pelib.prefix import apply_prefix, fold


def exercise_1(prompt_forward):
    """prompt_forward(model, prompt, input_ids, attention_mask) -> logits: the frozen model run on
    [prompt; Embed(input_ids)] with the mask widened by L_p visible positions."""
    torch.manual_seed(0)
    for label, model, _, _ in _models():
        model.eval().requires_grad_(False)
        embed = model.get_input_embeddings().weight                  # (V, d)
        L_p, B, T = 4, 3, 6
        prompt_ids = torch.randint(5, 50, (L_p,))
        ids = torch.randint(5, 50, (B, T))
        mask = torch.ones(B, T, dtype=torch.long)
        mask[1, 4:], mask[2, 2:] = 0, 0                              # right padding
        got = prompt_forward(model, embed[prompt_ids].clone(), ids, mask)
        want = model(input_ids=torch.cat([prompt_ids.expand(B, -1), ids], 1),
                     attention_mask=torch.cat([torch.ones(B, L_p, dtype=torch.long), mask], 1)).logits
        assert torch.is_tensor(got) and got.shape == want.shape, \
            f"{label}: logits of shape {tuple(want.shape)} expected, got {tuple(getattr(got, 'shape', ()))}"
        err = (got - want).abs().max().item()
        assert err < 1e-4, (f"{label}: a prompt of real token embeddings should give what the model "
                            f"gives on those tokens before the text; max |difference| = {err:.2e} "
                            "(the prompt first? the mask widened?)")
        prompt = torch.randn(L_p, embed.shape[1], requires_grad=True)
        prompt_forward(model, prompt, ids, mask).float().square().sum().backward()
        assert prompt.grad is not None and prompt.grad.abs().max() > 0, \
            f"{label}: a learned prompt gets no gradient"
        print(f"exercise_1: {label}: equals the model on [prompt tokens; text]; the prompt trains")
    for name, n_layers, d, d_kv in [("MiniLM", 6, 384, 384), ("SmolLM2", 30, 576, 192)]:
        L_p = 16
        print(f"exercise_1: {name}, L_p={L_p}: prompt tuning trains {L_p * d:,} numbers, a deep "
              f"prefix keeps {n_layers * 2 * L_p * d_kv:,} ({2 * n_layers * d_kv // d}x)")
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


def _reference(q, k, v, P_K, P_V):
    """Head by head, explicit softmax: query head h reads KV head h // (H // n_kv)."""
    B, H, T_q, d_h = q.shape
    n_kv, T, L_p = k.shape[1], k.shape[2], P_K.shape[1]
    out = torch.empty_like(q)
    pos = torch.arange(T - T_q, T)                                   # the queries' positions
    visible = torch.cat([torch.ones(T_q, L_p, dtype=torch.bool),
                         torch.arange(T)[None, :] <= pos[:, None]], 1)  # (T_q, L_p + T)
    for b in range(B):
        for h in range(H):
            g = h // (H // n_kv)
            keys, values = torch.cat([P_K[g], k[b, g]]), torch.cat([P_V[g], v[b, g]])
            scores = (q[b, h] @ keys.T / math.sqrt(d_h)).masked_fill(~visible, float("-inf"))
            out[b, h] = scores.softmax(-1) @ values
    return out


def exercise_3(gqa_prefix_attention):
    """gqa_prefix_attention(q, k, v, P_K, P_V) -> (B, H, T_q, d_h): causal GQA attention over
    [prefix; real keys], the queries being the last T_q of the T real positions."""
    torch.manual_seed(0)
    for B, H, n_kv, T_q, T, L_p, d_h in [(2, 9, 3, 5, 5, 4, 8), (1, 4, 2, 1, 7, 3, 16),
                                         (2, 6, 2, 3, 6, 2, 4), (1, 4, 4, 4, 4, 5, 8)]:
        q = torch.randn(B, H, T_q, d_h, dtype=torch.float64)
        k, v = torch.randn(2, B, n_kv, T, d_h, dtype=torch.float64).unbind(0)
        P_K, P_V = torch.randn(2, n_kv, L_p, d_h, dtype=torch.float64).unbind(0)
        with forbidden((F, "scaled_dot_product_attention")):
            got = gqa_prefix_attention(q, k, v, P_K, P_V)
        want = _reference(q, k, v, P_K, P_V)
        assert torch.is_tensor(got) and got.shape == want.shape, \
            f"expected shape {tuple(want.shape)}, got {tuple(getattr(got, 'shape', ()))}"
        err = (got - want).abs().max().item()
        assert err < 1e-10, (f"H={H}, n_kv={n_kv}, T_q={T_q}, T={T}, L_p={L_p}: max |yours - "
                             f"reference| = {err:.2e} (which KV head does query head h read? where "
                             "do the queries sit?)")
        print(f"exercise_3: {H} query / {n_kv} KV heads, {T_q} queries over {L_p} + {T} keys: ok")
    print("exercise_3: correct")
