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


def svd_triplets(P, lam, Q):
    Qp, Rp = torch.linalg.qr(P)  # P = Qp Rp: (out, r), (r, r)
    Qq, Rq = torch.linalg.qr(Q.T)  # Q^T = Qq Rq: (in, r), (r, r)
    U, S, Vh = torch.linalg.svd(Rp @ torch.diag(lam) @ Rq.T)  # the r x r core
    return Qp @ U, S, Vh @ Qq.T  # (out, r), (r,), (r, in)


def svd_triplets_normalised(P, lam, Q):  # unit columns and rows, the norms moved into λ: not orthogonal
    p, q = P.norm(dim=0), Q.norm(dim=1)
    lam2 = lam * p * q
    order = torch.argsort(lam2.abs(), descending=True)
    sign = torch.sign(lam2[order])
    return (P / p)[:, order] * sign, lam2[order].abs(), (Q / q[:, None])[order]


SOLUTIONS = {1: fold, 2: (update, scores), 3: svd_triplets}
WRONG = {1: fold_all, 2: (update_old_ibar, scores), 3: svd_triplets_normalised}
