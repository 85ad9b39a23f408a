"""A linear probe fitted to convergence, and LP-FT: start fine-tuning from it.

The probe is softmax regression on standardised features z_hat = (z - mu) / sd, trained to
convergence with L-BFGS on cross-entropy + l2 * ||W||^2 (notebook 00 builds it by hand). Its
weights fold back onto the raw features, so it can be loaded into a model's linear head:

    logits = z_hat @ W + b = z @ (W / sd[:, None]) + (b - (mu / sd) @ W)

LP-FT (Kumar et al. 2022, "Fine-Tuning can Distort Pretrained Features"): a random head's
large early gradients flow into the backbone and pull its features around before the head is
any good. Fitting the head as a probe on the frozen features first, then fine-tuning, starts
the backbone from a head that already reads its features well.
"""
from __future__ import annotations

import torch


def fit_probe(z: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float = 1e-3,
              bias: bool = True, max_iter: int = 500) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight (C, H), bias (C,) or None) of a linear head on the raw features z: (N, H).
    Without a bias the features are only scaled, not centred (a head with no bias cannot
    absorb the mean)."""
    z = z.detach().float()
    if z.ndim != 2 or len(z) != len(y):
        raise ValueError(f"fit_probe needs features (N, H) and N labels, got {tuple(z.shape)} "
                         f"and {len(y)}")
    if len(z) < 2:
        raise ValueError("fit_probe needs at least 2 rows: it standardises the features over them")
    mu = z.mean(0) if bias else torch.zeros(z.shape[1])
    sd = z.std(0) + 1e-6
    zs = (z - mu) / sd                                      # (N, H) standardised
    W = torch.zeros(z.shape[1], n_classes, requires_grad=True)  # (H, C)
    b = torch.zeros(n_classes, requires_grad=bias)
    opt = torch.optim.LBFGS([W, b] if bias else [W], max_iter=max_iter, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(zs @ W + b, y) + l2 * (W ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        weight = (W / sd[:, None]).T                        # (C, H) on raw features
        return weight.contiguous(), (b - (mu / sd) @ W) if bias else None
