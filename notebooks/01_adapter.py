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
# * **Init**: $W_{up} = 0$, so $\mathrm{Adapter}(h) = h$ and the adapted network *is* the
#   pretrained network at step 0. Houlsby draws $W_{down}$ near zero as well.
# * **Placement**: the adapter reads the output of a sub-layer's last projection, before the
#   residual add and the LayerNorm. In a BERT layer:
#
# ```
# x ──> self-attention ──> W_O ──[adapter]──> dropout ──> + x ──> LayerNorm ──> h
# h ──> W_1 ──> GELU ──> W_2 ──[adapter]──> dropout ──> + h ──> LayerNorm ──> next layer
# ```
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
# CI shares two cores with other jobs; one thread there avoids oversubscription (5x slower).
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
# $W_{down}$ spans: the same pattern as LoRA's $B = 0$ (notebook 03). Had $W_{down}$ been zero
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
# ## 5. Training on Banking77
# The same plain loop as notebook 03 (pelib's `train` adds warmup, length-grouped batches and
# evaluation). In CI it sees a few hundred examples; adapters like a larger learning rate than
# full fine-tuning, 1e-3 here.

# %%
train = pelib.load_nlu("banking77", "train", limit=96 if FAST else 4000)
test = pelib.load_nlu("banking77", "test", limit=64 if FAST else 3080)
EPOCHS, BS = (1, 32) if FAST else (3, 32)


def batches(data, bs, shuffle, seed=0):
    order = torch.randperm(len(data.texts), generator=torch.Generator().manual_seed(seed)) \
        if shuffle else torch.arange(len(data.texts))
    for k in range(0, len(order), bs):
        idx = order[k:k + bs].tolist()
        enc = tokenizer([data.texts[i] for i in idx], padding=True, truncation=True,
                        max_length=64, return_tensors="pt")
        yield enc, torch.tensor([data.labels[i] for i in idx])


def fit(model, lr, epochs=EPOCHS):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for epoch in range(epochs):
        for enc, y in batches(train, BS, shuffle=True, seed=epoch):
            loss = F.cross_entropy(model(**enc).logits, y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
    return losses


@torch.no_grad()
def accuracy(model):
    model.eval()
    hits = sum((model(**enc).logits.argmax(-1) == y).sum().item() for enc, y in batches(test, 128, False))
    return hits / len(test.texts)


runs = {}
for kind in ("houlsby", "pfeiffer"):
    torch.manual_seed(0)
    model = add_adapters(pelib.load_backbone("minilm", num_labels=77)[0], kind, 64)
    runs[kind] = (model, fit(model, lr=1e-3))
    print(f"{kind:>8} m=64: accuracy {accuracy(model):.3f}")
fig, ax = plt.subplots(figsize=(6, 3))
for kind, (_, losses) in runs.items():
    ax.plot(losses, label=f"{kind}, m=64")
ax.set(xlabel="step", ylabel="cross-entropy", title="training loss, lr 1e-3")
ax.legend()
plt.show()

# %% [markdown]
# Small data and few steps make these numbers noisy. The full-budget comparison with LoRA
# (3 epochs on all of Banking77) comes from the command line, e.g.
# `python -m pelib finetune --method adapter --adapter-kind houlsby --bottleneck 64 --lr 1e-3`.
#
# ## 6. The latency cost of extra depth
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


base = pelib.load_backbone("minilm", num_labels=77)[0]
models = {"base": base, "houlsby": runs["houlsby"][0], "pfeiffer": runs["pfeiffer"][0]}
shapes = [(1, 16), (8, 32)] if FAST else [(1, 16), (8, 64), (32, 64), (128, 64)]
repeats = 3 if FAST else 20
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
# Read the ratios as this machine's, measured now (other processes share the CPU). The pattern
# to expect: the relative cost is largest for small inputs, where each extra kernel launch and
# its memory traffic weigh most against little arithmetic, and it shrinks toward the FLOP ratio
# (a few percent) for large batches. Rücklé et al. (2021, "AdapterDrop") measured the same on
# GPUs, which is why they drop adapters from the lower layers at inference.
#
# ## 7. Check: pelib's adapters are the ones we built
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
