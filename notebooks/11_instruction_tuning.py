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
# # 11 · Instruction tuning: SmolLM2 learns to write the answer
#
# Notebook 10 gave SmolLM2-135M a fresh 77-way head on its last token: a classifier. The source
# article's team (the 58.com TEG-AI Lab article on PEFT methods: LoRA, QLoRA, AdaLoRA, SoRA,
# Unsloth) trained their chat LLMs differently: **supervised fine-tuning (SFT)**, next-token
# prediction on conversations, the answer written out as text. That is also what a learner does
# next with their own data, and it is where an LLM's fine-tuning cost lives:
#
# * the **chat template**: the Instruct model was trained on conversations in one format; we pose
#   each Banking77 row in it, the intent's name as the assistant's answer;
# * **which tokens carry the loss**: the answer only;
# * **padding**: right for training, left for generation, and what it costs;
# * the **LM head's bill**: the logits are tokens x 49,152, the largest tensor of the step; we
#   build a chunked linear cross-entropy with its own backward that never holds them all;
# * **decoding**: greedy with the KV cache, exact match against the 77 names, invalid outputs,
#   and constrained decoding with a prefix trie that can only write a name;
# * a **zero-shot** row (the Instruct model with the intent list in its prompt, no training) and a
#   short **LoRA** fine-tune, in one table beside notebook 10's classifier and, when they have
#   been run, the one-epoch fine-tunes of `python -m pelib compare --preset sft`;
# * the adapter on a **4-bit base**, written in peft's format and served by transformers +
#   bitsandbytes + peft, which must write the answers pelib writes.
#
# Full mode is sized for a laptop's CPU: all 9,003 training rows for the padding statistics, 100
# training steps (1,600 rows) for the fine-tune, and a seeded random 770 of the 3,080 test rows
# for decoding; the cells print their own sizes and times.
#
# Each piece is built here from its equations and checked at the end against `pelib.sft` and
# `pelib.linear_ce`, where the finished code lives. With `PELIB_FAST=1` (CI) the model is a tiny
# random SmolLM2 with the real tokenizer and vocabulary, trained for a few steps: every number
# is then a TOY NUMBER; only the mechanics are real.

# %%
import csv
import os
import random
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

import pelib
from pelib.measure import time_ms

FAST = os.environ.get("PELIB_FAST") == "1"
TOY = " (TOY NUMBERS)" if FAST else ""
flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
BF16 = "avx512_bf16" in flags or "amx_bf16" in flags   # bf16 matmuls in hardware: autocast pays
DTYPE = torch.bfloat16 if BF16 else torch.float32
torch.manual_seed(0)
if FAST:  # the architecture at toy size, random weights, the real tokenizer (vocabulary 49,152)
    model, tok = pelib.tiny_backbone("smollm2", task="causal_lm")
    print("TOY NUMBERS: PELIB_FAST=1. A TINY RANDOM SMOLLM2 TRAINED FOR A FEW STEPS ON A FEW ROWS; "
          "ITS F1, INVALID OUTPUTS AND TIMES SAY NOTHING ABOUT INSTRUCTION TUNING.")
else:
    model, tok = pelib.load_backbone("smollm2", task="causal_lm")
names = pelib.data.label_names("banking77")                       # 77 intents, sorted
train = pelib.load_nlu("banking77", "train", limit=64 if FAST else None, seed=0)
test = pelib.load_nlu("banking77", "test", limit=32 if FAST else 770, seed=0)  # a seeded quarter
V, H = model.lm_head.weight.shape                                  # (49152, 576): the head
print(f"{len(train.texts)} train rows, {len(test.texts)} test rows, {len(names)} intents; "
      f"vocabulary V = {V:,}, hidden size H = {H}{TOY}")

# %% [markdown]
# ## 1. The task as a conversation
#
# The Instruct model's tokenizer carries its chat template: a system turn, then
# `<|im_start|>user ... <|im_end|>`, then `<|im_start|>assistant` where the model writes. The
# user's turn asks for the intent; the assistant's answer is the intent's name with spaces
# (`lost_or_stolen_card` -> `lost or stolen card`: words the model already knows), closed by the
# end-of-turn token `<|im_end|>`, which is also the tokenizer's EOS: writing it ends the answer.
#
# Training is next-token prediction on the **answer only**. With $x_1..x_T$ the tokens and
# $y_t = x_t$ on the answer, $y_t = -100$ ("no label") on the prompt, the loss is
#
# $$\mathcal L = -\frac{1}{n}\sum_{t:\,y_t \ne -100} \log p_\theta(x_t \mid x_{<t}),\qquad
#   n = |\{t : y_t \ne -100\}|.$$
#
# The prompt's tokens are in the input (the model reads them) but not in the loss: the model is
# not trained to write the system prompt or the customer's message, only the answer.

# %%
QUESTION = "Which banking intent does this customer message express?\nMessage: {text}"


def build_prompt(text: str) -> list[int]:
    """The conversation up to the assistant's turn, in the model's own chat template."""
    chat = [{"role": "user", "content": QUESTION.format(text=text)}]
    out = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def build_example(text: str, label: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels): the answer's tokens + EOS carry labels, the prompt gets -100."""
    p = build_prompt(text)
    a = tok(label.replace("_", " "), add_special_tokens=False).input_ids + [tok.eos_token_id]
    return p + a, [-100] * len(p) + a


text0, label0 = train.texts[0], names[train.labels[0]]
ids0, labels0 = build_example(text0, label0)
print(tok.decode(ids0))
print(f"\n{len(ids0)} tokens, {sum(y != -100 for y in labels0)} of them labelled; the last 10:")
print(f"{'position':>8s}  {'token':18s} {'label':>6s}")
for t in range(len(ids0) - 10, len(ids0)):
    print(f"{t:8d}  {tok.convert_ids_to_tokens(ids0[t])!r:18s} {labels0[t]:6d}")

# %% [markdown]
# A causal LM predicts token $t$ from position $t-1$: the logits at position $t-1$ are scored
# against $y_t$. So the loss pairs `hidden[:, :-1]` with `labels[:, 1:]` (the shift), and the
# last prompt token (`\n` after `assistant`) is the one that must predict the answer's first word.
#
# ## 2. Padding: right for training, left for generation, and what it costs
#
# A batch is a rectangle $(B, T)$ with $T$ the longest row. **Training** pads on the right: pads
# get attention 0 and label -100, and a row's real tokens keep positions $0..L-1$. **Generation**
# pads on the left, so that every row's next token is written at the same column $T$; the
# positions are counted from each row's first real token, $\text{pos} = \text{cumsum(mask)} - 1$.
#
# Every pad is computed like a real token (the matmuls do not skip it), so the share of pads is
# the share of wasted compute. Random batches mix short and long rows; **length-grouped** batches
# sort a large pool of rows by length, cut it into batches, and shuffle the batches (the order of
# the data stays random at the level of batches).

# %%
def pad_right(rows, pad_id):
    """Rows of (input_ids, labels) -> input_ids, attention_mask, labels, each (B, T)."""
    T = max(len(x) for x, _ in rows)
    ids = torch.full((len(rows), T), pad_id)
    labels = torch.full((len(rows), T), -100)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pad_left(prompts, pad_id):
    """Prompts -> input_ids, attention_mask (B, T), every row ending at column T - 1."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):], mask[i, T - len(p):] = torch.tensor(p), 1
    return {"input_ids": ids, "attention_mask": mask}


def batches(lengths, batch_size, grouped, seed=0, pool=50):
    """Index lists of batches: random, or sorted by length within pools of `pool` batches."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    if grouped:
        chunks = [order[i:i + pool * batch_size] for i in range(0, len(order), pool * batch_size)]
        order = [j for c in chunks for j in sorted(c, key=lambda j: lengths[j])]
    out = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    random.Random(seed + 1).shuffle(out)
    return out


def pad_share(lengths, index_batches):
    """Pads / all tokens computed, over every batch."""
    real = sum(lengths[j] for b in index_batches for j in b)
    total = sum(len(b) * max(lengths[j] for j in b) for b in index_batches)
    return 1 - real / total


examples = [build_example(t, names[y]) for t, y in zip(train.texts, train.labels)]
lengths = [len(x) for x, _ in examples]
share = {g: pad_share(lengths, batches(lengths, 16, g)) for g in (False, True)}
print(f"{len(lengths)} training conversations of {min(lengths)}-{max(lengths)} tokens, batch 16:")
print(f"  random batches:         {100 * share[False]:5.1f}% of the tokens computed are pads")
print(f"  length-grouped batches: {100 * share[True]:5.1f}%{TOY}")

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 2.8), sharey=True)
for ax, g in zip(axes, (False, True)):
    b = batches(lengths, 16, g)[0]
    m = pad_right([examples[j] for j in b], tok.pad_token_id)["attention_mask"]  # (16, T)
    ax.imshow(m, cmap="Greys", aspect="auto", vmin=0, vmax=1, interpolation="nearest")
    ax.set(title=f"{'length-grouped' if g else 'random'} batch: {100 * (1 - m.float().mean()):.0f}% "
           f"pads (white){TOY}", xlabel="position", ylabel="row")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 3. The LM head's bill, and a cross-entropy that never holds the logits
#
# The head maps each hidden state $h_t \in \mathbb R^H$ to $V = 49{,}152$ logits, $z = hW^\top$
# with $W \in \mathbb R^{V \times H}$. Over a batch of $B \times T$ positions that is a
# $(BT, V)$ tensor; in fp32, and autograd keeps it (and the softmax) for the backward. The cell
# below prints what that is for one batch of the training set, against the positions that
# carry a label.

# %%
b = pad_right([examples[j] for j in batches(lengths, 16, True)[0]], tok.pad_token_id)
B, T = b["input_ids"].shape
n_lab = int((b["labels"][:, 1:] != -100).sum())
print(f"one batch {B} x {T}: all logits {B * T:,} x {V:,} x 4 B = {B * T * V * 4 / 2**20:,.0f} MiB; "
      f"only the {n_lab} labelled positions: {n_lab * V * 4 / 2**20:,.1f} MiB{TOY}")

# %% [markdown]
# Two savings, both exact.
#
# **Labelled rows only.** The loss reads the logits only where $y_t \ne -100$: select those
# hidden states first, $h \leftarrow h[y \ne -100]$, then apply the head to $n$ rows instead of
# $BT$.
#
# **Chunks, with the gradient made in the forward** (the idea of Liger-Kernel's fused linear
# cross-entropy and of Cut Cross-Entropy). For one row, with $p = \mathrm{softmax}(z)$,
#
# $$\ell = \log\sum_j e^{z_j} - z_y, \qquad \frac{\partial \ell}{\partial z} = p - e_y .$$
#
# The mean over $n$ rows gives $\partial\mathcal L/\partial z_i = (p_i - e_{y_i})/n$, and the
# chain rule through $z = hW^\top$ gives
#
# $$\frac{\partial\mathcal L}{\partial h_i} = \frac{(p_i - e_{y_i})}{n} W, \qquad
#   \frac{\partial\mathcal L}{\partial W} = \sum_i \frac{(p_i - e_{y_i})^\top}{n} h_i .$$
#
# Each needs only one row's logits. So the forward walks over chunks of $C$ rows: logits
# $(C, V)$, loss, $dz$, $dh$ for those rows, $dW$ accumulated; then the chunk's logits are
# dropped. Autograd keeps $dh$ $(n, H)$ and $dW$ $(V, H)$, not $(n, V)$; the backward only
# multiplies them by the incoming scalar gradient. With LoRA the head is frozen (and tied to the
# embedding), so $dW$ is skipped: a third of the head's FLOPs saved.

# %%
class ChunkedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, W, y, chunk):                  # h (n, H), W (V, H), y (n,): all labelled
        n, acc = len(y), torch.promote_types(h.dtype, torch.float32)  # fp32 (fp64 for fp64)
        w = W.to(h.dtype)                              # bf16 under autocast, as the model's matmuls
        dh = torch.empty_like(h) if ctx.needs_input_grad[0] else None        # (n, H)
        dW = torch.zeros(W.shape, dtype=acc) if ctx.needs_input_grad[1] else None  # (V, H)
        loss = torch.zeros((), dtype=acc)
        for s in range(0, n, chunk):
            h_c, y_c = h[s:s + chunk], y[s:s + chunk]  # (C, H), (C,)
            z = (h_c @ w.T).to(acc)                    # (C, V): the only logits alive
            lse = z.logsumexp(1)                       # (C,)
            loss += (lse - z.gather(1, y_c[:, None])[:, 0]).sum()
            dz = (z - lse[:, None]).exp()              # softmax p, (C, V)
            dz[torch.arange(len(y_c)), y_c] -= 1       # p - e_y
            dz = (dz / n).to(h.dtype)
            if dh is not None:
                dh[s:s + chunk] = dz @ w               # (C, H)
            if dW is not None:
                dW += (dz.T @ h_c).to(acc)             # (V, H)
        ctx.save_for_backward(dh, None if dW is None else dW.to(W.dtype))
        return loss / n

    @staticmethod
    def backward(ctx, g):                              # g: d(anything)/d(loss), a scalar
        dh, dW = ctx.saved_tensors
        return (None if dh is None else g.to(dh.dtype) * dh,
                None if dW is None else g.to(dW.dtype) * dW, None, None)


def chunked_ce(h, W, y, chunk=1024):
    return ChunkedLinearCE.apply(h, W, y, chunk)


def unfused_ce(h, W, y):                               # all logits, torch's cross-entropy
    return F.cross_entropy((h @ W.to(h.dtype).T).float(), y, ignore_index=-100)


# equal loss and gradients, on random rows with a trainable head (fp64 to see rounding only)
g = torch.Generator().manual_seed(0)
h = torch.randn(37, 16, generator=g, dtype=torch.float64, requires_grad=True)
W = torch.randn(1000, 16, generator=g, dtype=torch.float64, requires_grad=True)
y = torch.randint(0, 1000, (37,), generator=g)
ref = F.cross_entropy(h @ W.T, y)
d_ref = torch.autograd.grad(ref, (h, W))
mine = chunked_ce(h, W, y, chunk=8)
d_mine = torch.autograd.grad(mine, (h, W))
print(f"loss {mine.item():.10f} vs unfused {ref.item():.10f}; max |grad difference| "
      f"h {(d_mine[0] - d_ref[0]).abs().max():.1e}, W {(d_mine[1] - d_ref[1]).abs().max():.1e}")
assert torch.allclose(mine.double(), ref) and all(torch.allclose(a, b.to(a.dtype)) for a, b in zip(d_mine, d_ref))

# %% [markdown]
# Memory and time, three ways, on SmolLM2's head shape $(V, H)$, frozen as under LoRA, in the
# dtype the fine-tune below computes in (bf16 where the CPU has bf16 instructions, else fp32).
# The ledger counts the bytes autograd keeps for the backward: a `saved_tensors_hooks` pack hook
# sees every tensor saved (each storage counted once). The time is forward + backward, the
# median of a few turns taken in alternation, so that a change of load hits every way alike.

# %%
def saved_bytes(fn, inputs):
    """Run fn() and return the bytes autograd saved for its backward (each storage once), not
    counting the storages of `inputs`: the head and the hidden states exist anyway."""
    old = {t.untyped_storage().data_ptr() for t in inputs}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in old:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


Bs, Ts, A = (2, 32, 4) if FAST else (16, 64, 6)          # batch, length, answer tokens a row
g = torch.Generator().manual_seed(0)
W_head = (torch.randn(V, 576, generator=g) / 24).to(DTYPE)           # (V, H) frozen head
hid = torch.randn(Bs * Ts, 576, generator=g).to(DTYPE).requires_grad_()  # (B*T, H)
lab = torch.full((Bs, Ts), -100)
lab[:, Ts - A:] = torch.randint(0, V, (Bs, A), generator=g)
lab = lab.flatten()                                                  # (B*T,)
keep = lab != -100
ways = {"all logits": lambda: unfused_ce(hid, W_head, lab),
        "labelled rows": lambda: unfused_ce(hid[keep], W_head, lab[keep]),
        "chunked": lambda: chunked_ce(hid[keep], W_head, lab[keep])}       # chunks of 1024 rows
ledger = {k: saved_bytes(fn, (W_head, hid)) for k, fn in ways.items()}
ms = time_ms({k: (lambda fn=fn: fn().backward()) for k, fn in ways.items()}, repeats=3)
print(f"loss step of {Bs} x {Ts} positions, {int(keep.sum())} labelled, "
      f"head {V:,} x 576 {str(DTYPE)[6:]}{TOY}")
print(f"{'':14s} {'ledger MiB':>11s} {'ms fwd+bwd':>11s}")
for k in ways:
    print(f"{k:14s} {ledger[k] / 2**20:11.2f} {ms[k]:11.1f}")

# %% [markdown]
# The ledger of each unfused path is mostly the log-softmax that the cross-entropy keeps, one
# row of $V$ fp32 values per position it covers (all of them, or the labelled ones); the chunked
# path keeps $dh$ only (the head is frozen): $n \times H$ values. It does the labelled path's
# matmuls, in the forward instead of the backward, so the two times should be close. The chunk
# size is a trade: a chunk bounds the live logits to $C \times V$, but each chunk reads the whole
# head $W$ again (for $z$ and for $dh$): many small chunks pay that read many times. So chunks
# are large (1,024 rows here); they start to matter when the loss covers every token
# (pre-training, or the prompt too). At full size, with the machine's load printed beside it:
# `python -m pelib bench sft-loss --batch 16 --tokens 64`, which adds peak RSS.
#
# ## 4. Decoding: greedy with the KV cache, then constrained to the 77 names
#
# Greedy decoding writes $x_{t+1} = \arg\max_v\, z_t[v]$ until EOS. Re-running the whole prefix
# for every new token costs $O(T^2)$ rows of work per answer; the **KV cache** keeps each
# layer's keys and values of the tokens already seen, so each step runs the model on the one new
# token, $(B, 1)$, attending to the cache. With left padding the positions come from the mask.
# Only the last column's logits are needed: the prompt's pass applies the head to one position
# (`logits_to_keep=1`), not to $T$ of them.
#
# An answer is **valid** if it is exactly one of the 77 names; anything else is invalid (and
# wrong). **Constrained decoding** makes invalid outputs impossible: the names' token sequences
# (each ending with EOS) form a prefix trie; at each step only the tokens that continue some
# name after what was written so far keep their logits, the rest get $-\infty$.

# %%
def make_trie(sequences):
    root = {}
    for seq in sequences:
        node = root
        for t in seq:
            node = node.setdefault(t, {})
    return root


def trie_next(trie, prefix):
    node = trie
    for t in prefix:
        node = node.get(t)
        if node is None:
            return []
    return list(node)


answer_seqs = [tok(n.replace("_", " "), add_special_tokens=False).input_ids + [tok.eos_token_id]
               for n in names]
trie = make_trie(answer_seqs)
MAX_NEW = max(map(len, answer_seqs)) + 2


@torch.no_grad()
def greedy(batch, constrained=False):
    """Greedy decoding of a left-padded batch with the KV cache -> list of new token lists."""
    ids, mask = batch["input_ids"], batch["attention_mask"]             # (B, T)
    pos = (mask.cumsum(1) - 1).clamp(min=0)                              # (B, T)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                logits_to_keep=1)                                         # the head on one column
    cache, logits = out.cache, out.logits[:, -1].float()                 # (B, V)
    written = [[] for _ in range(len(ids))]
    done = torch.zeros(len(ids), dtype=torch.bool)
    for _ in range(MAX_NEW):
        if constrained:                                                   # -inf off the trie
            allow = torch.full_like(logits, float("-inf"))
            for i, w in enumerate(written):
                allow[i, trie_next(trie, w) or [tok.eos_token_id]] = 0
            logits = logits + allow
        nxt = torch.where(done, tok.pad_token_id, logits.argmax(-1))     # (B,)
        for i in range(len(ids)):
            if not done[i]:
                written[i].append(int(nxt[i]))
        done |= nxt == tok.eos_token_id
        if done.all():
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)        # (B, T + k)
        pos = pos[:, -1:] + 1                                             # (B, 1)
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos,
                    cache=cache, use_cache=True)                         # one new token a row
        cache, logits = out.cache, out.logits[:, -1].float()
    return written


by_text = {n.replace("_", " "): i for i, n in enumerate(names)}


def decode_all(texts, constrained=False, prompt=build_prompt, batch_size=32):
    """(written strings, prediction index or -1 for an invalid answer, seconds)."""
    t0, outs = time.perf_counter(), []
    for s in range(0, len(texts), batch_size):
        b = pad_left([prompt(t) for t in texts[s:s + batch_size]], tok.pad_token_id)
        for w in greedy(b, constrained):
            w = w[:w.index(tok.eos_token_id)] if tok.eos_token_id in w else w
            outs.append(tok.decode(w, skip_special_tokens=True).strip())
    return outs, [by_text.get(o, -1) for o in outs], time.perf_counter() - t0

# %% [markdown]
# ## 5. Zero-shot: the Instruct model with the list of intents, no training
#
# The source article compared its fine-tunes with a zero-shot GPT-4. Our zero-shot row asks
# SmolLM2-135M-Instruct itself, with all 77 names in the prompt (a prompt of several hundred
# tokens, so only part of the test split in full mode; the cell prints how many rows).
#
# Almost all of that prompt is the same for every row: the template's opening, the question and
# the 77 names come before the message. The prompt's pass costs about $2N$ FLOPs per token for
# $N$ parameters, so $R$ rows of $T$ tokens cost $\approx 2NRT$. If the first $P$ tokens are
# shared, their keys and values are the same in every row (causal attention: a token sees only
# what precedes it), so they can be computed once and their KV cache copied into each batch:
# $\approx 2N\,(P + R\,(T-P))$. A row is then `[shared prefix][pads][its own tokens]`: the pads
# sit in the middle, masked, and the positions counted from the mask stay those of the full
# prompt. This cell's loop runs every prompt whole; `pelib.sft.generate_answers` shares the prefix
# (section 9 checks that it writes the same answers), which is how `python -m pelib finetune
# --task sft --method zero-shot` answers all 3,080 test rows.

# %%
ZERO_SHOT = ("Which banking intent does this customer message express? Answer with exactly one "
             "intent from this list: {names}.\nMessage: {text}")


def zero_shot_prompt(text):
    listed = ", ".join(n.replace("_", " ") for n in names)
    chat = [{"role": "user", "content": ZERO_SHOT.format(names=listed, text=text)}]
    out = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


zs_rows = 8 if FAST else 154
zs_texts, zs_labels = test.texts[:zs_rows], test.labels[:zs_rows]
results = {}
for constrained in (False, True):
    outs, preds, sec = decode_all(zs_texts, constrained, prompt=zero_shot_prompt, batch_size=8)
    results[f"zero-shot{', constrained' if constrained else ''}"] = dict(
        y=zs_labels, pred=preds, trainable=0, s_step=None, sec=sec, outs=outs)
print(f"zero-shot on {zs_rows} test rows ({len(zero_shot_prompt(zs_texts[0]))} prompt tokens); "
      f"the first answers, unconstrained: {results['zero-shot']['outs'][:3]}{TOY}")

# %% [markdown]
# ## 6. A short LoRA fine-tune
#
# LoRA r=8, $\alpha=16$ on all seven projections of every layer (`pelib.backbone.DEFAULT_TARGETS`),
# the head and the embedding frozen. AdamW, learning rate $2\cdot 10^{-3}$ with a linear warm-up
# over the first 6% of the steps and a linear decay to 0, batch 16 in length-grouped batches,
# bf16 autocast if the CPU has bf16 instructions. The loss is section 3's: the model's hidden
# states, the labelled rows, the chunked cross-entropy. Full mode: the first 100 of the epoch's
# shuffled length-grouped batches (1,600 rows), with warm-up and decay over those 100 steps;
# `PELIB_FAST=1`: 4 steps. One epoch is 563 steps: the `sft` preset's runs (section 8).

# %%
targets = pelib.backbone.DEFAULT_TARGETS["smollm2"]
assert targets == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
model = pelib.apply_lora(model, targets, r=8, alpha=16)
trainable = [p for p in model.parameters() if p.requires_grad]
n_trainable = sum(p.numel() for p in trainable)


def loss_of(batch):
    hidden = model.model(input_ids=batch["input_ids"],
                         attention_mask=batch["attention_mask"]).last_hidden_state  # (B, T, H)
    h, y = hidden[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten()          # the shift
    keep = y != -100
    return chunked_ce(h[keep], model.lm_head.weight, y[keep])                      # (n, H), (n,)


steps = batches(lengths, 16, grouped=True, seed=0)
steps = steps[:4] if FAST else steps[:100]
opt = torch.optim.AdamW(trainable, lr=2e-3, weight_decay=0.0)
warm = max(1, round(0.06 * len(steps)))
sched = torch.optim.lr_scheduler.LambdaLR(
    opt, lambda k: (k + 1) / warm if k < warm else max(0.0, (len(steps) - k) / (len(steps) - warm)))
model.train()
losses, t0 = [], time.perf_counter()
for k, idx in enumerate(steps):
    batch = pad_right([examples[j] for j in idx], tok.pad_token_id)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=BF16):
        loss = loss_of(batch)
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()
    losses.append(loss.item())
    if not FAST and k % 25 == 0:
        print(f"step {k}/{len(steps)}: loss {loss.item():.3f}")
s_step = (time.perf_counter() - t0) / len(steps)
print(f"LoRA: {len(steps)} steps of batch 16, {s_step:.2f} s/step, bf16 autocast {BF16}, "
      f"{n_trainable:,} trainable parameters; loss {losses[0]:.3f} -> {losses[-1]:.3f}{TOY}")

# %%
for constrained in (False, True):
    outs, preds, sec = decode_all(test.texts, constrained)
    results[f"LoRA r=8{', constrained' if constrained else ''}"] = dict(
        y=test.labels, pred=preds, trainable=n_trainable, s_step=s_step, sec=sec, outs=outs)
free, con = results["LoRA r=8"], results["LoRA r=8, constrained"]
bad = [(t, o) for t, o, p in zip(test.texts, free["outs"], free["pred"]) if p < 0]
print(f"unconstrained: {len(bad)} of {len(test.texts)} answers are no intent name "
      f"({free['sec']:.1f} s); constrained: {con['pred'].count(-1)} ({con['sec']:.1f} s){TOY}")
for t, o in bad[:3]:
    print(f"  message {t[:50]!r} -> answer {o[:50]!r}")

# %% [markdown]
# ## 7. The adapter on a 4-bit base, in peft + bitsandbytes
#
# QLoRA trains the same $A$ and $B$ on a base whose linear layers are NF4 codes with double
# quantisation (notebooks 04-06); a learner then ships the adapter alone, in peft's file format,
# and serves it with transformers, bitsandbytes and peft. Here section 6's adapter goes onto
# the base quantised by pelib (`pelib.apply_qlora`, the same $A$, $B$ copied in), is written by
# `pelib.save_adapter` (`adapter_config.json`, `adapter_model.safetensors`), and is loaded by peft
# onto the same fp32 weights quantised by bitsandbytes (`pelib.peers.quantized_4bit`; the LM head,
# the tied embedding, stays dense in both). pelib's NF4 bytes equal bitsandbytes', so both models
# compute the same function up to the order of floating-point sums, and greedy decoding should
# write the same strings; the cell counts how many are identical.

# %%
import logging  # noqa: E402
import tempfile  # noqa: E402
import warnings  # noqa: E402

from peft import PeftModel  # noqa: E402

from pelib.sft import generate_answers  # noqa: E402

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its CPU import logs a warning
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing")  # peft reads a deprecated property


def fresh_base():  # the untrained Instruct model again (FAST: the same tiny random one)
    torch.manual_seed(0)
    if FAST:
        return pelib.tiny_backbone("smollm2", task="causal_lm")[0]
    return pelib.load_backbone("smollm2", task="causal_lm")[0]


qlora_model = pelib.apply_qlora(fresh_base(), targets, r=8, alpha=16)      # NF4 + DQ base
adapter = {k: v for k, v in model.state_dict().items() if ".lora_" in k}   # section 6's A, B
assert not qlora_model.load_state_dict(adapter, strict=False).unexpected_keys
adapter_dir = Path(tempfile.mkdtemp(prefix="pelib-nb11-")) / "qlora"
pelib.save_adapter(qlora_model, adapter_dir)
peft_model = PeftModel.from_pretrained(pelib.peers.quantized_4bit(fresh_base()), adapter_dir)
print("wrote", sorted(p.name for p in adapter_dir.iterdir()), "; peft's 4-bit layers:",
      sorted({type(m).__name__ for m in peft_model.modules() if "4bit" in type(m).__name__}))

n_peft = 16 if FAST else 256
ours_q = generate_answers(qlora_model, tok, test.texts[:n_peft], names)
theirs_q = generate_answers(peft_model, tok, test.texts[:n_peft], names)
same = sum(a == b for a, b in zip(ours_q.texts, theirs_q.texts))
print(f"pelib QLoRA and transformers + bitsandbytes + peft write the same answer on {same} of "
      f"{n_peft} test rows; pelib's QLoRA answers are right on "
      f"{sum(p == y for p, y in zip(ours_q.predictions, test.labels))} of them{TOY}")
assert same >= 0.9 * n_peft, "the reloaded adapter should write what pelib writes"

# %% [markdown]
# ## 8. The table, beside notebook 10's classifier head
#
# Macro-F1 with its macro precision and recall (`pelib.metrics`), the invalid-output rate, trainable
# parameters and seconds per training step. An invalid answer is a prediction of an extra
# class "invalid" that no row has: it lowers the recall of the row's own intent, and when any
# occur the extra class enters the macro mean with F1 0 (macro-averaging over the labels seen in
# either list, scikit-learn's default, does the same). The classifier rows are read from
# `docs/tables/smollm2_banking77.csv` (full-size runs on the test split: LoRA one epoch, the
# floor's head three; the command is in the file).

# %%
print(f"SmolLM2 on Banking77, by generation{TOY}")
print(f"{'row':26s} {'rows':>5s} {'F1':>6s} {'P':>6s} {'R':>6s} {'invalid':>8s} "
      f"{'trainable':>10s} {'s/step':>7s}")
table = {}
INVALID = len(names)                     # an answer that is no name: a class of its own
for name, r in results.items():
    m = pelib.metrics.classification_metrics(r["y"], [INVALID if p < 0 else p for p in r["pred"]])
    table[name] = m
    inv = r["pred"].count(-1) / len(r["pred"])
    step = "-" if r["s_step"] is None else f"{r['s_step']:.2f}"
    print(f"{name:26s} {len(r['y']):5d} {m['f1']:6.3f} {m['precision']:6.3f} {m['recall']:6.3f} "
          f"{100 * inv:7.1f}% {r['trainable']:10,d} {step:>7s}")
with open(Path("..") / "docs" / "tables" / "smollm2_banking77.csv") as f:
    for row in csv.DictReader(f):
        if row["method"] in ("head", "lora"):
            print(f"{'classifier: ' + row['label'].split(' (')[0]:26s} {'all':>5s} {float(row['test_f1_mean']):6.3f} "
                  f"{'':>6s} {'':>6s} {'-':>8s} {int(row['trainable']):10,d} {'':>7s}"
                  f"  ({row['seeds']} seed(s), {row['date']}, {'3 epochs' if row['method'] == 'head' else '1 epoch'})")

# %% [markdown]
# The full-size rows are `python -m pelib compare --preset sft`: the zero-shot floor (section 5's
# prompt, `--method zero-shot`), then LoRA, QLoRA (NF4 + DQ), SoRA and DoRA at r=8, one epoch over
# all 9,003 training rows, each scored by free greedy decoding on the whole test split (`python -m
# pelib finetune --task sft` is one of them). The cell below reads
# their records from `results/` when they exist, and trains nothing: on 2 CPU cores they take
# hours.

# %%
from pelib.compare import preset, run_all  # noqa: E402

ROOT = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()
done = run_all(preset("sft"), ROOT / "results", progress=False, finished_only=True)
if not done:
    print("NO RECORDS OF `python -m pelib compare --preset sft` IN results/: the rows above are this "
          "notebook's own runs")
else:
    print(f"READ FROM results/: {len(done)} of {len(preset('sft'))} runs of `python -m pelib compare "
          "--preset sft`")
for r in done:
    m = r["metrics"]
    print(f"{r['label']:26s} {r['eval_rows']:5d} {m['f1']:6.3f} {m['precision']:6.3f} "
          f"{m['recall']:6.3f} {100 * m['invalid_rate']:7.1f}% {r['trainable_params']:10,d} "
          f"{r['seconds_per_step']:7.2f}  peak RSS {r['peak_memory_mb']:,.0f} MiB")

# %% [markdown]
# Read the rows against each other: zero-shot against LoRA is what fine-tuning buys; the
# constrained rows against the free ones say how many of the misses were answers outside the
# list; the classifier rows hold the same backbone and LoRA, with a new head and a cross-entropy
# over 77 classes instead of 49,152 tokens. In `PELIB_FAST=1` all rows but the classifier's
# are toy numbers of a random tiny model.
#
# ## 9. Check against pelib
#
# `pelib.sft` and `pelib.linear_ce` hold the finished code of this notebook: the same prompt and
# labels, padding, loss and gradients, trie, and greedy decoding (through `generate`, with
# `prefix_allowed_tokens_fn` for the trie). pelib's decoding also runs the prompts' shared
# prefix once (section 5), so the last check compares it with this notebook's whole prompts.

# %%
from pelib import linear_ce, sft  # noqa: E402

assert sft.encode(tok, text0, label0) == (ids0, labels0)
rows = examples[:5]
assert all(torch.equal(a, b) for a, b in zip(pad_right(rows, 2).values(), sft.collate_train(rows, 2).values()))
prompts = [build_prompt(t) for t in test.texts[:4]]
assert all(torch.equal(a, b) for a, b in zip(pad_left(prompts, 2).values(), sft.collate_prompts(prompts, 2).values()))
assert sft.prompt_ids(tok, zs_texts[0], names) == zero_shot_prompt(zs_texts[0])

# the chunked loss and gradients: this notebook's == pelib.linear_ce's, fp32, trainable head
h = torch.randn(50, 24, requires_grad=True)
W = torch.randn(300, 24, requires_grad=True)
y = torch.randint(0, 300, (50,))
a = chunked_ce(h, W, y, chunk=7)
b = linear_ce.linear_cross_entropy(h, W, y, chunk=7)
assert torch.allclose(a, b, atol=1e-6)
assert all(torch.allclose(u, v, atol=1e-6) for u, v in
           zip(torch.autograd.grad(a, (h, W)), torch.autograd.grad(b, (h, W))))

# the whole loss of a batch: section 6's == pelib.sft.sft_loss (fp32)
batch = pad_right(examples[:4], tok.pad_token_id)
assert torch.allclose(loss_of(batch), sft.sft_loss(model, batch), atol=1e-5)

# the trie: the same continuations after every prefix of every answer
ptrie = sft.AnswerTrie(answer_seqs)
assert all(sorted(trie_next(trie, s[:i])) == sorted(ptrie.next(s[:i]))
           for s in answer_seqs for i in range(len(s) + 1))

# greedy decoding with the KV cache: this notebook's loop == pelib's generate, both ways, on the
# first 256 test rows (the same batches of 32 as section 6)
for constrained in (False, True):
    ours = results[f"LoRA r=8{', constrained' if constrained else ''}"]
    theirs = sft.generate_answers(model, tok, test.texts[:256], names, constrained=constrained)
    assert theirs.texts == ours["outs"][:256] and theirs.predictions == ours["pred"][:256], constrained
print("pelib.sft and pelib.linear_ce == this notebook's prompt, labels, padding, loss, gradients, "
      "trie and greedy decoding")

# %% [markdown]
# ## Exercises
#
# Solutions: `notebooks/solutions/nb11.py`. The checkers (`notebooks/checks/nb11.py`) fail an
# answer that calls the reference they compare against.
#
# **1 (warm-up).** Write `left_pad(prompts, pad_id)` returning `{"input_ids", "attention_mask"}`,
# both $(B, T)$ `torch.long`, every prompt ending at column $T-1$, without `pelib.sft`. The
# checker compares with its own expectation on prompts of different lengths.

# %%
from checks import attempt  # noqa: E402
from checks.nb11 import exercise_1, exercise_2, exercise_3, exercise_4  # noqa: E402


def left_pad(prompts, pad_id):
    raise NotImplementedError


attempt(exercise_1, left_pad)

# %% [markdown]
# **2 (new: label smoothing in the chunked loss).** Label smoothing with $\varepsilon$ trains
# against the target $q = (1-\varepsilon)\,e_y + \varepsilon/V$ instead of $e_y$:
#
# $$\ell = -\sum_j q_j \log p_j = \mathrm{lse}(z) - (1-\varepsilon)\,z_y
#   - \frac{\varepsilon}{V}\sum_j z_j .$$
#
# Derive $\partial\ell/\partial z$ and write `smoothed_linear_ce(h, W, y, eps, chunk)`: the
# mean of $\ell$ over the rows with $y \ne -100$, an `autograd.Function` (or any code) whose
# **saved tensors never reach the $N \times V$ logits**, with gradients for `h` and `W`. The
# checker compares loss and gradients with `F.cross_entropy(..., label_smoothing=eps)` (which is
# poisoned while your code runs) and counts the bytes your loss saves for the backward.

# %%
def smoothed_linear_ce(h, W, y, eps, chunk):
    raise NotImplementedError


attempt(exercise_2, smoothed_linear_ce)

# %% [markdown]
# **3 (new: a classifier from the LM).** Instead of generating, score every answer: the
# log-likelihood of answer $a$ (its tokens $a_1..a_m$, EOS included) after the prompt is
#
# $$\log p(a \mid \text{prompt}) = \sum_{k=1}^{m} \log p_\theta(a_k \mid \text{prompt}, a_{<k}),$$
#
# and the prediction is the answer with the largest score: never invalid, and it ranks all 77
# names. Write `answer_logprobs(model, prompt, answers) -> torch.Tensor` of shape $(K,)$ for a
# prompt (a list of token ids) and $K$ answers (lists of token ids), using **at most two
# forward calls** of the model (pad the $K$ rows, mind the shift of section 1). The checker
# compares with one forward per answer on a tiny random model. Then, on the test rows above,
# compare its predictions with greedy decoding (accuracy, and time for the 77 x rows scores).

# %%
def answer_logprobs(model, prompt, answers):
    raise NotImplementedError


attempt(exercise_3, answer_logprobs)

# %% [markdown]
# **4 (new: packing instead of padding).** Section 2 cut the pads by grouping lengths; packing
# removes them: several conversations are concatenated into one sequence of at most `capacity`
# tokens, and `position_ids` restart at 0 where each conversation starts (so RoPE sees every
# conversation as if it were alone; the attention must then be block-diagonal, each token seeing
# only its own conversation: transformers derives that from the position resets with
# flash-attention's variable-length kernels, or takes a 4-D mask). Write
# `pack(examples, capacity)` for rows of `(input_ids, labels)` returning a list of packs, each a
# dict of 1-D `input_ids`, `labels`, `position_ids`, using first-fit decreasing (sort by length,
# put each row in the first pack it fits). Why is no label lost or wrongly paired at a boundary
# after the shift of section 1? The checker rebuilds every conversation from the position resets,
# checks each appears once and no pack exceeds `capacity`, and that the number of packs is
# within first-fit decreasing's bound ($\le \tfrac{11}{9}\,\mathrm{OPT} + 1$, with OPT
# bounded below by total tokens / capacity). Then measure the pad share of batches of 4 packs of
# 256 tokens against section 2's length-grouped batches.

# %%
def pack(examples, capacity):
    raise NotImplementedError


attempt(exercise_4, pack)
