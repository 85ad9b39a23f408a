"""Solutions to notebook 08's exercises (and a plausible wrong answer for each)."""
import torch


def my_official(g, lam):
    p = g.clone()
    p[p > lam] -= lam
    p[p < -lam] += lam
    p[p.abs() < lam] = 0.0
    return p


def exact_prox(g, lam):  # the exact soft threshold: not what the official code does
    return torch.sign(g) * torch.clamp(g.abs() - lam, min=0)


def prune_one(A, B, g, alpha):
    K = (g != 0).nonzero().flatten()
    r, r2 = g.numel(), len(K)
    return A[K].clone(), B[:, K] * g[K] * (r2 / r), alpha / r2


def prune_one_no_rescale(A, B, g, alpha):  # forgets that alpha / r' differs from alpha / r
    K = (g != 0).nonzero().flatten()
    return A[K].clone(), B[:, K] * g[K], alpha / len(K)


SOLUTIONS = {1: my_official, 2: prune_one}
WRONG = {1: exact_prox, 2: prune_one_no_rescale}
