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


# Exercise 1: dw_j = sum_i dy_ij x_ij r_i, per-program partials, then a torch sum.
# Traffic: read dy and x once (8 bytes per element in fp32), write P x H partials.
@triton.jit
def _rmsnorm_dw_kernel(dy_ptr, x_ptr, dw_part_ptr, n_rows, H, eps,
                       BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, USE_R: tl.constexpr):
    pid, P = tl.program_id(0), tl.num_programs(0)
    cols = tl.arange(0, BLOCK_H)
    cm = cols < H
    dw = tl.zeros((BLOCK_H,), tl.float32)                              # this program's partial
    for r0 in range(pid * BLOCK_R, n_rows, P * BLOCK_R):               # grid-stride over row tiles
        rows = r0 + tl.arange(0, BLOCK_R)
        m = (rows[:, None] < n_rows) & cm[None, :]
        offs = rows[:, None] * H + cols[None, :]                       # (BLOCK_R, BLOCK_H)
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=m, other=0.0).to(tl.float32)
        if USE_R:
            x = x / tl.sqrt(tl.sum(x * x, axis=1) / H + eps)[:, None]  # xhat = x r
        dw += tl.sum(dy * x, axis=0)
    tl.store(dw_part_ptr + pid * H + cols, dw, mask=cm)


def _rmsnorm_dw(dy, x, eps, use_r):
    n_rows, H = x.shape
    BLOCK_H = triton.next_power_of_2(H)
    BLOCK_R = max(1, min((1 << 14 if INTERP else 4096) // BLOCK_H, triton.next_power_of_2(n_rows)))
    P = min(triton.cdiv(n_rows, BLOCK_R), 4 if INTERP else 512)
    part = torch.empty(P, H, device=x.device, dtype=torch.float32)
    _rmsnorm_dw_kernel[(P,)](dy, x, part, n_rows, H, eps, BLOCK_R=BLOCK_R, BLOCK_H=BLOCK_H, USE_R=use_r)
    return part.sum(0)


def rmsnorm_dw(dy, x, eps=1e-6):
    return _rmsnorm_dw(dy, x, eps, True)


def rmsnorm_dw_without_r(dy, x, eps=1e-6):  # wrong: sums dy * x, forgetting the 1/rms factor
    return _rmsnorm_dw(dy, x, eps, False)


# Exercise 2: a masked tiled matmul. Per K step: (BM + BN) BK elements in, 2 BM BN BK FLOPs.
@triton.jit
def _matmul_kernel(a_ptr, b_ptr, c_ptr, M, N, K,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TAIL: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_end = K if TAIL else (K // BLOCK_K) * BLOCK_K                   # wrong variant: drops the last partial step
    for k0 in range(0, k_end, BLOCK_K):
        kk = k0 + rk
        a = tl.load(a_ptr + rm[:, None] * K + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        b = tl.load(b_ptr + kk[:, None] * N + rn[None, :], mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0)
        acc += tl.dot(a, b)
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


def _matmul(a, b, BLOCK_M, BLOCK_N, BLOCK_K, tail):
    a, b = a.contiguous(), b.contiguous()
    (M, K), N = a.shape, b.shape[1]
    c = torch.empty(M, N, device=a.device, dtype=torch.float32)
    _matmul_kernel[(triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))](
        a, b, c, M, N, K, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, TAIL=tail)
    return c


def matmul_tiled(a, b, BLOCK_M, BLOCK_N, BLOCK_K):
    return _matmul(a, b, BLOCK_M, BLOCK_N, BLOCK_K, True)


def matmul_tiled_no_k_tail(a, b, BLOCK_M, BLOCK_N, BLOCK_K):  # wrong: assumes BLOCK_K divides K
    return _matmul(a, b, BLOCK_M, BLOCK_N, BLOCK_K, False)


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


SOLUTIONS = {1: rmsnorm_dw, 2: matmul_tiled, 3: swiglu_bwd}
WRONG = {1: rmsnorm_dw_without_r, 2: matmul_tiled_no_k_tail, 3: swiglu_bwd_sigma_only}
