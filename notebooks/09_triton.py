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
# * **matmuls** (the projections): many FLOPs per byte; cuBLAS already runs them near the chip's
#   peak, about 790 TFLOP/s bf16 on an H200;
# * **everything between them**: dequantising the 4-bit weights, RMSNorm, RoPE, the SwiGLU gate,
#   the loss. A few FLOPs per byte: their time is set by **memory traffic**, about 4.3 TB/s.
#
# So for every kernel we count bytes read and written and FLOPs, and compute its speed limit:
#
# $$ t \;\ge\; \max\Big(\frac{\text{bytes moved}}{\text{bandwidth}},\; \frac{\text{FLOPs}}{\text{peak FLOP/s}}\Big). $$
#
# Each kernel below sits next to a plain-torch **reference** that defines what it must compute;
# we check them against each other at odd sizes. At the end the notebook imports `pelib.kernels`
# and asserts that the package computes what we built here.
#
# On a machine without a GPU, Triton runs kernels in its **interpreter** (numpy, one program at
# a time, about 3 ms each): correct, never fast. It must be switched on before `triton` is
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
HBM, PEAK = 4.3e12, 790e12                                    # H200: bytes/s, bf16 FLOP/s
torch.manual_seed(0)
print("device", DEVICE, "| triton", triton.__version__, "| interpreter" if INTERP else "")


def limit_us(nbytes, flops=0):
    """The H200 speed limit of a kernel, in microseconds."""
    return 1e6 * max(nbytes / HBM, flops / PEAK)


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
print(f"n = {n}: {12 * n / 1e6:.2f} MB moved -> {limit_us(12 * n):.2f} us at 4.3 TB/s")

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
    scale = code2[qabsmax.long()] * absmax2[torch.arange(qabsmax.numel()) // 256] + offset  # (n_blocks,)
    b = packed.reshape(-1)
    q = torch.stack((b >> 4, b & 0xF), dim=-1).reshape(-1)[:n]                          # high nibble first
    return (code[q.long()] * scale.repeat_interleave(64)[:n]).to(dtype).reshape(shape)


args = (packed, qs.absmax, qs.state2.absmax, qs.state2.code, qs.offset, qs.code, (rows, cols))
assert torch.equal(nf4_dequant_ref(*args, torch.float16), bnbF.dequantize_4bit(packed, qs).half())

# %% [markdown]
# **Kernel, version 1: one output per lane.** Element `i` reads byte `i // 2` and picks its
# nibble by parity. Each byte is loaded twice (the cache absorbs it) and each lane makes two
# table gathers. bitsandbytes computes `code2[q] * absmax2` and adds `offset` as two separately
# rounded fp32 operations; on a GPU the compiler would fuse them into one FMA (one rounding), so
# the launch passes `enable_fp_fusion=False` to stay bit-exact.
#
# Traffic per element: read 1/2 byte + 1/64 byte (the uint8 block index), write 2 bytes in
# fp16. A 4096 x 14336 MLP weight: 148 MB, **34 us** at 4.3 TB/s.

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

# %% [markdown]
# **Version 2 (pelib's)** works on bytes instead of outputs: each program loads `BLOCK` bytes
# once, looks up both nibbles, and interleaves them with `tl.join(even, odd)` reshaped to
# `(2 BLOCK,)`. Same bytes moved; half the loads and no parity arithmetic.
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
# bf16 and 8192 tokens, 134 MB, **31 us**. Eager torch runs ~6 separate elementwise/reduction
# kernels over fp32 copies.
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

# %% [markdown]
# One program per row costs a launch slot per row. pelib's kernel takes a tile of `BLOCK_R`
# rows per program and walks the rows in a grid-stride loop (a few programs per SM on a GPU,
# a handful in the interpreter); the backward accumulates each program's `dw` partial in
# registers and torch adds the few partial rows.
#
# ## 4. SwiGLU: an elementwise gate and its derivative
#
# $h = \mathrm{silu}(g)\,u$ with $\mathrm{silu}(g) = g\,\sigma(g)$. Backward:
# $du = dh\,\mathrm{silu}(g)$, $dg = dh\,u\,\sigma(g)\,(1 + g(1-\sigma(g)))$. It saves only $g$
# and $u$. Traffic in bf16 for 8192 tokens x 14336: forward 3 x 235 MB = 705 MB (**164 us**),
# backward 5 x 235 MB (**273 us**).

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
    swiglu_kernel[(triton.cdiv(g.numel(), 65536),)](g, u, h, g.numel(), BLOCK=65536)
    return h


gs, us = torch.randn(37, 1000, device=DEVICE), torch.randn(37, 1000, device=DEVICE)
h_nb = swiglu(gs, us)
assert torch.allclose(h_nb, torch.nn.functional.silu(gs) * us, atol=1e-6, rtol=1e-5)

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
# **281 us**.

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

# %% [markdown]
# ## 7. Fused LoRA: when *not* to write a Triton matmul
#
# $y = xW^\top + s\,(xA^\top)B^\top$. For an MLP projection with 8192 tokens, h = 4096,
# m = 14336 the $xW^\top$ product is $2 \cdot 8192 \cdot 4096 \cdot 14336 = 0.96$ TFLOP: 1.2 ms
# at 790 TFLOP/s, against about 0.1 ms to read W and x and write y. It is compute-bound, and cuBLAS is already at
# the peak. So pelib does what Unsloth does: torch matmuls, the LoRA term added **in place**
# into `y` (`addmm_`), and a manual backward that
#
# * saves only x, A, B and the **4-bit** weight (never the dequantised 16-bit W: 117 MB for
#   this projection, times every layer, kept alive between forward and backward);
# * dequantises W again in the backward with the Triton kernel (34 us, ~3% of the matmul);
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


r, s = 8, 2.0
xl = torch.randn(13, cols, requires_grad=True)
A = (0.01 * torch.randn(r, cols)).requires_grad_()
Bm = torch.randn(rows, r).requires_grad_()
saved = []
with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
    y_nb = LoRAQ.apply(xl, A, Bm, s, *args)
dy = torch.randn_like(y_nb)
grads_nb = torch.autograd.grad(y_nb, (xl, A, Bm), dy)

W_dq = nf4_dequant_ref(*args, torch.float32)                            # the reference: plain autograd
y_ref = xl @ W_dq.t() + s * (xl @ A.t()) @ Bm.t()
grads_ref = torch.autograd.grad(y_ref, (xl, A, Bm), dy)
assert torch.allclose(y_nb, y_ref, atol=1e-4, rtol=1e-4)
assert all(torch.allclose(a, b, atol=1e-4, rtol=1e-4) for a, b in zip(grads_nb, grads_ref))


def nbytes(ts):  # kB held by a list of tensors
    return sum(t.numel() * t.element_size() for t in ts) / 1e3


print(f"saved for backward: x, A, B {nbytes(saved[:3]):.0f} kB + the NF4 weight {nbytes(saved[3:]):.0f} kB; "
      f"a dense fp32 W would be {W_dq.numel() * 4 / 1e3:.0f} kB, bf16 {W_dq.numel() * 2 / 1e3:.0f} kB")
assert all(t.numel() != W_dq.numel() for t in saved)

# %% [markdown]
# ## 8. The package
#
# `pelib.kernels` holds the finished versions (one file per kernel, its `_ref` beside it,
# backward passes for all of them) and `pelib.patch.patch(model)` switches a transformers
# Llama model's RMSNorm, RoPE, SwiGLU and loss to them. `python -m pelib bench kernels` times
# them against torch eager and prints these limits; `bench/gpu.sh` runs the full sizes on one
# H200. Here we check that the package computes what we built.

# %%
import pelib.kernels as K
from pelib.kernels.cross_entropy_kernel import cross_entropy_triton
from pelib.kernels.lora import lora_linear_fused
from pelib.kernels.rmsnorm import rms_norm_triton
from pelib.kernels.rope import apply_rope_triton
from pelib.kernels.swiglu_kernel import swiglu_triton
from pelib.quant import QuantState, dequantize_4bit

state = QuantState.from_bnb(qs)        # bitsandbytes' scales in pelib's one QuantState (shared tensors)
with K.backend("triton"):               # pelib.quant's 4-bit op on the kernel (a GPU's default)
    for dt in (torch.float32, torch.float16):
        assert torch.equal(dequantize_4bit(packed, state, dt), nf4_dequant(*args, dt))
assert torch.equal(rms_norm_triton(xr, wr), rms_nb)
assert torch.allclose(swiglu_triton(gs, us), h_nb, atol=1e-6, rtol=1e-6)
k = torch.randn(B, 3, T, D, device=DEVICE)
q_pelib, _ = apply_rope_triton(q, k, cos, sin)
assert torch.allclose(q_pelib, q_nb, atol=1e-6)
assert torch.allclose(cross_entropy_triton(logits, labels), ce_nb, atol=1e-6)
y_pelib = lora_linear_fused(xl, (packed, state), A, Bm, s)
assert torch.allclose(y_pelib, y_nb, atol=1e-5, rtol=1e-5)
assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-5)
           for a, b in zip(torch.autograd.grad(y_pelib, (xl, A, Bm), dy), grads_nb))
print("pelib.kernels computes what this notebook built")

# %% [markdown]
# ## 9. Patching a LoRA and a QLoRA model
#
# `patch(model)` (pelib.patch) also reaches pelib's own adapters: every `pelib.lora.LoRALinear` whose base is
# an `nn.Linear` (dense W) or a `pelib.quant.Linear4bit` (NF4 + double quantisation) now runs
# through `lora_linear`, section 7's node with W dense or 4-bit. A merged layer, an active
# dropout or an unfrozen W keep the plain forward; `unpatch(model)` puts every forward back.
#
# The promise to check: the same loss and the same gradient for every trainable parameter (the
# LoRA A and B) with the kernels on and off. B starts at zero in LoRA, which would hide the
# LoRA path, so we randomise it first.

# %%
from transformers import LlamaConfig, LlamaForCausalLM

import pelib
from pelib.lora import lora_layers
from pelib.patch import patch, unpatch
from pelib.quant import Linear4bit

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_lora_llama(qlora):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=1003)
    model = pelib.apply_lora(LlamaForCausalLM._from_config(cfg, attn_implementation="eager"), PROJ, r=4)
    for _, m in lora_layers(model):
        torch.nn.init.normal_(m.lora_B.weight, std=0.05)
        if qlora:                                              # QLoRA: the frozen W in 4 bits
            m.base_layer = Linear4bit.from_linear(m.base_layer)
    return model.to(DEVICE)


def loss_and_grads(model, ids):
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


ids = torch.randint(0, 1003, (2, 17), device=DEVICE)
for qlora in (False, True):
    model = tiny_lora_llama(qlora)
    loss_off, g_off = loss_and_grads(model, ids)
    patch(model)
    loss_on, g_on = loss_and_grads(model, ids)
    unpatch(model)
    worst = max(((g_on[n] - g).abs().max() / g.abs().max()).item() for n, g in g_off.items())
    print(f"{'QLoRA' if qlora else 'LoRA'}: loss off {loss_off:.6f}, on {loss_on:.6f}; "
          f"{len(g_off)} LoRA gradients, worst max|on - off| / max|off| = {worst:.1e}")
    assert abs(loss_on - loss_off) < 1e-5 and worst < 1e-4
