"""SoRA's proximal step and sparsifying scheduler (Ding et al., 2023, arXiv:2311.11696).

After each optimizer step the gates g go through the proximal operator of xi * ||g||_1 (the
paper's proximal gradient, eq. 5); xi is raised in stages over the run:

    g_{t+1} = T_{eta_t * xi}(g_t - eta_t grad),    T_lam(g) = sign(g) * max(|g| - lam, 0)

`soft_threshold` is the exact T_lam. The official code (TsinghuaC3I/SoRA, src/sparse_optimizer.py)
applies three masked in-place statements one after the other; a value with lam < |g| < 2 lam is
first moved to |g| - lam < lam and then zeroed by the third. `official_threshold` reproduces it
(for reproduction only: `SoRA(variant="official")`).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch


def _check_lam(lam) -> float:
    lam = float(lam)
    if not lam >= 0 or not math.isfinite(lam):
        raise ValueError(f"the sparsity threshold must be a finite number >= 0, got {lam}; "
                         "pass a non-negative sparse lambda (xi)")
    return lam


def soft_threshold(g: torch.Tensor, lam: float) -> torch.Tensor:
    """T_lam(g) = sign(g) * max(|g| - lam, 0): the prox of lam * ||g||_1, exactly."""
    lam = _check_lam(lam)
    return torch.sign(g) * torch.clamp(g.abs() - lam, min=0)


def official_threshold(g: torch.Tensor, lam: float) -> torch.Tensor:
    """The official code's three in-place statements, in their order (for reproduction only).
    Not T_lam: lam < |g| < 2 lam gives 0 instead of |g| - lam (and |g| == lam is kept)."""
    lam = _check_lam(lam)
    p = g.clone()
    p[p > lam] -= lam
    p[p < -lam] += lam
    p[p.abs() < lam] = 0.0
    return p


class SparsitySchedule:
    """xi raised over stages: xi = lambdas[k] during stage k; stages split the run evenly unless
    `stage_steps` fixes their length. The last value holds to the end of training."""

    def __init__(self, lambdas: Sequence[float], stage_steps: int | None = None):
        if not hasattr(lambdas, "__len__"):
            raise ValueError("the sparsity schedule must be a finite list of lambdas, got a "
                             f"{type(lambdas).__name__}; pass e.g. [0.1, 0.2, 0.3]")
        self.lambdas = [_check_lam(v) for v in lambdas]
        if not self.lambdas:
            raise ValueError("the sparsity schedule is empty; give at least one lambda")
        if stage_steps is not None and (not isinstance(stage_steps, int) or stage_steps < 1):
            raise ValueError(f"stage_steps must be a positive integer, got {stage_steps!r}")
        self.stage_steps = stage_steps
        self.total_steps = None

    @classmethod
    def linear(cls, start: float, end: float, stages: int, stage_steps: int | None = None):
        """`stages` values from start to end, evenly spaced (the official 'linear' schedule)."""
        if not isinstance(stages, int) or stages < 1:
            raise ValueError(f"stages must be a positive integer, got {stages!r}")
        if stages == 1:
            return cls([start], stage_steps)
        return cls([start + (end - start) * k / (stages - 1) for k in range(stages)], stage_steps)

    def begin(self, total_steps: int) -> None:
        n = len(self.lambdas)
        if self.stage_steps is None:
            if n > total_steps:
                raise ValueError(f"the schedule has {n} stages but training has only "
                                 f"{total_steps} steps; use fewer stages")
        elif (n - 1) * self.stage_steps >= total_steps:
            raise ValueError(
                f"the schedule does not end within training: its last stage would start at step "
                f"{(n - 1) * self.stage_steps + 1} of {total_steps}; lower stage_steps (or leave "
                f"it None to split the run evenly) or use fewer stages")
        self.total_steps = total_steps

    def __call__(self, step: int) -> float:
        """xi for optimizer step `step` (1-based, as the training loop counts)."""
        if self.stage_steps is not None:
            k = (step - 1) // self.stage_steps
        else:
            if self.total_steps is None:
                raise RuntimeError("call begin(total_steps) first (the training loop does)")
            k = (step - 1) * len(self.lambdas) // self.total_steps
        return self.lambdas[min(k, len(self.lambdas) - 1)]

