"""Solutions (and a plausible wrong answer each) for notebook 02's exercises."""
import math

import torch


def prompt_forward(model, prompt, input_ids, attention_mask):
    B = input_ids.shape[0]
    x = model.get_input_embeddings()(input_ids)                      # (B, T, d)
    x = torch.cat([prompt.expand(B, -1, -1).to(x.dtype), x], dim=1)  # (B, L_p + T, d)
    mask = torch.cat([attention_mask.new_ones(B, prompt.shape[0]), attention_mask], dim=1)
    return model(inputs_embeds=x, attention_mask=mask).logits


def prompt_forward_after(model, prompt, input_ids, attention_mask):
    """Wrong: the prompt after the text (a suffix), where a causal model's text cannot see it."""
    B = input_ids.shape[0]
    x = model.get_input_embeddings()(input_ids)
    x = torch.cat([x, prompt.expand(B, -1, -1)], dim=1)
    mask = torch.cat([attention_mask, attention_mask.new_ones(B, prompt.shape[0])], dim=1)
    return model(inputs_embeds=x, attention_mask=mask).logits


def prefix_numbers(n_layers, n_heads, n_kv_heads, d, L_p, hidden):
    kept = n_layers * 2 * L_p * n_kv_heads * (d // n_heads)       # d_kv = n_kv * d_h
    out = n_layers * 2 * n_kv_heads * (d // n_heads)
    trained = L_p * d + (d * hidden + hidden) + (hidden * out + out)  # P', Linear, Linear
    return trained, kept


def prefix_numbers_no_gqa(n_layers, n_heads, n_kv_heads, d, L_p, hidden):
    out = n_layers * 2 * d                                         # wrong: d_kv = d (ignores GQA)
    return L_p * d + (d * hidden + hidden) + (hidden * out + out), n_layers * 2 * L_p * d


def _gqa_prefix_attention(q, k, v, P_K, P_V, expand):
    B, H, T_q, d_h = q.shape
    n_kv, T, L_p = k.shape[1], k.shape[2], P_K.shape[1]
    keys = torch.cat([P_K.expand(B, -1, -1, -1), k], dim=2)        # (B, n_kv, L_p + T, d_h)
    values = torch.cat([P_V.expand(B, -1, -1, -1), v], dim=2)
    keys, values = expand(keys, H // n_kv), expand(values, H // n_kv)  # (B, H, L_p + T, d_h)
    scores = q @ keys.transpose(-1, -2) / math.sqrt(d_h)           # (B, H, T_q, L_p + T)
    pos = torch.arange(T - T_q, T)[:, None]                        # query i sits at T - T_q + i
    visible = torch.cat([torch.ones(T_q, L_p, dtype=torch.bool),   # the prefix: always
                         torch.arange(T)[None, :] <= pos], dim=1)  # real keys: up to the query
    return scores.masked_fill(~visible, float("-inf")).softmax(-1) @ values


def gqa_prefix_attention(q, k, v, P_K, P_V):
    # repeat_interleave: KV head g serves query heads g*G ... g*G + G - 1
    return _gqa_prefix_attention(q, k, v, P_K, P_V, lambda x, G: x.repeat_interleave(G, dim=1))


def gqa_prefix_attention_tiled(q, k, v, P_K, P_V):
    """Wrong: tiles the KV heads (0, 1, 2, 0, 1, 2, ...) instead of repeating each one."""
    return _gqa_prefix_attention(q, k, v, P_K, P_V, lambda x, G: x.repeat(1, G, 1, 1))


SOLUTIONS = {1: prompt_forward, 2: prefix_numbers, 3: gqa_prefix_attention}
WRONG = {1: prompt_forward_after, 2: prefix_numbers_no_gqa, 3: gqa_prefix_attention_tiled}
