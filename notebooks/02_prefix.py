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
# # 02 · Prefix tuning: learned keys and values in every layer
#
# Li & Liang (2021, arXiv:2101.00190) keep the whole network frozen and give every attention
# layer $l$ a few extra **key and value vectors** that every token may attend to, as if $L_p$
# virtual tokens preceded the input. With the layer's own $K = XW_K$, $V = XW_V$ (T rows) and the
# learned prefix $P_K^l, P_V^l$ ($L_p$ rows each):
#
# $$ \mathrm{head}_l = \mathrm{softmax}\!\Big(\frac{Q\,[P_K^l;\,K]^\top}{\sqrt{d_h}} + M\Big)\,[P_V^l;\,V]
#    \qquad \text{(attention over } L_p + T \text{ keys)} $$
#
# * $M$ is the usual mask (padding, causality) over the $T$ real keys; the prefix is visible to
#   every query.
# * **Parameters**: $n_{layers} \cdot 2 \cdot L_p \cdot d_{kv}$. With grouped-query attention
#   (SmolLM2: 9 query heads share 3 KV heads) the prefix lives where K and V live, so
#   $d_{kv} = n_{kv} \cdot d_h$, not the model width.
# * **Reparametrisation**: optimising $P$ directly was unstable in the paper, so they train
#   $P = \mathrm{MLP}(P')$ with a small $P' \in \mathbb{R}^{L_p \times d}$ and throw the MLP away
#   after training. Only $P$ is needed at inference.
# * **Unlike adapters and LoRA**, nothing inside a layer changes: the prefix only adds keys.
#   The price is a longer attention: $L_p + T$ keys for $T$ queries.

# %%
import copy
import math
import os
import time

import matplotlib.pyplot as plt
import torch
from torch import nn

FAST = os.environ.get("PELIB_FAST") == "1"  # CI: tiny sizes
torch.manual_seed(0)
# CI shares two cores with other jobs; one thread there avoids oversubscription.
torch.set_num_threads(1 if FAST else max(1, os.cpu_count() or 1))

# %% [markdown]
# ## 1. Attention over a prefix, by hand
# One head, $T = 5$ tokens, $L_p = 3$ prefix vectors, head size 8. The last two keys are padding.

# %%
def attend(q, k, v, mask=None):
    """softmax(q k^T / sqrt(d_h) + mask) v for (..., T_q, d_h) queries and (..., T_k, d_h) keys."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])       # (..., T_q, T_k)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v                                   # (..., T_q, d_h)


T, L_p, d_h = 5, 3, 8
q, k, v = torch.randn(3, T, d_h).unbind(0)                          # (T, d_h) each
P_K, P_V = torch.randn(2, L_p, d_h).unbind(0)                       # (L_p, d_h) each
pad = torch.tensor([True, True, True, False, False])                # real, real, real, pad, pad
keys_mask = torch.cat([torch.ones(L_p, dtype=torch.bool), pad])     # the prefix is never masked
out = attend(q, torch.cat([P_K, k]), torch.cat([P_V, v]), keys_mask[None, :])  # (T, d_h)
print("output", tuple(out.shape), "from", L_p + T, "keys")

# %% [markdown]
# **What the prefix does to a head.** Split the softmax over the two groups of keys. With
# $\lambda(q) = \sum_{j \in P} e^{s_j} / \sum_{j} e^{s_j}$, the share of attention that goes to
# the prefix (He et al., 2022, "Towards a unified view of parameter-efficient transfer learning"):
#
# $$ \mathrm{head} = (1 - \lambda(q))\,\mathrm{softmax}(qK^\top)V + \lambda(q)\,\mathrm{softmax}(qP_K^\top)P_V . $$
#
# The original attention, mixed with a learned, position-free term by a gate that depends on the
# query: a close cousin of an adapter running beside the attention. Numerically:

# %%
s_prefix = q @ P_K.T / math.sqrt(d_h)                               # (T, L_p)
s_tokens = (q @ k.T / math.sqrt(d_h)).masked_fill(~pad, float("-inf"))  # (T, T)
lam = s_prefix.exp().sum(-1, keepdim=True) / (s_prefix.exp().sum(-1, keepdim=True)
                                              + s_tokens.exp().sum(-1, keepdim=True))  # (T, 1)
mixed = (1 - lam) * attend(q, k, v, pad[None, :]) + lam * attend(q, P_K, P_V)
print("lambda per query:", [round(x, 3) for x in lam.squeeze(-1).tolist()])
assert torch.allclose(mixed, out, atol=1e-6)

# %% [markdown]
# ## 2. The reparametrisation and folding it away
# $P' \in \mathbb{R}^{L_p\times d}$ goes through Linear($d \to h$), tanh, Linear($h \to n_{layers}\cdot 2\cdot d_{kv}$);
# the output row $i$ holds virtual token $i$'s key and value for every layer. Reshaped:
# $(L_p,\, n_{layers},\, 2,\, n_{kv},\, d_h) \to (n_{layers},\, 2,\, n_{kv},\, L_p,\, d_h)$, the layout the
# attention wants. After training we evaluate the MLP once ("fold") and keep only that tensor.

# %%
class PrefixMLP(nn.Module):
    def __init__(self, n_layers, n_kv, d_h, L_p, d, hidden):
        super().__init__()
        self.shape = (L_p, n_layers, 2, n_kv, d_h)
        self.P_prime = nn.Parameter(torch.randn(L_p, d))           # P': (L_p, d)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(),
                                 nn.Linear(hidden, n_layers * 2 * n_kv * d_h))

    def forward(self):
        P = self.mlp(self.P_prime).view(self.shape)                 # (L_p, n_layers, 2, n_kv, d_h)
        return P.permute(1, 2, 3, 0, 4)                             # (n_layers, 2, n_kv, L_p, d_h)


import pelib

minilm, tokenizer = pelib.load_backbone("minilm", num_labels=77)
cfg = minilm.config
n_layers, n_heads, d = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_size
d_h = d // n_heads                                                  # BERT: n_kv = n_heads
L_p = 16
prefix_mlp = PrefixMLP(n_layers, n_heads, d_h, L_p, d, hidden=d)
folded = prefix_mlp().detach()                                      # what inference needs
n_mlp = sum(p.numel() for p in prefix_mlp.parameters())
print(f"MiniLM, L_p={L_p}: train {n_mlp:,} numbers through the MLP, keep {folded.numel():,} "
      f"= n_layers*2*L_p*d_kv = {n_layers * 2 * L_p * d:,}; prefix shape {tuple(folded.shape)}")

# %% [markdown]
# ## 3. Getting the prefix into a transformers model
# Where do the keys come from? In transformers 5, `BertSelfAttention.forward` (and
# `LlamaAttention.forward`) projects Q, K, V, applies RoPE (Llama), appends to the KV cache if
# there is one, and then calls an attention function that it looks up **by name** in a public
# registry, `AttentionInterface`, using `config._attn_implementation` ("eager", "sdpa", ...).
#
# That lookup is our hook. We register a function that prepends the prefix to the keys and
# values it receives, widens the mask by $L_p$ always-visible columns, and calls the original
# SDPA function. Nothing depends on the KV-cache classes (peft puts the prefix *into* the cache
# and broke when transformers changed those classes), and a generation cache only ever holds
# real tokens. The mask for the real keys is still built by the model, for the same name
# (`AttentionMaskInterface`).
#
# One subtlety: when nothing needs masking, transformers passes `mask=None` and lets SDPA use
# `is_causal=True`, whose triangle is aligned top-left. With $L_p + T$ keys for $T$ queries
# that would hide the wrong keys, so for a causal model we spell the mask out.

# %%
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS


def widen_mask(mask, L_p, T_q, n_keys, causal):
    """bool mask (B, 1, T_q, T) over the real keys -> (B, 1, T_q, L_p + T)."""
    if mask is None:
        if not causal or T_q == 1:
            return None                                             # nothing to mask anywhere
        mask = torch.ones(T_q, n_keys, dtype=torch.bool).tril(n_keys - T_q)[None, None]
    return torch.cat([mask.new_ones(*mask.shape[:-1], L_p), mask], dim=-1)


def sdpa_with_prefix(module, query, key, value, attention_mask, **kwargs):
    # query: (B, H, T_q, d_h); key, value: (B, n_kv, T, d_h)
    P_K, P_V = module.get_prefix()                                  # (n_kv, L_p, d_h) each
    B = key.shape[0]
    attention_mask = widen_mask(attention_mask, P_K.shape[1], query.shape[2], key.shape[2],
                                getattr(module, "is_causal", False))
    key = torch.cat([P_K.expand(B, -1, -1, -1), key], dim=2)        # (B, n_kv, L_p + T, d_h)
    value = torch.cat([P_V.expand(B, -1, -1, -1), value], dim=2)
    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register("nb_prefix", sdpa_with_prefix)
AttentionMaskInterface.register("nb_prefix", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


# %% [markdown]
# Now the model side. Every attention module gets a `get_prefix()` that returns its layer's
# slice. The prefix itself (through the MLP, when there is one) is computed **once per forward
# pass**, by a hook that runs before the model's forward, and every layer reads its slice of
# that one tensor: evaluating the MLP in each of the 6 layers would cost 6 MLP passes (and 6
# backward passes) for the same numbers.

# %%
def add_prefix(model, attention_modules, prefix):
    """prefix: a module whose forward() gives (n_layers, 2, n_kv, L_p, d_h)."""
    for p in model.parameters():
        p.requires_grad_(False)
    model.prefix = prefix                                           # registered once: it trains

    def compute_prefix(module, args, kwargs):                       # before each forward pass
        module.prefix_now = module.prefix()                         # (n_layers, 2, n_kv, L_p, d_h)

    def drop_prefix(module, args, kwargs, output):                  # after it: hold no graph
        del module.prefix_now

    model.register_forward_pre_hook(compute_prefix, with_kwargs=True)
    model.register_forward_hook(drop_prefix, with_kwargs=True)
    for i, attn in enumerate(attention_modules):
        # a plain attribute (a function, not a submodule) that reads model.prefix_now at call
        # time, so that replacing model.prefix (folding) reaches every layer
        attn.get_prefix = lambda i=i: model.prefix_now[i]
    for name in ("classifier", "score"):
        if hasattr(model, name):
            getattr(model, name).requires_grad_(True)
    model.set_attn_implementation("nb_prefix")
    return model


class Folded(nn.Module):
    def __init__(self, P):
        super().__init__()
        self.P = nn.Parameter(P.clone())                            # (n_layers, 2, n_kv, L_p, d_h)

    def forward(self):
        return self.P


def bert_attention(model):
    return [layer.attention.self for layer in model.bert.encoder.layer]


# %% [markdown]
# Two checks: a padded batch gives what each text gives alone (the widened mask hides the
# padding and only the padding), and one forward pass runs the MLP once, not once per layer.

# %%
model = copy.deepcopy(minilm)
model = add_prefix(model, bert_attention(model), prefix_mlp).eval()
texts = ["my card was declined at the shop", "hi", "how long does a transfer take?"]
with torch.no_grad():
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    together = model(**batch).logits                                # padded batch
    alone = torch.cat([model(**tokenizer([t], return_tensors="pt")).logits for t in texts])
print(f"max |padded batch - one by one| = {(together - alone).abs().max():.2e}")
assert (together - alone).abs().max() < 1e-5
mlp_calls = []
hook = model.prefix.mlp.register_forward_hook(lambda *_: mlp_calls.append(1))
with torch.no_grad():
    model(**batch)
hook.remove()
print(f"MLP evaluations in one forward pass of {n_layers} layers: {len(mlp_calls)}")
assert len(mlp_calls) == 1

# %% [markdown]
# **Where training starts.** LoRA's $B = 0$ and an adapter's near-zero up-projection begin
# training at the pretrained function: at step 0 the head sees the same sentence embedding as
# the frozen-backbone floor (notebook 00). A fresh prefix does not: in every layer each query
# now sends a share $\lambda(q)$ of its attention to $L_p$ random keys. How far does that move
# the mean-pooled embedding the head reads? On training queries, cosine between the embedding
# without and with the fresh prefix of section 3:

# %%
def pooled(model, texts):
    """The classification head's input (the mean-pooled sentence embedding), (N, d)."""
    seen = []
    hook = model.classifier.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    with torch.no_grad():
        model.eval()(**tokenizer(texts, padding=True, truncation=True, max_length=64,
                                 return_tensors="pt"))
    hook.remove()
    return seen[0]


sample = pelib.load_nlu("banking77", "train", limit=64).texts                # 64 queries: cheap
frozen = pooled(minilm, sample)                                     # (N, d)
cos = nn.functional.cosine_similarity(frozen, pooled(model, sample), dim=-1)  # (N,)
unit = nn.functional.normalize(frozen, dim=-1)
pairs = (unit @ unit.T)[~torch.eye(len(sample), dtype=torch.bool)]  # two different queries
print(f"cosine(frozen embedding, embedding with a fresh prefix) over {len(sample)} queries: "
      f"mean {cos.mean():.3f}, min {cos.min():.3f}")
print(f"for scale, cosine between two different queries' frozen embeddings: mean {pairs.mean():.3f}")
assert cos.mean() < 0.999  # the prefix moves every embedding before any training

# %% [markdown]
# The cell prints a mean cosine close to 1, far above the cosine between two different queries:
# the fresh prefix moves every embedding a little, but only a little, while LoRA and the adapters
# start exactly on it. A small push at step 0 is not where prefix tuning can lose, then; if it
# loses, it is in training (next section).

# %% [markdown]
# ## 4. Training on Banking77: with and without the MLP
# With `pelib.train.train`, the loop notebook 01 wrote and checked (AdamW, 6% warmup then
# linear decay, length-grouped batches). Which learning rate? P-tuning v2 and peft's examples
# use about 1e-2 for a prefix trained directly; Li & Liang, training through the MLP, used
# about 5e-5 (on GPT-2 and BART, for generation). We use 3e-3, pelib's default for prefix
# tuning. A loss that climbs back to chance ($\ln 77 \approx 4.34$) when the warm-up reaches the
# peak rate is the sign of a rate too high for the MLP. We train the reparametrised prefix and,
# for comparison, a prefix optimised directly, starting from the same initial values.

# %%
from pelib.train import TrainConfig
from pelib.train import train as pelib_train

train = pelib.load_nlu("banking77", "train", limit=96 if FAST else 2000)
test = pelib.load_nlu("banking77", "test", limit=64 if FAST else 1000)
config = TrainConfig(epochs=1 if FAST else 3, lr=3e-3, batch_size=32, progress=False)
if FAST:
    print("TOY NUMBERS (FAST mode, tiny sizes): near-chance accuracy is expected here")
runs = {}
for label, make in [("MLP reparametrisation", lambda: copy.deepcopy(prefix_mlp)),
                    ("direct", lambda: Folded(folded))]:               # the same P at step 0
    torch.manual_seed(0)
    m = pelib.load_backbone("minilm", num_labels=77)[0]
    m = add_prefix(m, bert_attention(m), make())
    result = pelib_train(m, tokenizer, train, test, config)
    runs[label] = (m, result.losses)
    print(f"{label:>22}: accuracy {result.metrics['accuracy']:.3f}, macro-F1 "
          f"{result.metrics['f1']:.3f}, {result.trainable_params:,} trainable")
fig, ax = plt.subplots(figsize=(6, 3))
for label, (_, losses) in runs.items():
    ax.plot(losses, label=label)
ax.set(xlabel="step", ylabel="cross-entropy", title=f"prefix tuning, L_p={L_p}, lr 3e-3")
ax.legend()
plt.show()

# %% [markdown]
# In CI this is a handful of steps and says little. The full budget (all 9,003 rows, 3 epochs,
# three seeds) runs from the command line; the course's results table keeps each method's
# test macro-F1 with the command that reproduces it. Prefix tuning next to the floor, the
# linear probe and LoRA, with the trainable numbers each one needs:

# %%
import csv

with open("../docs/tables/banking77_minilm.csv", newline="") as f:
    table = {row["method"]: row for row in csv.DictReader(f)}
rows = [table[k] for k in ("head", "probe", "prefix", "lora")]
print(f"{'':<28} {'test macro-F1':>17} {'trainable':>10}")
for row in rows:
    print(f"{row['label']:<28} {float(row['test_f1_mean']):.4f} ± {float(row['test_f1_sd']):.4f}"
          f" {int(row['trainable']):>10,}")
print("prefix command:", table["prefix"]["command"])
fig, ax = plt.subplots(figsize=(6, 2.4))
ax.barh([r["label"] for r in rows], [float(r["test_f1_mean"]) for r in rows],
        xerr=[float(r["test_f1_sd"]) for r in rows], color=["C7", "C7", "C1", "C0"])
lo = min(float(r["test_f1_mean"]) for r in rows)
ax.set(xlim=(lo - 0.01, lo + 0.02), xlabel="Banking77 test macro-F1 (3 epochs, mean ± sd)")
plt.show()

# %% [markdown]
# Prefix tuning trains the most numbers of the four rows (the MLP, thrown away after training)
# and lands where the frozen backbone with a linear head already is, under LoRA: on a
# 22M-parameter encoder its extra keys buy little. Its command is the one in the table that
# clips the gradient norm (`--max-grad-norm 1`, transformers' Trainer default). Lester et al.
# (2021) found that prompt tuning needs very large models to match fine-tuning; P-tuning v2
# (Liu et al., 2022) closed much of that gap with prompts in every layer, as here, on models from
# about 300M parameters, with per-task learning rates and long training.
#
# After training, folding makes the two the same kind of object: for MiniLM a tensor of the
# shape section 2 printed, (n_layers, 2, n_kv, L_p, d_h).

# %%
trained = runs["MLP reparametrisation"][0]
with torch.no_grad():
    probe = tokenizer(texts, padding=True, return_tensors="pt")
    trained.eval()
    before = trained(**probe).logits
    trained.prefix = Folded(trained.prefix())                       # fold: the MLP is gone
    after = trained(**probe).logits
assert not any(isinstance(m, PrefixMLP) for m in trained.modules())
print(f"after folding: {sum(p.numel() for p in trained.prefix.parameters()):,} numbers, "
      f"max |change| = {(after - before).abs().max():.1e}")
assert torch.equal(after, before)

# %% [markdown]
# ## 5. The cost: attention over $L_p + T$ keys
# Per layer and token, the projections and the feed-forward block cost about $12d^2$
# multiply-adds (Q, K, V, O: $4d^2$; FFN with width $4d$: $8d^2$) whatever the prefix. The
# attention scores and the weighted sum cost $2(L_p + T)d$: a prefix makes every query look
# at $L_p$ more keys. For short inputs and long prefixes that is a visible share, and during
# generation the keys to read grow by $L_p$ at every layer and every step. Forward time of
# MiniLM with prefixes of growing length, one thread, interleaved with the base model:

# %%
def forward_ms(model, enc, repeats):
    model.eval()
    times = []
    with torch.inference_mode():
        model(**enc)                                                # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(**enc)
            times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[len(times) // 2]


B, T = (4, 32) if FAST else (16, 32)
lengths = [16, 64, 256] if FAST else [4, 16, 64, 128, 256, 512]
enc = {"input_ids": torch.randint(1000, 20000, (B, T)), "attention_mask": torch.ones(B, T, dtype=torch.long)}
threads = torch.get_num_threads()
torch.set_num_threads(1)
measured, predicted = [], []
for n in lengths:
    m = copy.deepcopy(minilm)
    m = add_prefix(m, bert_attention(m), Folded(torch.randn(n_layers, 2, n_heads, n, d_h)))
    pair = [(forward_ms(minilm, enc, 3 if FAST else 10), forward_ms(m, enc, 3 if FAST else 10))
            for _ in range(2 if FAST else 3)]
    base_ms, prefix_ms = (sorted(x)[len(x) // 2] for x in zip(*pair))
    measured.append(prefix_ms / base_ms)
    predicted.append((12 * d * d + 2 * (n + T) * d) / (12 * d * d + 2 * T * d))
    print(f"L_p={n:>3}: base {base_ms:6.1f} ms, with prefix {prefix_ms:6.1f} ms "
          f"(x{measured[-1]:.2f}; FLOP model x{predicted[-1]:.2f})")
torch.set_num_threads(threads)
fig, ax = plt.subplots(figsize=(5, 3))
ax.plot(lengths, measured, "o-", label="measured forward time")
ax.plot(lengths, predicted, "s--", label="multiply-add count")
ax.axhline(1, color="k", lw=0.8)
ax.set(xscale="log", xlabel="prefix length L_p", ylabel="time / base",
       title=f"MiniLM, batch {B} x {T} tokens")
ax.legend()
plt.show()

# %% [markdown]
# The measured ratio can exceed the multiply-add model: attention's small matmuls and the
# softmax run far below the machine's matmul peak, so a longer attention costs more time than
# its share of arithmetic. (A ratio below 1 at small $L_p$ is timing noise on a shared CPU.)
#
# ## 6. A decoder with grouped-query attention, and generation
# SmolLM2 has 9 query heads and 3 KV heads; K and V, and so the prefix, have 3 heads, and SDPA
# repeats them for the query groups. With the prefix outside the cache, `generate` needs no
# special handling: at every step the cache holds the real tokens and our function prepends
# the prefix again. We check `generate` against a loop of full forward passes, no cache at all.
# (In CI a tiny random Llama with SmolLM2's head layout stands in for the real model.)

# %%
if FAST:
    llama, _ = pelib.tiny_backbone("smollm2", task="causal_lm", with_tokenizer=False,
                                   hidden_size=72, num_attention_heads=9, num_key_value_heads=3,
                                   head_dim=8, tie_word_embeddings=False)  # tied: it repeats itself
    llama.set_attn_implementation("sdpa")
    prompt = torch.randint(100, 1000, (1, 8))
else:
    llama, llama_tok = pelib.load_backbone("smollm2", task="causal_lm")
    prompt = llama_tok("The bank transfer is", return_tensors="pt")["input_ids"]
lc = llama.config
print(f"{lc.num_attention_heads} query heads, {lc.num_key_value_heads} KV heads, head size {lc.head_dim}")
llama_prefix = Folded(0.5 * torch.randn(lc.num_hidden_layers, 2, lc.num_key_value_heads, 8, lc.head_dim))
llama = add_prefix(llama, [layer.self_attn for layer in llama.model.layers], llama_prefix).eval()
with torch.no_grad():
    generated = llama.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                               max_new_tokens=8, do_sample=False, pad_token_id=lc.pad_token_id)
    seq = prompt
    for _ in range(8):
        seq = torch.cat([seq, llama(input_ids=seq).logits[:, -1:].argmax(-1)], dim=1)
print("generate:", generated[0, prompt.shape[1]:].tolist())
print("by hand: ", seq[0, prompt.shape[1]:].tolist())
assert torch.equal(generated, seq)

# %% [markdown]
# **And peft?** peft's `PrefixTuningConfig` builds the prefix as a KV cache
# (`past_key_values`). Two consequences, checked in `tests/test_prefix.py`:
#
# * The cache already holds $L_p$ entries, so Llama numbers the real tokens $L_p, L_p + 1, \dots$
#   instead of $0, 1, \dots$; with RoPE that changes how queries meet the (unrotated) prefix keys.
#   Given the same prefix values and `position_ids` shifted by $L_p$, our logits equal peft's
#   bit for bit on a tiny Llama.
# * With transformers 5.24, peft 0.21.2 refuses BERT sequence classification ("Model does not
#   support past key values which are required for prefix tuning."), because the BERT classifier
#   no longer takes `past_key_values`. The attention-function hook has no such dependency.
#
# ## 7. Check: pelib's prefix tuning is the one we built
# `pelib.prefix.apply_prefix(model, prefix_length)` does what `add_prefix` does, for eager and
# SDPA attention, BERT and Llama, and keeps the MLP as `prefix_encoder` until `fold()`. Given
# our trained, folded prefix and head, it must give our logits.

# %%
from pelib.prefix import apply_prefix, fold

theirs = apply_prefix(pelib.load_backbone("minilm", num_labels=77)[0], prefix_length=L_p)
n_theirs = pelib.trainable_parameters(theirs)
assert n_theirs == n_mlp + d * 77 + 77                              # the MLP + the head
# the same MLP weights give the same prefix (up to float rounding: pelib computes per layer)
with torch.no_grad():
    theirs.prefix_encoder.embedding.copy_(prefix_mlp.P_prime)
    theirs.prefix_encoder.mlp.load_state_dict(prefix_mlp.mlp.state_dict())
    P_ours = prefix_mlp()
    for i in range(n_layers):
        P_K, P_V = theirs.prefix_encoder.layer_kv(i)
        assert torch.allclose(P_K, P_ours[i, 0], atol=1e-6) and torch.allclose(P_V, P_ours[i, 1], atol=1e-6)
fold(theirs)
assert theirs.prefix_encoder.prefix.shape == (n_layers, 2, n_heads, L_p, d_h)
with torch.no_grad():
    theirs.prefix_encoder.prefix.copy_(trained.prefix.P)            # our trained, folded prefix
    theirs.classifier.load_state_dict(trained.classifier.state_dict())
    theirs.eval()
    assert torch.equal(theirs(**probe).logits, trained(**probe).logits)
print("pelib's prefix tuning equals the notebook's")

# %% [markdown]
# ## Exercises
# Each stub raises `NotImplementedError` until you fill it in; the cell after it then checks
# your answer. Solutions: `notebooks/solutions/nb02.py`. Exercise 2 is a warm-up (a count);
# exercises 1 and 3 ask for something this notebook did not build.
#
# **Exercise 1 (new: prompt tuning, the input-only prompt).** Prefix tuning puts learned keys and
# values into *every* layer (as P-tuning v2 does). Prompt tuning (Lester et al., 2021) keeps
# only the bottom of that idea: $L_p$ learned vectors $E_p \in \mathbb{R}^{L_p \times d}$ are
# prepended to the *input embeddings*, and the frozen network runs on $L_p + T$ positions,
#
# $$ \mathrm{model}\big(\,[E_p;\; \mathrm{Embed}(x)]\,\big), \qquad \text{mask } [\mathbf{1}_{L_p};\; m]. $$
#
# Write `prompt_forward(model, prompt, input_ids, attention_mask)` for a transformers model:
# `prompt` (L_p, d), `input_ids` and `attention_mask` (B, T), returning the model's `.logits`
# (hint: `model.get_input_embeddings()` and the `inputs_embeds=` argument). The checker uses the
# fact that a prompt made of real token embeddings must give exactly what the model gives on
# those tokens written before the text, on a tiny BERT classifier and a tiny Llama with padded
# batches; that a random prompt gets a gradient; and it prints the numbers prompt tuning trains
# against a deep prefix of the same length, for MiniLM and SmolLM2.

# %%
from checks import attempt
from checks.nb02 import exercise_1, exercise_2, exercise_3


def prompt_forward(model, prompt, input_ids, attention_mask):
    raise NotImplementedError                                        # -> model(...).logits


attempt(exercise_1, prompt_forward)

# %% [markdown]
# **Exercise 2 (warm-up): how big is a prefix, with grouped-query attention?** Write
# `prefix_numbers(n_layers, n_heads, n_kv_heads, d, L_p, hidden)` returning two counts: the
# numbers trained through the reparametrisation ($P' \in \mathbb{R}^{L_p \times d}$, then
# Linear($d \to$ hidden) and Linear(hidden $\to n_{layers} \cdot 2 \cdot d_{kv}$), with biases)
# and the numbers kept after folding ($n_{layers} \cdot 2 \cdot L_p \cdot d_{kv}$). Remember
# $d_{kv} = n_{kv} \cdot d_h$ with $d_h = d / n_{heads}$. The checker builds pelib's prefix on a
# tiny BERT and a tiny Llama with 9 query and 3 KV heads and counts.

# %%
def prefix_numbers(n_layers, n_heads, n_kv_heads, d, L_p, hidden):
    raise NotImplementedError                                        # -> (trained, kept)


attempt(exercise_2, prefix_numbers)

# %% [markdown]
# **Exercise 3 (new: a prefix in a GQA decoder, without SDPA).** Section 3 handed the widened keys
# to PyTorch's `scaled_dot_product_attention` and let it handle the query groups and the mask.
# Write that attention yourself: `gqa_prefix_attention(q, k, v, P_K, P_V)` with queries `q`
# (B, H, T_q, d_h), the real keys and values `k`, `v` (B, n_kv, T, d_h) and the prefix `P_K`,
# `P_V` (n_kv, L_p, d_h), returning (B, H, T_q, d_h). Three things to get right:
#
# * **groups**: query head $h$ reads KV head $\lfloor h / (H / n_{kv}) \rfloor$ (transformers'
#   `repeat_kv` order: heads 0, 1, 2 share KV head 0 when $H / n_{kv} = 3$);
# * **causality**: the queries are the *last* $T_q$ of the $T$ real positions (during generation
#   $T_q = 1$), so query $i$ sits at position $T - T_q + i$ and sees real keys $0 \dots T - T_q + i$;
# * **the prefix**: its $L_p$ keys are visible to every query; scores scale by $1/\sqrt{d_h}$.
#
# `F.scaled_dot_product_attention` is disabled while your function runs; the checker compares with
# a head-by-head loop of explicit softmaxes.

# %%
def gqa_prefix_attention(q, k, v, P_K, P_V):
    raise NotImplementedError                                        # -> (B, H, T_q, d_h)


attempt(exercise_3, gqa_prefix_attention)
