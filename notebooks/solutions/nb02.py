"""Solutions (and a plausible wrong answer each) for notebook 02's exercises."""
import math


def prefix_share(q, k, P_K, mask):
    d_h = q.shape[-1]
    s_prefix = (q @ P_K.T / math.sqrt(d_h)).exp().sum(-1)                       # (T,)
    s_tokens = (q @ k.T / math.sqrt(d_h)).masked_fill(~mask, float("-inf")).exp().sum(-1)
    return s_prefix / (s_prefix + s_tokens)


def prefix_share_unscaled(q, k, P_K, mask):  # wrong: forgot the 1/sqrt(d_h) of the scores
    s_prefix = (q @ P_K.T).exp().sum(-1)
    s_tokens = (q @ k.T).masked_fill(~mask, float("-inf")).exp().sum(-1)
    return s_prefix / (s_prefix + s_tokens)


def prefix_numbers(n_layers, n_heads, n_kv_heads, d, L_p, hidden):
    kept = n_layers * 2 * L_p * n_kv_heads * (d // n_heads)       # d_kv = n_kv * d_h
    out = n_layers * 2 * n_kv_heads * (d // n_heads)
    trained = L_p * d + (d * hidden + hidden) + (hidden * out + out)  # P', Linear, Linear
    return trained, kept


def prefix_numbers_no_gqa(n_layers, n_heads, n_kv_heads, d, L_p, hidden):
    out = n_layers * 2 * d                                         # wrong: d_kv = d (ignores GQA)
    return L_p * d + (d * hidden + hidden) + (hidden * out + out), n_layers * 2 * L_p * d


def fold_prefix(P_prime, mlp, n_layers, n_kv, d_h):
    L_p = P_prime.shape[0]
    P = mlp(P_prime).view(L_p, n_layers, 2, n_kv, d_h)             # row i: virtual token i
    return P.permute(1, 2, 3, 0, 4)                                # (n_layers, 2, n_kv, L_p, d_h)


def fold_prefix_no_permute(P_prime, mlp, n_layers, n_kv, d_h):
    return mlp(P_prime).reshape(n_layers, 2, n_kv, P_prime.shape[0], d_h)  # wrong: mixes tokens


SOLUTIONS = {1: prefix_share, 2: prefix_numbers, 3: fold_prefix}
WRONG = {1: prefix_share_unscaled, 2: prefix_numbers_no_gqa, 3: fold_prefix_no_permute}
