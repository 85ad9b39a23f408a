# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 09 · Triton: from a vector add to the kernels of a QLoRA step
#
# A training step of a QLoRA model spends its time in two kinds of work:
#
# * **matmuls** (the projections): many FLOPs per byte; cuBLAS runs them near the chip's peak;
# * **everything between them**: dequantising the 4-bit weights, RMSNorm, RoPE, the SwiGLU gate,
#   the loss. A few FLOPs per byte: their time is set by **memory traffic**.
#
# The limits below are those of one NVIDIA H200, from its spec sheet (an H100 SXM: 3.35 TB/s, the
# same matmul peak):
#
# | H200, spec sheet | |
# |---|---|
# | HBM3e bandwidth | 4.8 TB/s |
# | dense bf16 matmul | about 989 TFLOP/s |
#
# The spec is the bound no kernel can beat, so **"the limit" below always uses the spec**; real
# code reaches a fraction of it, and on a GPU the timing cells print that fraction. For every
# kernel we count bytes read and written and FLOPs, and compute its speed limit:
#
# $$ t \;\ge\; \max\Big(\frac{\text{bytes moved}}{\text{bandwidth}},\; \frac{\text{FLOPs}}{\text{peak FLOP/s}}\Big). $$
#
# Each kernel below sits next to a plain-torch **reference** that defines what it must compute;
# we check them against each other at odd sizes. On a GPU a timing cell after each kernel
# measures it (`triton.testing.do_bench`) against its limit and against torch. At the end the
# notebook imports `pelib.kernels` and asserts that the package computes what we built here.
#
# On a machine without a GPU, Triton runs kernels in its **interpreter** (numpy, one program at
# a time): correct, never fast. It must be switched on before `triton` is
# imported, so that is the first thing we do.

# %%
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"     # read when each @triton.jit runs: set it first
import logging
import math

import triton
import triton.language as tl

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)   # its CPU backend logs a harmless note
FAST = os.environ.get("PELIB_FAST") == "1"                    # CI: tiny sizes
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERP = DEVICE == "cpu"
HBM, PEAK = 4.8e12, 989e12                       # H200 spec sheet: bytes/s, dense bf16 FLOP/s
torch.manual_seed(0)
print("device", DEVICE, "| triton", triton.__version__, "| interpreter" if INTERP else "")


def limit_us(nbytes, flops=0):
    """The H200 speed limit of a kernel (spec sheet), in microseconds."""
    return 1e6 * max(nbytes / HBM, flops / PEAK)


# %% [markdown]
# **One timer for every kernel.** `timed(name, nbytes, flops, make)` computes the limit, and on a
# GPU calls `make()` to build full-size inputs (a 4096 x 14336 weight, 8192 tokens: not the small
# tensors the checks use) and times our kernel and torch's version with
# `triton.testing.do_bench` (it warms up, flushes the L2 cache between runs and returns a
# median in ms). It prints the three numbers every benchmark here prints: ours, torch's, the
# limit, and what ours achieves in GB/s and TFLOP/s. On a CPU it prints that timing is skipped:
# the interpreter runs each program instance in numpy, one after the other, so its times
# measure Python, not the kernel: it is a correctness tool (section 11 times what a CPU can).
# Every call is recorded in `BENCH` for the roofline figure of section 10.
#
# On a GPU these cells run unchanged: the same code launches compiled kernels (no interpreter
# switch, no upcasts; `bench/gpu.sh` times pelib's kernels the same way on a GPU). On a CPU,
# section 11 measures the same lesson with torch on the processor you have. Section 2
# quantises a weight with bitsandbytes (`pip install bitsandbytes` on a GPU machine that lacks
# it).

# %%
BENCH = []                                       # one dict per timed kernel, for the figure


def timed(name, nbytes, flops, make):
    """Time one kernel against its limit. make() -> (ours, torch's): two zero-argument callables
    on full-size GPU inputs; it is called only when CUDA is present."""
    lim = limit_us(nbytes, flops)
    us = us_torch = None
    if INTERP:
        print(f"{name}: limit {lim:.1f} us on an H200; not timed (Triton's interpreter is a "
              "correctness tool, not a speed measurement)")
    else:
        ours, theirs = make()
        us, us_torch = (1e3 * triton.testing.do_bench(f) for f in (ours, theirs))
        print(f"{name}: ours {us:.1f} us, torch {us_torch:.1f} us, limit {lim:.1f} us "
              f"({100 * lim / us:.0f}% of the limit) | {nbytes / us / 1e3:.0f} GB/s, {flops / us / 1e6:.1f} TFLOP/s")
    BENCH.append(dict(name=name, nbytes=nbytes, flops=flops, limit=lim, us=us, us_torch=us_torch))


# %% [markdown]
# ## 1. Vector add: programs, blocks, masks
#
# A Triton kernel is written for **one program** that handles a block of `BLOCK` elements; the
# launch grid says how many programs run. `tl.arange` gives the block's offsets, a mask guards
# the ragged end, and loads/stores move whole blocks.
#
# Traffic: read 2n, write n elements: `12 n` bytes in fp32 for `n` FLOPs, 1/12 FLOP per byte.
# No arithmetic can hide that: a vector add is pure bandwidth.

# %%
@triton.jit
def add_kernel(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)            # (BLOCK,) element indices of this program
    mask = offs < n                                     # the last block is partial
    x = tl.load(x_ptr + offs, mask=mask)
    y = tl.load(y_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, x + y, mask=mask)


def add(x, y, BLOCK=1024):
    out = torch.empty_like(x)
    n = x.numel()
    add_kernel[(triton.cdiv(n, BLOCK),)](x, y, out, n, BLOCK=BLOCK)
    return out


n = 10_007 if FAST else 1_000_003                       # not a multiple of BLOCK
x, y = torch.randn(n, device=DEVICE), torch.randn(n, device=DEVICE)
assert torch.equal(add(x, y, BLOCK=4096), x + y)
print(f"n = {n}: {12 * n / 1e6:.2f} MB moved -> {limit_us(12 * n):.2f} us at 4.8 TB/s")


# %%
N_ADD = 1 << 28                                          # 268M fp32: 3.2 GB moved


def make_add():
    xb, yb = torch.randn(N_ADD, device=DEVICE), torch.randn(N_ADD, device=DEVICE)
    return (lambda: add(xb, yb)), (lambda: xb + yb)


timed("vector add", 12 * N_ADD, N_ADD, make_add)

# %% [markdown]
# ## 2. NF4 dequantisation with double quantisation
#
# QLoRA stores a weight as 4-bit indices into the 16 NF4 values, two per byte (**even element
# in the high nibble**, as bitsandbytes), and one scale per block of 64 elements. Double
# quantisation stores the scales themselves as uint8 indices into an 8-bit table `code2`, with
# one fp32 `absmax2` per 256 blocks and a global `offset`:
#
# $$ W_i = \text{code}[q_i]\cdot s_{\lfloor i/64 \rfloor},\qquad
#    s_b = \text{code2}[\hat q_b]\cdot \text{absmax2}_{\lfloor b/256\rfloor} + \text{offset}. $$
#
# We take a weight quantised by bitsandbytes (notebooks 04 and 05 build the quantiser) and
# write the reference first.

# %%
import bitsandbytes.functional as bnbF

rows, cols = (37, 577) if FAST else (1024, 4096)          # odd sizes: a partial last block
W = torch.randn(rows, cols)
packed, qs = bnbF.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
print("packed", tuple(packed.shape), packed.dtype, "| qabsmax", tuple(qs.absmax.shape), qs.absmax.dtype,
      "| absmax2", tuple(qs.state2.absmax.shape), "| offset", round(qs.offset.item(), 4))


def nf4_dequant_ref(packed, qabsmax, absmax2, code2, offset, code, shape, dtype):
    n = math.prod(shape)
    scale = code2[qabsmax.long()] * absmax2[torch.arange(qabsmax.numel(), device=qabsmax.device) // 256] + offset  # (n_blocks,)
    b = packed.reshape(-1)
    q = torch.stack((b >> 4, b & 0xF), dim=-1).reshape(-1)[:n]                          # high nibble first
    return (code[q.long()] * scale.repeat_interleave(64)[:n]).to(dtype).reshape(shape)


args_cpu = (packed, qs.absmax, qs.state2.absmax, qs.state2.code, qs.offset, qs.code, (rows, cols))
assert torch.equal(nf4_dequant_ref(*args_cpu, torch.float16), bnbF.dequantize_4bit(packed, qs).half())
args = tuple(t.to(DEVICE) if torch.is_tensor(t) else t for t in args_cpu)   # where the kernel runs

# %% [markdown]
# **Kernel, version 1: one output per lane.** Element `i` reads byte `i // 2` and picks its
# nibble by parity. Each byte is loaded twice (the cache absorbs it) and each lane makes two
# table gathers. bitsandbytes computes `code2[q] * absmax2` and adds `offset` as two separately
# rounded fp32 operations; on a GPU the compiler would fuse them into one FMA (one rounding), so
# the launch passes `enable_fp_fusion=False` to stay bit-exact.
#
# Traffic per element: read 1/2 byte + 1/64 byte (the uint8 block index), write 2 bytes in
# fp16. A 4096 x 14336 MLP weight: 148 MB, **31 us** at the spec's 4.8 TB/s.

# %%
@triton.jit
def nf4_dequant_kernel(packed_ptr, qabsmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr, out_ptr,
                       n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)               # (BLOCK,) output indices
    m = i < n
    byte = tl.load(packed_ptr + i // 2, mask=m, other=0).to(tl.int32)
    q = (byte >> (4 * (1 - i % 2))) & 0xF                             # even i: high nibble
    blk = i // 64
    qa = tl.load(qabsmax_ptr + blk, mask=m, other=0).to(tl.int32)
    scale = tl.load(code2_ptr + qa) * tl.load(absmax2_ptr + blk // 256, mask=m, other=0.0) + tl.load(offset_ptr)
    w = tl.load(code_ptr + q) * scale
    tl.store(out_ptr + i, w.to(out_ptr.dtype.element_ty), mask=m)


def nf4_dequant(packed, qabsmax, absmax2, code2, offset, code, shape, dtype):
    n = math.prod(shape)
    out = torch.empty(n, dtype=dtype, device=packed.device)
    BLOCK = 1 << 16 if INTERP else 1024
    opts = {} if INTERP else {"enable_fp_fusion": False}
    nf4_dequant_kernel[(triton.cdiv(n, BLOCK),)](packed, qabsmax, absmax2, code2, offset.reshape(1), code, out,
                                                 n, BLOCK=BLOCK, **opts)
    return out.reshape(shape)


for dt in (torch.float32, torch.float16):
    assert torch.equal(nf4_dequant(*args, dt), nf4_dequant_ref(*args, dt))
print("NF4 + DQ kernel == reference == bitsandbytes, bit for bit")


# %%
def make_nf4(shape=(4096, 14336)):                      # random bytes: timing needs no real weight
    n = math.prod(shape)
    nb = (n + 63) // 64
    dev = dict(device=DEVICE)
    t = (torch.randint(0, 256, (n // 2,), dtype=torch.uint8, **dev), torch.randint(0, 256, (nb,), dtype=torch.uint8, **dev),
         torch.rand(triton.cdiv(nb, 256), **dev), qs.state2.code.to(DEVICE), qs.offset.to(DEVICE), qs.code.to(DEVICE))
    return (lambda: nf4_dequant(*t, shape, torch.float16)), (lambda: nf4_dequant_ref(*t, shape, torch.float16))


n_w = 4096 * 14336                                       # read n/2 + n/64 bytes, write 2n; ~3 FLOPs each
timed("NF4 dequant 4096x14336 -> fp16", n_w // 2 + n_w // 64 + 2 * n_w, 3 * n_w, make_nf4)

# %% [markdown]
# **Version 2 (pelib's)** works on bytes instead of outputs: each program loads `BLOCK` bytes
# once, looks up both nibbles, and interleaves them with `tl.join(even, odd)` reshaped to
# `(2 BLOCK,)`. Same bytes moved; half the loads and no parity arithmetic. Section 12 prints it
# beside this one.
#
# ## 3. RMSNorm: one row per program, a reduction inside
#
# Llama's RMSNorm, exactly as transformers writes it: compute in fp32, `eps` inside the square
# root, round the normalised row back to the input dtype, *then* multiply by the weight:
#
# $$ r = \big(\tfrac1H \textstyle\sum_j x_j^2 + \epsilon\big)^{-1/2},\qquad y = w \odot \mathrm{round}(x\,r). $$
#
# A row of H elements fits in one block (`BLOCK_H = next_power_of_2(H)`): load it, reduce with
# `tl.sum`, normalise, store. Traffic: read and write each element once (+ w): with H = 4096 in
# bf16 and 8192 tokens, 134 MB, **28 us**. Eager torch runs each op of `rmsnorm_ref` below as its
# own kernel, most of them reading and writing a full-size fp32 temporary (section 11 counts
# those passes and measures what they cost on a CPU).
#
# The backward (pelib returns both `dx` and `dw`; Unsloth's kernel treats `w` as frozen):
#
# $$ dw = \textstyle\sum_{\text{rows}} dy \odot \hat x,\qquad
#    dx = r\,\big(dn - \hat x\cdot\tfrac1H \textstyle\sum_j dn_j \hat x_j\big),\quad dn = dy \odot w. $$

# %%
@triton.jit
def rmsnorm_kernel(x_ptr, w_ptr, y_ptr, H, eps, BLOCK_H: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    m = cols < H
    x = tl.load(x_ptr + row * H + cols, mask=m, other=0.0).to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + eps)
    xhat = (x * r).to(x_ptr.dtype.element_ty).to(tl.float32)          # fp16 here (bf16: see pelib)
    w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * H + cols, (w * xhat).to(y_ptr.dtype.element_ty), mask=m)


def rmsnorm(x, w, eps=1e-6):
    y = torch.empty_like(x)
    rmsnorm_kernel[(x.shape[0],)](x, w, y, x.shape[1], eps, BLOCK_H=triton.next_power_of_2(x.shape[1]))
    return y


def rmsnorm_ref(x, w, eps=1e-6):                                       # transformers' LlamaRMSNorm
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


xr = torch.randn(37 if FAST else 512, 577, device=DEVICE, dtype=torch.float16)
wr = (1 + 0.1 * torch.randn(577, device=DEVICE)).half()
rms_nb = rmsnorm(xr, wr)
err = (rms_nb.float() - rmsnorm_ref(xr, wr).float()).abs().max().item()
print(f"RMSNorm fp16, 1 program per row: max |kernel - reference| = {err:.2e}")
assert err <= 2e-3

# %%
def make_rmsnorm(N=8192, H=4096):
    xb = torch.randn(N, H, device=DEVICE, dtype=torch.float16)
    wb = torch.ones(H, device=DEVICE, dtype=torch.float16)
    return (lambda: rmsnorm(xb, wb)), (lambda: rmsnorm_ref(xb, wb))


# read x, write y (fp16): 4 bytes per element; ~4 FLOPs per element
timed("RMSNorm fwd 8192x4096 fp16", 4 * 8192 * 4096, 4 * 8192 * 4096, make_rmsnorm)

# %% [markdown]
# **The backward: dx per row, dW reduced over rows.** dx needs only its own row (one more
# `tl.sum` across the columns, for $\tfrac1H\sum_j dn_j \hat x_j$). dW is a sum over *all*
# rows, a reduction across programs. Two ways: `tl.atomic_add` into one (H,) row (simple, but
# the order of the additions changes from run to run), or what we do: each program walks its
# share of the rows in a grid-stride loop (rows `pid`, `pid + P`, ... in tiles of `BLOCK_R`),
# keeps its fp32 partial of dW in registers, writes one (H,) row of partials, and torch sums the
# P rows: deterministic, and P x H x 4 bytes is small next to the traffic.
#
# $r$ is recomputed from x instead of saved (one more read of nothing: x is loaded anyway).
# Traffic: read x and dy, write dx: 3 x 2 bytes per element in fp16, plus P partial rows. With
# 8192 x 4096: 201 MB, **42 us**. About 8 FLOPs per element.

# %%
@triton.jit
def rmsnorm_bwd_kernel(dy_ptr, x_ptr, w_ptr, dx_ptr, dw_part_ptr, n_rows, H, eps,
                       BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    pid, P = tl.program_id(0), tl.num_programs(0)
    cols = tl.arange(0, BLOCK_H)                                          # (BLOCK_H,)
    cm = cols < H
    w = tl.load(w_ptr + cols, mask=cm, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_H,), tl.float32)                                 # this program's partial dW
    for r0 in range(pid * BLOCK_R, n_rows, P * BLOCK_R):                  # grid-stride over row tiles
        rows = r0 + tl.arange(0, BLOCK_R)                                 # (BLOCK_R,)
        m = (rows[:, None] < n_rows) & cm[None, :]
        offs = rows[:, None] * H + cols[None, :]                          # (BLOCK_R, BLOCK_H)
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=m, other=0.0).to(tl.float32)
        r = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / H + eps)               # (BLOCK_R,) recomputed
        xhat = x * r[:, None]
        dw += tl.sum(dy * xhat.to(x_ptr.dtype.element_ty).to(tl.float32), axis=0)  # the rounded xhat, as fwd
        dn = dy * w[None, :]
        c = tl.sum(dn * xhat, axis=1) / H                                 # (BLOCK_R,)
        dx = r[:, None] * (dn - xhat * c[:, None])
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=m)
    tl.store(dw_part_ptr + pid * H + cols, dw, mask=cm)


def rmsnorm_bwd(dy, x, w, eps=1e-6):                                      # dy, x (rows, H) -> dx, dw
    n_rows, H = x.shape
    BLOCK_H = triton.next_power_of_2(H)
    BLOCK_R = max(1, min((1 << 14 if INTERP else 4096) // BLOCK_H, triton.next_power_of_2(n_rows)))
    P = min(triton.cdiv(n_rows, BLOCK_R), 4 if INTERP else 528)           # a few programs per SM (132 SMs)
    dx = torch.empty_like(x)
    dw_part = torch.empty(P, H, device=x.device, dtype=torch.float32)     # (P, H)
    rmsnorm_bwd_kernel[(P,)](dy, x, w, dx, dw_part, n_rows, H, eps, BLOCK_R=BLOCK_R, BLOCK_H=BLOCK_H)
    return dx, dw_part.sum(0).to(w.dtype)

# %% [markdown]
# The forward and the backward as one autograd node (it saves x and w; r is recomputed), checked
# against torch autograd through the reference, in fp32 at an odd 37 x 100.

# %%
class RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, eps=1e-6):
        ctx.save_for_backward(x, w)
        ctx.eps = eps
        return rmsnorm(x, w, eps)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        return *rmsnorm_bwd(dy.contiguous(), x, w, ctx.eps), None


x32 = torch.randn(37, 100, device=DEVICE, requires_grad=True)
w32 = (1 + 0.1 * torch.randn(100, device=DEVICE)).requires_grad_()
dy32 = torch.randn(37, 100, device=DEVICE)
dx_nb, dw_nb = torch.autograd.grad(RMSNorm.apply(x32, w32), (x32, w32), dy32)
dx_ref, dw_ref = torch.autograd.grad(rmsnorm_ref(x32, w32), (x32, w32), dy32)
print(f"RMSNorm backward fp32 37x100: max |dx - autograd| = {(dx_nb - dx_ref).abs().max():.1e}, "
      f"max |dw - autograd| = {(dw_nb - dw_ref).abs().max():.1e}")
assert torch.allclose(dx_nb, dx_ref, atol=1e-5, rtol=1e-4) and torch.allclose(dw_nb, dw_ref, atol=1e-4, rtol=1e-4)
dy_r = torch.randn_like(xr)                                               # fp16, for the final check
dxr_nb, dwr_nb = rmsnorm_bwd(dy_r, xr, wr)

# %%
def make_rmsnorm_bwd(N=8192, H=4096):
    xb = torch.randn(N, H, device=DEVICE, dtype=torch.float16, requires_grad=True)
    wb = torch.ones(H, device=DEVICE, dtype=torch.float16, requires_grad=True)
    dyb = torch.randn(N, H, device=DEVICE, dtype=torch.float16)
    yb = rmsnorm_ref(xb, wb)
    return (lambda: rmsnorm_bwd(dyb, xb.detach(), wb.detach())), \
        (lambda: torch.autograd.grad(yb, (xb, wb), dyb, retain_graph=True))


timed("RMSNorm bwd 8192x4096 fp16", 6 * 8192 * 4096, 8 * 8192 * 4096, make_rmsnorm_bwd)

# %% [markdown]
# ## 4. SwiGLU: an elementwise gate and its derivative
#
# $h = \mathrm{silu}(g)\,u$ with $\mathrm{silu}(g) = g\,\sigma(g)$. Backward:
# $du = dh\,\mathrm{silu}(g)$, $dg = dh\,u\,\sigma(g)\,(1 + g(1-\sigma(g)))$. It saves only $g$
# and $u$. Traffic in bf16 for 8192 tokens x 14336: forward 3 x 235 MB = 705 MB (**147 us**),
# backward 5 x 235 MB (**245 us**).

# %%
@triton.jit
def swiglu_kernel(g_ptr, u_ptr, h_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    g = tl.load(g_ptr + i, mask=m, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + i, mask=m, other=0.0).to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(h_ptr.dtype.element_ty).to(tl.float32)  # torch rounds silu(g)
    tl.store(h_ptr + i, (silu * u).to(h_ptr.dtype.element_ty), mask=m)


def swiglu(g, u):
    h = torch.empty_like(g)
    BLOCK = 65536 if INTERP else 1024                   # few programs in the interpreter
    swiglu_kernel[(triton.cdiv(g.numel(), BLOCK),)](g, u, h, g.numel(), BLOCK=BLOCK)
    return h


gs, us = torch.randn(37, 1000, device=DEVICE), torch.randn(37, 1000, device=DEVICE)
h_nb = swiglu(gs, us)
assert torch.allclose(h_nb, torch.nn.functional.silu(gs) * us, atol=1e-6, rtol=1e-5)


# %%
def make_swiglu(N=8192, M=14336):
    gb, ub = (torch.randn(N, M, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    return (lambda: swiglu(gb, ub)), (lambda: torch.nn.functional.silu(gb) * ub)


# read g, u, write h in bf16: 6 bytes per element; ~5 FLOPs per element (exp, add, div, 2 mul)
timed("SwiGLU fwd 8192x14336 bf16", 6 * 8192 * 14336, 5 * 8192 * 14336, make_swiglu)

# %% [markdown]
# ## 5. RoPE: a rotation, so the backward is the same kernel with −sin
#
# HF's convention splits a head vector in halves, $x = [x_1 | x_2]$, and
# $\mathrm{RoPE}(x) = [x_1 c - x_2 s \,|\, x_2 c + x_1 s]$: each pair $(x_{1,i}, x_{2,i})$ is
# rotated by the angle $\theta_i t$. A rotation's transpose is the rotation by $-\theta$, so the
# gradient is the same kernel with $-\sin$, and nothing of $q$ or $k$ needs saving.
#
# With GQA the key has fewer heads (SmolLM2: 9 query heads, 3 key heads, head dim 64). The
# kernel below takes one (sequence, head) per program; pelib's loads a block of positions'
# cos/sin once and loops over all 9 + 3 heads.

# %%
@triton.jit
def rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, H, T, SIGN: tl.constexpr, HALF: tl.constexpr,
                BLOCK_T: tl.constexpr):
    bh = tl.program_id(0)                                               # one (batch, head)
    b = bh // H
    t = tl.arange(0, BLOCK_T)[:, None]                                  # (BLOCK_T, 1)
    d = tl.arange(0, HALF)[None, :]                                     # (1, HALF)
    m = t < T
    c = tl.load(cos_ptr + (b * T + t) * 2 * HALF + d, mask=m, other=0.0)
    s = SIGN * tl.load(sin_ptr + (b * T + t) * 2 * HALF + d, mask=m, other=0.0)
    base = bh * T * 2 * HALF + t * 2 * HALF + d
    x1 = tl.load(x_ptr + base, mask=m, other=0.0)
    x2 = tl.load(x_ptr + base + HALF, mask=m, other=0.0)
    tl.store(out_ptr + base, x1 * c - x2 * s, mask=m)
    tl.store(out_ptr + base + HALF, x2 * c + x1 * s, mask=m)


def rope(x, cos, sin, sign=1.0):                                        # x (B, H, T, D) contiguous
    B, H, T, D = x.shape
    out = torch.empty_like(x)
    rope_kernel[(B * H,)](x, cos, sin, out, H, T, SIGN=sign, HALF=D // 2, BLOCK_T=triton.next_power_of_2(T))
    return out


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


# %%
B, T, D = 2, 19, 64
ang = torch.arange(T)[:, None] * 10000.0 ** (-torch.arange(0, D, 2) / D)            # (T, D/2)
cos = torch.cat([ang.cos()] * 2, -1).expand(B, T, D).contiguous().to(DEVICE)      # (B, T, D)
sin = torch.cat([ang.sin()] * 2, -1).expand(B, T, D).contiguous().to(DEVICE)
q = torch.randn(B, 9, T, D, device=DEVICE)
q_nb = rope(q, cos, sin)
assert torch.allclose(q_nb, q * cos[:, None] + rotate_half(q) * sin[:, None], atol=1e-5)
# backward: <RoPE(q), g> = <q, RoPE^T(g)>, and RoPE^T is the kernel with -sin
g = torch.randn_like(q)
assert torch.allclose((q_nb * g).sum(), (q * rope(g, cos, sin, -1.0)).sum(), rtol=1e-4)


# %%
def make_rope(Bb=16, Hb=32, Tb=512, Db=64):
    angb = torch.arange(Tb, device=DEVICE)[:, None] * 10000.0 ** (-torch.arange(0, Db, 2, device=DEVICE) / Db)
    cb = torch.cat([angb.cos()] * 2, -1).expand(Bb, Tb, Db).contiguous()
    sb = torch.cat([angb.sin()] * 2, -1).expand(Bb, Tb, Db).contiguous()
    qb = torch.randn(Bb, Hb, Tb, Db, device=DEVICE)
    return (lambda: rope(qb, cb, sb)), (lambda: qb * cb[:, None] + rotate_half(qb) * sb[:, None])


n_q = 16 * 32 * 512 * 64                               # read and write q, read cos and sin once, fp32
timed("RoPE 16x32x512x64 fp32", 8 * n_q + 2 * 4 * 16 * 512 * 64, 3 * n_q, make_rope)

# %% [markdown]
# ## 6. Cross-entropy over 49,152 tokens: a running logsumexp
#
# $\text{loss} = \mathrm{lse}(x) - x_y$ and $\partial/\partial x_j = \mathrm{softmax}(x)_j - [j = y]$.
# A row of SmolLM2's vocabulary (49,152) is too long for one block, so we walk it in chunks and
# keep a running maximum $m$ and running sum $s = \sum e^{x - m}$; after a chunk with maximum
# $m_c$: $m' = \max(m, m_c)$, $s' = s\,e^{m - m'} + \sum_{\text{chunk}} e^{x - m'}$.
#
# Why bother: eager HF first makes an fp32 copy of the bf16 logits, then an fp32 log-softmax,
# then an fp32 gradient: for 8 x 512 tokens that is 3 x 805 MB beside the 403 MB logits. The
# chunked kernel reads the logits once in the forward, once in the backward and writes the
# gradient once in bf16 (pelib can write it over the logits themselves). Traffic: 3 x 403 MB,
# **252 us**.

# %%
@triton.jit
def ce_fwd_kernel(x_ptr, y_ptr, loss_ptr, V, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    m = tl.full((1,), -1e30, tl.float32)                                # running max
    s = tl.zeros((1,), tl.float32)                                      # running sum of exp(x - m)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(x_ptr + row * V + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = tl.sum(m + tl.log(s), axis=0)                                 # (1,) -> scalar
    label = tl.load(y_ptr + row)
    x_y = tl.load(x_ptr + row * V + tl.where(label >= 0, label, 0)).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(label >= 0, lse - x_y, 0.0))


def ce_loss(logits, labels, BLOCK_V=256):
    N, V = logits.shape
    loss = torch.empty(N, device=logits.device)
    ce_fwd_kernel[(N,)](logits, labels, loss, V, BLOCK_V=BLOCK_V)
    return loss.sum() / (labels != -100).sum()


V = 1003 if FAST else 49152
logits = 4 * torch.randn(6, V, device=DEVICE)
labels = torch.randint(0, V, (6,), device=DEVICE)
labels[2] = -100                                                        # ignored
ce_nb = ce_loss(logits, labels)
assert torch.allclose(ce_nb, torch.nn.functional.cross_entropy(logits, labels), atol=1e-5)
print(f"chunked CE over V={V} in blocks of 256 == F.cross_entropy: {ce_nb.item():.5f}")


# %%
def make_ce(N=4096, Vb=49152):
    lb = 4 * torch.randn(N, Vb, device=DEVICE, dtype=torch.bfloat16)
    yb = torch.randint(0, Vb, (N,), device=DEVICE)
    return (lambda: ce_loss(lb, yb, BLOCK_V=2048)), (lambda: torch.nn.functional.cross_entropy(lb, yb))


# the forward reads the bf16 logits once: 2 bytes per logit; ~4 FLOPs per logit (max, sub, exp, add)
timed("CE fwd 4096x49152 bf16", 2 * 4096 * 49152, 4 * 4096 * 49152, make_ce)

# %% [markdown]
# ## 7. A tiled matmul with `tl.dot`
#
# $C = AB$ with A (M, K), B (K, N). Each program owns one `BLOCK_M x BLOCK_N` tile of C and
# walks K in steps of `BLOCK_K`: load an A tile (BLOCK_M, BLOCK_K) and a B tile (BLOCK_K, BLOCK_N),
# multiply them on the tensor cores with `tl.dot`, accumulate in fp32 registers, store once.
# Masks guard the ragged edges in all three dimensions; the masked-off K entries load as 0, so
# they add nothing to the sum.
#
# Why tiles: each loaded A tile is used BLOCK_N times and each B tile BLOCK_M times. Per K step a
# program moves $(B_M + B_N)B_K$ elements for $2B_MB_NB_K$ FLOPs: in fp16,
# $B_MB_N/(B_M+B_N)$ FLOP per byte, 64 for 128 x 128 tiles. The H200 needs
# 989e12 / 4.8e12 = 206 FLOP per byte of HBM traffic to be compute-bound, and reaches it because
# the L2 cache serves the tiles that neighbouring programs share. The whole product,
# M = N = K = 4096 in fp16: 101 MB, 137 GFLOP: **139 us**, compute-bound.
#
# In the interpreter, `tl.dot` works in fp32 and fp16 but returns garbage for bf16: the
# `UPCAST` switch (a `tl.constexpr`, so the compiled GPU kernel has no branch) converts the tiles
# to fp32 there, and the kernel writes fp32 that torch rounds to bf16 (the interpreter's bf16
# cast truncates). On a GPU nothing is upcast: fp16/bf16 tiles go to the tensor cores as they are.

# %%
@triton.jit
def matmul_kernel(a_ptr, b_ptr, c_ptr, M, N, K, sam, sak, sbk, sbn, scm, scn,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  UPCAST: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)             # (BLOCK_M,) rows of C
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)             # (BLOCK_N,) columns of C
    rk = tl.arange(0, BLOCK_K)                                          # (BLOCK_K,)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(a_ptr + rm[:, None] * sam + kk[None, :] * sak,     # (BLOCK_M, BLOCK_K)
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        b = tl.load(b_ptr + kk[:, None] * sbk + rn[None, :] * sbn,     # (BLOCK_K, BLOCK_N)
                    mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0)
        if UPCAST:                                                      # interpreter only
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc += tl.dot(a, b)                                             # fp32 accumulator
    tl.store(c_ptr + rm[:, None] * scm + rn[None, :] * scn, acc.to(c_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def matmul(a, b, BLOCK_M=None, BLOCK_N=None, BLOCK_K=None):
    """a (M, K) @ b (K, N) -> (M, N) in a's dtype; any strides."""
    (M, K), N = a.shape, b.shape[1]
    BM, BN, BK = (64, 64, 64) if INTERP else (128, 128, 32)
    BM, BN, BK = BLOCK_M or BM, BLOCK_N or BN, BLOCK_K or BK
    c = torch.empty(M, N, device=a.device, dtype=torch.float32 if INTERP else a.dtype)
    matmul_kernel[(triton.cdiv(M, BM), triton.cdiv(N, BN))](
        a, b, c, M, N, K, *a.stride(), *b.stride(), *c.stride(),
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, UPCAST=INTERP)
    return c.to(a.dtype)

# %% [markdown]
# Checked against torch at an odd 37 x 100 @ 100 x 61 (every tile ragged), with B given as a
# transposed view (strides, not copies), and with bf16 inputs (upcast in the interpreter). On a
# GPU, fp32 `tl.dot` uses TF32 tensor cores by default (10-bit mantissa), as torch does when
# `allow_tf32` is on: the fp32 tolerance there is TF32's.

# %%
am = torch.randn(37, 100, device=DEVICE)
bm = torch.randn(61, 100, device=DEVICE).t()                           # (100, 61), a strided view
tol32 = dict(atol=1e-4, rtol=1e-4) if INTERP else dict(atol=5e-2, rtol=1e-2)
assert torch.allclose(matmul(am, bm), am @ bm, **tol32)
assert torch.allclose(matmul(am, bm, 16, 32, 16), am @ bm, **tol32)    # other tiles, same answer
for dt in (torch.float16, torch.bfloat16):
    c_nb, c_ref = matmul(am.to(dt), bm.to(dt)), (am.to(dt).float() @ bm.to(dt).float()).to(dt)
    assert c_nb.dtype == dt and torch.allclose(c_nb.float(), c_ref.float(), atol=5e-2, rtol=2e-2)
print(f"tl.dot matmul 37x100 @ 100x61 == torch (fp32, fp16, bf16), max |err| fp32 {(matmul(am, bm) - am @ bm).abs().max():.1e}")

# %%
def make_matmul(M=4096, N=4096, K=4096):
    ab, bb = torch.randn(M, K, device=DEVICE, dtype=torch.float16), torch.randn(K, N, device=DEVICE, dtype=torch.float16)
    return (lambda: matmul(ab, bb)), (lambda: ab @ bb)


timed("matmul 4096^3 fp16", 3 * 2 * 4096 * 4096, 2 * 4096 ** 3, make_matmul)

# %% [markdown]
# ## 8. A fused LoRA forward, and why pelib does not ship it
#
# $y = xW^\top + s\,(xA^\top)B^\top$ with x (N, in), W (out, in), A (r, in), B (out, r). The
# matmul above is its core. One program owns a `BLOCK_M x BLOCK_N` tile of y; in the loop over
# `in` it loads the x tile **once** and feeds it to two `tl.dot`s: one against the $W^\top$ tile,
# one against the $A^\top$ tile (r padded to `BLOCK_R` >= 16, the smallest `tl.dot` dimension).
# After the loop a third `tl.dot` multiplies the (BLOCK_M, BLOCK_R) tile of $xA^\top$ by the
# $B^\top$ tile and adds it, times s, to the accumulator: y is written once, and no (N, r) or
# (N, out) temporary ever reaches memory.
#
# The price: each column of programs recomputes its rows' $xA^\top$, so the LoRA FLOPs are paid
# `out / BLOCK_N` times over: $2N\cdot in\cdot B_R$ per column tile, a fraction
# $B_R / B_N$ (16/128 = 12.5%) on top of the $xW^\top$ work. Traffic (fp16, ignoring re-reads
# that L2 absorbs): x, W, y once: $2(N\cdot in + out\cdot in + N\cdot out)$ bytes.

# %%
@triton.jit
def lora_fwd_kernel(x_ptr, w_ptr, a_ptr, b_ptr, y_ptr, M, N, K, R, s,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    BLOCK_R: tl.constexpr, UPCAST: tl.constexpr):
    # x (M, K), W (N, K), A (R, K), B (N, R), y (M, N): contiguous, row-major
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)             # (BLOCK_M,) token rows
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)             # (BLOCK_N,) output features
    rr = tl.arange(0, BLOCK_R)                                          # (BLOCK_R,) LoRA rank
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)                # x W^T
    xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)                 # x A^T
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        km = kk < K
        x = tl.load(x_ptr + rm[:, None] * K + kk[None, :], mask=(rm[:, None] < M) & km[None, :], other=0.0)
        wt = tl.load(w_ptr + rn[None, :] * K + kk[:, None], mask=(rn[None, :] < N) & km[:, None], other=0.0)
        at = tl.load(a_ptr + rr[None, :] * K + kk[:, None], mask=(rr[None, :] < R) & km[:, None], other=0.0)
        if UPCAST:                                                      # interpreter only
            x, wt, at = x.to(tl.float32), wt.to(tl.float32), at.to(tl.float32)
        acc += tl.dot(x, wt)                                            # (BLOCK_M, BLOCK_K) @ (BLOCK_K, BLOCK_N)
        xa += tl.dot(x, at)                                             # (BLOCK_M, BLOCK_K) @ (BLOCK_K, BLOCK_R)
    bt = tl.load(b_ptr + rn[None, :] * R + rr[:, None], mask=(rr[:, None] < R) & (rn[None, :] < N), other=0.0)
    if UPCAST:
        bt = bt.to(tl.float32)
    else:
        xa = xa.to(bt.dtype)                                            # torch also rounds x A^T to x's dtype
    acc += s * tl.dot(xa, bt)                                           # (BLOCK_M, BLOCK_R) @ (BLOCK_R, BLOCK_N)
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))

# %%
def lora_fwd(x, W, A, B, s):
    """x (N, in), W (out, in), A (r, in), B (out, r) -> y (N, out) in x's dtype."""
    x, W, A, B = (t.contiguous() for t in (x, W, A, B))
    (M, K), N, R = x.shape, W.shape[0], A.shape[0]
    BM, BN, BK = (64, 64, 64) if INTERP else (128, 128, 32)
    y = torch.empty(M, N, device=x.device, dtype=torch.float32 if INTERP else x.dtype)
    lora_fwd_kernel[(triton.cdiv(M, BM), triton.cdiv(N, BN))](
        x, W, A, B, y, M, N, K, R, s, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
        BLOCK_R=max(16, triton.next_power_of_2(R)), UPCAST=INTERP)
    return y.to(x.dtype)


def lora_ref(x, W, A, B, s):                                            # the definition, plain torch
    return x @ W.t() + s * (x @ A.t()) @ B.t()


xq, Wq = torch.randn(37, 100, device=DEVICE), torch.randn(70, 100, device=DEVICE) / 10
Aq, Bq = torch.randn(8, 100, device=DEVICE) / 10, torch.randn(70, 8, device=DEVICE)
y_tl = lora_fwd(xq, Wq, Aq, Bq, 2.0)
assert torch.allclose(y_tl, lora_ref(xq, Wq, Aq, Bq, 2.0), **tol32)
y16 = lora_fwd(*(t.half() for t in (xq, Wq, Aq, Bq)), 2.0)
assert torch.allclose(y16.float(), lora_ref(*(t.half().float() for t in (xq, Wq, Aq, Bq)), 2.0), atol=3e-2, rtol=1e-2)
print(f"fused LoRA (3 tl.dot) 37x100 -> 70, r=8 == lora_ref: max |err| {(y_tl - lora_ref(xq, Wq, Aq, Bq, 2.0)).abs().max():.1e}")

# %%
def make_lora(Nt=8192, d_in=4096, d_out=4096, r=16):
    h = dict(device=DEVICE, dtype=torch.float16)
    xb, Wb = torch.randn(Nt, d_in, **h), torch.randn(d_out, d_in, **h) / 64
    Ab, Bb = torch.randn(r, d_in, **h) / 64, torch.randn(d_out, r, **h) / 4
    return (lambda: lora_fwd(xb, Wb, Ab, Bb, 2.0)), (lambda: lora_ref(xb, Wb, Ab, Bb, 2.0))


Nt, d_in, d_out, r_lo = 8192, 4096, 4096, 16                            # useful FLOPs only
timed("fused LoRA fwd 8192x4096->4096 r16 fp16", 2 * (Nt * d_in + d_out * d_in + Nt * d_out),
      2 * Nt * d_in * d_out + 2 * Nt * r_lo * (d_in + d_out), make_lora)

# %% [markdown]
# ### Why pelib's fused LoRA keeps cuBLAS for the big matmuls
#
# For an MLP projection with 8192 tokens, h = 4096, m = 14336 the $xW^\top$ product is
# $2 \cdot 8192 \cdot 4096 \cdot 14336 = 0.96$ TFLOP: 0.97 ms at the spec's 989 TFLOP/s, against
# about 0.09 ms to read W and x and write y at 4.8 TB/s. It is compute-bound,
# and cuBLAS is already near the peak. What the kernel above fuses away is memory traffic: the
# (N, r) $xA^\top$ and one (N, out) temporary, a few percent of the matmul's time at best; it
# pays 12.5% extra FLOPs for it, and a hand-written Triton matmul matches cuBLAS only with
# per-shape autotuning (section 9) and the tricks of Triton's matmul tutorial (grouped program
# order for L2 reuse, pipelining). The backward needs five more products in three transposed
# layouts. On a GPU the timing cell above prints ours against torch's two cuBLAS calls.
#
# So pelib does what Unsloth does: torch matmuls, the LoRA term added **in place** into `y`
# (`addmm_`, so no (N, out) temporary either), and a manual backward that
#
# * saves only x, A, B and the **4-bit** weight (never the dequantised 16-bit W: 117 MB for
#   this projection, times every layer, kept alive between forward and backward);
# * dequantises W again in the backward with the Triton kernel (31 us, ~3% of the matmul);
# * recomputes $xA^\top$ (r = 16: 1/900 of the forward's FLOPs) instead of saving it.
#
# The backward, with $dy$ (N, out): $dB = s\,dy^\top (xA^\top)$, $d(xA^\top) = s\,dy\,B$,
# $dA = d(xA^\top)^\top x$, $dx = dy\,W + d(xA^\top)\,A$.

# %%
class LoRAQ(torch.autograd.Function):
    """A notebook-sized fused QLoRA linear: saves x, A, B and the NF4 tensors only."""

    @staticmethod
    def forward(ctx, x, A, B, s, packed, qabsmax, absmax2, code2, offset, code, shape):
        Wd = nf4_dequant(packed, qabsmax, absmax2, code2, offset, code, shape, x.dtype)  # (out, in)
        y = (x @ Wd.t()).addmm_(x @ A.t(), B.t(), alpha=s)
        ctx.save_for_backward(x, A, B, packed, qabsmax, absmax2, code2, offset, code)
        ctx.s, ctx.shape = s, shape
        return y

    @staticmethod
    def backward(ctx, dy):
        x, A, B, *w4 = ctx.saved_tensors
        Wd = nf4_dequant(*w4, ctx.shape, x.dtype)                       # again: never saved
        dxa = (dy @ B).mul_(ctx.s)                                      # (N, r)
        dB = (dy.t() @ (x @ A.t())).mul_(ctx.s)                         # (out, r)
        dx = (dy @ Wd).addmm_(dxa, A)                                   # (N, in)
        return (dx, dxa.t() @ x, dB) + (None,) * 8


# %%
r, s = 8, 2.0
xl = torch.randn(13, cols, device=DEVICE, requires_grad=True)
A = (0.01 * torch.randn(r, cols, device=DEVICE)).requires_grad_()
Bm = torch.randn(rows, r, device=DEVICE).requires_grad_()
saved = []
with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
    y_nb = LoRAQ.apply(xl, A, Bm, s, *args)
dy = torch.randn_like(y_nb)
grads_nb = torch.autograd.grad(y_nb, (xl, A, Bm), dy)

W_dq = nf4_dequant_ref(*args, torch.float32)                            # the reference: plain autograd
y_ref = lora_ref(xl, W_dq, A, Bm, s)
grads_ref = torch.autograd.grad(y_ref, (xl, A, Bm), dy)
assert torch.allclose(y_nb, y_ref, atol=1e-4, rtol=1e-4)
assert all(torch.allclose(a, b, atol=1e-4, rtol=1e-4) for a, b in zip(grads_nb, grads_ref))


def nbytes(ts):  # kB held by a list of tensors
    return sum(t.numel() * t.element_size() for t in ts) / 1e3


print(f"saved for backward: x, A, B {nbytes(saved[:3]):.0f} kB + the NF4 weight {nbytes(saved[3:]):.0f} kB; "
      f"a dense fp32 W would be {W_dq.numel() * 4 / 1e3:.0f} kB, bf16 {W_dq.numel() * 2 / 1e3:.0f} kB")
assert all(t.numel() != W_dq.numel() for t in saved)

# %% [markdown]
# ## 9. `BLOCK`, `num_warps`, and letting `triton.autotune` choose
#
# Every launch above fixed its tile sizes by hand. What they trade:
#
# * **BLOCK sizes** set a program's tile. Larger tiles reuse each loaded element more (a matmul
#   tile does $B_MB_N/(B_M+B_N)$ FLOPs per byte loaded) and mean fewer programs. But a tile
#   lives in registers, and a `tl.dot`'s operands in shared memory (228 KB per SM on an H200):
#   too large spills or fails to launch, and too few programs leave some of the 132 SMs idle
#   (4096 x 4096 in 128 x 128 tiles is 1024 programs, about 8 per SM). Row kernels (RMSNorm,
#   the loss) have no choice in one dimension: `BLOCK_H = next_power_of_2(H)` holds a row.
# * **`num_warps`**: how many warps (32 threads each) run one program; a tile's elements are
#   spread over `32 * num_warps` threads. An elementwise `BLOCK = 1024` with 4 warps gives each
#   thread 8 contiguous elements (16-byte vector loads); Triton's softmax tutorial uses 8 warps
#   for rows >= 2048 and 16 for rows >= 4096; a 128 x 256 matmul tile wants 8.
# * **`num_stages`**: how many K-steps of tiles a matmul loads ahead of the one it multiplies
#   (software pipelining): more hides memory latency, and costs shared memory per stage.
#
# The best choice depends on the shape and the chip, so Triton can measure it:
# `@triton.autotune(configs=[triton.Config({...}, num_warps=..., num_stages=...), ...],
# key=["M", "N", "K"])` compiles and times every config the first time it sees new values of the
# `key` arguments, caches the winner, and launches it from then on (the first call is slow).
# Put in `key` the arguments whose values change the answer.
#
# The interpreter cannot time anything (`do_bench` fails there), so a multi-config autotune
# fails on a CPU; with a single config there is nothing to time and it runs. Hence
# `configs if torch.cuda.is_available() else configs[:1]`. The tuned variant below is the matmul
# of section 7 plus the other trick of Triton's matmul tutorial: **grouped program order**.
# Programs launch in order of their id; numbering tiles row by row means consecutive programs
# share one row of A but each needs a different column block of B. Taking `GROUP_M` rows of
# tiles at a time, column by column, makes programs that run together share both, so more loads
# hit the L2 cache.

# %%
configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=st)
           for bm, bn, bk, w, st in [(64, 64, 64, 4, 3), (128, 256, 64, 8, 3), (64, 256, 32, 4, 4),
                                      (128, 128, 32, 4, 4), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4)]]


@triton.autotune(configs=configs if torch.cuda.is_available() else configs[:1], key=["M", "N", "K"])
@triton.jit
def matmul_tuned_kernel(a_ptr, b_ptr, c_ptr, M, N, K, sam, sak, sbk, sbn, scm, scn,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        GROUP_M: tl.constexpr, UPCAST: tl.constexpr):
    pid = tl.program_id(0)                                              # 1-D grid: grouped order
    n_m, n_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    first_m = (pid // (GROUP_M * n_n)) * GROUP_M                        # first tile row of my group
    group_m = tl.minimum(n_m - first_m, GROUP_M)                        # the last group may be short
    pid_m = first_m + (pid % (GROUP_M * n_n)) % group_m
    pid_n = (pid % (GROUP_M * n_n)) // group_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                        # from here: section 7's body
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(a_ptr + rm[:, None] * sam + kk[None, :] * sak, mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        b = tl.load(b_ptr + kk[:, None] * sbk + rn[None, :] * sbn, mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0)
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc += tl.dot(a, b)
    tl.store(c_ptr + rm[:, None] * scm + rn[None, :] * scn, acc.to(c_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))

# %%
def matmul_tuned(a, b):
    (M, K), N = a.shape, b.shape[1]
    c = torch.empty(M, N, device=a.device, dtype=torch.float32 if INTERP else a.dtype)

    def grid(meta):                                                     # the chosen config's tiles
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    matmul_tuned_kernel[grid](a, b, c, M, N, K, *a.stride(), *b.stride(), *c.stride(), UPCAST=INTERP)
    return c.to(a.dtype)


assert torch.allclose(matmul_tuned(am, bm), am @ bm, **tol32)
a_big = torch.randn(300, 100, device=DEVICE)                           # 5 x 1 tiles of 64: groups are ragged
assert torch.allclose(matmul_tuned(a_big, bm), a_big @ bm, **tol32)
print(f"{len(matmul_tuned_kernel.configs)} config(s) to try; chosen for (M, N, K) = (300, 61, 100): "
      f"{matmul_tuned_kernel.best_config}")

# %%
def make_matmul_tuned(M=4096, N=4096, K=4096):
    ab, bb = torch.randn(M, K, device=DEVICE, dtype=torch.float16), torch.randn(K, N, device=DEVICE, dtype=torch.float16)
    matmul_tuned(ab, bb)                                                # the first call tunes: not timed
    return (lambda: matmul_tuned(ab, bb)), (lambda: ab @ bb)


timed("autotuned matmul 4096^3 fp16", 3 * 2 * 4096 * 4096, 2 * 4096 ** 3, make_matmul_tuned)

# %% [markdown]
# ## 10. Where each kernel sits: a roofline
#
# Left, the roofline: a kernel of arithmetic intensity $I$ FLOP/byte can reach at most
# $\min(\text{peak}, I \cdot \text{bandwidth})$ FLOP/s. Everything but the matmuls sits far left
# on the bandwidth slope, where only fewer bytes (fusion, 4-bit weights, bf16 gradients written
# in place) make it faster. The line is the spec sheet's; hollow markers are the limits, filled
# ones (on a GPU only) what `do_bench` measured on the GPU running this notebook. Right, the
# same as times: the limit, ours and torch's.

# %%
import matplotlib.pyplot as plt
import numpy as np

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
ai = np.logspace(-1.5, 3.5, 200)                                        # FLOP per byte
ax1.loglog(ai, np.minimum(PEAK, ai * HBM) / 1e12, "k-", lw=1, label="H200 spec: 4.8 TB/s, 989 TFLOP/s")
for i, b in enumerate(BENCH):
    intensity = b["flops"] / b["nbytes"]
    mark = "osD^v<>ph*"[i % 10]
    ax1.plot(intensity, b["flops"] / b["limit"] / 1e6, mark, mfc="none", color=f"C{i}", ms=8, label=b["name"])
    if b["us"]:
        ax1.plot(intensity, b["flops"] / b["us"] / 1e6, mark, color=f"C{i}", ms=6)
ax1.set(xlabel="arithmetic intensity (FLOP / byte)", ylabel="TFLOP/s", title="roofline, H200 spec sheet")
ax1.legend(fontsize=6.5, loc="lower right")
y = np.arange(len(BENCH))
ax2.barh(y - (0 if INTERP else 0.27), [b["limit"] for b in BENCH], 0.27, color="0.7", label="limit (spec)")
if not INTERP:
    ax2.barh(y, [b["us"] for b in BENCH], 0.27, label="ours (do_bench)")
    ax2.barh(y + 0.27, [b["us_torch"] for b in BENCH], 0.27, label="torch")
ax2.set_yticks(y, [b["name"] for b in BENCH], fontsize=7)
ax2.invert_yaxis()
ax2.set(xscale="log", xlabel="microseconds",
        title="time per kernel" + (" (CPU: limits only, nothing timed)" if INTERP else ""))
ax2.xaxis.set_minor_formatter(plt.NullFormatter())
ax2.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 11. The same lesson on the CPU you have
#
# Triton's interpreter cannot time a kernel, but the lesson of this notebook holds on any
# processor: an elementwise or row-wise op runs at the speed of the bytes it moves, and fusion
# removes bytes. We measure it here, with torch alone, on this machine's CPU:
#
# * **the limit**: this CPU's memory bandwidth, measured by copying a large fp32 tensor
#   (STREAM's "copy": read 4n bytes, write 4n bytes). It plays the role of the spec's 4.8 TB/s;
# * **eager torch**: `rmsnorm_ref` of section 3 and `silu(g) * u` of section 4 as written. Each
#   operation is its own pass over memory. On fp32 input RMSNorm moves seven full-size tensors
#   (the square reads $x$ and writes $x^2$, the mean reads $x^2$, the scale reads $x$ and writes a
#   temporary, the weight reads it and writes $y$) where two are needed, and SwiGLU five (silu
#   reads $g$ and writes a temporary, the product reads it and $u$ and writes $h$) where three
#   are;
# * **`torch.compile`**: inductor fuses each op into one loop (C++ with vector instructions on a
#   CPU) that reads every input once and writes the output once, as our Triton kernels do.
#
# For each we print the time, the **useful bytes** (inputs read once, output written once)
# divided by that time, and that as a share of the copy's bandwidth. In FAST mode the sizes are
# tiny (they fit in the cache, so the shares mean little) and `torch.compile` is skipped: its
# first call generates and builds C++ code, slow next to everything else here.

# %%
import time


def median_s(f, reps=7):
    """Median wall time of f() in seconds, after one warm-up call (CPU: no cache flush)."""
    f()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "this CPU"


def swiglu_ref(g, u):                                                    # section 4's definition
    return torch.nn.functional.silu(g) * u


N_C, H_C, M_C = (64, 256, 512) if FAST else (4096, 2048, 5632)          # tokens, hidden, MLP width
src = torch.randn(1 << 22 if FAST else 1 << 26)                         # 17 MB / 268 MB of fp32
dst = torch.empty_like(src)
BW_CPU = 2 * src.numel() * 4 / median_s(lambda: dst.copy_(src))         # bytes/s, read + write
xc, wc = torch.randn(N_C, H_C), torch.rand(H_C) + 0.5                   # (N, H), (H,)
gc, uc = torch.randn(N_C, M_C), torch.randn(N_C, M_C)                   # (N, M) each
cpu_cases = [("RMSNorm fwd", rmsnorm_ref, (xc, wc), 4 * (2 * xc.numel() + wc.numel())),   # read x, w; write y
             ("SwiGLU fwd", swiglu_ref, (gc, uc), 4 * 3 * gc.numel())]                    # read g, u; write h
print(f"{cpu_name()}, {torch.get_num_threads()} threads; copy {src.numel() * 4 / 1e6:.0f} MB: "
      f"{BW_CPU / 1e9:.1f} GB/s, the limit below")
CPU_BENCH = []
for name, fn, inputs, nbytes in cpu_cases:
    t_eager = median_s(lambda: fn(*inputs))
    row = dict(name=name, eager=nbytes / t_eager / BW_CPU, compiled=None)
    line = (f"{name:12s} ({nbytes / 1e6:6.1f} MB useful) eager {1e3 * t_eager:8.3f} ms "
            f"= {nbytes / t_eager / 1e9:6.1f} GB/s, {100 * row['eager']:3.0f}% of copy")
    if not FAST:
        fused = torch.compile(fn)
        assert torch.allclose(fused(*inputs), fn(*inputs), atol=1e-5, rtol=1e-5)   # compiles here
        t_fused = median_s(lambda: fused(*inputs))
        row["compiled"] = nbytes / t_fused / BW_CPU
        line += (f" | compiled {1e3 * t_fused:8.3f} ms = {nbytes / t_fused / 1e9:6.1f} GB/s, "
                 f"{100 * row['compiled']:3.0f}% of copy ({t_eager / t_fused:.1f}x eager)")
    CPU_BENCH.append(row)
    print(line)
if FAST:
    print("FAST mode (PELIB_FAST=1): tiny sizes that fit in the cache, and torch.compile skipped; "
          "run with PELIB_FAST=0 for the comparison")

# %%
fig, ax = plt.subplots(figsize=(6, 2.6))
yy = np.arange(len(CPU_BENCH))
ax.barh(yy - 0.2, [100 * r["eager"] for r in CPU_BENCH], 0.4, label="eager torch")
if not FAST:
    ax.barh(yy + 0.2, [100 * r["compiled"] for r in CPU_BENCH], 0.4, label="torch.compile (fused)")
ax.axvline(100, color="k", lw=1, label="this CPU's copy bandwidth")
ax.set_yticks(yy, [r["name"] for r in CPU_BENCH])
ax.invert_yaxis()
ax.set(xlabel="useful bytes / time, % of the copy bandwidth",
       title="fusion on this CPU" + (" (FAST: tiny sizes, nothing compiled)" if FAST else ""))
ax.legend(fontsize=7, loc="lower right")
plt.tight_layout()
plt.show()

# %% [markdown]
# The bars say how close each version comes to moving only the bytes it needs at the speed this
# CPU can move bytes at all. Eager torch pays for its extra passes over memory; a fused loop
# does not, and that is what the Triton kernels of sections 3 and 4 remove on a GPU. On a busy
# machine every bar moves; the ratios within one run are what to read.

# %% [markdown]
# ## 12. Check: pelib computes what we built
#
# `pelib.kernels` holds the finished versions: one file per kernel, its `_ref` beside it,
# backward passes for all of them. `python -m pelib bench kernels` times them against torch and
# prints these limits; `bench/gpu.sh` runs it at full size on a GPU, and
# `pelib.patch.patch(model)` puts them into a transformers model (its tests check that the loss
# and every LoRA gradient stay the same with the kernels on and off).
#
# First pelib's NF4 kernel, beside ours of section 2:

# %%
import inspect

import pelib.kernels as K

print(inspect.getsource(K.nf4._nf4_dequant_kernel.fn))

# %% [markdown]
# Same formula, same bytes moved, three differences:
#
# * **a byte per lane, not an output per lane.** Ours gives each lane one output `i`: it loads
#   byte `i // 2` (every byte twice, once per nibble; the cache absorbs it) and picks the nibble
#   by parity with a shift that depends on `i % 2`. pelib's lane loads its byte once, splits it
#   into `q >> 4` and `q & 0xF` with no parity arithmetic, and makes two table lookups.
# * **the interleave.** A program then holds two (BLOCK,) vectors, the even and the odd outputs.
#   `tl.join(even, odd)` stacks them into (BLOCK, 2) and `tl.reshape(..., (2 * BLOCK,))` reads
#   that row-major, `even0, odd0, even1, odd1, ...`: the output order, stored as one contiguous
#   block. The block's scale is computed once per byte, for both nibbles.
# * **what a library needs and a lesson does not**: `int64` offsets (int32 offsets wrap for a
#   tensor past $2^{31}$ elements, and a library cannot rule one out), the plain-absmax path
#   (`DOUBLE` is a `tl.constexpr`, so each variant compiles without the other's branch), any
#   blocksize, and bf16 written through fp32 in the interpreter (whose bf16 cast truncates).
#
# Now the checks. Each compares something this notebook built with pelib's version on the same
# inputs: the NF4 kernel against `pelib.quant.dequantize_4bit` (the one public 4-bit op, on its
# Triton path) on the same bytes, bit for bit; RMSNorm forward and backward; SwiGLU; RoPE; the
# loss; our fused LoRA kernel and our QLoRA autograd node against `pelib.kernels.lora_linear`.

# %%
from pelib.kernels import lora_linear
from pelib.kernels.cross_entropy_kernel import cross_entropy_triton
from pelib.kernels.lora import lora_linear_fused
from pelib.kernels.rmsnorm import rms_norm_triton
from pelib.kernels.rope import apply_rope_triton
from pelib.kernels.swiglu_kernel import swiglu_triton
from pelib.quant import QuantState, dequantize_4bit

packed_d, qabsmax_d, absmax2_d, code2_d, offset_d, code_d, shape_d = args
state = QuantState(shape=torch.Size(shape_d), dtype=torch.float32, blocksize=64, quant_type="nf4", code=code_d,
                   qabsmax=qabsmax_d, absmax2=absmax2_d, code2=code2_d, offset=offset_d)  # our tensors, pelib's state
with K.backend("triton"):               # pelib.quant's 4-bit op on the kernel (a GPU's default)
    for dt in (torch.float32, torch.float16):
        assert torch.equal(dequantize_4bit(packed_d, state, dt), nf4_dequant(*args, dt))
print("NF4: our kernel == pelib.quant.dequantize_4bit, bit for bit")

# %%
xr_g = xr.clone().requires_grad_()
wr_g = wr.clone().requires_grad_()
y_p = rms_norm_triton(xr_g, wr_g)
assert torch.equal(y_p, rms_nb)
dx_p, dw_p = torch.autograd.grad(y_p, (xr_g, wr_g), dy_r)
assert torch.allclose(dx_p.float(), dxr_nb.float(), atol=2e-3, rtol=1e-2)
assert torch.allclose(dw_p.float(), dwr_nb.float(), atol=2e-2, rtol=1e-2)    # fp16 sums in another order
assert torch.allclose(swiglu_triton(gs, us), h_nb, atol=1e-6, rtol=1e-6)
k = torch.randn(B, 3, T, D, device=DEVICE)
q_pelib, _ = apply_rope_triton(q, k, cos, sin)
assert torch.allclose(q_pelib, q_nb, atol=1e-6)
assert torch.allclose(cross_entropy_triton(logits, labels), ce_nb, atol=1e-6)
print("RMSNorm fwd/bwd, SwiGLU, RoPE, cross-entropy: ours == pelib.kernels")

# %%
assert torch.allclose(lora_linear(xq, Wq, Aq, Bq, 2.0), y_tl, **tol32)   # our tl.dot kernel
y_pelib = lora_linear_fused(xl, (packed_d, state), A, Bm, s)              # our QLoRA node
assert torch.allclose(y_pelib, y_nb, atol=1e-5, rtol=1e-5)
assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-5)
           for a, b in zip(torch.autograd.grad(y_pelib, (xl, A, Bm), dy), grads_nb))
print("LoRA: our fused tl.dot kernel and our QLoRA node == pelib.kernels.lora_linear")
print("pelib.kernels computes what this notebook built")

# %% [markdown]
# ## Exercises
#
# Each exercise asks for a kernel this notebook did not write. Replace the stub; the checker
# compares your answer with plain torch at small odd shapes (it runs in the interpreter in
# seconds: keep blocks large and grids small), and it rejects an answer that launches no
# `@triton.jit` kernel or calls the torch function it compares against. Solutions:
# `notebooks/solutions/nb09.py`.
#
# **Exercise 1: LayerNorm forward (a mean, then a variance).** BERT-style models (MiniLM of the
# earlier notebooks) normalise with LayerNorm, not RMSNorm: per row $x \in \mathbb{R}^H$,
#
# $$ \mu = \tfrac1H \textstyle\sum_j x_j,\qquad \sigma^2 = \tfrac1H \textstyle\sum_j (x_j - \mu)^2,
#    \qquad y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} \odot w + b . $$
#
# Write `layernorm(x, w, b, eps)` for x (rows, H) fp32 contiguous, one row per program as in
# section 3, with two reductions. Mind the padding: `BLOCK_H` is a power of two, the masked
# lanes load 0, and $0 - \mu$ is not 0. The checker uses H = 100, 33 and 1000 with rows whose
# mean is far from 0 (a kernel that lets the padding into $\sigma^2$ fails) and compares with
# `F.layer_norm`.

# %%
def layernorm(x, w, b, eps=1e-5):
    """x (rows, H), w (H,), b (H,) -> y (rows, H): one Triton program per row."""
    raise NotImplementedError

# %%
from checks import attempt
from checks.nb09 import exercise_1, exercise_2, exercise_3

attempt(exercise_1, layernorm)

# %% [markdown]
# **Exercise 2: GeGLU, SwiGLU's sibling.** T5 v1.1 and Gemma gate the MLP with GELU instead of
# SiLU, in its tanh approximation:
#
# $$ h = \mathrm{gelu}(g)\,u,\qquad \mathrm{gelu}(g) = \tfrac12\, g\,\big(1 + \tanh z\big),\quad
#    z = \sqrt{2/\pi}\,\big(g + 0.044715\, g^3\big). $$
#
# The interpreter has no `tanh` (it lives in `libdevice`): write it with `tl.exp` so that it
# cannot overflow for large $|z|$ (hint: $e^{-2|z|} \le 1$). Write `geglu(g, u)` for g, u of the
# same shape, fp32, contiguous. The checker compares with `F.gelu(g, approximate="tanh") * u` at
# values up to about $|g| = 12$.

# %%
def geglu(g, u):
    """g, u (..., M) -> h = gelu_tanh(g) * u: one elementwise Triton kernel."""
    raise NotImplementedError

# %%
attempt(exercise_2, geglu)

# %% [markdown]
# **Exercise 3: the SwiGLU backward kernel.** Section 4 wrote the forward $h = \mathrm{silu}(g)\,u$
# and stated its derivative. Write one elementwise Triton kernel and its launcher
# `swiglu_bwd(dh, g, u)` returning `(dg, du)`, with $\sigma = \sigma(g)$:
#
# $$ du = dh\,g\,\sigma, \qquad dg = dh\,u\,\sigma\,\big(1 + g\,(1 - \sigma)\big). $$
#
# It reads 3 and writes 2 tensors: 5 x 2 bytes per element in bf16, section 4's backward limit.
# dh, g, u: same shape, fp32, contiguous. The checker compares with torch autograd.

# %%
def swiglu_bwd(dh, g, u):
    """dh, g, u (..., M) -> (dg, du): one elementwise Triton kernel."""
    raise NotImplementedError

# %%
attempt(exercise_3, swiglu_bwd)
