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
# # 03 · LoRA: low-rank adaptation, from the equation to a trained model
#
# Hu et al. (2021, arXiv:2106.09685) freeze a pretrained weight $W \in \mathbb{R}^{d_{out}\times d_{in}}$
# and learn only a low-rank update:
#
# $$ y = x W^\top + b + \frac{\alpha}{r}\,(x A^\top) B^\top, \qquad A \in \mathbb{R}^{r\times d_{in}},\;
#    B \in \mathbb{R}^{d_{out}\times r},\; r \ll \min(d_{in}, d_{out}). $$
#
# * **Parameters**: $r(d_{in}+d_{out})$ instead of $d_{in} d_{out}$. For a 384 x 384 attention
#   matrix and r = 8 that is 6,144 instead of 147,456 (4.2%).
# * **Init**: $A$ random, $B = 0$. So $\Delta W = BA = 0$: the adapted model *is* the pretrained
#   model at step 0. The paper draws $A$ from a Gaussian; we use kaiming-uniform (as `nn.Linear`
#   initialises its weight), which is peft's default, so that our layer can equal peft's bit for
#   bit given the same seed. Either works: what matters is that $A$ is random (section 2 shows
#   why) and $B$ is zero.
# * **Scaling** $\alpha/r$: lets you change r without retuning the learning rate (roughly);
#   rsLoRA (Kalajdzievski, 2023) argues for $\alpha/\sqrt r$ instead. We test both below.
# * **Merge**: after training, $W' = W + \frac{\alpha}{r}BA$ is an ordinary matrix: zero
#   inference overhead.
#
# The hypothesis behind it: the change that fine-tuning makes to a weight has low "intrinsic rank".
# We look at that claim with a real fine-tune at the end.

# %%
import copy
import math
import os

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn

FAST = os.environ.get("PELIB_FAST") == "1"  # CI: tiny sizes
torch.manual_seed(0)
torch.set_num_threads(max(1, os.cpu_count() or 1))

# %% [markdown]
# ## 1. A LoRA layer in 20 lines

# %%
class LoRA(nn.Module):
    """y = base(x) + scaling * (x A^T) B^T, with base frozen. (peft and pelib can also apply
    dropout to x on the LoRA path, `lora_dropout`; this notebook uses none.)"""

    def __init__(self, base: nn.Linear, r: int, alpha: float, rslora: bool = False):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.r, self.scaling = r, alpha / (math.sqrt(r) if rslora else r)
        self.A = nn.Parameter(torch.empty(r, base.in_features))   # (r, d_in)
        self.B = nn.Parameter(torch.zeros(base.out_features, r))  # (d_out, r): zero!
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))          # as nn.Linear initialises
        self.merged = False

    def forward(self, x):                                         # x: (..., d_in)
        y = self.base(x)                                          # (..., d_out)
        if self.merged:
            return y
        return y + F.linear(F.linear(x, self.A), self.B) * self.scaling  # (..., r) -> (..., d_out)

    @torch.no_grad()
    def merge(self):
        self.base.weight += self.scaling * self.B @ self.A        # (d_out, d_in)
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        self.base.weight -= self.scaling * self.B @ self.A
        self.merged = False


base = nn.Linear(384, 384)
layer = LoRA(base, r=8, alpha=16)
x = torch.randn(4, 10, 384)                                       # (B, T, d_in)
print("trainable:", sum(p.numel() for p in layer.parameters() if p.requires_grad),
      "vs full:", base.weight.numel())
assert torch.equal(layer(x), base(x))                             # B = 0: the base model exactly

# %% [markdown]
# ## 2. Why B starts at zero, and where the first gradient goes
# With $h = xA^\top$ and upstream gradient $G = \partial L/\partial y$:
#
# $$ \frac{\partial L}{\partial B} = s\, G^\top h, \qquad \frac{\partial L}{\partial A} = s\,(G B)^\top x. $$
#
# At init $B = 0$, so $\partial L/\partial A = 0$: only $B$ moves on the first step, and it moves
# within the random subspace that $A$ spans. Had we set both to zero, neither would ever move;
# had we made both random, the model would no longer start from the pretrained function.

# %%
target = torch.randn(4, 10, 384)
loss = F.mse_loss(layer(x), target)
loss.backward()
print(f"|dL/dA| = {layer.A.grad.norm():.3e}   |dL/dB| = {layer.B.grad.norm():.3e}")
assert layer.A.grad.abs().max() == 0 and layer.B.grad.abs().max() > 0

# %% [markdown]
# ## 3. Rank versus parameters
# The trainable count grows linearly in r, while a full update is quadratic in the width.
# For MiniLM with LoRA on every attention and feed-forward linear (`query, key, value, dense`):

# %%
import pelib

minilm, tokenizer = pelib.load_backbone("minilm", num_labels=77)
targets = ["query", "key", "value", "dense"]
linears = [m for n, m in minilm.named_modules()
           if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in targets]
full_linear = sum(m.weight.numel() for m in linears)
ranks = [1, 2, 4, 8, 16, 32, 64, 128]
counts = [sum(r * (m.in_features + m.out_features) for m in linears) for r in ranks]
for r, c in zip(ranks, counts):
    print(f"r={r:>3}: {c:>9,} trainable = {100 * c / full_linear:5.2f}% of the targeted weights")
fig, ax = plt.subplots(figsize=(5, 3))
ax.loglog(ranks, counts, "o-", label="LoRA r(d_in + d_out)")
ax.axhline(full_linear, color="k", ls="--", label="full update of the same layers")
ax.set(xlabel="rank r", ylabel="trainable parameters", title=f"MiniLM, {len(linears)} linear layers")
ax.legend()
plt.show()

# %% [markdown]
# ## 4. alpha/r or alpha/sqrt(r)?
# How big is the change of the effective weight $\Delta W = s\,\Delta B\,A$ after the first
# optimizer step, as a function of r? Everyone trains LoRA with Adam, and Adam's first step moves
# every entry by exactly $\pm\eta$ ($m/\sqrt v = g/|g|$), whatever the gradient's size. So
# $\Delta B = -\eta\,\mathrm{sign}(\partial L/\partial B)$ and
#
# $$ \Delta W = -\eta\, s \sum_{k=1}^{r} \mathrm{sign}(\cdot)_{:,k}\, a_k^\top , $$
#
# a sum of r roughly independent rank-one terms, whose size grows like $\sqrt r$. With
# $s = \alpha/r$ the update shrinks like $1/\sqrt r$: larger ranks learn *slower* unless you raise
# the learning rate. With $s = \alpha/\sqrt r$ (rsLoRA) it stays about constant. We measure it
# with a real `torch.optim.Adam` step:

# %%
def first_step_update(r, rslora, lr=1e-3, d=384, seed=0):
    torch.manual_seed(seed)
    lay = LoRA(nn.Linear(d, d), r=r, alpha=16, rslora=rslora)
    opt = torch.optim.Adam([lay.A, lay.B], lr=lr)
    xb, tb = torch.randn(64, d), torch.randn(64, d)
    F.mse_loss(lay(xb), tb).backward()
    opt.step()
    with torch.no_grad():
        return (lay.scaling * lay.B @ lay.A).norm().item()       # ||Delta W||_F (B was 0)


rs = [1, 2, 4, 8, 16, 32, 64, 128]
plain = [first_step_update(r, False) for r in rs]
rs_lora = [first_step_update(r, True) for r in rs]
fig, ax = plt.subplots(figsize=(5, 3))
ax.loglog(rs, plain, "o-", label="alpha / r")
ax.loglog(rs, rs_lora, "s-", label="alpha / sqrt(r)  (rsLoRA)")
ax.set(xlabel="rank r", ylabel="||Delta W|| after one Adam step", title="update size vs rank")
ax.legend()
plt.show()
print("ratio r=128 / r=1:  alpha/r %.3f   alpha/sqrt(r) %.3f" % (plain[-1] / plain[0], rs_lora[-1] / rs_lora[0]))

# %% [markdown]
# (With plain SGD the picture differs: the step is proportional to the gradient, which itself
# carries a factor s, and neither scaling is constant. The argument above is the one that matters
# for Adam-trained LoRA.) pelib offers both: `apply_lora(..., use_rslora=True)`.

# %% [markdown]
# ## 5. Injecting LoRA into a real model
# Walk the model, replace each targeted `nn.Linear` by our `LoRA` wrapper, freeze everything else,
# keep the new classification head trainable (it starts random, so it must learn).

# %%
def inject_lora(model, targets, r, alpha):
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            parent = model.get_submodule(name.rpartition(".")[0])
            setattr(parent, name.rpartition(".")[2], LoRA(module, r, alpha))
    for p in model.classifier.parameters():
        p.requires_grad_(True)
    return model


base_state = copy.deepcopy(minilm.state_dict())
lora_model = inject_lora(minilm, targets, r=8, alpha=16)
n_train = sum(p.numel() for p in lora_model.parameters() if p.requires_grad)
n_all = sum(p.numel() for p in lora_model.parameters())
print(f"trainable {n_train:,} of {n_all:,} ({100 * n_train / n_all:.2f}%)")

# %% [markdown]
# ## 6. A short training run on Banking77
# With `pelib.train.train`, the loop notebook 01 wrote and checked (AdamW, 6% warmup then
# linear decay, length-grouped batches). In CI (`PELIB_FAST=1`) it sees a few hundred
# examples; run the notebook yourself for the larger setting. The same loop also fine-tunes a
# **full** copy of MiniLM, so that we can look at the update full fine-tuning makes.

# %%
from pelib.train import TrainConfig
from pelib.train import train as pelib_train

train = pelib.load_nlu("banking77", "train", limit=192 if FAST else 2000)
test = pelib.load_nlu("banking77", "test", limit=128 if FAST else 1000)
EPOCHS = 1 if FAST else 3
if FAST:
    print("TOY NUMBERS (FAST mode, tiny sizes): near-chance accuracy is expected here")
lora_run = pelib_train(lora_model, tokenizer, train, test, TrainConfig(epochs=EPOCHS, lr=2e-3, progress=False))
full_model, _ = pelib.load_backbone("minilm", num_labels=77)
full_run = pelib_train(full_model, tokenizer, train, test, TrainConfig(epochs=EPOCHS, lr=1e-4, progress=False))
print(f"LoRA r=8: accuracy {lora_run.metrics['accuracy']:.3f} in {lora_run.train_seconds:.1f}s | "
      f"full FT: accuracy {full_run.metrics['accuracy']:.3f} in {full_run.train_seconds:.1f}s")
fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(lora_run.losses, label="LoRA r=8, lr 2e-3")
ax.plot(full_run.losses, label="full fine-tuning, lr 1e-4")
ax.set(xlabel="step", ylabel="cross-entropy", title="training loss")
ax.legend()
plt.show()

# %% [markdown]
# With this little data and few steps the numbers are small and noisy: compare methods only in
# the full-size runs (section 9, `make run`, notebook 10). Note the two learning rates: LoRA
# trains its few numbers at a rate 20 times that of full fine-tuning.
#
# ## 7. Is the fine-tuning update low-rank?
# Take $\Delta W = W_{\text{after}} - W_{\text{before}}$ of one attention matrix from the **full**
# fine-tune and look at its singular values. We plot the cumulative share of
# $\|\Delta W\|_F^2 = \sum_i \sigma_i^2$ captured by the top k directions, next to a random
# Gaussian matrix of the same shape (no structure) and LoRA's own $\Delta W = sBA$ (rank <= 8 by
# construction).

# %%
def energy(M):
    s = torch.linalg.svdvals(M.double())
    return (s**2).cumsum(0) / (s**2).sum()


name = "bert.encoder.layer.0.attention.self.query"
dW_full = full_model.get_submodule(name).weight.detach() - base_state[name + ".weight"]
lq = lora_model.get_submodule(name)
dW_lora = (lq.scaling * lq.B @ lq.A).detach()
curves = {"full fine-tuning": energy(dW_full), "random matrix": energy(torch.randn_like(dW_full)),
          "LoRA r=8": energy(dW_lora)}
fig, ax = plt.subplots(figsize=(5.5, 3.2))
for label, c in curves.items():
    ax.plot(range(1, 65), c[:64], label=label)
ax.set(xlabel="top-k singular directions", ylabel="share of ||dW||^2", title=name.replace("bert.encoder.", ""))
ax.legend()
plt.show()
for label, c in curves.items():
    print(f"{label:<17} top-8 share {c[7]:.3f}   top-32 share {c[31]:.3f}")

# %% [markdown]
# Read the curve honestly: a short full fine-tune with Adam produces an update whose spectrum is
# more concentrated than noise, but it is not exactly rank 8. LoRA's bet is that the *useful* part
# of the update lives in a few directions, which the task scores (notebook 10) test directly.
#
# ## 8. Merging: zero inference overhead
# After `merge()` the forward pass is a single matmul per layer; the outputs agree to float
# rounding, and `unmerge()` restores the base weights.

# %%
probe = tokenizer(test.texts[:16], padding=True, truncation=True, max_length=64, return_tensors="pt")
lora_model.eval()
with torch.no_grad():
    before = lora_model(**probe).logits
    W_before = lq.base.weight.clone()
    for m in lora_model.modules():
        if isinstance(m, LoRA):
            m.merge()
    merged = lora_model(**probe).logits
    for m in lora_model.modules():
        if isinstance(m, LoRA):
            m.unmerge()
print(f"max |merged - unmerged| = {(merged - before).abs().max():.2e}, "
      f"max |W restored - W| = {(lq.base.weight - W_before).abs().max():.2e}")
assert (merged - before).abs().max() < 1e-5

# %% [markdown]
# ## 9. Rank ablation
# Does the rank matter? The full-size answer comes from the command line: the same recipe as
# LoRA r=8 in the results table (all 9,003 training rows, 3 epochs, alpha = 2r so the scaling
# stays 2, macro-F1 on the 3,080 test rows, three seeds where there are three), with only `--r`
# changed. `docs/tables/lora_rank.csv` keeps each rank's row with its command:

# %%
import csv

with open("../docs/tables/lora_rank.csv", newline="") as f:
    rank_rows = sorted(csv.DictReader(f), key=lambda row: int(row["method"].removeprefix("lora-r")))
for row in rank_rows:
    print(f"{row['label']:<10} test macro-F1 {float(row['test_f1_mean']):.4f} ± "
          f"{float(row['test_f1_sd']):.4f} (seeds: {row['seeds']})  {int(row['trainable']):>9,} "
          f"trainable   {row['command']}")
fig, ax = plt.subplots(figsize=(4.5, 3))
r_full = [int(row["method"].removeprefix("lora-r")) for row in rank_rows]
ax.errorbar(r_full, [float(row["test_f1_mean"]) for row in rank_rows],
            yerr=[float(row["test_f1_sd"]) for row in rank_rows], fmt="o-", capsize=4)
ax.set(xscale="log", xlabel="rank r (alpha = 2r)", ylabel="test macro-F1 (mean ± sd)",
       title="Banking77, 3 epochs, full data")
ax.set_xticks(r_full, [str(r) for r in r_full])
plt.show()

# %% [markdown]
# Read each difference against the spread of the seeds: two ranks whose means differ by less than
# about one standard deviation are level on this task and budget. The cell below puts every rank
# beside r=8, the recipe, in those units:

# %%
by_rank = {int(row["method"].removeprefix("lora-r")): row for row in rank_rows}
ref = by_rank[8]
for r, row in by_rank.items():
    if r == 8:
        continue
    diff = float(row["test_f1_mean"]) - float(ref["test_f1_mean"])
    sd = max(float(row["test_f1_sd"]), float(ref["test_f1_sd"]))  # the larger of the two spreads
    verdict = "level with r=8" if abs(diff) < sd else ("above r=8" if diff > 0 else "below r=8")
    print(f"r={r}: {diff:+.4f} against r=8 = {diff / sd:+.1f} sd, with "
          f"{int(row['trainable']) / int(ref['trainable']):.2f}x its trainable parameters: {verdict}")

# %% [markdown]
# What the rows show: the rank moves test F1 far less than it moves the adapter. A quarter of the
# rank, a quarter of LoRA's parameters, costs about as much F1 as one seed's spread (the cell above
# gives the difference in those units). The LoRA paper saw the same on GPT-3 (r=1 already close to
# r=64 on WikiSQL and MultiNLI): the update a task needs is of low intrinsic rank. Here the frozen
# features and the head already carry most of the accuracy (the floor of notebook 00), and the
# head, the same in every row, is a large share of r=2's total, so the total shrinks by less than
# the adapter (the ratio the cell prints, not 1/4). On a 135M-parameter LLM (notebook 10) the
# adapter dominates the trainable parameters, and the rank sets the bill.
#
# The cell below repeats the ablation at toy size (one epoch on the small training set of
# section 6, more ranks): it shows how to run one, and its numbers are too noisy to read a trend
# from.

# %%
ablation = {}
for r in ([1, 8] if FAST else [1, 2, 8, 32]):
    torch.manual_seed(0)
    m = inject_lora(pelib.load_backbone("minilm", num_labels=77)[0], targets, r=r, alpha=2 * r)
    run = pelib_train(m, tokenizer, train, test, TrainConfig(epochs=1, lr=2e-3, progress=False))
    ablation[r] = run.metrics["accuracy"]
    print(f"r={r:>2}: accuracy {ablation[r]:.3f}")
fig, ax = plt.subplots(figsize=(4.5, 3))
ax.semilogx(list(ablation), list(ablation.values()), "o-", base=2)
ax.set(xlabel="rank r (alpha = 2r)", ylabel="test accuracy", title="1 epoch, same data")
plt.show()

# %% [markdown]
# ## 10. Check: pelib's LoRA is the one we built
# `pelib.lora.LoRALinear` keeps peft's names (`lora_A`, `lora_B` as `nn.Linear`, `base_layer`) so
# its adapters load in peft. Given the same A and B, it must compute what our `LoRA` computes.

# %%
from pelib.lora import LoRALinear, merge, unmerge

ours = LoRA(nn.Linear(384, 200), r=4, alpha=8)
with torch.no_grad():
    ours.B.normal_()
theirs = LoRALinear(copy.deepcopy(ours.base), r=4, alpha=8)
with torch.no_grad():
    theirs.lora_A.weight.copy_(ours.A)
    theirs.lora_B.weight.copy_(ours.B)
x = torch.randn(3, 7, 384)
assert theirs.scaling == ours.scaling == 2.0
assert torch.allclose(theirs(x), ours(x), atol=1e-6, rtol=0)
assert torch.equal(LoRALinear(nn.Linear(384, 200), r=4).lora_B.weight, torch.zeros(200, 4))
assert LoRALinear(nn.Linear(384, 200), r=4, alpha=8, use_rslora=True).scaling == 8 / 2

model = pelib.apply_lora(pelib.load_backbone("minilm", num_labels=77)[0], targets, r=8, alpha=16)
assert pelib.trainable_parameters(model) == counts[ranks.index(8)] + 384 * 77 + 77  # + head
with torch.no_grad():
    for _, m in pelib.lora.lora_layers(model):
        m.lora_B.weight.normal_(std=0.01)
    model.eval()
    y0 = model(**probe).logits
    merge(model)
    y1 = model(**probe).logits
    unmerge(model)
assert (y0 - y1).abs().max() < 1e-5
print("pelib's LoRA equals the notebook's")

# %% [markdown]
# ## Exercises
# Each stub raises `NotImplementedError` until you fill it in; the cell after it then checks
# your answer against peft's layers on the same weights (with peft's own code for the task
# disabled while yours runs). Solutions: `notebooks/solutions/nb03.py`. Exercise 1 is a warm-up;
# exercises 2 and 3 build LoRA variants from the literature that this notebook did not show.
#
# **Exercise 1 (warm-up): merge, with either scaling.** Write `merged_weight(W, A, B, alpha, r,
# rslora)` returning $W' = W + s\,BA$ with $s = \alpha / r$, or $s = \alpha/\sqrt r$ when
# `rslora` (Kalajdzievski 2023, section 4). Shapes: W (d_out, d_in), A (r, d_in), B (d_out, r).
# The checker builds peft LoRA layers (`use_rslora` off and on, B random) and compares
# $xW'^\top + b$ with peft's output.

# %%
from checks import attempt
from checks.nb03 import exercise_1, exercise_2, exercise_3


def merged_weight(W, A, B, alpha, r, rslora):
    raise NotImplementedError                                        # -> (d_out, d_in)


attempt(exercise_1, merged_weight)

# %% [markdown]
# **Exercise 2 (new: DoRA's weight).** DoRA (Liu et al. 2024, arXiv:2402.09353) splits a
# weight into a magnitude and a direction, trains the magnitude $m$ directly and the direction
# through LoRA:
#
# $$ W' = m \odot \frac{V}{\lVert V \rVert_c}, \qquad V = W + s\,BA, $$
#
# where $\lVert\cdot\rVert_c$ is the norm of each column of the paper's $d_{in} \times d_{out}$
# weight, i.e. one norm per **output** unit. At init $m = \lVert W \rVert_c$ and $B = 0$, so
# $W' = W$. Write `dora_weight(W, A, B, magnitude, scaling)` with `magnitude` of shape (d_out,),
# in torch's (d_out, d_in) layout. The checker compares $xW'^\top + b$ with peft's
# `LoraConfig(use_dora=True)` layer after moving its magnitude and B away from their init.

# %%
def dora_weight(W, A, B, magnitude, scaling):
    raise NotImplementedError                                        # -> (d_out, d_in)


attempt(exercise_2, dora_weight)

# %% [markdown]
# **Exercise 3 (new: PiSSA, start from the principal part).** LoRA starts with $BA = 0$, so
# training begins from the pretrained function but with an adapter that knows nothing about $W$.
# PiSSA (Meng et al. 2024, arXiv:2404.02948) starts the adapter *at the most important part of
# $W$ itself*: with the SVD $W = U\,\mathrm{diag}(S)\,V^\top$, the adapter takes the top $r$
# singular directions and the frozen base keeps the rest,
#
# $$ s\,BA = U_{:r}\,\mathrm{diag}(S_{:r})\,V_{:r}^\top, \qquad W_{res} = W - s\,BA, $$
#
# so the layer still computes exactly $W$ at step 0, and the gradient now flows into the
# directions that carry most of $W$. Split the singular values evenly between the two factors,
# as the paper does (each gets a square root), and remember the scaling $s$ of section 4: the
# forward pass multiplies $BA$ by $s$, so the factors must hold $S_{:r} / s$ between them. Write
# `pissa_init(W, r, scaling)` returning `(A, B, W_res)` with A (r, d_in), B (d_out, r). The
# checker compares with peft's `init_lora_weights="pissa"` (which is disabled while your
# function runs): the residual, the product $sBA$, orthogonal rows of A, $\lVert a_k \rVert =
# \lVert b_k \rVert$, and the layer's output.

# %%
def pissa_init(W, r, scaling):
    raise NotImplementedError                                        # -> (A, B, W_res)


attempt(exercise_3, pissa_init)
