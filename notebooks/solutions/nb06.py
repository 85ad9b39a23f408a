"""Solutions to notebook 06's exercises (and a plausible wrong answer for each)."""
import torch
import torch.nn.functional as F

from pelib.quant import dequantize_4bit, quantize_4bit


class QLoRAFunction(torch.autograd.Function):
    """y = x W~^T + s (x A^T) B^T. With g = dL/dy (..., out) and h = x A^T (..., r):
    dL/dx = g W~ + s (g B) A,  dL/dA = s (g B)^T x,  dL/dB = s g^T h (batch dims summed).
    Saves packed, x, A, B and h; W~ is rebuilt from the bytes in the backward."""

    @staticmethod
    def forward(ctx, x, A, B, packed, state, scaling):
        W = dequantize_4bit(packed, state).view(B.shape[0], A.shape[1])  # (out, in), freed on return
        h = x @ A.T  # (..., r)
        ctx.save_for_backward(x, A, B, packed, h)
        ctx.state, ctx.scaling = state, scaling
        return x @ W.T + scaling * (h @ B.T)  # (..., out)

    @staticmethod
    def backward(ctx, g):  # (..., out)
        x, A, B, packed, h = ctx.saved_tensors
        s = ctx.scaling
        W = dequantize_4bit(packed, ctx.state).view(B.shape[0], A.shape[1])  # again
        gB = g @ B  # (..., r)
        grad_x = g @ W + s * (gB @ A)  # (..., in)
        grad_A = s * gB.reshape(-1, gB.shape[-1]).T @ x.reshape(-1, x.shape[-1])  # (r, in)
        grad_B = s * g.reshape(-1, g.shape[-1]).T @ h.reshape(-1, h.shape[-1])  # (out, r)
        return grad_x, grad_A, grad_B, None, None, None


def qlora_autograd(x, A, B, packed, state, scaling):  # right gradients, but autograd keeps W~
    W = dequantize_4bit(packed, state).view(B.shape[0], A.shape[1])
    return F.linear(x, W) + scaling * F.linear(F.linear(x, A), B)


def _dq(W):
    packed, state = quantize_4bit(W, 64, "nf4")
    return dequantize_4bit(packed, state).view_as(W)


def _loftq(W, r, steps, subtract):
    R = torch.zeros_like(W)
    for _ in range(steps):
        Q = _dq(W - R if subtract else W)  # quantise what the adapter does not carry
        U, S, Vh = torch.linalg.svd(W - Q, full_matrices=False)
        B = U[:, :r] * S[:r].sqrt()  # (out, r)
        A = S[:r].sqrt()[:, None] * Vh[:r]  # (r, in)
        R = B @ A
    return Q, B, A


def loftq_init(W, r, steps):
    return _loftq(W, r, steps, subtract=True)


def loftq_init_quantise_W(W, r, steps):  # quantises W itself every round: the rounds change nothing
    return _loftq(W, r, steps, subtract=False)


def _nf4_dq(n):
    blocks = -(-n // 64)
    return -(-n // 2) + blocks + 4 * -(-blocks // 256) + 4


def qlora_training_bytes(shapes, r):
    return dict(frozen=sum(_nf4_dq(o * i) for o, i in shapes),
                lora=sum(16 * r * (o + i) for o, i in shapes))


def qlora_training_bytes_no_moments(shapes, r):  # forgets Adam's two moments
    return dict(frozen=sum(_nf4_dq(o * i) for o, i in shapes),
                lora=sum(8 * r * (o + i) for o, i in shapes))


SOLUTIONS = {1: QLoRAFunction.apply, 2: loftq_init, 3: qlora_training_bytes}
WRONG = {1: qlora_autograd, 2: loftq_init_quantise_W, 3: qlora_training_bytes_no_moments}
