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
# # 07 · AdaLoRA: let the training decide where the rank goes
#
# LoRA gives every adapted matrix the same rank r. But not every matrix needs the same: Zhang et
# al. (ICLR 2023, arXiv:2303.10512) start every matrix at a larger rank and **prune** the least
# important directions while training, until the total rank meets a budget. To prune single
# directions they write the update in SVD form:
#
# $$ \Delta W = P\,\Lambda\,Q, \qquad P \in \mathbb{R}^{d_{out}\times r},\;
#    \Lambda = \mathrm{diag}(\lambda_1..\lambda_r),\; Q \in \mathbb{R}^{r\times d_{in}} $$
#
# $$ y = x W^\top + b + \frac{\alpha}{r_{init}}\; x\,(Q \odot \lambda)^\top P^\top $$
#
# Each **triplet** $(P_{:,i}, \lambda_i, Q_{i,:})$ is one rank-1 direction; pruning it means
# $\lambda_i \leftarrow 0$ (P and Q stay, so a pruned direction could come back). In code we keep
# peft's names: `lora_A` = Q, `lora_E` = λ (shape r x 1), `lora_B` = P.
#
# Three pieces, one section each: (1) why P and Q should be orthogonal, (2) an importance score
# per triplet, (3) a budget schedule. Then we train with all three and check pelib against them.

# %%
import copy
import os

import matplotlib.pyplot as plt
import torch
from torch import nn

FAST = os.environ.get("PELIB_FAST") == "1"  # CI: tiny sizes
torch.manual_seed(0)

# %% [markdown]
# ## 1. Why orthogonal P and Q
# If the columns of P and the rows of Q are orthonormal, $P\Lambda Q$ **is** an SVD: the
# singular values of ΔW are the $|\lambda_i|$, and dropping triplet i removes exactly
# $\lambda_i^2$ of $\|\Delta W\|_F^2$, whatever the other triplets are. With overlapping
# directions that fails even when every column and row has unit norm:
#
# $$ \|\Delta W\|_F^2 - \|\Delta W_{-i}\|_F^2 = \lambda_i^2 + 2\lambda_i \sum_{j \ne i}
#    \lambda_j\,(p_i^\top p_j)(q_i^\top q_j), $$
#
# so $|\lambda_i|$ no longer says how much triplet i matters, and the singular values of ΔW
# are not the $|\lambda_i|$.
#
# AdaLoRA therefore adds a regulariser to the loss. The paper (eq. 4) writes it with
# **squared** Frobenius norms, $\|P^\top P - I\|_F^2 + \|Q Q^\top - I\|_F^2$. peft's code, and
# so pelib and this notebook, use the **plain** norms, averaged over all the $P$ and $Q$ of the
# model and weighted by 0.5 (peft's `orth_reg_weight`):
#
# $$ R(P, Q) = \|P^\top P - I\|_F + \|Q Q^\top - I\|_F. $$
#
# Both vanish exactly at orthonormal factors. They differ in how hard they pull: the squared
# norm's gradient shrinks as the factors approach orthonormality, the plain norm's keeps a
# constant size (it is the gradient of a distance), so the plain norm pushes all the way.

# %%
d_out, d_in, r = 48, 40, 6
lam = torch.linspace(2.0, 0.2, r)  # (r,)


def energy_removed(P, lam, Q):
    """||ΔW||_F^2 - ||ΔW without triplet i||_F^2 for every i: (r,)."""
    full = torch.linalg.norm(P @ torch.diag(lam) @ Q) ** 2
    keep = [torch.arange(len(lam)) != i for i in range(len(lam))]
    return torch.stack([full - torch.linalg.norm(P[:, k] @ torch.diag(lam[k]) @ Q[k]) ** 2 for k in keep])


def R(P, Q):
    I = torch.eye(P.shape[1])
    return torch.linalg.norm(P.T @ P - I) + torch.linalg.norm(Q @ Q.T - I)


def unit(M, dim):
    return M / torch.linalg.norm(M, dim=dim, keepdim=True)


# Overlapping directions of unit norm: a shared component in every column of P and row of Q.
P_over = unit(torch.randn(d_out, r) + torch.randn(d_out, 1), dim=0)  # (48, 6), ||p_i|| = 1
Q_over = unit(torch.randn(r, d_in) + torch.randn(1, d_in), dim=1)    # (6, 40), ||q_i|| = 1
P_orth, Q_orth = torch.linalg.qr(P_over)[0], torch.linalg.qr(Q_over.T)[0].T  # P^T P = I, Q Q^T = I

# %% [markdown]
# Or let gradient descent on R alone find orthonormal factors, as training does:

# %%
P_gd, Q_gd = P_over.clone().requires_grad_(), Q_over.clone().requires_grad_()
opt = torch.optim.Adam([P_gd, Q_gd], lr=1e-2)
reg_curve = []
for _ in range(300):
    loss = R(P_gd, Q_gd)
    reg_curve.append(loss.item())
    opt.zero_grad()
    loss.backward()
    opt.step()
P_gd, Q_gd = P_gd.detach(), Q_gd.detach()

fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
for (P, Q), label in [((P_over, Q_over), "overlapping, unit norm"), ((P_orth, Q_orth), "orthonormal (QR)"),
                      ((P_gd, Q_gd), "after minimising R")]:
    axes[0].plot(lam**2, energy_removed(P, lam, Q), "o-", label=label)
    sv = torch.linalg.svdvals(P @ torch.diag(lam) @ Q)[:r]
    print(f"{label:<24} R = {R(P, Q):.3f}   singular values of ΔW: {[round(v, 2) for v in sv.tolist()]}")
print(f"{'':<24} |λ|:                      {[round(v, 2) for v in lam.tolist()]}")
axes[0].plot(lam**2, lam**2, "k--", lw=1, label="λ_i² (ideal)")
axes[0].set(xlabel="λ_i²", ylabel="||ΔW||² − ||ΔW_{-i}||²", title="what removing triplet i takes away")
axes[0].legend(fontsize=8)
axes[1].semilogy(reg_curve)
axes[1].set(xlabel="Adam step", ylabel="R(P, Q)", title="the regulariser alone drives P, Q orthonormal")
plt.tight_layout()
plt.show()
assert torch.allclose(energy_removed(P_orth, lam, Q_orth), lam**2, atol=1e-4)
assert torch.allclose(torch.linalg.svdvals(P_orth @ torch.diag(lam) @ Q_orth)[:r], lam, atol=1e-5)
assert not torch.allclose(energy_removed(P_over, lam, Q_over), lam**2, atol=0.1)  # overlap: not λ²

# %% [markdown]
# ## 2. The layer
# peft's initialisation: λ = 0 (so ΔW = 0 and the model starts as the pretrained one), P and Q
# drawn from a normal with standard deviation 0.02. The scale is α / r_init and stays fixed
# while triplets are pruned (peft keeps `ranknum` = r_init), so pruning never rescales the
# triplets that remain.

# %%
class SVDLayer(nn.Module):
    def __init__(self, base_layer: nn.Linear, r: int, alpha: float):
        super().__init__()
        self.base_layer, self.r, self.scaling = base_layer, r, alpha
        self.lora_A = nn.Parameter(torch.randn(r, base_layer.in_features) * 0.02)  # Q (r, in)
        self.lora_E = nn.Parameter(torch.zeros(r, 1))                              # λ (r, 1)
        self.lora_B = nn.Parameter(torch.randn(base_layer.out_features, r) * 0.02)  # P (out, r)
        self.register_buffer("ranknum", torch.tensor([float(r)]), persistent=False)

    def forward(self, x):  # x (..., in) -> (..., out)
        return self.base_layer(x) + (x @ (self.lora_A * self.lora_E).T @ self.lora_B.T) \
            * self.scaling / (self.ranknum + 1e-5)


def inject(model, targets, r, alpha):
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            parent = model.get_submodule(name.rpartition(".")[0])
            setattr(parent, name.rpartition(".")[2], SVDLayer(module, r, alpha))
    for p in model.classifier.parameters():
        p.requires_grad_(True)
    return model


def svd_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, SVDLayer)}


def orth_reg(model):  # mean over all P and Q, as peft's AdaLoraModel.forward
    terms = []
    for m in svd_modules(model).values():
        for G in (m.lora_A @ m.lora_A.T, m.lora_B.T @ m.lora_B):  # (r, r)
            terms.append(torch.norm(G - torch.eye(G.shape[0]), p="fro"))
    return sum(terms) / len(terms)


layer = SVDLayer(nn.Linear(d_in, d_out), r=4, alpha=8)
x = torch.randn(3, d_in)
assert torch.equal(layer(x), layer.base_layer(x))  # λ = 0 at the start

# %% [markdown]
# ## 3. Which triplets matter: sensitivity, smoothed, with its uncertainty
# The sensitivity of a single weight is the first-order loss change if it were set to zero,
# $I(w) = |w\,\nabla_w L|$. It is noisy from batch to batch, so AdaLoRA smooths it and also
# tracks how much it fluctuates (eq. 9-11 of the paper), after each optimizer step t:
#
# $$ \bar I^{(t)} = \beta_1 \bar I^{(t-1)} + (1-\beta_1) I^{(t)}, \qquad
#    \bar U^{(t)} = \beta_2 \bar U^{(t-1)} + (1-\beta_2) |I^{(t)} - \bar I^{(t)}|, \qquad
#    s(w) = \bar I^{(t)} \bar U^{(t)} $$
#
# A triplet's score adds its λ's score to the mean score of its P column and of its Q row:
#
# $$ S_i = s(\lambda_i) + \frac{1}{d_{out}}\sum_j s(P_{ji}) + \frac{1}{d_{in}}\sum_j s(Q_{ij}). $$
#
# ## 4. The budget: how many triplets survive at step t
# With $b^{(0)} = L\,r_{init}$ triplets over the L adapted matrices and a target
# $b^{(T)} = L\,r_{target}$: full rank for $t_{init}$ steps, a cubic decrease, then the final
# $t_{final}$ steps train the final pattern. Every ΔT steps the lowest-scoring triplets (over all
# matrices together, which is what lets one matrix keep more than another) get λ = 0.
#
# $$ b^{(t)} = \begin{cases} b^{(0)} & t \le t_{init} \\
#   b^{(T)} + (b^{(0)} - b^{(T)}) \left(1 - \frac{t - t_{init}}{T - t_{final} - t_{init}}\right)^3
#   & t_{init} < t \le T - t_{final} \\ b^{(T)} & \text{after} \end{cases} $$

# %%
def budget(t, init_bgt, target_bgt, tinit, tfinal, T):
    """Triplets kept after step t (1-based) of T: full, cubic decrease, then the target."""
    if t <= tinit:
        return init_bgt
    if t > T - tfinal:
        return target_bgt
    c = 1 - (t - tinit) / (T - tfinal - tinit)
    return int((init_bgt - target_bgt) * c**3 + target_bgt)


# MiniLM: 6 layers x 6 adapted matrices (query, key, value, attention output, intermediate,
# output); the classifier pools by the mean, so there is no pooler to adapt. Section 5 counts.
L_MINILM = 6 * 6
# An illustration: 3 epochs of Banking77 at batch 32 (846 steps), t_init 10%, t_final 30%.
sched = dict(init_bgt=L_MINILM * 12, target_bgt=L_MINILM * 8, tinit=85, tfinal=254, T=846)  # r 12 -> 8
steps = range(1, sched["T"] + 1)
fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(steps, [budget(t, **sched) for t in steps])
ax.axvspan(0, sched["tinit"], alpha=0.15, label="t_init: full rank")
ax.axvspan(sched["T"] - sched["tfinal"], sched["T"], alpha=0.15, color="C2", label="t_final: fixed pattern")
ax.set(xlabel="step", ylabel="triplets kept", title=f"cubic budget, MiniLM {L_MINILM} matrices, r 12 -> 8")
ax.legend()
plt.show()

# %% [markdown]
# The scores, as exponential moving averages kept per parameter tensor, then summed per triplet:

# %%
class Importance:
    def __init__(self, model, beta1=0.85, beta2=0.85):
        self.mods, self.beta1, self.beta2 = svd_modules(model), beta1, beta2
        self.Ibar, self.Ubar = {}, {}

    @torch.no_grad()
    def update_scores(self):  # after optimizer.step(), while the gradients are still there
        for name, m in self.mods.items():
            for k in ("lora_A", "lora_E", "lora_B"):
                p, key = getattr(m, k), (name, k)
                I = (p * p.grad).abs()  # sensitivity |w ∇w|, shape of p
                Ibar = self.beta1 * self.Ibar.get(key, torch.zeros_like(p)) + (1 - self.beta1) * I
                self.Ubar[key] = self.beta2 * self.Ubar.get(key, torch.zeros_like(p)) \
                    + (1 - self.beta2) * (I - Ibar).abs()
                self.Ibar[key] = Ibar

    def triplet_scores(self):  # {module: (r,)}
        s = {key: self.Ibar[key] * self.Ubar[key] for key in self.Ibar}
        return {n: s[n, "lora_E"].view(-1) + (s[n, "lora_A"].mean(1) + s[n, "lora_B"].mean(0))
                for n in self.mods}


# %% [markdown]
# The allocator is a hook of pelib's training loop (a subclass of `pelib.hooks.Hook`, whose
# events are named, so a misspelt one is an error): `loss` adds the regulariser, `begin`
# learns the run's length T, `step` (after `optimizer.step()`, before `zero_grad()`) scores
# and, every ΔT steps, keeps the top `budget(t)` triplets over all matrices.

# %%
from pelib.hooks import Hook  # noqa: E402  (the loop's event names)


class Allocator(Importance, Hook):
    def __init__(self, model, target_r, tinit, tfinal, deltaT, w=0.5):
        super().__init__(model)
        self.init_bgt = sum(m.r for m in self.mods.values())
        self.target_bgt = target_r * len(self.mods)
        self.tinit, self.tfinal, self.deltaT, self.w = tinit, tfinal, deltaT, w
        self.pattern, self.budgets = None, []

    def loss(self, model, loss):
        return loss + self.w * orth_reg(model)

    def begin(self, model, optimizer, total_steps):
        self.T = total_steps

    @torch.no_grad()
    def mask(self, b):
        S = self.triplet_scores()
        threshold = torch.kthvalue(torch.cat(list(S.values())), self.init_bgt - b).values
        self.pattern = {n: S[n] > threshold for n in self.mods}  # keep the top b
        self.apply()

    @torch.no_grad()
    def apply(self):
        for n, m in self.mods.items():
            m.lora_E.masked_fill_(~self.pattern[n].unsqueeze(-1), 0.0)

    def step(self, model, t):
        b = budget(t, self.init_bgt, self.target_bgt, self.tinit, self.tfinal, self.T)
        end = self.T - self.tfinal
        if t < end:
            self.update_scores()
            if t > self.tinit and t % self.deltaT == 0:
                self.mask(b)
        elif t == end:  # the final allocation, then fixed
            self.mask(b)
            self.Ibar, self.Ubar = {}, {}
        else:  # the optimizer moves a zeroed λ again: re-apply the final pattern
            self.apply()
        self.budgets.append(b)

# %% [markdown]
# ## 5. Training with AdaLoRA
# MiniLM on Banking77 (a tiny random BERT under `PELIB_FAST=1`). Every `nn.Linear` of the
# encoder gets an SVD adapter; `pelib.train.train` calls the allocator's hooks at each step.
# Forgetting the allocator's step is the classic way to train plain LoRA by accident with peft
# (two reports on peft's GitHub: [1801](https://github.com/huggingface/peft/issues/1801),
# [1327](https://github.com/huggingface/peft/issues/1327)); here the budget curve shows it ran.

# %%
import pelib

if FAST:
    backbone, tokenizer = pelib.tiny_backbone("minilm", 77)
    N_TRAIN, BS, EPOCHS, R_INIT, R_TARGET, TINIT, TFINAL, DT = 128, 16, 3, 4, 2, 3, 6, 2
else:
    torch.manual_seed(0)
    backbone, tokenizer = pelib.load_backbone("minilm", num_labels=77)
    N_TRAIN, BS, EPOCHS, R_INIT, R_TARGET, TINIT, TFINAL, DT = 1500, 32, 2, 12, 8, 10, 25, 5
for m in backbone.modules():  # no dropout: the pelib check at the end replays the same run
    if isinstance(m, nn.Dropout):
        m.p = 0.0
base_copy = copy.deepcopy(backbone)
train = pelib.load_nlu("banking77", "train", limit=N_TRAIN)
test = pelib.load_nlu("banking77", "test", limit=128 if FAST else 500)
targets = ["query", "key", "value", "dense"]
model = inject(backbone, targets, r=R_INIT, alpha=2 * R_INIT)
adapted = list(svd_modules(model))
print(f"{len(adapted)} adapted matrices in {backbone.config.num_hidden_layers} layers; "
      f"pooler among them: {any('pooler' in n for n in adapted)}")
assert len(adapted) == 6 * backbone.config.num_hidden_layers  # six per layer, nothing else
if not FAST:
    assert len(adapted) == L_MINILM  # the count section 4's schedule used
init_state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
CFG = pelib.train.TrainConfig(epochs=EPOCHS, lr=5e-3 if FAST else 2e-3, batch_size=BS,
                              max_length=64, progress=False)
T = pelib.train.total_steps(N_TRAIN, CFG)

# %%
alloc = Allocator(model, R_TARGET, TINIT, TFINAL, DT)
run = pelib.train.train(model, tokenizer, train, test, CFG, hooks=[alloc])
losses = run.losses  # cross-entropy + 0.5 R, per step
final_ranks = {n: int(v.sum()) for n, v in alloc.pattern.items()}
if FAST:
    print("TOY NUMBERS (PELIB_FAST=1: a tiny random BERT): the accuracy is near chance")
print(f"{T} steps; budget {alloc.budgets[0]} -> {alloc.budgets[-1]} triplets; "
      f"test accuracy ({len(test.texts)} rows) {run.metrics['accuracy']:.3f}")

# %% [markdown]
# ## 6. Where did the rank go?
# Left: the budget the allocator enforced at each step, and the loss. Right: the final number
# of triplets per matrix, by layer and by kind of matrix.

# %%
kinds = ["attention.self.query", "attention.self.key", "attention.self.value",
         "attention.output.dense", "intermediate.dense", "output.dense"]
n_layers = backbone.config.num_hidden_layers
grid = torch.zeros(n_layers, len(kinds))
for name, k in final_ranks.items():
    if ".layer." in name:
        i, kind = name.split(".layer.")[1].split(".", 1)
        grid[int(i), kinds.index(kind)] = k
fig, axes = plt.subplots(1, 3, figsize=(14, 3.4))
axes[0].plot(range(1, T + 1), alloc.budgets)
axes[0].set(xlabel="step", ylabel="triplets kept", title="budget during training")
axes[1].plot(losses)
axes[1].set(xlabel="step", ylabel="cross-entropy + 0.5 R", title="training loss")
im = axes[2].imshow(grid, cmap="viridis", vmin=0, vmax=R_INIT)
axes[2].set(xticks=range(len(kinds)), xticklabels=[k.replace("attention.", "att.") for k in kinds],
            ylabel="layer", title=f"final rank per matrix (init {R_INIT}, mean {R_TARGET})")
axes[2].tick_params(axis="x", rotation=35)
plt.colorbar(im, ax=axes[2])
plt.tight_layout()
plt.show()
assert sum(final_ranks.values()) == alloc.target_bgt  # the budget is met exactly

# %% [markdown]
# With the tiny random model (CI) the pattern is noise. On the real MiniLM run (`PELIB_FAST`
# unset) look for which kinds of matrix keep more than the mean; the paper found the feed-forward
# matrices and the top layers to receive more rank on GLUE. One short run on a subset is not
# evidence for such a claim, nor is its accuracy a result. The full run (3 epochs of all of
# Banking77, several seeds) is on the results page; the cell below reads its row and LoRA's.

# %%
import csv  # noqa: E402

with open("../docs/tables/banking77_minilm.csv") as f:
    table = {row["method"]: row for row in csv.DictReader(f)}
for key in ("lora", "adalora"):
    row = table[key]
    print(f"{row['label']:18s} test macro-F1 {float(row['test_f1_mean']):.4f} ± {float(row['test_f1_sd']):.4f} "
          f"({row['seeds']} seeds, {int(row['trainable']):,} trainable)  {row['command']}")

# %% [markdown]
#
# ## 7. Check: pelib's AdaLoRA is the one we built
# `pelib.adalora` has the same layer (`SVDLinear`, peft's names) and the allocator as a
# `pelib.train` hook (`RankAllocator`: `loss` adds the regulariser, `step` updates scores and
# masks). Replaying the same run from the same weights must give the same budgets, the same
# rank pattern and the same λ. (`tests/test_adalora.py` checks pelib against peft's
# `RankAllocator` step by step, bitwise.)

# %%
from pelib.adalora import RankAllocator, apply_adalora, svd_layers

ours = apply_adalora(base_copy, targets, init_r=R_INIT, alpha=2 * R_INIT)
with torch.no_grad():
    for n, p in ours.named_parameters():
        if p.requires_grad:
            p.copy_(init_state[n])
hook = RankAllocator(ours, target_r=R_TARGET, tinit=TINIT, tfinal=TFINAL, deltaT=DT)
pelib_run = pelib.train.train(ours, tokenizer, train, test, CFG, hooks=[hook])
assert [hook.budget_schedule(t)[0] for t in range(1, T + 1)] == \
    [budget(t, alloc.init_bgt, alloc.target_bgt, TINIT, TFINAL, T) for t in range(1, T + 1)]
assert [h["budget"] for h in hook.history] == alloc.budgets
assert hook.ranks() == final_ranks
assert all(torch.equal(torch.tensor(hook.rank_pattern[n]), alloc.pattern[n]) for n in final_ranks)
for n, m in svd_layers(ours):
    assert torch.allclose(m.lora_E, alloc.mods[n].lora_E, atol=1e-5)
assert max(abs(a - b) for a, b in zip(losses, pelib_run.losses)) < 1e-4
print("pelib's AdaLoRA allocates exactly as the notebook's")

# %% [markdown]
# ## Exercises
#
# Each checker compares with an independent reference and prints what it verified; library
# functions that would solve the task are switched off while your answer runs. Solutions:
# `notebooks/solutions/nb07.py`.
#
# **1 (new): export a pruned layer as plain LoRA.** Plain LoRA has no $\Lambda$: after training,
# a layer with triplets $(P_{\cdot i}, \lambda_i, Q_{i\cdot})$ and a mask `keep` of the ones
# the allocator kept must become a pair $B \in \mathbb{R}^{d_{out} \times k}$,
# $A \in \mathbb{R}^{k \times d_{in}}$ of rank $k = $ `keep.sum()` with
# $BA = s\, P_{\cdot,\text{keep}}\, \mathrm{diag}(\lambda_\text{keep})\, Q_{\text{keep},\cdot}$, the
# layer's $\Delta W$ (scale $s = \alpha / r$). Write `fold(P, lam, Q, keep, scale)` returning
# `(B, A)`. The checker compares $BA$ and the shapes with `SVDLinear.delta_weight()` of random
# layers (what `pelib.adalora.to_lora` does per layer before `pelib.save_adapter` writes a
# peft LoRA file with a rank per module).

# %%
from checks import attempt  # noqa: E402
from checks.nb07 import exercise_1, exercise_2, exercise_3  # noqa: E402


def fold(P, lam, Q, keep, scale):  # P (out, r), lam (r,), Q (r, in), keep (r,) bool
    raise NotImplementedError


attempt(exercise_1, fold)

# %% [markdown]
# **2 (warm-up): importance by hand.** Section 3's `Importance`, as two functions. The checker
# builds a toy with two SVD matrices and runs a few optimizer steps; after each it calls your
# `update(state, params)` with `params = {name: (p, p.grad)}` for every `lora_A`, `lora_E`,
# `lora_B`, and a dict `state` you keep (empty at first). After the last step it calls
# `scores(state, modules)`, with `modules` the two layer names, which must return
# `{module: (r,) tensor}`: the triplet scores
# $S_i = s(\lambda_i) + \mathrm{mean}_j\, s(P_{ji}) + \mathrm{mean}_j\, s(Q_{ij})$, with
# $s = \bar I\,\bar U$, $\beta_1 = \beta_2 = 0.85$ (eq. 9-11 above; note $\bar U$ uses the
# *new* $\bar I$). Names are `f"{module}.lora_A"` and so on. Checked against
# `pelib.adalora.RankAllocator`.

# %%
def update(state, params):
    raise NotImplementedError


def scores(state, modules):
    raise NotImplementedError


attempt(exercise_2, (update, scores))

# %% [markdown]
# **3 (new): make the triplets an SVD without an SVD of $\Delta W$.** Section 1 showed that
# $|\lambda_i|$ ranks the triplets correctly only when $P$ and $Q$ are orthonormal, and training
# only pushes them there through $R$. After training you can make it exact: find
# $P' \,(d_{out}, r)$ with orthonormal columns, $\lambda' \ge 0$ in descending order, and
# $Q' \,(r, d_{in})$ with orthonormal rows, such that
#
# $$ P' \mathrm{diag}(\lambda') Q' = P \mathrm{diag}(\lambda) Q = \Delta W / s .$$
#
# Then $\lambda'$ are the singular values of $\Delta W / s$, and pruning the smallest removes
# exactly $\lambda'^2_i$ of its squared norm. The catch: $\Delta W$ is $d_{out} \times d_{in}$
# (in a 7B model, $4096 \times 11008$), but its rank is at most $r$. Use only QR
# decompositions of the thin factors and an SVD (or eigendecomposition) of an $r \times r$
# matrix. Hint: write $P = Q_P R_P$ and $Q^\top = Q_Q R_Q$; what is left in the middle?
# Write `svd_triplets(P, lam, Q)` returning `(P2, lam2, Q2)`. The checker verifies the product,
# the orthonormality and $\lambda'$ against the singular values of $\Delta W$, and refuses an
# SVD or eigendecomposition of anything larger than $r \times r$ while your function runs.

# %%
def svd_triplets(P, lam, Q):  # P (out, r), lam (r,), Q (r, in) -> P2 (out, r), lam2 (r,), Q2 (r, in)
    raise NotImplementedError


attempt(exercise_3, svd_triplets)
