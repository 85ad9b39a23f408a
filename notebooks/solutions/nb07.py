"""Solutions to notebook 07's exercises (and a plausible wrong answer for each)."""
import torch


def my_budget(t, init_bgt, target_bgt, tinit, tfinal, T):
    if t <= tinit:
        return init_bgt
    if t > T - tfinal:
        return target_bgt
    c = 1 - (t - tinit) / (T - tfinal - tinit)
    return int((init_bgt - target_bgt) * c**3 + target_bgt)


def linear_budget(t, init_bgt, target_bgt, tinit, tfinal, T):  # linear, not cubic
    if t <= tinit:
        return init_bgt
    if t > T - tfinal:
        return target_bgt
    c = 1 - (t - tinit) / (T - tfinal - tinit)
    return int((init_bgt - target_bgt) * c + target_bgt)


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


SOLUTIONS = {1: my_budget, 2: (update, scores)}
WRONG = {1: linear_budget, 2: (update_old_ibar, scores)}
