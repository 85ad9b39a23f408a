"""Solutions to notebook 06's exercises (and a plausible wrong answer for each)."""
import torch
import torch.nn.functional as F

from pelib.quant import dequantize_4bit


class Linear4bitFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, packed, state):
        W = dequantize_4bit(packed, state).view(-1, x.shape[-1])  # (out, in), freed on return
        ctx.save_for_backward(packed)
        ctx.state = state
        return x @ W.T

    @staticmethod
    def backward(ctx, grad_y):
        (packed,) = ctx.saved_tensors
        W = dequantize_4bit(packed, ctx.state).view(grad_y.shape[-1], -1)  # again
        return grad_y @ W, None, None


def linear4bit_naive(x, packed, state):  # right gradient, but autograd keeps W~ alive
    return F.linear(x, dequantize_4bit(packed, state).view(-1, x.shape[-1]))


def _nf4_dq(n):
    blocks = -(-n // 64)
    return -(-n // 2) + blocks + 4 * -(-blocks // 256) + 4


def qlora_training_bytes(shapes, r):
    return dict(frozen=sum(_nf4_dq(o * i) for o, i in shapes),
                lora=sum(16 * r * (o + i) for o, i in shapes))


def qlora_training_bytes_no_moments(shapes, r):  # forgets Adam's two moments
    return dict(frozen=sum(_nf4_dq(o * i) for o, i in shapes),
                lora=sum(8 * r * (o + i) for o, i in shapes))


SOLUTIONS = {1: Linear4bitFn.apply, 2: qlora_training_bytes}
WRONG = {1: linear4bit_naive, 2: qlora_training_bytes_no_moments}
