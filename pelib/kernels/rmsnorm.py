"""RMSNorm (Zhang & Sennrich 2019) forward and backward, Llama style.

For one row x of length H (the hidden size), as `transformers`' LlamaRMSNorm:

    r    = 1 / sqrt(mean(x^2) + eps)          computed in fp32, eps inside the sqrt
    xhat = x * r                              fp32, then rounded to x's dtype
    y    = w * xhat                           in the promoted dtype of (w, x)

Backward, with dn = dy * w (the gradient reaching xhat):

    dw   = sum over rows of dy * xhat
    dx_i = r * dn_i + sum_j dn_j x_j * d r/d x_i,   d r/d x_i = -r^3 x_i / H
         = r * (dn_i - xhat_i * mean_j(dn_j * xhat_j))

Unsloth's RMSNorm kernel treats the weight as frozen and returns no dw. Here dw is computed
(a LoRA/QLoRA run freezes it, but full fine-tuning and some PEFT methods train the norms):
each program accumulates the fp32 partial sum of dy * xhat over the rows it visits, writes one
(H,) row of partials, and torch adds the few rows.

Traffic per row (B = bytes per element): forward reads H*B (x) and writes H*B (y) + 4 (r);
backward reads 2*H*B (x, dy) + 4 and writes H*B (dx); w is read once per program. About 4 FLOPs
per element forward, 8 backward: bandwidth-bound on any GPU.
"""
import torch
import triton
import triton.language as tl

from ._dispatch import interpreting, num_programs, use_triton
from ._triton_utils import round_to


@triton.jit
def _rmsnorm_fwd_kernel(
    x_ptr, w_ptr, y_ptr, rstd_ptr,   # x, y (n_rows, H) row strides sx, sy; w (H,); rstd (n_rows,) fp32
    n_rows, H, sx, sy, eps,
    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid, nprog = tl.program_id(0), tl.num_programs(0)
    cols = tl.arange(0, BLOCK_H)
    cmask = cols < H
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)           # (BLOCK_H,)
    for r0 in range(pid * BLOCK_R, n_rows, nprog * BLOCK_R):                  # grid-stride over tiles
        rows = r0 + tl.arange(0, BLOCK_R)
        m = (rows[:, None] < n_rows) & cmask[None, :]
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * sx + cols[None, :], mask=m, other=0.0)
        x = x.to(tl.float32)                                                   # (BLOCK_R, BLOCK_H)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / H + eps)                 # (BLOCK_R,)
        xhat = round_to(x * rstd[:, None], x_ptr.dtype.element_ty)
        y = round_to(xhat * w[None, :], y_ptr.dtype.element_ty)
        tl.store(y_ptr + rows[:, None].to(tl.int64) * sy + cols[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=m)
        tl.store(rstd_ptr + rows, rstd, mask=rows < n_rows)


@triton.jit
def _rmsnorm_bwd_kernel(
    dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr,   # dw_partial (n_programs, H) fp32
    n_rows, H, sdy, sx, sdx,
    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid, nprog = tl.program_id(0), tl.num_programs(0)
    cols = tl.arange(0, BLOCK_H)
    cmask = cols < H
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_H,), dtype=tl.float32)                               # this program's partial
    for r0 in range(pid * BLOCK_R, n_rows, nprog * BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        rows64 = rows[:, None].to(tl.int64)
        m = (rows[:, None] < n_rows) & cmask[None, :]
        x = tl.load(x_ptr + rows64 * sx + cols[None, :], mask=m, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows64 * sdy + cols[None, :], mask=m, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=rows < n_rows, other=0.0)         # (BLOCK_R,)
        xhat = x * rstd[:, None]
        dw += tl.sum(dy * round_to(xhat, x_ptr.dtype.element_ty), axis=0)
        dn = dy * w[None, :]
        c = tl.sum(dn * xhat, axis=1) / H                                      # (BLOCK_R,)
        dx = rstd[:, None] * (dn - xhat * c[:, None])
        DT: tl.constexpr = dx_ptr.dtype.element_ty
        tl.store(dx_ptr + rows64 * sdx + cols[None, :], round_to(dx, DT).to(DT), mask=m)
    tl.store(dw_partial_ptr + pid * H + cols, dw, mask=cmask)


def _tiles(H, n_rows):
    """(BLOCK_R, BLOCK_H, n_programs): big tiles in the interpreter, ~4K elements on a GPU."""
    BLOCK_H = triton.next_power_of_2(H)
    budget = 1 << 16 if interpreting() else 4096
    BLOCK_R = max(1, min(budget // BLOCK_H, triton.next_power_of_2(n_rows)))
    return BLOCK_R, BLOCK_H


class RMSNormFunction(torch.autograd.Function):
    """y = w * round_{x.dtype}(x / sqrt(mean(x^2) + eps)); grads dx and dw.

    Saves for backward: x (as given, its dtype), w, and rstd (one fp32 per row). Neither xhat
    nor y is saved; xhat is recomputed from x and rstd in the backward kernel.
    """

    @staticmethod
    def forward(ctx, x, w, eps):
        shape, H = x.shape, x.shape[-1]
        x2 = x.reshape(-1, H)                                                  # (rows, H)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        n_rows = x2.shape[0]
        y = torch.empty((n_rows, H), dtype=torch.promote_types(x.dtype, w.dtype), device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        BLOCK_R, BLOCK_H = _tiles(H, n_rows)
        grid = (min(num_programs(x.device), triton.cdiv(n_rows, BLOCK_R)),)
        _rmsnorm_fwd_kernel[grid](x2, w, y, rstd, n_rows, H, x2.stride(0), y.stride(0), eps,
                                  BLOCK_R=BLOCK_R, BLOCK_H=BLOCK_H)
        ctx.save_for_backward(x2, w, rstd)
        ctx.shape = shape
        return y.reshape(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, w, rstd = ctx.saved_tensors
        n_rows, H = x2.shape
        dy2 = dy.reshape(-1, H)
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        dx = torch.empty_like(x2)
        BLOCK_R, BLOCK_H = _tiles(H, n_rows)
        P = min(num_programs(x2.device), triton.cdiv(n_rows, BLOCK_R))
        dw_partial = torch.empty((P, H), dtype=torch.float32, device=x2.device)
        _rmsnorm_bwd_kernel[(P,)](dy2, x2, w, rstd, dx, dw_partial, n_rows, H,
                                  dy2.stride(0), x2.stride(0), dx.stride(0),
                                  BLOCK_R=BLOCK_R, BLOCK_H=BLOCK_H)
        dw = dw_partial.sum(0).to(w.dtype)
        return dx.reshape(ctx.shape), dw, None


def rms_norm_ref(x, w, eps=1e-6):
    """transformers' LlamaRMSNorm.forward, as plain torch (autograd gives the backward)."""
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def _check(x, w):
    """w must be (H,) for x (..., H): the kernel reads H weights, torch would broadcast (1,)."""
    if x.dim() == 0:
        raise ValueError("rms_norm needs x of shape (..., H), got a scalar")
    if w.shape != (x.shape[-1],):
        raise ValueError(f"rms_norm weight has shape {tuple(w.shape)}; expected ({x.shape[-1]},): one "
                         f"weight per feature of x {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"rms_norm got an empty x {tuple(x.shape)}; pass at least one row")
    if x.device != w.device:
        raise ValueError(f"x is on {x.device} and w on {w.device}; put them on one device")


def rms_norm_triton(x, w, eps=1e-6):
    _check(x, w)
    return RMSNormFunction.apply(x, w, eps)


def rms_norm(x, w, eps=1e-6):
    """RMSNorm over the last dimension of x (..., H) with weight w (H,)."""
    _check(x, w)
    return (rms_norm_triton if use_triton(x) else rms_norm_ref)(x, w, eps)
