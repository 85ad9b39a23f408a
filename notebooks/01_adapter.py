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
# # 01 · Bottleneck adapters: Houlsby and Pfeiffer
#
# Houlsby et al. (2019, arXiv:1902.00751) were the first to fine-tune BERT by *adding* small
# modules to a frozen network instead of changing its weights. An **adapter** is a residual MLP
# with a narrow middle:
#
# $$ \mathrm{Adapter}(h) = h + W_{up}\, f(W_{down} h + b_{down}) + b_{up}, \qquad
#    W_{down} \in \mathbb{R}^{m\times d},\; W_{up} \in \mathbb{R}^{d\times m},\; m \ll d. $$
#
# * **Parameters** per adapter: $2dm + m + d$. For MiniLM ($d = 384$) and $m = 64$: 49,600.
# * **Init**: Houlsby et al. draw *both* projections from a near-zero normal, so the adapter is
#   *nearly* the identity at step 0. We draw $W_{down}$ near zero but set $W_{up} = 0$ exactly
#   (the convention peft uses for LoRA's second matrix), so $\mathrm{Adapter}(h) = h$ and the
#   adapted network *is* the pretrained network at step 0, bit for bit.
# * **What trains**: Houlsby et al. train the adapters, the classification head **and every
#   LayerNorm** of the network. We (like pelib) freeze the LayerNorms and train adapters and
#   head only: simpler to count, and each method in this course then changes only its own
#   parameters. Exercise 1 counts what training the LayerNorms would add.
# * **Placement**: the adapter reads the output of a sub-layer's last projection, before the
#   residual add and the LayerNorm. In a BERT layer, as this notebook (and pelib) builds it:
#
# ```
# x ──> self-attention ──> W_O ──[adapter]──> dropout ──> + x ──> LayerNorm ──> h
# h ──> W_1 ──> GELU ──> W_2 ──[adapter]──> dropout ──> + h ──> LayerNorm ──> next layer
# ```
#
#   The official code of Houlsby et al. (google-research/adapter-bert) puts the adapter one step
#   later, **after** the dropout: `W_O ──> dropout ──[adapter]──> + x`. We wrap the projection
#   instead, because then an adapter is injected exactly like LoRA (find an `nn.Linear` by
#   name, replace it by a module that calls it), with no change to transformers' layer code.
#   The two orders compute the same function at inference, when dropout is off; in training
#   ours also drops units of the adapter's output, theirs feeds the adapter a dropped-out input.
#
#   **Houlsby** puts one after the attention output ($W_O$) and one after the feed-forward
#   output ($W_2$); **Pfeiffer** et al. (2021, arXiv:2005.00247) found that the feed-forward
#   one alone does about as well, at half the parameters and half the extra depth.
# * **The price**: unlike LoRA, an adapter cannot be merged into $W$; the nonlinearity $f$
#   keeps it a separate layer, so every forward pass runs two more matmuls per adapter, one
#   after the other. We measure that at the end.

# %%
import copy
import os
import time

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn

FAST = os.environ.get("PELIB_FAST") == "1"  # CI: tiny sizes
torch.manual_seed(0)
# CI shares two cores with other jobs; one thread there avoids oversubscribing them.
torch.set_num_threads(1 if FAST else max(1, os.cpu_count() or 1))

# %% [markdown]
# ## 1. An adapter in 15 lines

# %%
class BottleneckAdapter(nn.Module):
    """h + W_up f(W_down h): d -> m -> d with a skip connection."""

    def __init__(self, d: int, m: int):
        super().__init__()
        self.down = nn.Linear(d, m)                                  # W_down: (m, d)
        self.up = nn.Linear(m, d)                                    # W_up:   (d, m)
        nn.init.normal_(self.down.weight, std=1e-2)                  # near zero, as Houlsby
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)                               # zero: starts as identity
        nn.init.zeros_(self.up.bias)

    def forward(self, h):                                            # h: (B, T, d)
        return h + self.up(F.relu(self.down(h)))                     # (B, T, m) -> (B, T, d)


adapter = BottleneckAdapter(384, 64)
h = torch.randn(4, 10, 384)                                          # (B, T, d)
print("parameters:", sum(p.numel() for p in adapter.parameters()), "= 2dm + m + d =",
      2 * 384 * 64 + 64 + 384)
assert torch.equal(adapter(h), h)                                    # exactly the identity

# %% [markdown]
# ## 2. Where the first gradient goes
# With $z = f(W_{down} h)$ and upstream gradient $G = \partial L / \partial y$:
#
# $$ \frac{\partial L}{\partial W_{up}} = G^\top z, \qquad
#    \frac{\partial L}{\partial W_{down}} = \big((G W_{up}) \odot f'(\cdot)\big)^\top h . $$
#
# At init $W_{up} = 0$, so only $W_{up}$ moves on the first step, inside the subspace the random
# $W_{down}$ spans. (LoRA, in notebook 03, starts with the same pattern.) Had $W_{down}$ been zero
# too, ReLU would pass nothing and neither matrix would ever move.

# %%
loss = F.mse_loss(adapter(h), torch.randn_like(h))
loss.backward()
print(f"|dL/dW_down| = {adapter.down.weight.grad.norm():.3e}   "
      f"|dL/dW_up| = {adapter.up.weight.grad.norm():.3e}")
assert adapter.down.weight.grad.abs().max() == 0 and adapter.up.weight.grad.abs().max() > 0

# %% [markdown]
# ## 3. Parameters versus the bottleneck m
# MiniLM has 6 layers of width 384: Houlsby adds 12 adapters, Pfeiffer 6. The count is linear
# in m; the classification head (384 x 77 + 77) comes on top for both.

# %%
import pelib

minilm, tokenizer = pelib.load_backbone("minilm", num_labels=77)
d, n_layers = minilm.config.hidden_size, minilm.config.num_hidden_layers
total = sum(p.numel() for p in minilm.parameters())
ms = [8, 16, 32, 64, 128, 256]
houlsby = [n_layers * 2 * (2 * d * m + m + d) for m in ms]
pfeiffer = [n_layers * 1 * (2 * d * m + m + d) for m in ms]
for m, a, b in zip(ms, houlsby, pfeiffer):
    print(f"m={m:>3}: Houlsby {a:>9,} ({100 * a / total:4.1f}%)   Pfeiffer {b:>9,} ({100 * b / total:4.1f}%)")
fig, ax = plt.subplots(figsize=(5, 3))
ax.loglog(ms, houlsby, "o-", label="Houlsby (2 per layer)")
ax.loglog(ms, pfeiffer, "s-", label="Pfeiffer (1 per layer)")
ax.axhline(total, color="k", ls="--", label="whole MiniLM")
ax.set(xlabel="bottleneck m", ylabel="trainable parameters", title="adapter parameters, MiniLM")
ax.legend()
plt.show()

# %% [markdown]
# ## 4. Putting adapters into MiniLM
# In transformers' BERT, `attention.output.dense` is $W_O$ and `output.dense` is $W_2$; each is
# followed by dropout, the residual add and the LayerNorm (`BertSelfOutput`, `BertOutput`). So
# "adapter after the projection" means: replace the `nn.Linear` by *Linear, then adapter*.

# %%
class AfterLinear(nn.Module):
    """Run the frozen projection, then the adapter on its output."""

    def __init__(self, linear: nn.Linear, m: int):
        super().__init__()
        self.linear, self.adapter = linear, BottleneckAdapter(linear.out_features, m)

    def forward(self, x):
        return self.adapter(self.linear(x))


def add_adapters(model, kind, m):
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in model.bert.encoder.layer:
        if kind == "houlsby":
            layer.attention.output.dense = AfterLinear(layer.attention.output.dense, m)
        layer.output.dense = AfterLinear(layer.output.dense, m)
    for p in model.classifier.parameters():                          # the new head trains
        p.requires_grad_(True)
    return model


probe = tokenizer(["my card was declined", "how do I top up by bank transfer?"], padding=True,
                  return_tensors="pt")
minilm.eval()
with torch.no_grad():
    y_base = minilm(**probe).logits
    houlsby_model = add_adapters(copy.deepcopy(minilm), "houlsby", 64)
    y_adapted = houlsby_model(**probe).logits
n_train = sum(p.numel() for p in houlsby_model.parameters() if p.requires_grad)
print(f"Houlsby m=64: {n_train:,} trainable of {total:,} ({100 * n_train / total:.2f}%)")
assert torch.equal(y_adapted, y_base)                                # step 0 = the base model
assert n_train == houlsby[ms.index(64)] + d * 77 + 77

# %% [markdown]
# ## 5. A training loop, written once for the course
# This is the first notebook that trains, so we write the loop here, in plain torch, and check
# that it is the loop `pelib.train.train` runs; notebooks 02 onwards call pelib's directly.
# What one run does:
#
# * tokenise every text once, truncated to 64 tokens, not padded;
# * **length-grouped batches**: shuffle, sort each window of 50 batches' worth by length, cut
#   it into batches, shuffle the batches. The order stays random and a batch pads little, so
#   little of the compute goes to padding tokens;
# * AdamW on the trainable parameters, no weight decay, with the learning rate scaled by a
#   **warmup + linear decay** schedule over the run's $S$ steps, $w = \mathrm{round}(0.06\,S)$:
#
# $$ \eta_s = \eta \cdot \begin{cases} (s+1)/w & s < w \\ (S - s)/(S - w) & s \ge w \end{cases} $$
#
# * the cross-entropy of the head's logits against the labels.
#
# First the batching: which rows go together, and how they are padded.

# %%
import math
import random


def length_grouped(lengths, bs, rng):
    """Row indices -> batches (lists of indices) of similar lengths, in random order."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = 50 * bs
    out = []
    for i in range(0, len(order), window):
        chunk = sorted(order[i:i + window], key=lambda j: lengths[j])
        out += [chunk[k:k + bs] for k in range(0, len(chunk), bs)]
    rng.shuffle(out)
    return out


def pad(ids, index):
    """Token id lists -> right-padded input_ids and attention_mask, each (B, T_max)."""
    T = max(len(ids[i]) for i in index)
    input_ids = torch.full((len(index), T), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(index), T), dtype=torch.long)
    for row, i in enumerate(index):
        input_ids[row, :len(ids[i])] = torch.tensor(ids[i])
        mask[row, :len(ids[i])] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


# %% [markdown]
# Then the loop itself, and the accuracy on a test split (batches sorted by length, no
# dropout). Two seeds decide a run: `torch.manual_seed` (dropout) and a `random.Random` (the
# batch order).

# %%
def fit(model, data, lr, epochs, bs=32, warmup_ratio=0.06, seed=0):
    torch.manual_seed(seed)                                          # dropout's draws
    rng = random.Random(seed)                                        # the batch order
    ids = tokenizer(data.texts, truncation=True, max_length=64)["input_ids"]
    labels = torch.tensor(data.labels)
    S = round(epochs * math.ceil(len(ids) / bs))                     # optimizer steps
    w = round(warmup_ratio * S)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                            weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / max(1, w) if s < w else max(0.0, (S - s) / max(1, S - w)))
    model.train()
    losses = []
    while len(losses) < S:                                           # one pass = one epoch
        for index in length_grouped([len(x) for x in ids], bs, rng):
            if len(losses) == S:
                break
            logits = model(**pad(ids, index)).logits                 # (B, 77)
            loss = F.cross_entropy(logits, labels[index])
            loss.backward()
            opt.step()
            opt.zero_grad()
            sched.step()
            losses.append(loss.item())
    return losses


@torch.no_grad()
def accuracy(model, data, bs=128):
    model.eval()
    ids = tokenizer(data.texts, truncation=True, max_length=64)["input_ids"]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))      # little padding
    hits = 0
    for k in range(0, len(order), bs):
        index = order[k:k + bs]
        hits += (model(**pad(ids, index)).logits.argmax(-1) == torch.tensor(data.labels)[index]).sum().item()
    return hits / len(ids)


# %% [markdown]
# **Is it pelib's loop?** Two copies of the same adapted model (same adapter and head weights),
# one trained by `fit`, one by `pelib.train.train`, on 64 rows in batches of 16 for 2 epochs:
# the same batches, the same dropout masks and the same schedule must give the same losses,
# step for step. (pelib adds progress, gradient accumulation, bf16, checkpoints, evaluation
# and memory tracking around the same core.)

# %%
from pelib.train import TrainConfig
from pelib.train import train as pelib_train

tiny_train = pelib.load_nlu("banking77", "train", limit=64)
tiny_test = pelib.load_nlu("banking77", "test", limit=32)
torch.manual_seed(0)
a = add_adapters(pelib.load_backbone("minilm", num_labels=77)[0], "pfeiffer", 16)
b = copy.deepcopy(a)                                                 # the same weights
ours = fit(a, tiny_train, lr=1e-3, epochs=2, bs=16)
theirs = pelib_train(b, tokenizer, tiny_train, tiny_test,
                     TrainConfig(epochs=2, lr=1e-3, batch_size=16, progress=False,
                                 label_smoothing=0.0, head_lr=None))  # fit's plain loss, one lr
print("fit:        ", [round(x, 5) for x in ours])
print("pelib.train:", [round(x, 5) for x in theirs.losses])
assert len(ours) == len(theirs.losses) == 8
assert torch.allclose(torch.tensor(ours), torch.tensor(theirs.losses), rtol=1e-5, atol=0)
assert abs(accuracy(a, tiny_test) - theirs.metrics["accuracy"]) < 1e-9
del a, b

# %% [markdown]
# ## 6. Training on Banking77
# Houlsby and Pfeiffer, bottleneck 64. In CI (`PELIB_FAST=1`) the run sees 96 examples for a
# few steps; adapters like a larger learning rate than full fine-tuning, 1e-3 here.

# %%
train = pelib.load_nlu("banking77", "train", limit=96 if FAST else 2000)
test = pelib.load_nlu("banking77", "test", limit=64 if FAST else 1000)
EPOCHS = 1 if FAST else 3
if FAST:
    print("TOY NUMBERS (FAST mode, tiny sizes): near-chance accuracy is expected here")
runs = {}
for kind in ("houlsby", "pfeiffer"):
    torch.manual_seed(0)
    model = add_adapters(pelib.load_backbone("minilm", num_labels=77)[0], kind, 64)
    runs[kind] = (model, fit(model, train, lr=1e-3, epochs=EPOCHS))
    print(f"{kind:>8} m=64: accuracy {accuracy(model, test):.3f}")
fig, ax = plt.subplots(figsize=(6, 3))
for kind, (_, losses) in runs.items():
    ax.plot(losses, label=f"{kind}, m=64")
ax.set(xlabel="step", ylabel="cross-entropy", title="training loss, lr 1e-3")
ax.legend()
plt.show()

# %% [markdown]
# Small data and few steps make these numbers noisy. The full-budget comparison (3 epochs on all
# of Banking77, three seeds, test macro-F1) comes from the command line; the course's results
# table `docs/tables/banking77_minilm.csv` keeps each row with the command that reproduces it:

# %%
import csv

with open("../docs/tables/banking77_minilm.csv", newline="") as f:
    table = {row["method"]: row for row in csv.DictReader(f)}
print(f"{'':<24} {'test macro-F1':>17} {'trainable':>10}")
for key in ("head", "probe", "houlsby", "pfeiffer", "lora"):
    row = table[key]
    print(f"{row['label']:<24} {float(row['test_f1_mean']):.4f} ± {float(row['test_f1_sd']):.4f}"
          f" {int(row['trainable']):>10,}")
print("adapter command:", table["pfeiffer"]["command"])

# %% [markdown]
# Read the table with its standard deviations in mind (seed to seed, a few thousandths): the
# Pfeiffer placement, with half the adapters and about half the trainable numbers, lands within
# about one sd of Houlsby's, which is Pfeiffer et al.'s finding; both sit above the floor, and
# LoRA, with fewer trainable numbers than Houlsby, is at least level with both.
#
# ## 7. The latency cost of extra depth
# A merged LoRA model runs exactly the base model's matmuls. An adapter model cannot merge: each
# adapter adds $2dm$ multiply-adds per token, $2 \cdot 384 \cdot 64 / (12 \cdot 384^2) \approx 2.8\%$
# of a MiniLM layer's $12d^2$ (Houlsby has two per layer, Pfeiffer one), and, worse for small
# batches, two more kernels that must run *after* the projection and before the next step.
# We time the forward pass of the base and the adapted model in the same process, alternating
# them so that both see the same machine load, and report the ratio of the medians. One
# thread: on a shared machine the ratio then measures the work, not how the threads were
# scheduled.

# %%
def forward_ms(model, enc, repeats):
    model.eval()
    times = []
    with torch.inference_mode():
        model(**enc)                                                 # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(**enc)
            times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[len(times) // 2]


# %% [markdown]
# The base model and the two trained adapter models, at a few batch shapes; three rounds, each
# timing every model in turn, and the median round per model.

# %%
base = pelib.load_backbone("minilm", num_labels=77)[0]
models = {"base": base, "houlsby": runs["houlsby"][0], "pfeiffer": runs["pfeiffer"][0]}
# batch x length: 32 x 64 is the largest; the trend shows without a longer wait
shapes = [(1, 16), (8, 32)] if FAST else [(1, 16), (8, 64), (32, 64)]
repeats = 3 if FAST else 10
ratios = {k: [] for k in ("houlsby", "pfeiffer")}
threads = torch.get_num_threads()
torch.set_num_threads(1)
for B, T in shapes:
    enc = {"input_ids": torch.randint(1000, 20000, (B, T)),
           "attention_mask": torch.ones(B, T, dtype=torch.long)}
    ms_per = {k: [] for k in models}
    for _ in range(3):                                               # interleave: same load for all
        for k, mdl in models.items():
            ms_per[k].append(forward_ms(mdl, enc, repeats))
    med = {k: sorted(v)[1] for k, v in ms_per.items()}
    for k in ratios:
        ratios[k].append(med[k] / med["base"])
    print(f"B={B:>3} T={T}: base {med['base']:6.2f} ms | Houlsby x{ratios['houlsby'][-1]:.2f} | "
          f"Pfeiffer x{ratios['pfeiffer'][-1]:.2f}")
torch.set_num_threads(threads)
fig, ax = plt.subplots(figsize=(5, 3))
xs = range(len(shapes))
ax.bar([x - 0.2 for x in xs], ratios["houlsby"], 0.4, label="Houlsby (12 adapters)")
ax.bar([x + 0.2 for x in xs], ratios["pfeiffer"], 0.4, label="Pfeiffer (6 adapters)")
ax.axhline(1, color="k", lw=0.8)
ax.set_xticks(list(xs), [f"{B}x{T}" for B, T in shapes])
ax.set(xlabel="batch x tokens", ylabel="forward time / base", title="adapter latency, m=64")
ax.legend()
plt.show()

# %% [markdown]
# Read the ratios as this machine's, measured now (other processes share the CPU). On a GPU the
# relative cost is largest for small inputs, where each extra kernel launch and its memory
# traffic weigh most against little arithmetic, and it shrinks toward the FLOP ratio (a few
# percent) for large batches: Rücklé et al. (2021, "AdapterDrop") measured that, which is why
# they drop adapters from the lower layers at inference. On one CPU thread there are no kernel
# launches to pay for, and the extra ~3% of FLOPs is close to the timer's noise, so expect the
# ratios the cell prints to scatter around 1 with no clear pattern across shapes. A ratio below
# 1 is noise, not a faster model.
#
# ## 8. Check: pelib's adapters are the ones we built
# `pelib.adapter.apply_adapters(model, kind, bottleneck)` finds the same projections by name
# (for BERT and for Llama, where they are `self_attn.o_proj` and `mlp.down_proj`), wraps them,
# and freezes the rest through `pelib.inject`. Given the same weights it must compute what our
# trained notebook model computes.

# %%
from pelib.adapter import AdapterLinear, adapter_layers, apply_adapters

for kind, (ours, _) in runs.items():
    theirs = apply_adapters(pelib.load_backbone("minilm", num_labels=77)[0], kind, 64)
    assert pelib.trainable_parameters(theirs) == sum(p.numel() for p in ours.parameters()
                                                     if p.requires_grad)
    mine = [m for m in ours.modules() if isinstance(m, AfterLinear)]
    assert len(mine) == len(adapter_layers(theirs)) == n_layers * (2 if kind == "houlsby" else 1)
    with torch.no_grad():
        for a, (_, b) in zip(mine, adapter_layers(theirs)):
            b.adapter.adapter_down.load_state_dict(a.adapter.down.state_dict())
            b.adapter.adapter_up.load_state_dict(a.adapter.up.state_dict())
        theirs.classifier.load_state_dict(ours.classifier.state_dict())
        theirs.eval(), ours.eval()
        assert torch.equal(theirs(**probe).logits, ours(**probe).logits)
assert isinstance(theirs.bert.encoder.layer[0].output.dense, AdapterLinear)
print("pelib's adapters equal the notebook's (Houlsby and Pfeiffer)")

# %% [markdown]
# ## Exercises
# Each stub raises `NotImplementedError` until you fill it in; the cell after it then checks
# your answer. Solutions: `notebooks/solutions/nb01.py`. Exercises 1, 3 and 4 are warm-ups (the
# formula is in the prompt); exercises 2 and 5 build adapter variants from the literature that
# this notebook did not show.
#
# **Exercise 1 (warm-up): what Houlsby et al. actually train.** Write `houlsby_trainable(n_layers,
# d, m, n_labels, train_layernorms)`: the trainable parameters of a BERT with Houlsby adapters
# of bottleneck $m$ (two a layer, $2dm + m + d$ each) and a new head ($d \cdot n_{labels} +
# n_{labels}$), plus, when `train_layernorms`, every LayerNorm as in the paper: the embeddings'
# one and two per layer, $2d$ each (scale and shift). For MiniLM with $m = 64$ the LayerNorms
# add 9,984 to 624,845. The checker applies `pelib.adapter.apply_adapters` to tiny random
# BERTs, unfreezes their LayerNorms, and counts.

# %%
from checks import attempt
from checks.nb01 import exercise_1, exercise_2, exercise_3, exercise_4


def houlsby_trainable(n_layers, d, m, n_labels, train_layernorms):
    raise NotImplementedError


attempt(exercise_1, houlsby_trainable)

# %% [markdown]
# **Exercise 2 (new: a parallel adapter).** He et al. (2022, "Towards a unified view of
# parameter-efficient transfer learning", arXiv:2110.04366) found that an adapter placed
# *beside* a projection, reading the projection's input rather than its output, does better
# than Houlsby's sequential one, especially beside the feed-forward block:
#
# $$ y = W x + b + s\; W_{up}\, \mathrm{ReLU}(W_{down} x + b_{down}) + s\, b_{up}, \qquad
#    W_{down} \in \mathbb{R}^{m \times d_{in}},\; W_{up} \in \mathbb{R}^{d_{out} \times m}, $$
#
# with a fixed scale $s$ (they use $s = 4$). Write `ParallelAdapter(linear, m, scale)`, an
# `nn.Module` that freezes `linear`, has `nn.Linear` attributes `down` and `up`, and starts as
# exactly `linear` (zero $W_{up}$ and $b_{up}$, near-zero $W_{down}$ as in `BottleneckAdapter`).
# Note that $d_{in}$ and $d_{out}$ may differ. Unlike a sequential adapter, this one is a
# *sum* with the projection: LoRA (notebook 03) is the same shape without the ReLU.

# %%
class ParallelAdapter(nn.Module):
    def __init__(self, linear: nn.Linear, m: int, scale: float = 1.0):
        super().__init__()
        raise NotImplementedError

    def forward(self, x):                                            # (..., d_in) -> (..., d_out)
        raise NotImplementedError


attempt(exercise_2, ParallelAdapter)

# %% [markdown]
# **Exercise 3 (warm-up): a cosine schedule.** Section 5's schedule falls in a straight line after
# the warm-up. Loshchilov & Hutter (2017, SGDR) let it fall along half a cosine instead, which
# stays near the peak longer and flattens out at the end:
#
# $$ \eta_s = \eta \cdot \begin{cases} (s+1)/w & s < w \\
#    \tfrac12 \left(1 + \cos\left(\pi \, \frac{s - w}{S - w}\right)\right) & s \ge w \end{cases} $$
#
# Write `cosine_factor(s, S, w)`, the factor of step $s$. The checker compares it, step by step,
# with transformers' `get_cosine_schedule_with_warmup` after the warm-up (and disables that
# function while yours runs); `pelib.train`'s loop runs it with `TrainConfig(schedule="cosine")`
# (`finetune --schedule cosine`).

# %%
def cosine_factor(s, S, w):
    raise NotImplementedError


attempt(exercise_3, cosine_factor)

# %% [markdown]
# **Exercise 4 (warm-up): label smoothing.** The loop's loss is the cross-entropy against a one-hot
# target. Szegedy et al. (2016, "Rethinking the Inception architecture") soften the target: $1 -
# \varepsilon$ on the label and $\varepsilon / K$ on each of the $K$ classes (the label's own
# included), so the loss of a row is
#
# $$ \ell = (1 - \varepsilon)\,\bigl(-\log p_y\bigr) + \varepsilon\,\frac{1}{K}\sum_{k=1}^{K} -\log p_k , $$
#
# and its gradient with respect to the logits is $p - q$ with $q$ the soft target: a confident
# model is pulled back from putting all its mass on one class. Write
# `smoothed_cross_entropy(logits, labels, eps)`, the mean of $\ell$ over the batch (`logits` is
# (B, K), `labels` (B,)), from `log_softmax`. The checker compares it with torch's
# `F.cross_entropy(..., label_smoothing=eps)`, which is disabled while your function runs, and
# checks the gradient. pelib's recipe trains every method with $\varepsilon = 0.1$
# (`finetune --label-smoothing`; docs/benchmarks.md compares it with $\varepsilon = 0$).

# %%
def smoothed_cross_entropy(logits, labels, eps):                     # (B, K), (B,) -> ()
    raise NotImplementedError


attempt(exercise_4, smoothed_cross_entropy)

# %% [markdown]
# **Exercise 5 (new: Compacter's Kronecker-factored adapter).** An adapter's matrices are dense:
# $W_{down}$ alone costs $md$ numbers. Karimi Mahabadi et al. (2021, "Compacter: efficient
# low-rank hypercomplex adapter layers", arXiv:2106.04647) build each one as a sum of $n$
# Kronecker products (a "parameterized hypercomplex multiplication" layer):
#
# $$ W = \sum_{i=1}^{n} A_i \otimes B_i, \qquad A_i \in \mathbb{R}^{n \times n},\;
#    B_i = s_i\, t_i^{\top} \in \mathbb{R}^{\frac{k}{n} \times \frac{d}{n}}, \qquad
#    W \in \mathbb{R}^{k \times d}, $$
#
# where $(A \otimes B)_{a p + i,\; b q + j} = A_{ab} B_{ij}$ for $B \in \mathbb{R}^{p \times q}$.
# The small $A_i$ are shared by every adapter of the network (the "slow" weights); each adapter
# owns only its rank-one $B_i$, that is $n(k/n + d/n) = k + d$ numbers instead of $kd$. Write
# `phm_weight(A, s, t)` with `A` $(n, n, n)$, `s` $(n, k/n)$, `t` $(n, d/n)$, returning $W$
# $(k, d)$, differentiable in all three. The checker compares it, at several shapes, with $W$
# assembled block by block, checks the gradients, and prints what a Compacter adapter on MiniLM
# would cost against a bottleneck adapter.

# %%
from checks.nb01 import exercise_5


def phm_weight(A, s, t):                                             # (n,n,n), (n,k/n), (n,d/n) -> (k, d)
    raise NotImplementedError


attempt(exercise_5, phm_weight)
