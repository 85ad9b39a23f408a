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
# # 05 · Blocks, bytes and double quantisation
#
# Notebook 04 chose the 16 values of NF4. Here we build the rest of QLoRA's storage format
# (Dettmers et al. 2023, [arXiv:2305.14314](https://arxiv.org/abs/2305.14314), section 3):
#
# 1. **blockwise absmax**: one scale per block of $B$ weights, so an outlier only hurts its block;
# 2. **packing**: two 4-bit indices a byte, and a fast way back to floats;
# 3. **double quantisation**: the scales themselves in 8 bits;
# 4. **the ledger**: bits per parameter counted from the bytes we actually store, and what
#    that means for whole models.
#
# Everything is checked against bitsandbytes' bytes, and at the end against `pelib.quant`.

# %%
import logging
import os
import time

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from scipy.stats import norm

FAST = os.environ.get("PELIB_FAST") == "1"  # tiny sizes for CI
ROWS, COLS = (256, 1024) if FAST else (4096, 4096)
torch.manual_seed(0)

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its CPU import logs a warning
import bitsandbytes.functional as bnbF  # noqa: E402  (the peer, for checking only)

# The NF4 code of notebook 04 (8 positive quantiles, 7 negative, zero; float32 arithmetic).
v_pos = norm.ppf(torch.linspace(0.9677083, 0.5, 9)[:-1].numpy())
v_neg = -norm.ppf(torch.linspace(0.9677083, 0.5, 8)[:-1].numpy())
code = torch.tensor([*v_pos, 0.0, *v_neg], dtype=torch.float32).sort().values
code = code / code.max()  # (16,) sorted
assert torch.equal(code, bnbF.get_4bit_type("nf4", device="cpu"))

# A weight with heavier tails than a normal (Student-t, 5 degrees of freedom), at a realistic
# scale. Odd shape on purpose: its size is not a multiple of any block size.
W = 0.02 * torch.distributions.StudentT(5.0).sample((ROWS + 3, COLS - 5))
print(f"W {tuple(W.shape)}: {W.numel():,} weights, fast={FAST}")

# %% [markdown]
# ## 1. Blockwise absmax
#
# Flatten $W$ into $n$ values and cut it into blocks of $B$. Each block $b$ gets its own
# scale $\mathrm{absmax}_b = \max_{i \in b} |W_i|$, and each value the nearest code level:
#
# $$q_i = \arg\min_k \left| W_i / \mathrm{absmax}_b - \mathrm{code}_k \right|, \qquad
#   \tilde W_i = \mathrm{code}_{q_i}\, \mathrm{absmax}_b .$$
#
# The nearest level is found among the midpoints of neighbouring levels (`torch.bucketize`;
# exactly on a midpoint goes to the lower level). A last partial block is padded with zeros,
# which never change its absmax. We multiply by the float32 reciprocal of the absmax rather
# than divide: that is what bitsandbytes does, and the bytes are then identical.

# %%
def quantize_blockwise(W, code, blocksize):
    """W (any shape) -> q (n,) int64 indices into the sorted code, absmax (n_blocks,) fp32."""
    flat = W.reshape(-1).float()  # (n,)
    blocks = F.pad(flat, (0, -flat.numel() % blocksize)).view(-1, blocksize)  # (n_blocks, B)
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    scaled = blocks * (1.0 / absmax.clamp(min=torch.finfo(torch.float32).tiny))[:, None]
    midpoints = (code[:-1] + code[1:]) / 2  # (len(code) - 1,)
    q = torch.bucketize(scaled.clamp(-1, 1).view(-1), midpoints)  # (n_blocks * B,)
    return q[: flat.numel()], absmax


def dequantize_blockwise(q, absmax, code, blocksize):
    """code[q] * absmax of q's block: (n,) fp32."""
    n = q.numel()
    values = F.pad(code[q], (0, -n % blocksize)).view(-1, blocksize)  # (n_blocks, B)
    return (values * absmax[:, None]).view(-1)[:n]


# Error against cost: a smaller block tracks the outliers better but stores more scales.
sizes = [32, 64, 128, 256, 1024, 4096, W.numel()]  # the last: one absmax for the whole tensor
errors, bits = [], []
for B in sizes:
    q, absmax = quantize_blockwise(W, code, B)
    errors.append((dequantize_blockwise(q, absmax, code, B) - W.reshape(-1)).abs().mean().item())
    bits.append(4 + 32 * absmax.numel() / W.numel())  # 4-bit index + fp32 scale per block
for B, e, b in zip(sizes, errors, bits):
    print(f"B = {B:>9}: mean |err| = {e:.3e}, {b:.3f} bits/param")

fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(bits, errors, "o-")
for B, e, b in zip(sizes, errors, bits):
    ax.annotate("tensor" if B == W.numel() else str(B), (b, e), textcoords="offset points", xytext=(4, 4))
ax.set_xlabel("bits per parameter (4 + 32/B)")
ax.set_ylabel("mean |W - W~|")
ax.set_title("NF4 on a heavy-tailed weight: block size trade-off")
plt.show()
assert errors[1] < errors[-1]  # blocks of 64 beat one scale per tensor

# %% [markdown]
# QLoRA uses $B = 64$: most of the gain, for $32/64 = 0.5$ extra bits per parameter.
# Section 3 wins most of that half bit back.
#
# ## 2. Two indices a byte
#
# A 4-bit index fits in a nibble. bitsandbytes puts the **even** element in the **high** nibble:
#
# $$\text{byte}_j = q_{2j} \ll 4 \;|\; q_{2j+1}.$$
#
# An odd count gets one padding nibble: the index of the level 0, which is what padding $W$
# with a zero would give.

# %%
def pack(q):
    """(n,) indices < 16 -> (ceil(n/2),) uint8."""
    q = q.to(torch.uint8)
    if q.numel() % 2:
        q = torch.cat([q, torch.bucketize(torch.zeros(1), (code[:-1] + code[1:]) / 2).to(torch.uint8)])
    return (q[0::2] << 4) | q[1::2]


def unpack(packed, n):
    """(ceil(n/2),) uint8 -> (n,) int64 indices."""
    return torch.stack([packed >> 4, packed & 0xF], dim=1).view(-1)[:n].long()


BLOCKSIZE = 64
q, absmax = quantize_blockwise(W, code, BLOCKSIZE)  # (n,), (n_blocks,)
packed = pack(q)  # (ceil(n/2),) uint8
print("first indices:", q[:6].tolist(), "-> bytes:", [f"0x{b:02x}" for b in packed[:3].tolist()])
assert torch.equal(unpack(packed, W.numel()), q)

# The same weight through bitsandbytes: same bytes, same scales.
b_packed, b_state = bnbF.quantize_4bit(W, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=False)
assert torch.equal(packed, b_packed.reshape(-1)) and torch.equal(absmax, b_state.absmax)
print(f"{packed.numel():,} bytes, identical to bitsandbytes'")

# %% [markdown]
# ### Back to floats, fast
#
# The plain way unpacks the nibbles, looks each one up, and scales. Every byte makes two
# lookups and the unpacked indices take a pass through memory of their own. A **256-entry
# table** does better: a byte has only 256 possible values, so precompute
# `lut[byte] = (code[byte >> 4], code[byte & 15])` once and gather both values with one lookup:
# `lut[packed]` is `(n/2, 2)`, which viewed flat is the weight in order. (`pelib` also works in
# chunks, so the int32 indices stay in cache; the one unavoidable pass is writing the output.)

# %%
def dequantize_naive(packed, absmax, n):
    return dequantize_blockwise(unpack(packed, n), absmax, code, BLOCKSIZE)


lut = code[torch.stack([torch.arange(256) >> 4, torch.arange(256) & 0xF], dim=1)]  # (256, 2)


def dequantize_lut(packed, absmax, n):
    values = lut[packed.long()].view(-1)  # (2 * n_bytes,): both nibbles of each byte, in order
    values = F.pad(values, (0, -values.numel() % BLOCKSIZE)).view(-1, BLOCKSIZE)  # (n_blocks, B)
    return values.mul_(absmax[:, None]).view(-1)[:n]


def median_ms(fn, repeats=5):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return sorted(times)[repeats // 2]


n = W.numel()
W_naive, W_lut = dequantize_naive(packed, absmax, n), dequantize_lut(packed, absmax, n)
assert torch.equal(W_naive, W_lut)
assert torch.equal(W_lut.view_as(W), bnbF.dequantize_4bit(b_packed, b_state))  # and bitsandbytes'
print(f"naive {median_ms(lambda: dequantize_naive(packed, absmax, n)):.1f} ms, "
      f"256-entry table {median_ms(lambda: dequantize_lut(packed, absmax, n)):.1f} ms, "
      f"bitsandbytes {median_ms(lambda: bnbF.dequantize_4bit(b_packed, b_state)):.1f} ms "
      f"(medians of 5 on a shared machine: indicative; `python -m pelib bench quant` measures properly)")

# %% [markdown]
# ## 3. Double quantisation
#
# The scales cost $32/B = 0.5$ bits per parameter at $B = 64$: an eighth of the 4 bits. QLoRA
# quantises them too, with an 8-bit code, in blocks of $B_2 = 256$ scales.
#
# Which 8-bit code? The QLoRA paper says *8-bit floats* for the constants; its code
# (bitsandbytes' `quantize_4bit(compress_statistics=True)`) uses the 8-bit **dynamic map**,
# and so do we, since the bytes are the point here. Both are floats in spirit: a sign, an
# exponent, a fraction. (Exercise 2 tries a true 8-bit float, FP8 E4M3, and compares.)
#
# The **dynamic map** (Dettmers 2016, [arXiv:1511.04561](https://arxiv.org/abs/1511.04561))
# spends its bits differently. After the sign bit, a run of $e$ zero bits sets a decimal
# exponent $10^{-e}$, a 1 bit ends the run, and the remaining $6 - e$ bits are a linear
# fraction: the centres of $2^{6-e}$ equal bins of $[0.1, 1]$. Small values get range, large
# ones precision. With 0 and 1.0 added: $127 + 127 + 2 = 256$ values.

# %%
levels = []
for i in range(7):  # scale 10^(i - 6) with 2^i fraction levels
    edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
    centres = (edges[:-1] + edges[1:]) / 2  # (2^i,)
    levels += [centres * 10.0 ** (i - 6), -centres * 10.0 ** (i - 6)]
code2 = torch.cat([*levels, torch.tensor([0.0, 1.0])]).sort().values  # (256,)
assert torch.equal(code2, bnbF.create_dynamic_map(signed=True))
print(f"{code2.numel()} values from {code2.min():.5f} to {code2.max():.1f}; smallest |value| > 0: "
      f"{code2[code2 > 0].min():.1e}")

# %% [markdown]
# The scales are all positive and cluster around their mean: a signed code would leave its
# negative half unused. So subtract the mean first,
#
# $$c = \overline{\mathrm{absmax}}, \qquad
#   (\mathrm{qabsmax}, \mathrm{absmax2}) = \mathrm{quantize\_blockwise}(\mathrm{absmax} - c,\ \mathrm{code2},\ 256),$$
#
# $$\mathrm{absmax}_b \approx \mathrm{code2}[\mathrm{qabsmax}_b]\cdot \mathrm{absmax2}_{\lfloor b/256 \rfloor} + c .$$

# %%
offset = absmax.mean()  # () fp32
qabsmax, absmax2 = quantize_blockwise(absmax - offset, code2, 256)  # (n_blocks,), (ceil(n_blocks/256),)
absmax_dq = dequantize_blockwise(qabsmax, absmax2, code2, 256) + offset  # (n_blocks,)

q_plain, a2_plain = quantize_blockwise(absmax, code2, 256)  # without the mean subtraction
absmax_plain = dequantize_blockwise(q_plain, a2_plain, code2, 256)
rel = lambda a: ((a - absmax).abs() / absmax).mean().item()  # noqa: E731
print(f"mean relative error of the scales: {rel(absmax_dq):.2e} centred, {rel(absmax_plain):.2e} not centred")
print(f"codes used: {qabsmax.unique().numel()} centred, {q_plain.unique().numel()} not centred")

W_dq = dequantize_blockwise(q, absmax_dq, code, BLOCKSIZE)
err, err_dq = (W_naive - W.reshape(-1)).abs().mean(), (W_dq - W.reshape(-1)).abs().mean()
print(f"weight mean |err|: {err:.4e} with fp32 scales, {err_dq:.4e} with 8-bit scales "
      f"(+{100 * (err_dq / err - 1):.2f}%)")

fig, ax = plt.subplots(figsize=(7, 3))
ax.hist(absmax.numpy(), bins=100, alpha=0.7, label="absmax (fp32)")
ax.axvline(offset.item(), color="k", ls="--", label="mean (offset)")
ax.set_xlabel("block absmax")
ax.legend()
plt.show()

# %% [markdown]
# bitsandbytes agrees on the offset and on `absmax2`, and on all but a few `qabsmax` bytes:
# its CPU kernel rounds the scales slightly differently from the nearest level (appendix A,
# which notebook 06 also relies on).

# %%
_, b_state_dq = bnbF.quantize_4bit(W, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True)
assert torch.equal(offset, b_state_dq.offset) and torch.equal(absmax2, b_state_dq.state2.absmax)
n_diff = int((qabsmax != b_state_dq.absmax.long()).sum())
print(f"qabsmax, nearest level: {n_diff} of {qabsmax.numel()} differ from bitsandbytes' CPU kernel")
assert n_diff <= 0.01 * qabsmax.numel()

# %% [markdown]
# ## 4. The ledger, from the bytes
#
# Count what is stored, not what the formula says. For $n$ weights:
#
# | stored | bits | NF4 | NF4 + DQ |
# |---|---|---|---|
# | packed indices | $4n$ | ✓ | ✓ |
# | absmax, fp32, one per $B$ | $32\,n/B$ | ✓ | |
# | qabsmax, uint8, one per $B$ | $8\,n/B$ | | ✓ |
# | absmax2, fp32, one per $B \cdot 256$ | $32\,n/(256 B)$ | | ✓ |
# | offset, fp32 | 32 | | ✓ |
#
# so $4 + 32/64 = 4.5$ bits without and $4 + 8/64 + 32/16384 \approx 4.127$ with double
# quantisation (plus $32/n$ for the offset). The two code tables are shared by the whole model.

# %%
def nbytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


qabsmax8 = qabsmax.to(torch.uint8)  # stored as bytes
ledger_plain = 8 * nbytes(packed, absmax) / W.numel()
ledger_dq = 8 * nbytes(packed, qabsmax8, absmax2, offset) / W.numel()
print(f"this weight: {ledger_plain:.4f} bits/param (fp32 scales), {ledger_dq:.4f} (double quantised)")

# On a shape that fills every block exactly, the ledger is the formula, to the last bit.
W_even = torch.randn(512, 512)  # 4096 blocks of 64, 16 blocks of 256 scales
q_e, a_e = quantize_blockwise(W_even, code, 64)
o_e = a_e.mean()
qa_e, a2_e = quantize_blockwise(a_e - o_e, code2, 256)
n_e = W_even.numel()
assert 8 * nbytes(pack(q_e), a_e) / n_e == 4 + 32 / 64 == 4.5
assert 8 * nbytes(pack(q_e), qa_e.to(torch.uint8), a2_e, o_e) / n_e == 4 + 8 / 64 + 32 / (64 * 256) + 32 / n_e
print(f"512x512: 4.5 and {4 + 8 / 64 + 32 / (64 * 256) + 32 / n_e:.6f} bits/param, exactly")

# %% [markdown]
# ### Whole models
#
# QLoRA quantises the linear layers of the decoder blocks; embeddings and the LM head stay in
# 16 bits. A Llama block has seven: $q$ $(H d, h)$, $k$ and $v$ $(H_{kv} d, h)$, $o$ $(h, H d)$,
# and the SwiGLU MLP's gate and up $(i, h)$ and down $(h, i)$. Each tensor is quantised on its
# own, so each has its own ragged last block and its own offset.

# %%
def linear_shapes(n_layers, hidden, intermediate, n_heads, n_kv_heads, head_dim):
    q_out, kv_out = n_heads * head_dim, n_kv_heads * head_dim
    layer = [(q_out, hidden), (kv_out, hidden), (kv_out, hidden), (hidden, q_out),
             (intermediate, hidden), (intermediate, hidden), (hidden, intermediate)]
    return layer * n_layers


def stored_bytes(n, blocksize=64, double_quant=True):
    blocks = -(-n // blocksize)
    if not double_quant:
        return -(-n // 2) + 4 * blocks
    return -(-n // 2) + blocks + 4 * -(-blocks // 256) + 4


models = {
    "SmolLM2-135M": dict(n_layers=30, hidden=576, intermediate=1536, n_heads=9, n_kv_heads=3, head_dim=64),
    "Llama-7B": dict(n_layers=32, hidden=4096, intermediate=11008, n_heads=32, n_kv_heads=32, head_dim=128),
}
totals = {}
print(f"{'model':14s}{'params':>15s}{'bf16 MB':>11s}{'NF4 MB':>10s}{'NF4+DQ MB':>11s}{'DQ saves MB':>13s}{'bits':>8s}")
for name, cfg in models.items():
    numels = [a * b for a, b in linear_shapes(**cfg)]
    p = sum(numels)
    nf4_b = sum(stored_bytes(k, double_quant=False) for k in numels)
    dq_b = sum(stored_bytes(k) for k in numels)
    totals[name] = dict(params=p, bf16=2 * p, nf4=nf4_b, nf4_dq=dq_b)
    print(f"{name:14s}{p:>15,}{2 * p / 1e6:>11.1f}{nf4_b / 1e6:>10.1f}{dq_b / 1e6:>11.1f}"
          f"{(nf4_b - dq_b) / 1e6:>13.1f}{8 * dq_b / p:>8.4f}")
saved_bits = 8 * (totals["Llama-7B"]["nf4"] - totals["Llama-7B"]["nf4_dq"]) / totals["Llama-7B"]["params"]
print(f"double quantisation saves {saved_bits:.3f} bits a parameter; at that rate a 65B model "
      f"saves {65e9 * saved_bits / 8 / 1e9:.1f} GB")

fig, axes = plt.subplots(1, 2, figsize=(10, 3))
for ax, (name, t) in zip(axes, totals.items()):
    ax.bar(["bf16", "NF4", "NF4+DQ"], [t["bf16"] / 1e6, t["nf4"] / 1e6, t["nf4_dq"] / 1e6])
    ax.set_title(f"{name}: linear layers")
    ax.set_ylabel("MB")
plt.show()

# %% [markdown]
# The lines above print what double quantisation saves, per parameter and for a whole model;
# for a 65B model it is the "about 3 GB" the QLoRA paper quotes.
#
# ## 5. Check against pelib (and bitsandbytes)
#
# `pelib.quant.quantize_4bit` packs, scales and double-quantises as we did here (the bytes
# equal ours and bitsandbytes'); `dequantize_4bit` is the chunked 256-entry-table path;
# `bits_per_param` and `model_ledger` are the ledger.

# %%
from pelib.quant import (  # noqa: E402
    LLAMA_7B,
    SMOLLM2_135M,
    bits_per_param,
    create_dynamic_map,
    dequantize_4bit,
    llama_linear_shapes,
    model_ledger,
    quantize_4bit,
)

p_packed, p_state = quantize_4bit(W, BLOCKSIZE, "nf4", double_quant=False)
assert torch.equal(p_packed, packed) and torch.equal(p_state.absmax, absmax)
assert torch.equal(dequantize_4bit(p_packed, p_state).reshape(-1), W_lut)
assert bits_per_param(p_packed, p_state) == ledger_plain

p_packed, p_state = quantize_4bit(W, BLOCKSIZE, "nf4", double_quant=True, dq_rounding="nearest")
assert torch.equal(p_packed, packed) and torch.equal(p_packed, b_packed.reshape(-1))
assert torch.equal(p_state.offset, offset) and torch.equal(p_state.absmax2, absmax2)
assert torch.equal(p_state.qabsmax.long(), qabsmax) and torch.equal(p_state.code2, code2)
assert torch.equal(create_dynamic_map(), code2)
assert torch.equal(dequantize_4bit(p_packed, p_state).reshape(-1), W_dq)
assert bits_per_param(p_packed, p_state) == ledger_dq

for name, cfg in [("SmolLM2-135M", SMOLLM2_135M), ("Llama-7B", LLAMA_7B)]:
    assert llama_linear_shapes(**cfg) == linear_shapes(**models[name])
    led = model_ledger(llama_linear_shapes(**cfg))
    t = totals[name]
    assert (led["params"], led["bf16_bytes"], led["nf4_bytes"], led["nf4_dq_bytes"]) == (
        t["params"], t["bf16"], t["nf4"], t["nf4_dq"])
print("pelib == this notebook == bitsandbytes (bytes, scales, offset, absmax2); ledger equal")


# %% [markdown]
# ## Appendix A. bitsandbytes' CPU rounding of the scales
#
# For `qabsmax` bitsandbytes' CPU kernel (0.50.2)
# does not search for the nearest code: it rounds the value into one of 65536 bins of
# $[-1, 1]$, $\mathrm{bin} = \lfloor \tfrac{v+1}{2} \cdot 65535 + \tfrac12 \rfloor$, and reads a
# table holding the code nearest each bin's centre. A value within a bin ($3\cdot10^{-5}$) of
# a midpoint can land one level off. The table is three lines, and with it the bytes agree.

# %%
centres = -1.0 + 2.0 * torch.arange(65536, dtype=torch.float32) / 65535  # (65536,) bin centres
table = torch.bucketize(centres, (code2[:-1] + code2[1:]) / 2)  # nearest code of each centre
x = F.pad(absmax - offset, (0, -absmax.numel() % 256)).view(-1, 256)  # (n_blocks2, 256)
v = (x * (1.0 / x.abs().amax(1, keepdim=True))).clamp(-1, 1)
qabsmax_bnb = table[(((v + 1) * 0.5) * 65535 + 0.5).long()].view(-1)[: absmax.numel()]
assert torch.equal(qabsmax_bnb, b_state_dq.absmax.long())
print("qabsmax through the 65536-bin table: identical to bitsandbytes'")
_, p_state_bnb = quantize_4bit(W, BLOCKSIZE, "nf4", double_quant=True)  # pelib: dq_rounding="bnb"
assert torch.equal(p_state_bnb.qabsmax.long(), qabsmax_bnb)
assert torch.equal(p_state_bnb.qabsmax, b_state_dq.absmax)
print("pelib's default dq_rounding='bnb': the same bytes as bitsandbytes'")


# %% [markdown]
# Which should a library store? The nearest level is what the equations say; the table is
# what the peer's bytes are. `pelib.quant.quantize_4bit(..., dq_rounding="bnb")` (the
# default) reproduces the table, so a model quantised by pelib and by bitsandbytes is the
# same model, byte for byte; `dq_rounding="nearest"` keeps the exact rule. The extra error of
# the table is at most one bin width on a constant, invisible in the weights' error.

# %% [markdown]
# ## Exercises
#
# Each checker compares your answer with an independent reference and prints what it verified;
# the library functions that would solve the task (pelib's and bitsandbytes' quantisers and
# ledger) are switched off while your answer runs. Solutions: `notebooks/solutions/nb05.py`.
#
# **1 (warm-up).** Decode double-quantised scales: given `qabsmax` (n_blocks,) uint8 indices into
# `code2`, `absmax2` (ceil(n_blocks/256),) and `offset`, return
# $\mathrm{absmax}_b = \mathrm{code2}[\mathrm{qabsmax}_b]\cdot\mathrm{absmax2}_{\lfloor b/256\rfloor} + c$
# (section 3's last equation).

# %%
from checks import attempt  # noqa: E402
from checks.nb05 import exercise_1, exercise_2, exercise_3  # noqa: E402


def decode_scales(qabsmax, absmax2, offset, code2):  # -> (n_blocks,) fp32
    raise NotImplementedError


attempt(exercise_1, decode_scales)

# %% [markdown]
# **2 (new): the constants in FP8, as the paper words it.** The QLoRA paper says the scales
# are quantised to *8-bit floats*; bitsandbytes uses the dynamic map. Try the paper's wording
# with PyTorch's `torch.float8_e4m3fn` (E4M3: sign, 4 exponent bits, 3 mantissa bits, largest
# finite value 448). Same layout as section 3: subtract the mean $c$ of the fp32 `absmax`, cut
# the centred values into blocks of 256 (zero-pad the last), and give each block the scale
# $s_j = \max_{i \in j} |x_i| / 448$ so that its largest value lands on 448. Store
# $q_i = \mathrm{fp8}(x_i / s_j)$ (the cast rounds to the nearest E4M3 value) and decode
#
# $$\widehat{\mathrm{absmax}}_i = q_i\, s_{\lfloor i/256 \rfloor} + c .$$
#
# Write `fp8_double_quant(absmax)` returning the decoded (n_blocks,) fp32 scales. It costs the
# same 8 bits a scale as the dynamic map. Predict first: E4M3 has 8 levels per binade at every
# magnitude; the dynamic map has 64 equal steps in $[0.1, 1]$ of its range, then fewer and
# finer steps below. The centred scales fill the range fairly evenly: which code do you expect
# to have the smaller error? The checker compares with its own E4M3 decoding and prints both
# codes' mean relative error on the scales of a heavy-tailed weight.

# %%
def fp8_double_quant(absmax):  # (n_blocks,) fp32 -> (n_blocks,) fp32, decoded
    raise NotImplementedError


attempt(exercise_2, fp8_double_quant)

# %% [markdown]
# **3 (new): what double quantisation buys is a smaller block.** Section 1's figure traded
# blocksize against bits with fp32 scales. With 8-bit scales the same bits buy a smaller block.
# Write `dq_tradeoff(W, blocksizes)` returning `{B: (bits_per_param, mean_abs_err)}` for NF4
# with double-quantised scales (section 3: offset, blocks of 256 scales, the nearest level of
# `code2`) at each blocksize $B$. Count the bits from the tensors you would store (packed
# bytes, uint8 `qabsmax`, fp32 `absmax2`, the fp32 offset) as in section 4, and the error from
# the weight you decode from them. The notebook's `quantize_blockwise`, `dequantize_blockwise`,
# `pack` and `nbytes` are all you need. The checker compares with pelib at $B = 32 \dots 256$
# and then answers the question: is NF4 + DQ at some $B < 64$ both smaller and more accurate
# than QLoRA's format without double quantisation at $B = 64$?

# %%
def dq_tradeoff(W, blocksizes):  # -> {B: (bits/param, mean |W - W~|)}
    raise NotImplementedError


attempt(exercise_3, dq_tradeoff)
