"""Fused LoRA linear with a manual backward; the frozen W dense or NF4 (QLoRA).

LoRA (Hu et al. 2021) keeps W (out, in) frozen and learns A (r, in), B (out, r):

    y = x W^T + s * (x A^T) B^T + bias          s = alpha / r (the `scaling`)

Shapes: x (N, in), xa = x A^T (N, r), y (N, out). With dy = dL/dy (N, out):

    dB  = s * dy^T xa                           (out, r)
    dxa = s * dy B                              (N, r)
    dA  = dxa^T x                               (r, in)
    dx  = dy W + dxa A                          (N, in)
    W and bias are frozen: no gradient.

What is saved for backward: x, A, B, and W as it was given: the dense W (a reference to the
parameter, no new memory), or for a 4-bit W (pelib.quant's packed bytes and QuantState) only
the bytes and the state's tensors (n/2 bytes plus
~n/64 bytes with double quantisation). The dense dequantised W is made in forward, used, and
dropped; the backward dequantises it again. xa is recomputed (2*N*in*r FLOPs, ~r/out of the
forward's cost) instead of being saved.

Why torch matmuls and not a Triton matmul: the five products here are compute-bound (for
N=8192, in=4096, out=14336 the x W^T product alone is 0.96 TFLOP, about 1 ms at the H200's
spec-sheet 989 TFLOP/s bf16) and cuBLAS runs them at the hardware's peak, which a hand-written Triton matmul
matches only after per-shape autotuning (unavailable in the interpreter). What fusion can
save is traffic: the LoRA term is added into y in place (`addmm_`, no (N, out) temporary),
dx likewise, and the NF4 weight is dequantised by one Triton kernel, read as 4 bits, never
stored in 16 bits across the forward-backward gap. This is Unsloth's choice as well.

FLOPs per call (forward + backward): 4*N*in*out (x W^T, dy W) + N*r*(8*in + 6*out) (x A^T
twice, dA and dxa A over `in`; the LoRA term of y, dB and dxa over `out`).
"""
import dataclasses

import torch

from ._dispatch import use_triton

# A 4-bit W arrives as (packed bytes, state): its state's type names the functions that
# dequantise it, (fast, reference), each (packed, state, dtype) -> (out, in). The package that
# defines the state fills this in (pelib.quant), so this kernel imports nothing of it.
DEQUANTIZERS: dict[type, tuple] = {}


def _dequantizer(state, which: int):
    if type(state) not in DEQUANTIZERS:
        raise TypeError(f"no dequantiser for a {type(state).__name__} weight state; a 4-bit W is "
                        "a (packed, pelib.quant.QuantState) pair")
    return DEQUANTIZERS[type(state)][which]


def _split(state):
    """A state dataclass as (its tensors, the state without them): autograd saves tensors, and
    the husk (shape, dtype, blocksize, names) rebuilds the state from them in backward."""
    names = tuple(f.name for f in dataclasses.fields(state)
                  if isinstance(getattr(state, f.name), torch.Tensor))
    return [getattr(state, k) for k in names], (dataclasses.replace(state, **dict.fromkeys(names)), names)


def _dequantize(packed, meta, tensors, dtype):
    husk, names = meta
    return _dequantizer(husk, 0)(packed, dataclasses.replace(husk, **dict(zip(names, tensors))), dtype)


class LoRALinearFunction(torch.autograd.Function):
    """y = x W^T + s (x A^T) B^T (+ bias); returns grads for x, A, B only.

    Saves for backward: x, A, B, and either the dense W (the frozen parameter itself) or the
    4-bit tensors (packed uint8 and the QuantState's code, absmax or qabsmax/absmax2/code2/offset);
    never a dense dequantised copy of W. `W` is the dense W or the packed bytes (with `meta`).
    """

    @staticmethod
    def forward(ctx, x, A, B, scaling, bias, W, meta, *state_tensors):
        X = x.reshape(-1, x.shape[-1])                                         # (N, in)
        if meta is None:
            Wd = W.to(X.dtype)                                                  # (out, in)
        else:
            Wd = _dequantize(W, meta, state_tensors, X.dtype)                   # (out, in), dropped below
        Ac, Bc = A.to(X.dtype), B.to(X.dtype)
        xa = X @ Ac.t()                                                         # (N, r)
        y = torch.addmm(bias.to(X.dtype), X, Wd.t()) if bias is not None else X @ Wd.t()  # (N, out)
        y.addmm_(xa, Bc.t(), alpha=scaling)                                     # y += s xa B^T, in place
        ctx.save_for_backward(x, A, B, W, *state_tensors)                      # W: dense, or packed bytes
        ctx.scaling, ctx.meta = scaling, meta
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x, A, B, W, *state_tensors = ctx.saved_tensors
        s = ctx.scaling
        X = x.reshape(-1, x.shape[-1])                                         # (N, in)
        dY = dy.reshape(-1, dy.shape[-1]).to(X.dtype)                          # (N, out)
        Ac, Bc = A.to(X.dtype), B.to(X.dtype)
        xa = X @ Ac.t()                                                         # (N, r) recomputed
        dB = (dY.t() @ xa).mul_(s)                                              # (out, r)
        dxa = (dY @ Bc).mul_(s)                                                 # (N, r)
        dA = dxa.t() @ X                                                        # (r, in)
        dx = None
        if ctx.needs_input_grad[0]:
            if ctx.meta is None:
                Wd = W.to(X.dtype)
            else:
                Wd = _dequantize(W, ctx.meta, state_tensors, X.dtype)           # dequantised again
            dx = (dY @ Wd).addmm_(dxa, Ac).reshape(x.shape)                    # (N, in)
        return (dx, dA.to(A.dtype), dB.to(B.dtype), None, None, None, None) + (None,) * len(state_tensors)


def lora_linear_ref(x, W, A, B, scaling, bias=None):
    """Plain torch under autograd. W is a dense tensor or a (packed, QuantState) pair
    (dequantised by its reference dequantiser, pelib.quant.dequantize_4bit_ref)."""
    if isinstance(W, tuple):
        W = _dequantizer(W[1], 1)(W[0], W[1], x.dtype)
    W = W.detach().to(x.dtype)
    y = torch.nn.functional.linear(x, W, None if bias is None else bias.detach().to(x.dtype))
    xa = torch.nn.functional.linear(x, A.to(x.dtype))  # (..., r)
    return y + scaling * torch.nn.functional.linear(xa, B.to(x.dtype))


def lora_linear_fused(x, W, A, B, scaling, bias=None):
    if isinstance(W, tuple):                                                   # (packed, QuantState)
        tensors, meta = _split(W[1])
        return LoRALinearFunction.apply(x, A, B, scaling, bias, W[0], meta, *tensors)
    return LoRALinearFunction.apply(x, A, B, scaling, bias, W, None)


def lora_linear(x, W, A, B, scaling, bias=None):
    """y = x W^T + scaling * (x A^T) B^T + bias, W (out, in) frozen: a dense tensor or a 4-bit
    (packed, pelib.quant.QuantState) pair, e.g. (layer.packed, layer.quant_state) of a Linear4bit.

    x (..., in), A (r, in), B (out, r) -> y (..., out). Gradients flow to x, A and B.
    """
    return (lora_linear_fused if use_triton(x) else lora_linear_ref)(x, W, A, B, scaling, bias)
