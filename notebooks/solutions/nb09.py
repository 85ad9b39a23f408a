"""Solutions to notebook 09's exercises (Triton kernels), and a plausible wrong answer for each.

The kernels run in Triton's interpreter on a machine without CUDA: TRITON_INTERPRET is read when
each @triton.jit decorator runs, so it is set before the decorators below.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

INTERP = os.environ.get("TRITON_INTERPRET") == "1"


# Exercise 1: LayerNorm forward, one row per program. Traffic: read x, write y (+ w, b once).
# The masked-off lanes load 0, so x - mean is -mean there: mask it before squaring.
@triton.jit
def _layernorm_kernel(x_ptr, w_ptr, b_ptr, y_ptr, H, eps, BLOCK_H: tl.constexpr, MASK_CENTRED: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)                                       # (BLOCK_H,)
    m = cols < H
    x = tl.load(x_ptr + row * H + cols, mask=m, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / H
    xc = tl.where(m, x - mean, 0.0) if MASK_CENTRED else x - mean     # wrong variant: padding adds mean^2
    var = tl.sum(xc * xc, axis=0) / H                                  # biased, as torch
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * H + cols, (xc * rstd * w + b).to(y_ptr.dtype.element_ty), mask=m)


def _layernorm(x, w, b, eps, mask_centred):
    x = x.contiguous()
    y = torch.empty_like(x)
    _layernorm_kernel[(x.shape[0],)](x, w, b, y, x.shape[1], eps, BLOCK_H=triton.next_power_of_2(x.shape[1]),
                                     MASK_CENTRED=mask_centred)
    return y


def layernorm(x, w, b, eps=1e-5):
    return _layernorm(x, w, b, eps, True)


def layernorm_unmasked_padding(x, w, b, eps=1e-5):  # wrong: the padded lanes enter the variance
    return _layernorm(x, w, b, eps, False)


# Exercise 2: GeGLU, h = gelu_tanh(g) * u; tanh(z) = sign(z) (1 - e^{-2|z|}) / (1 + e^{-2|z|}), no libdevice.
@triton.jit
def _geglu_kernel(g_ptr, u_ptr, h_ptr, n, BLOCK: tl.constexpr, TANH: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    g = tl.load(g_ptr + i, mask=m, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + i, mask=m, other=0.0).to(tl.float32)
    if TANH:
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)            # sqrt(2/pi) (g + 0.044715 g^3)
        e = tl.exp(-2.0 * tl.abs(z))                                   # in (0, 1]: never overflows
        tanh = tl.where(z >= 0, 1.0, -1.0) * (1.0 - e) / (1.0 + e)
        gelu = 0.5 * g * (1.0 + tanh)
    else:                                                              # wrong variant: g sigmoid(1.702 g)
        gelu = g / (1.0 + tl.exp(-1.702 * g))
    tl.store(h_ptr + i, (gelu * u).to(h_ptr.dtype.element_ty), mask=m)


def _geglu(g, u, tanh):
    g, u = g.contiguous(), u.contiguous()
    h = torch.empty_like(g)
    BLOCK = 1 << 16 if INTERP else 1024
    _geglu_kernel[(triton.cdiv(g.numel(), BLOCK),)](g, u, h, g.numel(), BLOCK=BLOCK, TANH=tanh)
    return h


def geglu(g, u):
    return _geglu(g, u, True)


def geglu_sigmoid_approx(g, u):  # wrong: the other, cruder GELU approximation
    return _geglu(g, u, False)


# Exercise 3: SwiGLU backward. Reads dh, g, u; writes dg, du: 5 tensors, ~10 FLOPs per element.
@triton.jit
def _swiglu_bwd_kernel(dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr, FULL: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    dh = tl.load(dh_ptr + i, mask=m, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + i, mask=m, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + i, mask=m, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-g))
    dsilu = sig * (1.0 + g * (1.0 - sig)) if FULL else sig           # wrong variant: d silu / dg = sigma
    tl.store(du_ptr + i, (dh * g * sig).to(du_ptr.dtype.element_ty), mask=m)
    tl.store(dg_ptr + i, (dh * u * dsilu).to(dg_ptr.dtype.element_ty), mask=m)


def _swiglu_bwd(dh, g, u, full):
    dh, g, u = dh.contiguous(), g.contiguous(), u.contiguous()
    dg, du = torch.empty_like(g), torch.empty_like(u)
    BLOCK = 1 << 16 if INTERP else 1024
    _swiglu_bwd_kernel[(triton.cdiv(g.numel(), BLOCK),)](dh, g, u, dg, du, g.numel(), BLOCK=BLOCK, FULL=full)
    return dg, du


def swiglu_bwd(dh, g, u):
    return _swiglu_bwd(dh, g, u, True)


def swiglu_bwd_sigma_only(dh, g, u):  # wrong: treats silu'(g) as sigma(g)
    return _swiglu_bwd(dh, g, u, False)


SOLUTIONS = {1: layernorm, 2: geglu, 3: swiglu_bwd}
WRONG = {1: layernorm_unmasked_padding, 2: geglu_sigmoid_approx, 3: swiglu_bwd_sigma_only}
