"""The run's length and the lr's shape over it: a linear warm-up, then a linear decay to 0
(BERT's recipe), half a cosine down to 0 (Loshchilov & Hutter 2017), or a constant lr."""
from __future__ import annotations

import math

SCHEDULES = ("linear", "cosine", "constant")  # the lr's shape after the warm-up


def total_steps(n_examples: int, cfg) -> int:
    """Optimizer steps pelib.train.train takes (cfg: epochs, batch_size, grad_accum); the
    methods' schedules (AdaLoRA's budget, SoRA's sparsity) need it before the first step."""
    per_epoch = math.ceil(math.ceil(n_examples / cfg.batch_size) / cfg.grad_accum)
    return max(1, round(cfg.epochs * per_epoch))


def lr_schedule(total: int, warmup: int, schedule: str = "linear"):
    """The lr factor of step s: up in a straight line over `warmup` steps, then `schedule`."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup  # step 0 already learns (a factor of 0 would waste it)
        if schedule == "constant":
            return 1.0
        if schedule == "linear":
            return max(0.0, (total - s) / max(1, total - warmup))
        progress = min(1.0, (s - warmup) / max(1, total - warmup))  # 0 -> 1 over the decay
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor
