"""Solutions (and a plausible wrong answer each) for notebook 01's exercises."""
import math

import torch
import torch.nn.functional as F
from torch import nn


def houlsby_trainable(n_layers, d, m, n_labels, train_layernorms):
    adapters = n_layers * 2 * (2 * d * m + m + d)                  # two a layer, with biases
    head = d * n_labels + n_labels
    layernorms = (1 + 2 * n_layers) * 2 * d                         # embeddings + two a layer
    return adapters + head + (layernorms if train_layernorms else 0)


def houlsby_trainable_no_bias(n_layers, d, m, n_labels, train_layernorms):
    adapters = n_layers * 2 * (2 * d * m)                           # wrong: forgot the biases
    return adapters + d * n_labels + n_labels + ((1 + 2 * n_layers) * 2 * d if train_layernorms else 0)


class ParallelAdapter(nn.Module):
    """He et al. (2022): y = linear(x) + s * W_up relu(W_down x), beside the frozen projection."""

    def __init__(self, linear: nn.Linear, m: int, scale: float = 1.0):
        super().__init__()
        self.linear, self.scale = linear.requires_grad_(False), scale
        self.down = nn.Linear(linear.in_features, m)               # (m, d_in)
        self.up = nn.Linear(m, linear.out_features)                # (d_out, m)
        nn.init.normal_(self.down.weight, std=1e-2)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):                                          # (..., d_in) -> (..., d_out)
        return self.linear(x) + self.scale * self.up(F.relu(self.down(x)))


class SequentialAdapter(ParallelAdapter):
    """Wrong: reads the linear's output (Houlsby's placement), not its input."""

    def __init__(self, linear: nn.Linear, m: int, scale: float = 1.0):
        super().__init__(linear, m, scale)
        self.down = nn.Linear(linear.out_features, m)
        nn.init.normal_(self.down.weight, std=1e-2)

    def forward(self, x):
        h = self.linear(x)
        return h + self.scale * self.up(F.relu(self.down(h)))


def cosine_factor(s, S, w):
    if s < w:
        return (s + 1) / w                                          # the linear warm-up
    progress = (s - w) / max(1, S - w)                              # 0 -> 1 after the warm-up
    return 0.5 * (1 + math.cos(math.pi * progress))


def cosine_factor_from_zero(s, S, w):
    """Wrong: the cosine runs over all S steps, so it has already fallen when the warm-up ends."""
    return (s + 1) / w if s < w else 0.5 * (1 + math.cos(math.pi * s / S))


def smoothed_cross_entropy(logits, labels, eps):
    logp = logits.log_softmax(-1)                                   # (B, K)
    nll = -logp.gather(-1, labels[:, None]).squeeze(-1)             # (B,) -log p_y
    uniform = -logp.mean(-1)                                        # (B,) mean_k -log p_k
    return ((1 - eps) * nll + eps * uniform).mean()


def smoothed_cross_entropy_wrong_classes(logits, labels, eps):
    """Wrong: spreads eps over the K - 1 other classes only (another convention, not torch's)."""
    logp = logits.log_softmax(-1)
    K = logits.shape[-1]
    nll = -logp.gather(-1, labels[:, None]).squeeze(-1)
    others = (-logp.sum(-1) - nll) / (K - 1)
    return ((1 - eps) * nll + eps * others).mean()


def phm_weight(A, s, t):
    B = s[:, :, None] * t[:, None, :]                               # (n, k/n, d/n): B_i = s_i t_i^T
    n, p, q = B.shape
    # (A_i kron B_i)[a p + x, b q + y] = A_i[a, b] B_i[x, y]: an outer product, then a reshape
    return torch.einsum("iab,ixy->axby", A, B).reshape(n * p, n * q)


def phm_weight_swapped(A, s, t):
    """Wrong: B_i kron A_i, the factors in the other order (the same numbers, misplaced)."""
    B = s[:, :, None] * t[:, None, :]
    n, p, q = B.shape
    return torch.einsum("iab,ixy->xayb", A, B).reshape(n * p, n * q)


SOLUTIONS = {1: houlsby_trainable, 2: ParallelAdapter, 3: cosine_factor, 4: smoothed_cross_entropy,
             5: phm_weight}
WRONG = {1: houlsby_trainable_no_bias, 2: SequentialAdapter, 3: cosine_factor_from_zero,
         4: smoothed_cross_entropy_wrong_classes, 5: phm_weight_swapped}
