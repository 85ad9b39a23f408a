"""Solutions to notebook 07's exercises (and a plausible wrong answer for each)."""
import torch


def fold(P, lam, Q, keep, scale):
    return P[:, keep] * (lam[keep] * scale), Q[keep]  # (out, k), (k, in)


def fold_all(P, lam, Q, keep, scale):  # the right product, but the pruned triplets stay: rank r
    return P * (lam * scale), Q


def _update(state, params, new_ibar_in_u):
    b1 = b2 = 0.85
    for name, (p, grad) in params.items():
        I = (p * grad).abs()
        Ibar_old = state.get(("I", name), torch.zeros_like(p))
        Ibar = b1 * Ibar_old + (1 - b1) * I
        ref = Ibar if new_ibar_in_u else Ibar_old
        state[("U", name)] = b2 * state.get(("U", name), torch.zeros_like(p)) + (1 - b2) * (I - ref).abs()
        state[("I", name)] = Ibar


def update(state, params):
    _update(state, params, new_ibar_in_u=True)


def update_old_ibar(state, params):  # |I - Ibar| against the previous step's Ibar
    _update(state, params, new_ibar_in_u=False)


def scores(state, modules):
    s = {k[1]: state[("I", k[1])] * state[("U", k[1])] for k in state if k[0] == "I"}
    return {m: s[f"{m}.lora_E"].view(-1) + s[f"{m}.lora_A"].mean(1) + s[f"{m}.lora_B"].mean(0)
            for m in modules}


SOLUTIONS = {1: fold, 2: (update, scores)}
WRONG = {1: fold_all, 2: (update_old_ibar, scores)}
