"""Solutions (and a plausible wrong answer each) for notebook 03's exercises."""
import math


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


SOLUTIONS = {1: merged_weight, 2: dora_weight}
WRONG = {1: merged_weight_ignores_rslora, 2: dora_weight_wrong_axis}
