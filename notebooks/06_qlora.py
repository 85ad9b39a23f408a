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
# # 06 · QLoRA: training LoRA on a frozen 4-bit model
#
# Notebooks 04 and 05 built a 4-bit storage format: NF4 codes, blockwise absmax, double
# quantised scales, 4.127 bits a weight. Notebook 03 built LoRA. QLoRA (Dettmers et al. 2023,
# [arXiv:2305.14314](https://arxiv.org/abs/2305.14314), eq. 5) puts them together:
#
# $$ Y = X\,\mathrm{dequant}(W_{\mathrm{NF4}})^\top + b + s\,(X A^\top) B^\top, \qquad s = \alpha / r. $$
#
# The base weight is stored in 4 bits and frozen; only $A$ and $B$ (in 32 bits) train. The
# 4-bit weight is turned back into floats, $\tilde W = \mathrm{dequant}(W_{\mathrm{NF4}})$, inside
# every forward and backward and thrown away at once.
#
# 1. the 4-bit weight from the pieces of 04 and 05, and how NF4 fares on **real** SmolLM2 weights;
# 2. a `Linear4bit` whose backward needs no saved $\tilde W$, and the QLoRA layer on top;
# 3. the memory ledger: 4.127-bit weights, fp32 LoRA, Adam;
# 4. a short training run, QLoRA beside LoRA;
# 5. merging: $\tilde W + sBA$ has no exact 4-bit form. Three ways out, measured;
# 6. a check that `pelib.quant.apply_qlora` is what we built here.

# %%
import copy
import logging
import math
import os

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from scipy.stats import norm
from torch import nn

import pelib

FAST = os.environ.get("PELIB_FAST") == "1"  # CI: tiny sizes
torch.manual_seed(0)
# CI runs tiny ops on a shared machine, where every multi-threaded op waits for a busy core:
# one thread is faster there. The full run uses every core.
torch.set_num_threads(1 if FAST else max(1, os.cpu_count() or 1))
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its CPU import logs a warning
import bitsandbytes.functional as bnbF  # noqa: E402  (the peer, for checking only)

BLOCKSIZE, BLOCKSIZE2 = 64, 256

# %% [markdown]
# ## 1. The 4-bit weight, in thirty lines
#
# The NF4 code (normal quantiles, notebook 04), the 8-bit dynamic code for the scales
# (notebook 05), blockwise quantisation to the nearest level, packing two indices a byte.
# For the scales we round as bitsandbytes' CPU kernel does (`bin_table`: notebook 05,
# appendix A, explains it), so that every byte equals the peer's.

# %%
v_pos = norm.ppf(torch.linspace(0.9677083, 0.5, 9)[:-1].numpy())
v_neg = -norm.ppf(torch.linspace(0.9677083, 0.5, 8)[:-1].numpy())
code = torch.tensor([*v_pos, 0.0, *v_neg], dtype=torch.float32).sort().values
code = code / code.max()  # (16,) NF4
levels = []
for i in range(7):  # the dynamic map: scale 10^(i - 6) with 2^i fraction levels
    edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
    levels += [(edges[:-1] + edges[1:]) / 2 * 10.0 ** (i - 6), -(edges[:-1] + edges[1:]) / 2 * 10.0 ** (i - 6)]
code2 = torch.cat([*levels, torch.tensor([0.0, 1.0])]).sort().values  # (256,)
centres = -1.0 + 2.0 * torch.arange(65536, dtype=torch.float32) / 65535
bin_table = torch.bucketize(centres, (code2[:-1] + code2[1:]) / 2)  # (65536,) nearest code of each bin


# %% [markdown]
# Quantise: scale each block by its absmax, snap to the nearest NF4 level, pack two indices a
# byte; then the scales themselves, centred, in blocks of 256 with the 8-bit code.

# %%
def blocks_of(x, B):
    """(any shape) -> (n_blocks, B) fp32, zero padded."""
    x = x.reshape(-1).float()
    return F.pad(x, (0, -x.numel() % B)).view(-1, B)


def scaled_blocks(x, B):
    blocks = blocks_of(x, B)
    absmax = blocks.abs().amax(1)  # (n_blocks,)
    return (blocks * (1.0 / absmax.clamp(min=torch.finfo(torch.float32).tiny))[:, None]).clamp(-1, 1), absmax


def quantize_nf4(W):
    """W (out, in) -> packed (ceil(n/2),) uint8, qabsmax (n_blocks,) uint8, absmax2, offset."""
    scaled, absmax = scaled_blocks(W, BLOCKSIZE)
    q = torch.bucketize(scaled.view(-1), (code[:-1] + code[1:]) / 2)[: W.numel()]  # nearest level
    q = F.pad(q, (0, W.numel() % 2), value=7).to(torch.uint8)  # an odd count: pad with code 0
    packed = (q[0::2] << 4) | q[1::2]  # even element in the high nibble
    offset = absmax.mean()  # double quantisation: centre, then 8 bits in blocks of 256
    v, absmax2 = scaled_blocks(absmax - offset, BLOCKSIZE2)
    qabsmax = bin_table[(((v + 1) * 0.5) * 65535 + 0.5).long()].view(-1)[: absmax.numel()]
    return packed, qabsmax.to(torch.uint8), absmax2, offset


# %% [markdown]
# Dequantise: decode the scales, look each byte up in a 256-entry table of value pairs, scale.

# %%
lut = code[torch.stack([torch.arange(256) >> 4, torch.arange(256) & 0xF], dim=1)]  # (256, 2)


def dequantize_nf4(packed, qabsmax, absmax2, offset, shape):
    """The 256-entry byte table of notebook 05, scaled by the decoded block absmax."""
    n, nb = math.prod(shape), qabsmax.numel()
    absmax = (blocks_of(code2[qabsmax.long()], BLOCKSIZE2) * absmax2[:, None]).view(-1)[:nb] + offset
    values = blocks_of(lut[packed.long()], BLOCKSIZE)  # (n_blocks, B) code values
    return (values * absmax[:, None]).view(-1)[:n].view(shape)


W = torch.randn(300, 200) * 0.02
parts = quantize_nf4(W)
b_packed, b_state = bnbF.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
assert torch.equal(parts[0], b_packed.view(-1)) and torch.equal(parts[1], b_state.absmax)
assert torch.equal(parts[2], b_state.state2.absmax) and torch.equal(parts[3], b_state.offset)
assert torch.equal(dequantize_nf4(*parts, W.shape), bnbF.dequantize_4bit(b_packed, b_state))
print("bytes, scales and dequantised weight identical to bitsandbytes'")

# %% [markdown]
# ### NF4 on real weights
#
# Notebook 04 compared NF4, FP4 and int4 on normal and Student-t samples. Here are SmolLM2-135M's
# own linear weights. One caveat: the packaged SmolLM2 is a Q4_1 GGUF file, so its weights were
# *already* rounded to 16 levels of an affine grid per block of 32 (count the distinct values
# below). They are still the weights we train on. FAST mode looks at two matrices, the full run
# at all 210 linear layers of the 30 decoder blocks (seven in each).

# %%
from pelib.quant import create_fp4_map, create_int4_map  # noqa: E402  (the tables of notebook 04)

CODES = {"NF4": code, "FP4": create_fp4_map(), "int4": create_int4_map()}


def roundtrip_error(W, table):
    """Blockwise absmax to the nearest level of `table` and back: W - W~ (fp32)."""
    scaled, absmax = scaled_blocks(W, BLOCKSIZE)
    order = torch.argsort(table)
    s = table[order]
    q = order[torch.bucketize(scaled.view(-1), (s[:-1] + s[1:]) / 2)]
    W_q = (table[q].view(-1, BLOCKSIZE) * absmax[:, None]).view(-1)[: W.numel()]
    return W.reshape(-1) - W_q


smol, _ = pelib.load_backbone("smollm2", task="causal_lm")
names = [n for n, m in smol.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]
if FAST:
    names = ["model.layers.0.self_attn.q_proj", "model.layers.15.mlp.down_proj"]
signal, noise = 0.0, {k: 0.0 for k in CODES}
for n in names:
    Wr = smol.get_submodule(n).weight.detach()
    signal += Wr.square().sum().item()
    for k, table in CODES.items():
        noise[k] += roundtrip_error(Wr, table).square().sum().item()
gauss = torch.randn(512, 1024)
sqnr = {k: 10 * math.log10(signal / noise[k]) for k in CODES}
sqnr_gauss = {k: 10 * math.log10(gauss.square().sum().item() / roundtrip_error(gauss, t).square().sum().item())
              for k, t in CODES.items()}
distinct = torch.tensor([row.unique().numel() for row in Wr.reshape(-1, 32)[:2000]]).float().mean()
print(f"{len(names)} SmolLM2 matrices, {sum(smol.get_submodule(n).weight.numel() for n in names):,} weights; "
      f"distinct values per block of 32: {distinct:.1f} (Q4_1 origin)")
for k in CODES:
    print(f"  {k:5s} SQNR {sqnr[k]:5.2f} dB on SmolLM2, {sqnr_gauss[k]:5.2f} dB on N(0,1)")

# %%
fig, ax = plt.subplots(figsize=(6, 3))
x_pos = torch.arange(len(CODES))
ax.bar(x_pos - 0.2, list(sqnr.values()), 0.4, label="SmolLM2 linear weights")
ax.bar(x_pos + 0.2, list(sqnr_gauss.values()), 0.4, label="N(0, 1)")
ax.set_xticks(x_pos, list(CODES))
ax.set(ylabel="SQNR (dB), blocksize 64", title="4-bit codes on real and normal weights")
ax.legend()
plt.show()
assert sqnr["NF4"] > max(sqnr["FP4"], sqnr["int4"])  # NF4 still wins on the real weights
del smol

# %% [markdown]
# ## 2. `Linear4bit`: a backward without the weight
#
# For $y = x \tilde W^\top + b$ with $\tilde W$ frozen, the backward needs only
#
# $$\frac{\partial L}{\partial x} = \frac{\partial L}{\partial y}\,\tilde W ,$$
#
# no $\partial L / \partial W$ (frozen) and so no saved $x$ for it. Written naively,
# `F.linear(x, dequant(...))` makes autograd keep $\tilde W$ alive until the backward: 32 bits
# a weight for every layer of the model at once, eight times the 4-bit weight it came from.
# A custom `autograd.Function` saves the packed bytes instead and dequantises again in the
# backward: one more dequantisation per layer and step, for never holding more than one
# $\tilde W$ at a time.

# %%
class Dequant4bit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, packed, qabsmax, absmax2, offset, shape):
        W = dequantize_nf4(packed, qabsmax, absmax2, offset, shape)  # (out, in), freed on return
        ctx.save_for_backward(packed, qabsmax, absmax2, offset)  # 4.127 bits a weight
        ctx.shape = shape
        return F.linear(x, W, bias)  # (..., out)

    @staticmethod
    def backward(ctx, grad_y):  # (..., out)
        W = dequantize_nf4(*ctx.saved_tensors, ctx.shape)  # again
        return grad_y @ W, None, None, None, None, None, None  # dL/dx: (..., in)


class Linear4bit(nn.Module):
    def __init__(self, linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        for name, t in zip(("packed", "qabsmax", "absmax2", "offset"), quantize_nf4(linear.weight.detach())):
            self.register_buffer(name, t)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def dequantized_weight(self):
        return dequantize_nf4(self.packed, self.qabsmax, self.absmax2, self.offset,
                              (self.out_features, self.in_features))

    def forward(self, x):
        return Dequant4bit.apply(x, self.bias, self.packed, self.qabsmax, self.absmax2, self.offset,
                                 (self.out_features, self.in_features))


# %% [markdown]
# How much does each version keep for the backward? `saved_tensors_hooks` sees every tensor
# autograd saves; we add up their bytes, for one SmolLM2 `gate_proj` and a batch of 8 x 64 tokens.

# %%
def saved_bytes(fn, x):
    """Bytes of the tensors autograd keeps for the backward of fn(x)."""
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        fn(x)
    return sum(sizes)


lin = nn.Linear(576, 1536)  # a SmolLM2 gate_proj
q4 = Linear4bit(lin).requires_grad_(False)
x = torch.randn(8, 64, 576, requires_grad=True)
naive = saved_bytes(lambda x: F.linear(x, q4.dequantized_weight(), q4.bias), x)
ours = saved_bytes(q4, x)
print(f"saved for backward: naive {naive / 1e6:.2f} MB, Linear4bit {ours / 1e6:.2f} MB (bytes + scales); "
      f"x alone would be {x.numel() * 4 / 1e6:.2f} MB")
assert naive == q4.out_features * q4.in_features * 4  # exactly W~ in fp32: x is not kept

y = q4(x)
g = torch.randn_like(y)
(grad_x,) = torch.autograd.grad(y, x, g)
x_ref = x.detach().requires_grad_()
(grad_ref,) = torch.autograd.grad(F.linear(x_ref, q4.dequantized_weight(), q4.bias), x_ref, g)
assert torch.equal(grad_x, grad_ref) and ours < naive / 4

# %% [markdown]
# The naive version keeps exactly $\tilde W$ and not $x$: autograd saves only what the inputs
# that want a gradient need, and with a frozen weight that is $\tilde W$ (for
# $\partial L/\partial x$). $x$ would be saved only if the weight required a gradient.
#
# ### The QLoRA layer
#
# LoRA as in notebook 03, on top of the 4-bit base. Here $A$ and $B$ train in **fp32**. The
# paper keeps them in BF16 and computes in BF16 (its eq. 5: $X^{\mathrm{BF16}}$,
# $L_1^{\mathrm{BF16}}$, $L_2^{\mathrm{BF16}}$), dequantising the NF4 weight to BF16. fp32 costs 2
# more bytes per adapter weight (a small fraction of the model) and keeps Adam's small updates
# from being rounded away. The LoRA part of the $(X A^\top) B^\top$ path below (and of the
# ledger in section 3) is fp32.

# %%
class QLoRA(nn.Module):
    def __init__(self, linear, r, alpha):
        super().__init__()
        self.base, self.r, self.scaling = Linear4bit(linear), r, alpha / r
        self.A = nn.Parameter(torch.empty(r, linear.in_features))  # (r, in)
        self.B = nn.Parameter(torch.zeros(linear.out_features, r))  # (out, r): zero at the start
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def forward(self, x):  # (..., in) -> (..., out)
        return self.base(x) + F.linear(F.linear(x, self.A), self.B) * self.scaling


def inject_qlora(model, targets, r=8, alpha=16):
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            parent, child = name.rpartition(".")[0], name.rpartition(".")[2]
            setattr(model.get_submodule(parent), child, QLoRA(module, r, alpha))
    for p in model.get_submodule("classifier" if hasattr(model, "classifier") else "score").parameters():
        p.requires_grad_(True)  # the new classification head trains
    return model


layer = QLoRA(lin, r=8, alpha=16)
nn.init.normal_(layer.B, std=0.02)
out = layer(x)
out.square().mean().backward()
dense = nn.Linear(576, 1536)  # LoRA on a dense copy of W~: the same gradients
dense.weight.data, dense.bias.data = layer.base.dequantized_weight(), lin.bias.detach().clone()
A, B = layer.A.detach().clone().requires_grad_(), layer.B.detach().clone().requires_grad_()
(dense(x) + F.linear(F.linear(x, A), B) * layer.scaling).square().mean().backward()
assert torch.allclose(layer.A.grad, A.grad, rtol=1e-5, atol=1e-8)
assert torch.allclose(layer.B.grad, B.grad, rtol=1e-5, atol=1e-8)
print("QLoRA gradients = LoRA gradients on the dense W~")

# %% [markdown]
# ## 3. The memory ledger
#
# What training holds before activations, for SmolLM2-135M with LoRA r = 8 on all seven
# projections of each of its 30 blocks. Full fine-tuning pays 4 bytes for a weight, 4 for its
# gradient and 8 for Adam's two moments. LoRA pays those 16 bytes only for $A$ and $B$. QLoRA also
# shrinks the frozen linear weights to $4 + 8/64 + 32/(64 \cdot 256) = 4.127$ bits. Embeddings and
# norms stay in 16 bits in the paper (here, on a CPU, pelib keeps them in fp32).

# %%
cfg = dict(layers=30, hidden=576, inter=1536, q=9 * 64, kv=3 * 64, vocab=49152)
shapes = [(cfg["q"], 576), (cfg["kv"], 576), (cfg["kv"], 576), (576, cfg["q"]),
          (cfg["inter"], 576), (cfg["inter"], 576), (576, cfg["inter"])] * cfg["layers"]
n_linear = sum(o * i for o, i in shapes)
n_rest = cfg["vocab"] * cfg["hidden"] + (2 * cfg["layers"] + 1) * cfg["hidden"]  # tied embedding, norms
n_lora = sum(8 * (o + i) for o, i in shapes)
bits_dq = 4 + 8 / BLOCKSIZE + 32 / (BLOCKSIZE * BLOCKSIZE2)
MB = 1e6
ledger = {  # (frozen weights, trainable weights + gradients, Adam moments), MB
    "full FT, fp32": (0, 8 * (n_linear + n_rest) / MB, 8 * (n_linear + n_rest) / MB),
    "LoRA, fp32 base": (4 * (n_linear + n_rest) / MB, 8 * n_lora / MB, 8 * n_lora / MB),
    "LoRA, bf16 base": (2 * (n_linear + n_rest) / MB, 8 * n_lora / MB, 8 * n_lora / MB),
    "QLoRA, bf16 rest": ((bits_dq / 8 * n_linear + 2 * n_rest) / MB, 8 * n_lora / MB, 8 * n_lora / MB),
    "QLoRA, fp32 rest": ((bits_dq / 8 * n_linear + 4 * n_rest) / MB, 8 * n_lora / MB, 8 * n_lora / MB),
}
print(f"linear weights {n_linear:,}, embeddings + norms {n_rest:,}, LoRA r=8 {n_lora:,} "
      f"({100 * n_lora / (n_linear + n_rest):.2f}%)")
for k, (frozen, train_, adam) in ledger.items():
    print(f"  {k:18s} frozen {frozen:7.1f}  trainable+grad {train_:7.1f}  Adam {adam:7.1f}  "
          f"total {frozen + train_ + adam:7.1f} MB")
fig, ax = plt.subplots(figsize=(7, 3))
bottom = torch.zeros(len(ledger))
for j, part in enumerate(["frozen weights", "trainable + gradients", "Adam moments"]):
    vals = torch.tensor([v[j] for v in ledger.values()])
    ax.barh(list(ledger), vals, left=bottom, label=part)
    bottom += vals
ax.set(xlabel="MB before activations", title="SmolLM2-135M, r = 8 on all projections")
ax.legend()
plt.show()

# %% [markdown]
# On a 135M model the embedding matrix (tied with the LM head: almost all of the "embeddings +
# norms" count printed above) is about a fifth of the parameters and does not shrink, and
# activations (not in the ledger) dominate at any useful batch size. QLoRA matters at 7B and
# beyond, where the linear weights are almost everything.
#
# **Paged optimizers**, QLoRA's third idea, are not in this ledger because they change *where*
# memory lives, not how much. On a GPU, a long sequence with gradient checkpointing makes
# activation memory spike; if Adam's moments sit on the GPU, a spike runs out of memory.
# bitsandbytes' `PagedAdamW` (and `PagedAdamW8bit`) allocate the moments in CUDA unified memory:
# when the GPU is full the driver evicts their pages to CPU RAM, and pages them back when the
# optimizer step touches them. Nothing is copied while memory suffices. On a CPU there is no
# second memory to page to, so this notebook cannot show it; the paper uses it to fit a 65B
# fine-tune on one 48 GB GPU.
#
# ## 4. A short training run
#
# `pelib.train.train` (the loop notebook 01 builds) on Banking77, with QLoRA and, beside it, LoRA
# on the unquantised model. QLoRA needs no hook: the loop trains whatever requires a gradient.
# FAST mode: MiniLM, three steps (toy numbers: it barely learns). The full run: SmolLM2-135M as
# a sequence classifier, one pass over 256 examples.

# %%
NAME = "minilm" if FAST else "smollm2"
TARGETS = pelib.backbone.DEFAULT_TARGETS[NAME]
N_TRAIN, N_TEST, BS = (96, 64, 32) if FAST else (256, 128, 16)
train_data = pelib.load_nlu("banking77", "train", limit=N_TRAIN)
test_data = pelib.load_nlu("banking77", "test", limit=N_TEST)
tokenizer = pelib.backbone.load_tokenizer(NAME)


CFG = pelib.train.TrainConfig(epochs=1, lr=2e-3, batch_size=BS, max_length=64, warmup_ratio=0.0,
                              eval_batch_size=64, progress=False)


@torch.no_grad()
def test_logits(model):  # (N_TEST, 77): the merges below compare logits, not only the argmax
    model.eval()
    out = []
    for k in range(0, len(test_data.texts), 64):
        enc = tokenizer(test_data.texts[k:k + 64], padding=True, truncation=True, max_length=64,
                        return_tensors="pt")
        out.append(model(**enc).logits)
    return torch.cat(out)


# %%
labels = torch.tensor(test_data.labels)
torch.manual_seed(0)
backbone, _ = pelib.load_backbone(NAME, num_labels=77)
base_state = copy.deepcopy(backbone.state_dict())  # the same start for every model below
qmodel = inject_qlora(backbone, TARGETS)
q_run = pelib.train.train(qmodel, tokenizer, train_data, test_data, CFG)

lmodel, _ = pelib.load_backbone(NAME, num_labels=77)
lmodel.load_state_dict(base_state)
torch.manual_seed(0)
pelib.apply_lora(lmodel, TARGETS, r=8, alpha=16)  # notebook 03's LoRA, on the fp32 weights
l_run = pelib.train.train(lmodel, tokenizer, train_data, test_data, CFG)
if FAST:
    print("TOY NUMBERS (PELIB_FAST=1: MiniLM, 3 steps): the accuracies below are near chance")
print(f"{NAME}: QLoRA accuracy {q_run.metrics['accuracy']:.3f} ({q_run.seconds_per_step:.2f} s/step) | "
      f"LoRA {l_run.metrics['accuracy']:.3f} ({l_run.seconds_per_step:.2f} s/step), {q_run.steps} steps")
fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(q_run.losses, label="QLoRA (NF4 + DQ base)")
ax.plot(l_run.losses, label="LoRA (fp32 base)")
ax.set(xlabel="step", ylabel="cross-entropy", title=f"{NAME}, r = 8")
ax.legend()
plt.show()

# %% [markdown]
# In the full run the two curves follow each other: the 4-bit base perturbs each weight only a
# little (section 1 printed the SQNR; every 20 dB is a factor of 10 between the weights' RMS and
# the error's), and the adapter learns on top of the perturbed model. The line above the figure
# prints the seconds a step of each.
#
# ### Where a CPU differs from a GPU
#
# QLoRA buys **memory**, and pays for it in **time**: every 4-bit layer dequantises its weight
# in the forward and again in the backward (section 2), work plain LoRA never does. How the
# two sides of that bargain look depends on the machine.
#
# * *Memory.* On a GPU the weights must fit in the device's memory (tens of GB), next to the
#   activations, and for a large model the linear weights are almost all of it: cutting them
#   from 16 to about 4.13 bits is what decides whether a fine-tune fits on one card at all
#   (the paper fits a 65B model on one 48 GB GPU). On a CPU the weights live in main memory,
#   which is usually far larger; at 135M parameters the embeddings and the activations
#   weigh more (section 3), so the 4-bit base removes only part of the peak.
# * *Time.* On a GPU the dequantisation is one fused kernel that reads half a byte and writes
#   two bytes a weight at memory bandwidth, next to matmuls on tensor cores; it is a modest
#   cost that shrinks as the batch grows, since the matmuls grow with the batch and the
#   dequantisation does not. On a CPU it runs as a few general PyTorch ops (a table lookup and
#   a scale, notebook 05) with no fused kernel, and the CPU's memory bandwidth is a small
#   fraction of a GPU's. So on a CPU the extra dequantisations weigh more in a step; compare the
#   two seconds-a-step figures the line above prints (the ratio depends on the batch, the
#   model and the machine).
# * *What the process shows.* The ledger counts tensors. A process's peak resident memory (RSS,
#   what `top` shows) adds the interpreter and the code and data of torch and the other
#   libraries, the same for every method, and the freed tensors glibc keeps in its heap, which
#   vary with the heap's fragmentation and can exceed the differences between methods: RSS
#   compresses, and can reorder, what the ledger shows (the results page measures it, and the
#   trade of handing freed tensors back at once: less RSS, slower steps). `make run`'s memory
#   figure draws both: the ledger of each run stacked by kind, its peak RSS as a marker. On a
#   GPU, `torch.cuda.max_memory_allocated()` counts tensors only and stays close to the ledger.
# * *LoRA's fair baseline in 16 bits.* Under bf16 autocast an fp32 frozen weight is cast to
#   bf16 in every forward, and autograd keeps that copy for the backward: an fp32 base holds
#   6 bytes a weight, not 4. QLoRA dequantises straight into bf16 and keeps nothing. So LoRA is
#   compared with QLoRA on a bf16 base, as in the QLoRA paper; pelib stores the frozen weights
#   in bf16 whenever training runs in bf16 (`--base-dtype auto`). The results page measures
#   both bases ("The frozen base in bf16 under bf16 autocast").
#
# The numbers that matter for a decision come from the machine you will train on: measure
# seconds a step and peak memory there, with the batch you will use. docs/benchmarks.md
# lists the measured runs, each with its command and machine.
#
# ## 5. Merging
#
# After LoRA training, $W + sBA$ is one dense matrix and inference costs nothing extra
# (notebook 03). With QLoRA the base is $\tilde W$, and $\tilde W + sBA$ lies between the
# NF4 levels. Three ways out:
#
# * **(a) requantise** $\tilde W + sBA$ to NF4: a 4-bit model again, but with a fresh rounding
#   error (this is what peft does when it merges into a bitsandbytes layer);
# * **(b) dequantise and merge** into a dense fp32 (or bf16) matrix: exact up to float rounding,
#   at 8 (or 4) times the memory;
# * **(c) keep the adapter separate**: exact, 4.127 bits, and the LoRA path on every call.
#
# We compare each with (c) on the test set: the largest logit difference, the mean KL divergence
# of the predicted distributions, how often the top class agrees with (c)'s, and accuracy.

# %%
def merged_weight(layer):
    return layer.base.dequantized_weight() + (layer.B @ layer.A) * layer.scaling  # (out, in) fp32


def dense_linear(W, bias):
    linear = nn.Linear(W.shape[1], W.shape[0], bias=bias is not None)
    linear.weight.data = W.clone()
    if bias is not None:
        linear.bias.data = bias.clone()
    return linear.requires_grad_(False)


@torch.no_grad()
def merge(model, strategy):
    model = copy.deepcopy(model)
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, QLoRA)]:
        W, bias = merged_weight(layer), layer.base.bias
        if strategy == "nf4":
            new = Linear4bit(dense_linear(W, bias))
        elif strategy == "bf16":
            new = dense_linear(W.bfloat16().float(), None if bias is None else bias.bfloat16().float())
        else:  # fp32
            new = dense_linear(W, bias)
        parent, child = name.rpartition(".")[0], name.rpartition(".")[2]
        setattr(model.get_submodule(parent), child, new)
    return model


# %%
ref = test_logits(qmodel)
p_ref = ref.double().log_softmax(-1)
rows, merged_logits = {}, {}
for strategy in ["nf4", "fp32", "bf16"]:
    merged_logits[strategy] = y = test_logits(merge(qmodel, strategy))
    kl = F.kl_div(y.double().log_softmax(-1), p_ref, log_target=True, reduction="batchmean").item()
    rows[strategy] = dict(max_abs=(y - ref).abs().max().item(), kl=kl,
                          agree=(y.argmax(-1) == ref.argmax(-1)).float().mean().item(),
                          acc=(y.argmax(-1) == labels).float().mean().item())
rows["separate"] = dict(max_abs=0.0, kl=0.0, agree=1.0, acc=(ref.argmax(-1) == labels).float().mean().item())
bits = {"nf4": bits_dq, "fp32": 32, "bf16": 16, "separate": bits_dq}
print(f"{'strategy':10s}{'bits/weight':>12s}{'max |dlogit|':>14s}{'KL':>11s}{'top-1 agree':>13s}{'accuracy':>10s}")
for k, r_ in rows.items():
    print(f"{k:10s}{bits[k]:>12.3f}{r_['max_abs']:>14.2e}{r_['kl']:>11.2e}{r_['agree']:>13.3f}{r_['acc']:>10.3f}")
assert rows["fp32"]["max_abs"] < 1e-3 * ref.abs().max()
assert rows["fp32"]["max_abs"] < rows["bf16"]["max_abs"] < rows["nf4"]["max_abs"]

# %% [markdown]
# Why does requantising hurt more than the bf16 rounding? Because $\tilde W$ sits exactly *on* an
# NF4 level, in the middle of its rounding cell. Near the centre of the code neighbouring levels
# are about $0.08\,\mathrm{absmax}$ apart, and a short training moves weights by far less than half
# of that: $\tilde W + sBA$ rounds straight back to $\tilde W$. Only the few weights whose update
# crosses half a step change level, and then by a whole step. (And where the block's largest
# weight moves, the whole block's scale shifts slightly.) Per model: how many 4-bit codes change,
# and how much of $sBA$ the requantised weight still carries.

# %%
def codes_of(packed, n):
    return torch.stack([packed >> 4, packed & 0xF], dim=1).view(-1)[:n]  # (n,) indices


with torch.no_grad():
    changed, kept, upd, n_q = 0, 0.0, 0.0, 0
    for layer in [m for m in qmodel.modules() if isinstance(m, QLoRA)]:
        W_t, dW = layer.base.dequantized_weight(), (layer.B @ layer.A) * layer.scaling
        requant = Linear4bit(dense_linear(W_t + dW, None))
        n = W_t.numel()
        changed += (codes_of(requant.packed, n) != codes_of(layer.base.packed, n)).sum().item()
        kept += ((requant.dequantized_weight() - W_t) * dW).sum().item()  # projection on s*BA
        upd += dW.square().sum().item()
        n_q += n
print(f"requantising ({NAME}, {q_run.steps} steps): {100 * changed / n_q:.2f}% of the 4-bit codes change; "
      f"the weight change carries {100 * kept / upd:.0f}% of s*BA (its projection on it), plus rounding "
      f"noise; the merged model's top class agrees with the adapter's on {100 * rows['nf4']['agree']:.0f}% "
      f"of the test set (fp32 merge: {100 * rows['fp32']['agree']:.0f}%, bf16: {100 * rows['bf16']['agree']:.0f}%)")

# %% [markdown]
# So requantising (a) keeps 4 bits but erases most of a short fine-tune (the line above: few
# codes move and the weights keep a small part of $sBA$). The head, trained together with the
# adapter, then sees other features, and the top-class agreement with (c) drops. peft's merge
# into a bitsandbytes layer is exactly this strategy (`tests/test_qlora.py` checks the two agree
# bit for bit). (b) is exact in fp32 and nearly so in bf16, at 8 or 4 times the memory; (c) costs
# two small matmuls per layer. To serve a QLoRA fine-tune: keep the adapter, or merge into a
# 16-bit copy of the base.
#
# ## 6. Check against pelib
#
# `pelib.quant.apply_qlora` builds the same model with `pelib.quant.Linear4bit` and
# `pelib.lora.LoRALinear`: the same bytes, and, given our $A$, $B$ and head, the same logits.
# `merge_qlora` implements the three strategies; its results equal ours.

# %%
from pelib.quant import Linear4bit as PLinear4bit  # noqa: E402
from pelib.quant import apply_qlora, merge_qlora, qlora_nbytes  # noqa: E402

pmodel, _ = pelib.load_backbone(NAME, num_labels=77)
pmodel.load_state_dict(base_state)
apply_qlora(pmodel, TARGETS, r=8, alpha=16)
ours_layers = {n: m for n, m in qmodel.named_modules() if isinstance(m, QLoRA)}
pelib_layers = dict(pelib.lora.lora_layers(pmodel))
assert ours_layers.keys() == pelib_layers.keys()
with torch.no_grad():
    for n, m in ours_layers.items():
        p = pelib_layers[n]
        assert isinstance(p.base_layer, PLinear4bit)
        for k in ("packed", "qabsmax", "absmax2", "offset"):
            assert torch.equal(getattr(p.base_layer, k), getattr(m.base, k)), (n, k)
        p.lora_A.weight.copy_(m.A)
        p.lora_B.weight.copy_(m.B)
    head = "classifier" if NAME == "minilm" else "score"
    pmodel.get_submodule(head).load_state_dict(qmodel.get_submodule(head).state_dict())
assert torch.equal(test_logits(pmodel), ref)
for strategy in ["nf4", "fp32", "bf16"]:
    assert torch.equal(test_logits(merge_qlora(copy.deepcopy(pmodel), strategy)), merged_logits[strategy])
nbytes = qlora_nbytes(pmodel)
stored = sum(sum(getattr(m.base, k).numel() * getattr(m.base, k).element_size()
                 for k in ("packed", "qabsmax", "absmax2", "offset")) for m in ours_layers.values())
assert nbytes["packed"] + nbytes["scales"] == stored
print(f"pelib's QLoRA == this notebook's: bytes, logits and merges; {8 * stored / n_q:.3f} bits/weight "
      f"in the 4-bit layers")


# %% [markdown]
# ## Exercises
#
# Each checker compares with an independent reference and prints what it verified; library
# functions that would solve the task are switched off while your answer runs. Solutions:
# `notebooks/solutions/nb06.py`.
#
# **1 (new): the QLoRA layer as one `autograd.Function`.** Section 2 wrote the frozen 4-bit
# linear by hand and left LoRA to autograd. Write the whole layer by hand:
#
# $$ y = x\,\tilde W^\top + s\,(x A^\top) B^\top, \qquad x\ (\dots, d_{in}),\ A\ (r, d_{in}),\
#    B\ (d_{out}, r),\ \tilde W = \mathrm{dequant}(W_{\mathrm{NF4}})\ (d_{out}, d_{in}). $$
#
# Derive $\partial L/\partial x$, $\partial L/\partial A$ and $\partial L/\partial B$ from
# $g = \partial L/\partial y$ (the batch dimensions sum out of the two weight gradients), then
# implement `forward(ctx, x, A, B, packed, state, scaling)` and its `backward`, with
# $\tilde W$ = `pelib.quant.dequantize_4bit(packed, state)` reshaped to $(d_{out}, d_{in})$.
# Keep for the backward only the 4-bit weight (`packed` and `state`), `x`, `A`, `B` and, if you
# like, $h = x A^\top$: never $\tilde W$. The checker compares $y$ and the three gradients with
# autograd on a dense copy, and counts the bytes your function saves with `saved_tensors_hooks`:
# they must not exceed those tensors' bytes (pelib's own 4-bit `autograd.Function` is switched
# off while yours runs).

# %%
from checks import attempt  # noqa: E402
from checks.nb06 import exercise_1, exercise_2, exercise_3  # noqa: E402


class QLoRAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, A, B, packed, state, scaling):  # -> (..., out)
        raise NotImplementedError

    @staticmethod
    def backward(ctx, grad_y):  # (..., out) -> grads for (x, A, B, packed, state, scaling)
        raise NotImplementedError


attempt(exercise_1, QLoRAFunction.apply)

# %% [markdown]
# **2 (new): LoftQ, an initialisation that knows about the quantisation.** QLoRA starts from
# $B = 0$, so at step 0 the model is $\tilde W$, with all of the quantisation error
# $W - \tilde W$. LoftQ (Li et al. 2023, [arXiv:2310.08659](https://arxiv.org/abs/2310.08659))
# chooses the 4-bit weight and the adapter together, so that $Q + BA \approx W$ from the start.
# It alternates, starting from $R_0 = 0$:
#
# $$ Q_t = \mathrm{dequant}(\mathrm{quant}(W - R_{t-1})), \qquad
#    U S V^\top = \mathrm{svd}(W - Q_t), \qquad
#    B_t = U_{:, :r} S_{:r}^{1/2}, \quad A_t = S_{:r}^{1/2} V^\top_{:r, :}, \quad R_t = B_t A_t. $$
#
# Write `loftq_init(W, r, steps)` returning `(Q, B, A)` after `steps` rounds: `Q` the
# dequantised (out, in) fp32 weight (quantise with `pelib.quant.quantize_4bit(.., 64, "nf4")`,
# its defaults otherwise, and `dequantize_4bit`), `B` (out, r), `A` (r, in). (In a layer with
# scale $s$, the adapter would start at $B/s$ and $A$.) The checker compares
# $\|W - Q - BA\|_F$ with its own LoftQ and prints it beside QLoRA's $\|W - \tilde W\|_F$: how
# much of the quantisation error can a rank-8 adapter absorb before training starts? (peft's
# own LoftQ is switched off while yours runs.)

# %%
def loftq_init(W, r, steps):  # W (out, in) -> Q (out, in), B (out, r), A (r, in)
    raise NotImplementedError


attempt(exercise_2, loftq_init)

# %% [markdown]
# **3 (warm-up).** The training ledger before activations, in bytes, for LoRA rank $r$ on a list
# of linear shapes `[(out, in), ...]`: the frozen weights in NF4 + DQ (blocksize 64, each tensor
# on its own: packed bytes, one uint8 per block, one fp32 per 256 blocks, one fp32 offset), and
# the fp32 LoRA weights $A$ $(r, \mathrm{in})$ and $B$ $(\mathrm{out}, r)$ with their gradients
# and AdamW's two moments. Return `dict(frozen=..., lora=...)`. (Section 3 and notebook 05's
# ledger have every piece; pelib's ledger is switched off while yours runs.)

# %%
def qlora_training_bytes(shapes, r):
    raise NotImplementedError


attempt(exercise_3, qlora_training_bytes)
