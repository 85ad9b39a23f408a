"""SwiGLU gate (Shazeer 2020): h = silu(g) * u, elementwise, forward and backward.

In a Llama MLP, g = x W_gate^T and u = x W_up^T (both (N, m)), and down_proj(h) follows.

    sigma(g) = 1 / (1 + exp(-g))
    silu(g)  = g * sigma(g)
    h        = silu(g) * u                      rounded like torch: silu to g's dtype, then h

Backward, with d silu/dg = sigma + g * sigma * (1 - sigma) = sigma * (1 + g * (1 - sigma)):

    du = dh * silu(g)
    dg = dh * u * sigma(g) * (1 + g * (1 - sigma(g)))

Traffic per element (B bytes each): forward reads 2B and writes B; backward reads 3B (dh, g, u)
and writes 2B. ~5 FLOPs + 1 exp each way: bandwidth-bound. A fusion into the up/gate matmul
epilogue would save the round trip of g and u; we keep the gate separate and readable.
"""
import torch
import triton
import triton.language as tl

from ._dispatch import interpreting, use_triton
from ._triton_utils import round_to


@triton.jit
def _swiglu_fwd_kernel(g_ptr, u_ptr, h_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)          # (BLOCK,) flat index
    m = i < n
    g = tl.load(g_ptr + i, mask=m, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + i, mask=m, other=0.0).to(tl.float32)
    DT: tl.constexpr = h_ptr.dtype.element_ty
    silu = round_to(g / (1.0 + tl.exp(-g)), DT)
    tl.store(h_ptr + i, round_to(silu * u, DT).to(DT), mask=m)


@triton.jit
def _swiglu_bwd_kernel(dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    dh = tl.load(dh_ptr + i, mask=m, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + i, mask=m, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + i, mask=m, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-g))
    silu = g * sig
    du = dh * silu
    dg = dh * u * sig * (1.0 + g * (1.0 - sig))
    DT: tl.constexpr = dg_ptr.dtype.element_ty
    tl.store(du_ptr + i, round_to(du, DT).to(DT), mask=m)
    tl.store(dg_ptr + i, round_to(dg, DT).to(DT), mask=m)


KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # the kernel's math is fp32


def _block():
    return 1 << 16 if interpreting() else 1024


class SwiGLUFunction(torch.autograd.Function):
    """h = silu(g) * u. Saves for backward: g and u (the two inputs), nothing else."""

    @staticmethod
    def forward(ctx, g, u):
        g, u = g.contiguous(), u.contiguous()
        h = torch.empty_like(g)
        n, BLOCK = g.numel(), _block()
        _swiglu_fwd_kernel[(triton.cdiv(n, BLOCK),)](g, u, h, n, BLOCK=BLOCK)
        ctx.save_for_backward(g, u)
        return h

    @staticmethod
    def backward(ctx, dh):
        g, u = ctx.saved_tensors
        dh = dh.contiguous()
        dg, du = torch.empty_like(g), torch.empty_like(u)
        n, BLOCK = g.numel(), _block()
        _swiglu_bwd_kernel[(triton.cdiv(n, BLOCK),)](dh, g, u, dg, du, n, BLOCK=BLOCK)
        return dg, du


def swiglu_ref(g, u):
    """What a Llama MLP computes between its projections: F.silu(g) * u."""
    return torch.nn.functional.silu(g) * u


def _check(g, u):
    if g.shape != u.shape or g.dtype != u.dtype or g.device != u.device:
        raise ValueError(f"swiglu needs g and u of one shape, dtype and device, got g {tuple(g.shape)} "
                         f"{g.dtype} {g.device} and u {tuple(u.shape)} {u.dtype} {u.device}")


def swiglu_triton(g, u):
    _check(g, u)
    if g.dtype not in KERNEL_DTYPES:
        raise ValueError(f"the SwiGLU kernel computes in fp32 and takes {[str(d) for d in KERNEL_DTYPES]}, "
                         f"got {g.dtype}; call swiglu (which computes {g.dtype} in torch) or swiglu_ref")
    return SwiGLUFunction.apply(g, u)


def swiglu(g, u):
    """h = silu(g) * u. fp64 (which the kernel does not keep) is computed in fp64 by torch."""
    _check(g, u)
    return (swiglu_triton if use_triton(g) and g.dtype in KERNEL_DTYPES else swiglu_ref)(g, u)
