"""Solutions (and a plausible wrong answer each) for notebook 03's exercises."""
import math

import torch


def merged_weight(W, A, B, alpha, r, rslora):
    scaling = alpha / (math.sqrt(r) if rslora else r)
    return W + scaling * B @ A                                     # (d_out, r) @ (r, d_in)


def merged_weight_ignores_rslora(W, A, B, alpha, r, rslora):
    return W + (alpha / r) * B @ A                                 # wrong: always alpha / r


def dora_weight(W, A, B, magnitude, scaling):
    V = W + scaling * B @ A                                        # (d_out, d_in)
    return magnitude[:, None] * V / V.norm(dim=1, keepdim=True)    # one norm per output row


def dora_weight_wrong_axis(W, A, B, magnitude, scaling):
    V = W + scaling * B @ A
    return magnitude[:, None] * V / V.norm(dim=0, keepdim=True)    # wrong: per input column


def pissa_init(W, r, scaling):
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)            # W = U diag(S) Vh
    root = (S[:r] / scaling).sqrt()                                # (r,): so that s B A = U_r S_r Vh_r
    A = root[:, None] * Vh[:r]                                     # (r, d_in)
    B = U[:, :r] * root[None, :]                                   # (d_out, r)
    return A, B, W - scaling * B @ A                               # W_res: the rest of the spectrum


def pissa_init_unscaled(W, r, scaling):
    """Wrong: forgets the scaling, so the adapter starts at scaling x the principal part."""
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    root = S[:r].sqrt()
    A, B = root[:, None] * Vh[:r], U[:, :r] * root[None, :]
    return A, B, W - B @ A


SOLUTIONS = {1: merged_weight, 2: dora_weight, 3: pissa_init}
WRONG = {1: merged_weight_ignores_rslora, 2: dora_weight_wrong_axis, 3: pissa_init_unscaled}
