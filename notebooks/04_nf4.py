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
# # 04 · NF4: sixteen numbers for a normal distribution
#
# QLoRA (Dettmers et al. 2023, [arXiv:2305.14314](https://arxiv.org/abs/2305.14314)) stores a
# frozen model in 4 bits a weight. Four bits name one of 16 values, so a 4-bit data type *is*
# a table of 16 numbers, the **code**. A weight $W_i$ in a block of weights is stored as the
# index of the nearest code value after dividing by the block's largest magnitude:
#
# $$q_i = \arg\min_k \left| \frac{W_i}{\mathrm{absmax}} - \mathrm{code}_k \right|, \qquad
#   \tilde W_i = \mathrm{code}_{q_i} \cdot \mathrm{absmax}.$$
#
# This notebook is about the table: where to put 16 numbers in $[-1, 1]$ so that the error is
# small for the values neural-network weights actually take. We build NF4 (NormalFloat) from
# the quantile function of $N(0, 1)$, bit-exact with bitsandbytes, and compare it with FP4,
# a uniform int4 grid and the MSE-optimal 16-level code (Lloyd-Max), which is the limit.
# Blocks, packing and the cost of the scales are notebook 05.

# %%
import logging
import math
import os

import matplotlib.pyplot as plt
import torch
from scipy.stats import norm

FAST = os.environ.get("PELIB_FAST") == "1"  # tiny sizes for CI
ROWS, COLS = (128, 1024) if FAST else (1024, 1024)  # the test weight: ROWS x COLS
BLOCKSIZE = 64
torch.manual_seed(0)
print(f"test weight {ROWS}x{COLS}, blocksize {BLOCKSIZE}, fast={FAST}")

# %% [markdown]
# ## 1. What the quantiser sees
#
# Pretrained weights are close to normal with mean 0. Blockwise absmax quantisation divides
# each block of 64 by its largest $|W_i|$, so the quantiser sees $x = W / \mathrm{absmax}$ in
# $[-1, 1]$: a normal distribution squeezed so that the block maximum lands on $\pm 1$.
# For 64 samples the maximum of $|N(0,1)|$ is about $2.6$ on average (measured below), so most
# of the mass sits well inside $[-0.5, 0.5]$. We use $N(0,1)$ weights and, as a stand-in for the
# heavier tails of real weights, a Student-t with 5 degrees of freedom. (The comparison on real SmolLM2 weights
# is in notebook 06: NF4 wins there too.)

# %%
def block_normalise(W, blocksize=BLOCKSIZE):
    """(n,) -> x (n_blocks, B) in [-1, 1] and absmax (n_blocks, 1)."""
    blocks = W.reshape(-1, blocksize)  # (n_blocks, B); our sizes divide evenly
    absmax = blocks.abs().amax(dim=1, keepdim=True)  # (n_blocks, 1)
    return blocks / absmax, absmax


W_normal = torch.randn(ROWS, COLS)
W_heavy = torch.distributions.StudentT(5.0).sample((ROWS, COLS))  # heavier tails
x_normal, absmax_normal = block_normalise(W_normal)
x_heavy, _ = block_normalise(W_heavy)
print(f"block max of |N(0,1)| over {BLOCKSIZE} samples: mean {absmax_normal.mean():.3f}, "
      f"median {absmax_normal.median():.3f} ({absmax_normal.numel():,} blocks)")
assert 2.5 < absmax_normal.mean() < 2.7

fig, ax = plt.subplots(figsize=(8, 3))
ax.hist(x_normal.flatten().numpy(), bins=200, density=True, alpha=0.6, label="N(0,1) / block absmax")
ax.hist(x_heavy.flatten().numpy(), bins=200, density=True, alpha=0.6, label="Student-t(5) / block absmax")
ax.set_xlabel("x = W / absmax")
ax.legend()
plt.show()

# %% [markdown]
# ## 2. Quantiles: each code value gets the same probability mass
#
# If every one of the 16 codes is used equally often, the 4-bit index carries the full 4 bits
# of information: that is the quantile quantiser. Cut $N(0,1)$ into bins of equal probability
# and put a level at a quantile of each bin, via the inverse CDF $\Phi^{-1}$
# (`scipy.stats.norm.ppf`):
#
# $$q_i = \Phi^{-1}(p_i).$$
#
# Two wrinkles. $\Phi^{-1}(0)$ and $\Phi^{-1}(1)$ are infinite, so the outermost probability must
# be pulled in, to an **offset** $p_{\max} < 1$. And the code must contain an exact **zero**
# (zero padding, and weights that are exactly zero, must come back as zero). A symmetric
# code with a zero has an odd number of levels; with 16 slots, NF4 spends the extra one on
# the positive side: **8 positive + 7 negative + zero**.
#
# * positive: $\Phi^{-1}$ of 9 evenly spaced probabilities from $p_{\max}$ down to $0.5$,
#   dropping $0.5$ itself (its quantile is the zero);
# * negative: the same with 8 points, negated;
# * zero; then sort and divide by the maximum so the code spans $[-1, 1]$.
#
# **The paper's own equation** (QLoRA, section 3) estimates $2^k$ levels from $2^k + 1$ quantiles
# of $N(0,1)$, each level the mean of two neighbouring quantiles:
#
# $$q_i = \tfrac12\left(Q_X\!\left(\tfrac{i}{2^k+1}\right) + Q_X\!\left(\tfrac{i+1}{2^k+1}\right)\right),
#   \qquad i = 0, \dots, 2^k - 1.$$
#
# Taken literally it cannot be evaluated: $Q_X(0) = -\infty$, and its probabilities stop at
# $16/17$, so it is not symmetric either. It also has no exact zero (16 levels symmetric about 0
# never include 0). The paper's text then describes the asymmetric 8 + 7 + zero construction
# above, and bitsandbytes' code implements that, with the offset below instead of bin means.
# (Exercise 2 evaluates a symmetric, finite version of the equation and compares.)

# %%
p_paper = torch.arange(17, dtype=torch.float64) / 17                # i / (2^k + 1), i = 0..16
print("Q_X at 0, 1/17, 16/17:", norm.ppf(p_paper[[0, 1, -1]].numpy()))

# %% [markdown]
# ### Where does $p_{\max} = 0.9677083$ come from?
#
# The QLoRA paper does not say; bitsandbytes has the constant. Its most plausible origin:
# with $m$ equal-mass bins, the centre of the last bin is at probability $1 - \frac{1}{2m}$.
# For $m = 15$ that is $0.966667$, for $m = 16$ it is $0.96875$, and their mean is
# $0.9677083$ to the seven digits given. We check it, and note what it means: the largest
# positive level sits at $\Phi^{-1}(0.9677) \approx 1.85\,\sigma$ before normalisation.

# %%
offset = 0.9677083
p15, p16 = 1 - 1 / (2 * 15), 1 - 1 / (2 * 16)
print(f"1 - 1/30 = {p15:.7f}, 1 - 1/32 = {p16:.7f}, mean = {(p15 + p16) / 2:.7f}, offset = {offset}")
assert abs((p15 + p16) / 2 - offset) < 5e-8
print(f"outer level before normalisation: Phi^-1(offset) = {norm.ppf(offset):.4f} sigma")

# %% [markdown]
# ### Building it, the way that is bit-exact
#
# To get the *same bits* as bitsandbytes, the arithmetic must match too: the probabilities
# are a **float32** `torch.linspace`, `norm.ppf` evaluates them in float64, the 16 values are
# rounded to float32, sorted, and divided by their max in float32.

# %%
p_pos = torch.linspace(offset, 0.5, 9)[:-1]  # (8,) float32 probabilities, 0.5 dropped
p_neg = torch.linspace(offset, 0.5, 8)[:-1]  # (7,)
v_pos = norm.ppf(p_pos.numpy())  # (8,) float64 quantiles of float32 inputs
v_neg = -norm.ppf(p_neg.numpy())  # (7,)
nf4 = torch.tensor([*v_pos, 0.0, *v_neg], dtype=torch.float32).sort().values  # (16,)
nf4 = nf4 / nf4.max()  # normalise to [-1, 1]
print(nf4)

# %%
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its CPU import logs a warning
import bitsandbytes.functional as bnbF  # noqa: E402  (the peer, for checking only)

nf4_bnb = bnbF.get_4bit_type("nf4", device="cpu")
assert torch.equal(nf4, nf4_bnb)
print("our NF4 == bitsandbytes NF4, bit for bit")

# %% [markdown]
# ### Two near misses
#
# *Float64 probabilities.* The same recipe with a float64 `linspace` moves some values by an
# **ulp** (unit in the last place: the gap between a float32 number and the next one, about
# $6 \cdot 10^{-8}$ near 1): close, but not the same bits (and then not the same rounding
# decisions).
#
# *A symmetric grid.* 7 + 7 + zero wastes a code (15 levels) and is not NF4 at all.

# %%
p64_pos = torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1].numpy()
p64_neg = torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1].numpy()
v64 = torch.tensor([*norm.ppf(p64_pos), 0.0, *(-norm.ppf(p64_neg))], dtype=torch.float64).sort().values
nf4_f64 = (v64 / v64.max()).float()
n_diff = int((nf4_f64 != nf4).sum())
print(f"float64 linspace: {n_diff} of 16 values differ, max |diff| = {(nf4_f64 - nf4).abs().max():.2e}")
assert n_diff > 0 and not torch.equal(nf4_f64, nf4_bnb)

sym = torch.tensor([*norm.ppf(p_neg.numpy()), 0.0, *(-norm.ppf(p_neg.numpy()))], dtype=torch.float32).sort().values
sym = sym / sym.max()  # (15,) levels: 7 + zero + 7
print(f"symmetric grid: {sym.numel()} levels, max |diff| to NF4 on the positive side "
      f"{(sym[-7:] - nf4[-8:-1]).abs().max():.3f}")
assert sym.numel() == 15

# %% [markdown]
# ## 3. The competitors
#
# **FP4** (bitsandbytes' E2M1 float): sign, 2 exponent bits, 1 mantissa bit. The table is
# indexed by bit pattern $s\,e_1 e_0\,m$, so a nibble decodes directly. A **binade** is the set
# of floats that share one exponent, $[2^e, 2^{e+1})$. bitsandbytes' exponent field counts
# *down* (field 1 is the largest binade) and its single subnormal is $2^{-4}$:
#
# $$|v| = \begin{cases} m \cdot 2^{-4} & e = 0 \\ (1 + m/2)\, 2^{4 - e} & e > 0\end{cases}
#   \in \{0, 0.0625, 2, 3, 4, 6, 8, 12\}, \quad \text{divided by } 12.$$
#
# Floats spend levels near zero (relative precision); a normal distribution wants them
# where the mass is.
#
# **int4 absmax**: the uniform grid $\{-7, \dots, 7\}/7$, i.e. `round(x * 7)`, 15 levels.
#
# **Lloyd-Max**: the 16 levels that minimise the mean squared error for our data. Alternate
# two optimality conditions until they agree: each value goes to its nearest level (cells
# bounded by midpoints), each level moves to the mean of its cell (centroid). It needs the
# data, has no exact zero and no exact $\pm 1$; it is the bound for any 16-level table. (Strictly,
# the iteration finds a fixed point, in general a local optimum; for a log-concave density such
# as the normal the fixed point is unique (Fleischer 1964).)

# %%
def fp4_magnitude(e, m):
    return m * 2.0**-4 if e == 0 else (1 + m / 2) * 2.0 ** (4 - e)


fp4 = []
for bits in range(16):  # bit pattern s e1 e0 m
    s, e, m = bits >> 3, (bits >> 1) & 3, bits & 1
    mag = fp4_magnitude(e, m)
    fp4.append(-mag if s and mag else mag)
fp4 = torch.tensor(fp4) / 12  # (16,) in bit-pattern order
assert torch.equal(fp4, bnbF.get_4bit_type("fp4", device="cpu"))
print("FP4 (bit-pattern order):", fp4)

int4 = torch.arange(-7, 8, dtype=torch.float32) / 7  # (15,)

# %% [markdown]
# The quantiser for any table: sort it, find each value's cell among the midpoints of
# neighbouring levels (`torch.bucketize`; a value exactly on a midpoint goes to the lower
# level), and map the sorted position back to the table index (only FP4 needs that).

# %%
def nearest(x, code):
    """Index into `code` of the nearest level to each x (ties go down)."""
    order = torch.argsort(code, stable=True)
    s = code[order]
    return order[torch.bucketize(x, (s[:-1] + s[1:]) / 2)]


def lloyd_max(x, code, iters=60):
    """Refine `code` to the MSE-optimal levels for the samples x (sorted result)."""
    code = code.clone()
    for _ in range(iters):
        q = nearest(x, code)  # assignment step
        sums = torch.zeros_like(code).index_add_(0, q, x)
        counts = torch.zeros_like(code).index_add_(0, q, torch.ones_like(x))
        code = torch.where(counts > 0, sums / counts.clamp(min=1), code).sort().values  # centroid step
    return code


lloyd = lloyd_max(x_normal.flatten(), nf4)  # fitted to the N(0,1) data
lloyd_heavy = lloyd_max(x_heavy.flatten(), nf4)  # and to the heavy-tailed data
print("Lloyd-Max levels for N(0,1):", lloyd)

# %% [markdown]
# ## 4. Error, SQNR, code usage
#
# On the $N(0,1)$ weight and blocksize 64 we measure the mean absolute error, the
# signal-to-quantisation-noise ratio $\mathrm{SQNR} = 10 \log_{10} \frac{\sum W^2}{\sum (W - \tilde W)^2}$
# dB, and how often each code is used.

# %%
def quantise_dequantise(W, code):
    x, absmax = block_normalise(W)  # (n_blocks, B), (n_blocks, 1)
    q = nearest(x.flatten(), code)  # (n,)
    W_hat = (code[q].view_as(x) * absmax).view_as(W)
    return q, W_hat


def metrics(W, W_hat):
    err = W_hat - W
    return err.abs().mean().item(), 10 * math.log10(W.square().sum() / err.square().sum())


codes = {"NF4": nf4, "FP4": fp4, "int4": int4, "Lloyd-Max": lloyd}
results = {}
for data_name, W in [("N(0,1)", W_normal), ("Student-t(5)", W_heavy)]:
    for name, code in codes.items():
        if name == "Lloyd-Max" and data_name != "N(0,1)":
            code = lloyd_heavy  # the limit is specific to the data
        q, W_hat = quantise_dequantise(W, code)
        results[data_name, name] = (*metrics(W, W_hat), torch.bincount(q, minlength=16)[:16])
print(f"{'weights':14s}{'code':11s}{'mean |err|':>11s}{'SQNR dB':>9s}")
for (data_name, name), (mae, sqnr, _) in results.items():
    print(f"{data_name:14s}{name:11s}{mae:11.4f}{sqnr:9.2f}")

# %%
fig, axes = plt.subplots(1, 4, figsize=(14, 3), sharey=True)
for ax, name in zip(axes, codes):
    counts = results["N(0,1)", name][2].float()
    code = codes[name]
    order = torch.argsort(code, stable=True)  # plot the levels from -1 to 1
    ax.bar(range(code.numel()), (counts[order] / counts.sum()).numpy())
    ax.axhline(1 / 16, color="k", lw=0.8, ls="--")
    ax.set_title(f"{name}: {results['N(0,1)', name][1]:.2f} dB")
    ax.set_xlabel("level (sorted)")
axes[0].set_ylabel("share of weights")
plt.show()
nf4_counts = results["N(0,1)", "NF4"][2].float()
inner = (nf4_counts / nf4_counts.sum())[1:-1]                       # the 14 levels between -1 and 1
print(f"NF4 inner levels on N(0,1) blocks: {100 * inner.min():.1f}% to {100 * inner.max():.1f}% "
      f"of the weights (equal use would be {100 / 16:.2f}%)")
assert inner.max() / inner.min() > 2                                # far from equal use

# %% [markdown]
# What the table and the figure say (the assertions in the next cell hold them to it):
#
# * NF4 has the lowest mean absolute error of the three fixed tables, and its SQNR is within
#   0.6 dB of Lloyd-Max, which is the limit for any 16-level code on this data.
# * Lloyd-Max wins on squared error but can lose on absolute error: it optimises the MSE.
# * NF4 does **not** use its levels equally (the dashed line is 1/16; the line under the figure
#   prints the range of its inner levels). The quantile argument assumes the quantiser sees
#   $N(0,1)$, but after absmax normalisation it sees $N(0,1)$ divided by each block's maximum,
#   a distribution squeezed toward 0 whose shape depends on the blocksize. Yoshida (2023, "NF4
#   isn't information theoretically optimal (and that's good)", arXiv:2306.06965) makes this
#   point and proposes a code chosen for the normalised values instead. The end levels $\pm 1$
#   are hit about once per block, by the block maximum itself.
# * FP4 spends two levels next to zero ($\pm 0.0625/12$, in the FP4 table printed above) and
#   leaves a gap up to $\pm 2/12$ where much of the mass is: the worst of the four.
# * The uniform int4 grid sits in between.
#
# On heavier tails every code loses SQNR (the block maximum is further out relative to the
# bulk, so the bulk falls on fewer levels); NF4 stays the best fixed table and close to the
# Lloyd-Max code fitted to that data.

# %%
mae_nf4, sqnr_nf4, _ = results["N(0,1)", "NF4"]
assert mae_nf4 < results["N(0,1)", "int4"][0] < results["N(0,1)", "FP4"][0]
assert sqnr_nf4 < results["N(0,1)", "Lloyd-Max"][1] < sqnr_nf4 + 0.6
if not FAST:  # the reference figures, on randn(1024, 1024) with blocksize 64
    assert abs(mae_nf4 - 0.0728) < 5e-4 and abs(sqnr_nf4 - 20.7) < 0.1

# %% [markdown]
# ## 5. Check against pelib (and bitsandbytes)
#
# `pelib.quant` builds the same tables (`create_normal_map`, `create_fp4_map`,
# `create_int4_map`) and quantises with the same nearest-level rule inside `quantize_4bit`
# (which also packs two codes a byte; notebook 05). They must agree with what we built here,
# and with bitsandbytes.

# %%
from pelib.quant import create_fp4_map, create_int4_map, create_normal_map, quantize_4bit, unpack_4bit  # noqa: E402

assert torch.equal(create_normal_map(), nf4) and torch.equal(create_normal_map(), nf4_bnb)
assert torch.equal(create_fp4_map(), fp4) and torch.equal(create_int4_map(), int4)
assert torch.equal(create_normal_map(use_extra_value=False).unique(), sym)  # symmetric: 0 twice

for name, quant_type in [("NF4", "nf4"), ("FP4", "fp4")]:
    packed, state = quantize_4bit(W_normal, BLOCKSIZE, quant_type, double_quant=False)
    q_ours, _ = quantise_dequantise(W_normal, codes[name])
    assert torch.equal(unpack_4bit(packed, W_normal.numel()).long(), q_ours)
    b_packed, _ = bnbF.quantize_4bit(W_normal, blocksize=BLOCKSIZE, quant_type=quant_type)
    assert torch.equal(packed, b_packed.reshape(-1))
print("pelib == this notebook == bitsandbytes")

# %% [markdown]
# ## Exercises
# Each stub raises `NotImplementedError` until you fill it in; the cell after it then checks
# your answer. A checker compares with an independent reference and fails if your answer just
# calls that reference. Solutions: `notebooks/solutions/nb04.py`.
#
# **Exercise 1 (warm-up): blockwise absmax quantisation, end to end.** Write
# `absmax_quantise(W, code, blocksize)` returning $\tilde W$ with $W$'s shape: cut the flattened
# $W$ into blocks of `blocksize` consecutive values, divide each block by its absmax, snap every
# value to the nearest entry of `code` (a (16,) table, not necessarily sorted: FP4 is in
# bit-pattern order), and multiply back:
#
# $$\tilde W_i = \mathrm{code}_{q_i} \cdot \mathrm{absmax}_{b(i)}, \qquad
#   q_i = \arg\min_k \left| W_i / \mathrm{absmax}_{b(i)} - \mathrm{code}_k \right|.$$
#
# This is section 4's `quantise_dequantise` with the code and blocksize as arguments. The
# checker compares with bitsandbytes' bytes (NF4 and FP4, several blocksizes) on a weight whose
# rows have very different scales; bitsandbytes' and pelib's quantisers are switched off while
# your function runs.

# %%
from checks import attempt
from checks.nb04 import exercise_1, exercise_2, exercise_3


def absmax_quantise(W, code, blocksize):
    raise NotImplementedError                                        # -> W_hat, W's shape


attempt(exercise_1, absmax_quantise)

# %% [markdown]
# **Exercise 2 (new): the paper's equation, made finite.** Evaluate the equation of
# section 2 on $2^k + 1$ evenly spaced probabilities from $1 - \delta$ to $\delta$ with
# $\delta = 0.9677083$ (instead of $i/(2^k+1)$, whose first quantile is $-\infty$): take the
# quantiles $Q_X(p_j)$, average neighbours to get $2^k$ levels, divide by the largest $|q_i|$,
# sort. Write `nf4_from_equation(k, offset)` returning a float64 tensor of $2^k$ levels. The
# checker compares with scipy for k = 2, 3, 4 and then reports how far the result is from
# bitsandbytes' NF4: how many levels differ, by how much, and what replaces the exact zero.

# %%
def nf4_from_equation(k, offset):
    raise NotImplementedError                                        # -> (2**k,) float64, sorted


attempt(exercise_2, nf4_from_equation)

# %% [markdown]
# **Exercise 3 (new): NF3 and NF2, and what a bit buys.** The NF4 construction works for any
# number of bits $k$: $2^{k-1}$ positive quantiles, $2^{k-1} - 1$ negative ones and a zero, from
# float32 probabilities spaced evenly from the offset down to $0.5$, then sorted and divided by
# the maximum. Two functions:
#
# * `nf_offset(k)`: the offset by the argument of section 2, generalised. With $2^k$ levels,
#   the bins that argument averages over are $m = 2^k - 1$ and $m = 2^k$:
#   $p_{\max} = \tfrac12\left[(1 - \tfrac{1}{2(2^k - 1)}) + (1 - \tfrac{1}{2 \cdot 2^k})\right]$.
#   For $k = 4$ it must give bitsandbytes' $0.9677083$ (to its seven digits).
# * `nf_code(k, offset)`: the sorted float32 table of $2^k$ levels in $[-1, 1]$.
#   `nf_code(4, 0.9677083)` must equal bitsandbytes' NF4 bit for bit.
#
# The checker compares both with its own construction for $k = 2, 3, 4, 5$ (bitsandbytes' and
# pelib's NF4 builders are switched off while yours run), then quantises a $N(0,1)$ weight in
# blocks of 64 with your NF2 ... NF5 and prints the SQNR of each. Before you run it, predict:
# the rule of thumb for a uniform quantiser is about 6 dB a bit. Which step breaks it, and why?
# (Hint: how many of NF2's four levels can a value that is not a block maximum use?)

# %%
def nf_offset(k):
    raise NotImplementedError                                        # -> float


def nf_code(k, offset):
    raise NotImplementedError                                        # -> (2**k,) float32, sorted


attempt(exercise_3, (nf_offset, nf_code))
