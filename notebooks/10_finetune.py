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
# # 10 · A real fine-tune, end to end: SmolLM2-135M with QLoRA and SoRA
#
# Notebooks 01-08 each built one idea from its equations; `pelib` holds the finished code. This
# notebook uses only `pelib` and does what the **58.com TEG-AI Lab article on parameter-efficient
# fine-tuning methods** (LoRA, QLoRA, AdaLoRA, SoRA and Unsloth's kernels) did: fine-tune one
# pretrained model on one data set with several methods under the same loop, and read quality
# against what each method costs. Here: **SmolLM2-135M**
# (Llama, 30 layers) as a Banking77 intent classifier (77 classes), all 9,003 training rows, one
# epoch, with
#
# * **head only (floor)**: the backbone frozen; every method is read against it;
# * **full fine-tuning**: every weight trains, the cost every PEFT method is measured against;
# * **LoRA r=8** (the reference), **QLoRA r=8** (NF4 + double quantisation base), **SoRA r=8**.
#
# Per run: macro-F1 on the test split, trainable parameters, memory (measured two ways: process
# RSS, and a ledger counted tensor by tensor), the loss curve; for SoRA the live ranks during
# training. Then the QLoRA adapter leaves pelib in peft's file format and is reloaded with peft +
# bitsandbytes, and the two must predict the same labels.
#
# The runs come from `pelib.compare`, the runner behind `python -m pelib compare`. Its presets
# (`pelib/compare.py`):
#
# | preset | what |
# |---|---|
# | `smoke` | tiny random models, 64 examples: checks the pipeline (CI, and this notebook with `PELIB_FAST=1`) |
# | `workshop` (`make run`) | MiniLM on all Banking77 rows, 1 epoch, each fine-tune starting from the probe head (LP-FT): the floor, full fine-tuning, LoRA, QLoRA, AdaLoRA, SoRA, and peft's LoRA |
# | `seeds` | the `workshop` rows with seeds 0, 1, 2 |
# | `lr`, `lr-clinc150` | each MiniLM method at 1/2, 1 and 2x its learning rate, F1 on the dev split of Banking77, of CLINC150 |
# | `full` | every method and its peft twin, Banking77 and CLINC150, 3 epochs, 3 seeds |
# | `llm` | SmolLM2-135M on all Banking77 rows, 1 epoch, batch 16: head, full fine-tuning, LoRA, QLoRA, SoRA (this notebook) |
#
# Each run is its own process, checkpointed: the runner skips runs whose record already exists
# in `results/` and resumes a cut-off one. So `python -m pelib compare --preset llm` and this
# notebook share their runs; whichever runs first does the work, the other reads it (the
# table of section 1 prints what each run cost: its training time and seconds per step, read
# from its record). With `PELIB_FAST=1` the notebook runs the four SmolLM2 rows of the
# `smoke` preset instead: tiny random models, and every number printed is a TOY NUMBER.

# %%
import logging
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from matplotlib.ticker import FuncFormatter

import pelib
from pelib.compare import preset, run_all, summary
from pelib.measure import LEDGER_KINDS, memory_ledger

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its CPU import logs a warning
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing")  # peft reads a deprecated property
FAST = os.environ.get("PELIB_FAST") == "1"  # CI: tiny models
ROOT = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()
TOY = " (TOY NUMBERS)" if FAST else ""  # on every table and figure title

if FAST:  # the SmolLM2 rows of the smoke preset, in a scratch folder
    OUT = Path(tempfile.mkdtemp(prefix="pelib-nb10-"))
    runs = [(label, argv) for label, argv in preset("smoke") if argv[1] == "smollm2"]
else:  # the llm preset, in results/ (shared with `python -m pelib compare --preset llm`)
    OUT = ROOT / "results"
    OUT.mkdir(exist_ok=True)
    runs = preset("llm")
before = {p.name: p.stat().st_mtime for p in OUT.glob("*.json")}
missing = len(runs) - len(run_all(runs, OUT, progress=False, finished_only=True))
if missing and not FAST:  # said before it starts: at full size a run takes up to an hour on 2 cores
    print(f"TRAINING {missing} OF THE {len(runs)} RUNS OF `python -m pelib compare --preset llm` NOW "
          "(their records are not in results/): hours on a laptop's CPU; stop the kernel and run "
          "the preset from a terminal to keep them going in the background")
t0 = time.time()
records = run_all(runs, OUT, progress=False)
reused = [r["name"] for r in records if before.get(r["name"] + ".json") is not None
          and (OUT / (r["name"] + ".json")).stat().st_mtime == before[r["name"] + ".json"]]
print(f"{len(records)} runs in {'a scratch folder' if FAST else 'results/'}: {len(reused)} read from finished runs there, "
      f"{len(records) - len(reused)} trained now ({time.time() - t0:.0f} s)")
if reused and len(reused) == len(records):
    print("READ FROM results/: these runs were written earlier by `python -m pelib compare "
          "--preset llm` (or an earlier run of this notebook)")
assert all(r["args"]["model"] == "smollm2" and r["args"]["tiny"] == FAST for r in records)
if FAST:
    print("TOY NUMBERS: PELIB_FAST=1. THESE RUNS USE RANDOM TINY MODELS ON 64 EXAMPLES; THEIR F1, "
          "MEMORY AND TIME SAY NOTHING ABOUT THE METHODS. ONLY THE PIPELINE IS REAL.")

# %% [markdown]
# ## 1. The table
#
# Macro-F1 averages the per-class F1 over the 77 intents, so a rare intent counts as much as a
# common one: $F_1^{macro} = \frac{1}{C}\sum_c \frac{2 P_c R_c}{P_c + R_c}$. The share is
# trainable / all parameters; for QLoRA "all" counts the 4-bit weights as weights.

# %%
def plain(x, _=None):  # 2.5M, 360k: plain units, never a 1e6 offset
    return f"{x / 1e6:.3g}M" if x >= 1e6 else f"{x / 1e3:.3g}k" if x >= 1e3 else f"{x:.0f}"


by_method = {r["args"]["method"]: r for r in records}  # one seed, one run per method
rows = {r["label"]: dict(method=r["args"]["method"], f1=r["metrics"]["f1"], acc=r["metrics"]["accuracy"],
                         trainable=r["trainable_params"], share=r["trainable_params"] / r["total_params"],
                         rss_mb=r["peak_memory_mb"], s_per_step=r["seconds_per_step"],
                         train_s=r["train_seconds"])
        for r in records}
r0 = records[0]
print(f"SmolLM2{'-tiny' if FAST else ''} on Banking77{TOY}: {r0['train_rows']} train rows, "
      f"{r0['eval_rows']} {r0['eval_split']} rows, batch {r0['args']['batch_size']}")
print(f"{'method':22s} {'F1':>7s} {'acc':>7s} {'trainable':>10s} {'share':>7s} {'RSS MB':>7s} {'s/step':>7s} "
      f"{'train s':>8s}")
for label, v in rows.items():
    print(f"{label:22s} {v['f1']:7.4f} {v['acc']:7.4f} {plain(v['trainable']):>10s} "
          f"{100 * v['share']:6.2f}% {v['rss_mb']:7.0f} {v['s_per_step']:7.3f} {v['train_s']:8.0f}")

# %% [markdown]
# ## 2. Quality against trainable parameters
#
# The floor (only the head trains) is a dashed line: a method is worth its adapter only by how
# far above that line it sits. The x axis counts what AdamW holds (8 bytes of state each).
#
# How high is the floor? The cell below reads the full-size floors from the course's result
# tables (`docs/tables/`; each row there carries the command that produced it: MiniLM trains
# every row three epochs, SmolLM2 its head three epochs and its adapters one), with the L-BFGS
# probe (a linear classifier fitted on standardised frozen features) beside the head trained by
# Adam, and LoRA r=8 for scale.

# %%
import csv  # noqa: E402


def course_table(name):  # {method: row} of one result table in docs/tables
    with open(ROOT / "docs" / "tables" / name) as f:
        return {r["method"]: r for r in csv.DictReader(f)}


minilm, smol = course_table("banking77_minilm.csv"), course_table("smollm2_banking77.csv")
print(f"{'test macro-F1 at full size':28s} {'MiniLM':>8s} {'SmolLM2':>8s}")
for m in ("head", "probe", "lora"):
    print(f"{minilm[m]['label']:28s} {float(minilm[m]['test_f1_mean']):8.4f} {float(smol[m]['test_f1_mean']):8.4f}")

# %% [markdown]
# SmolLM2's floor sits far below MiniLM's. The last token's state of a causal LM is trained to
# predict the next token, not to summarise the query, and a few of its dimensions are outliers
# far larger than the rest (docs/benchmarks.md measures them), which an Adam-trained head
# handles worse than a probe fitted on standardised features. So fine-tuning is worth much more here than on MiniLM: compare the
# gap from the head to LoRA in the two columns.

# %%
fig, ax = plt.subplots(figsize=(6.5, 4.2))
for j, (label, v) in enumerate(rows.items()):
    if v["method"] == "head":
        ax.axhline(v["f1"], color="grey", linestyle="--", linewidth=1, label=f"{label}: {v['f1']:.3f}")
    else:  # a legend, not labels at the points: LoRA and QLoRA have equal counts and would stack
        ax.scatter(v["trainable"], v["f1"], s=50, marker="osD^v"[j % 5], label=f"{label}: {v['f1']:.3f}")
ax.xaxis.set_major_formatter(FuncFormatter(plain))
ax.xaxis.set_minor_formatter(FuncFormatter(lambda x, _: ""))
ax.set(xlabel="trainable parameters", ylabel=f"macro-F1 ({r0['eval_split']})",
       title=f"SmolLM2 / Banking77: F1 vs trainable parameters{TOY}")
ax.legend(fontsize=8, loc="best")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 3. Memory: a ledger counted from tensors, beside process RSS
#
# A training step holds, in bytes (fp32, AdamW):
#
# $$M = \underbrace{M_{frozen}}_{\text{4 B/weight; NF4+DQ: } \approx 4.127/8 \text{ B}}
#     + \underbrace{4P}_{\text{trainable}} + \underbrace{4P}_{\text{gradients}}
#     + \underbrace{8P + 4T}_{\text{AdamW } m, v, \text{step}} + M_{act}$$
#
# with $P$ trainable parameters in $T$ tensors. `pelib.measure.memory_ledger` counts each term
# from the tensors of one real step (each storage once): the frozen weights and buffers (for
# QLoRA the packed 4-bit bytes, scales and code tables of every `Linear4bit`), the gradients after
# backward, `optimizer.state` after one AdamW step, and the activations autograd saves for
# backward (a `saved_tensors_hooks` pack hook sees each one). With activation checkpointing a
# layer keeps only its inputs and recomputes the rest in backward: $M_{act}$ shrinks.

# %%
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# tiny: rows a multiple of 64 (bitsandbytes' CPU dequantiser needs that, section 5)
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16)


def backbone():
    if FAST:
        return pelib.tiny_backbone("smollm2", 77, **TINY)
    return pelib.load_backbone("smollm2", num_labels=77)


BUILD = {"head": lambda m: pelib.inject.train_heads_only(m),
         "lora": lambda m: pelib.apply_lora(m, TARGETS, r=8, alpha=16),
         "qlora": lambda m: pelib.apply_qlora(m, TARGETS, r=8, alpha=16),
         "sora": lambda m: pelib.apply_sora(m, TARGETS, r=8, alpha=16)}
model, tok = backbone()
train_rows = pelib.load_nlu("banking77", "train", limit=r0["args"]["batch_size"], seed=0)
ids = pelib.train.encode(tok, train_rows.texts, r0["args"]["max_length"])
batch = dict(pelib.train.collate(ids, list(range(len(ids))), tok.pad_token_id),  # (B, T) each
             labels=torch.tensor(train_rows.labels))
del model
ledgers, built = {}, {}
for method in ["head", "lora", "qlora", "sora"]:
    model = BUILD[method](backbone()[0])
    ledgers[method] = memory_ledger(model, batch)
    if method in ("lora", "qlora"):
        ledgers[method + "+ckpt"] = memory_ledger(model, batch, checkpointing=True)
        built[method] = model  # for the checks at the end
    del model
MiB = 2**20
print(f"ledger of one step, batch {tuple(batch['input_ids'].shape)}, MiB{TOY}")
print(f"{'':12s}" + "".join(f"{k[:14]:>16s}" for k in LEDGER_KINDS) + f"{'total':>10s}")
for name, led in ledgers.items():
    print(f"{name:12s}" + "".join(f"{led[k] / MiB:16.2f}" for k in LEDGER_KINDS)
          + f"{sum(led.values()) / MiB:10.2f}")

# %%
fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw=dict(width_ratios=[3, 2]))
left = [0.0] * len(ledgers)
for k in LEDGER_KINDS:
    vals = [led[k] / MiB for led in ledgers.values()]
    a1.barh(list(ledgers), vals, left=left, label=k)
    left = [a + b for a, b in zip(left, vals)]
a1.set(xlabel="MiB (counted from tensors)", title=f"memory ledger of one step{TOY}")
a1.legend(fontsize=7)
rss = {v["method"]: v["rss_mb"] for v in rows.values()}
a2.barh(list(rss), list(rss.values()), color="grey")
a2.set(xlabel=f"MB ({r0['memory_kind']})", title=f"peak process memory of the runs{TOY}")
plt.tight_layout()
plt.show()
frozen_ratio = ledgers["qlora"]["frozen weights"] / ledgers["lora"]["frozen weights"]
print(f"QLoRA's frozen weights are {frozen_ratio:.2f} of LoRA's; the saved activations "
      f"{ledgers['lora']['activations saved for backward'] / MiB:.1f} MiB become "
      f"{ledgers['lora+ckpt']['activations saved for backward'] / MiB:.1f} MiB with checkpointing; "
      f"peak RSS QLoRA / LoRA = {rss['qlora'] / rss['lora']:.2f}{TOY}")

# %% [markdown]
# Why RSS shows far less difference than the ledger (the ratios printed above): what pelib's
# QLoRA does besides holding 4-bit bytes (`pelib/quant/linear4bit.py`,
# `pelib/quant/qlora.py`):
#
# * the model is loaded in fp32 and quantised afterwards, layer by layer (`Linear4bit.from_linear`),
#   so the fp32 weights were resident once; glibc keeps much of the freed memory in its heap
#   rather than returning it to the OS, and RSS counts what the process holds, not what tensors use;
# * every forward and every backward dequantises $\tilde W$ again, into a scratch tensor reused
#   per thread and dtype, as large as the largest weight seen (`workspace`), beside the buffers
#   for the decoded scales and the byte indices, reused the same way: memory the ledger does
#   not list (nothing saves it), allocated once instead of at every layer;
# * compute is fp32 here (`compute_dtype`, the default), so $\tilde W$ is an fp32 copy of one layer;
#   the embedding and the head stay dense in both methods.
#
# The ledger counts what a training step must hold; RSS adds the allocator and the scratch.
# On a GPU, `max_memory_allocated` is closer to the ledger (no heap retention of this kind).
#
# ## 4. Learning curves and SoRA's live ranks
#
# SoRA (notebook 08) gates each rank, $\Delta W = B\,\mathrm{diag}(g)\,A$, and after every
# optimizer step applies the proximal step of $\xi\lVert g\rVert_1$:
# $g \leftarrow \mathrm{sign}(g)\max(|g| - \eta\xi, 0)$. A rank is live while its gate is
# non-zero; the hook records the live ranks after each step (`SoRA.live_history`).

# %%
sora_run = by_method["sora"]
live = sora_run.get("sora", {}).get("live_ranks_history")
n_rows = 64 if FAST else 640  # a short in-notebook run (here and for section 5's adapter)
data = pelib.load_nlu("banking77", "train", limit=n_rows, seed=0)
if live is None:  # the run record keeps only the final live ranks: train a SoRA here to watch them
    label_live = f"a {n_rows}-row SoRA run in this notebook{' (tiny model)' if FAST else ''}"
    sora_model = BUILD["sora"](backbone()[0])
    hook = pelib.SoRA(pelib.sora.SparsitySchedule.linear(0.05, 0.45, 3), gate_lr=1e-2)
    cfg = pelib.train.TrainConfig(epochs=1, lr=2e-3, head_lr=1e-2, batch_size=16,
                                  max_length=r0["args"]["max_length"], progress=False)
    pelib.train.train(sora_model, tok, data, data, cfg, hooks=[hook])
    live = hook.live_history
    del sora_model
else:
    label_live = "the llm preset's SoRA run"
fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4))
for r in records:
    losses = r["losses"]
    k = max(1, len(losses) // 20)  # moving average over 5% of the run
    a1.plot([statistics.fmean(losses[max(0, i - k + 1):i + 1]) for i in range(len(losses))],
            label=r["label"])
a1.set(xlabel="optimizer step", ylabel="training loss (moving average)", title=f"loss curves{TOY}")
a1.legend(fontsize=7)
a2.plot(range(1, len(live) + 1), live)
a2.set(xlabel="optimizer step", ylabel="live ranks (all layers)", ylim=(0, None),
       title=f"SoRA: live ranks, {label_live}{TOY}")
plt.tight_layout()
plt.show()
final = sora_run["sora"]
print(f"SoRA in the table's run: {final['live_ranks_total']} of {final['initial_ranks_total']} ranks "
      f"live at the end, {final['params_after_pruning']:,} trainable parameters after pruning "
      f"({final['params_before_pruning']:,} before){TOY}")

# %% [markdown]
# ## 5. The QLoRA adapter in peft's format, reloaded with peft + bitsandbytes
#
# The run records keep metrics, not weights, so the adapter comes from a QLoRA trained here (the
# same rows as the SoRA run above). `pelib.save_adapter` writes `adapter_config.json` and
# `adapter_model.safetensors` with peft's keys. peft loads it onto the same base weights
# quantised by bitsandbytes (`pelib.peers.quantized_4bit`: NF4, double quantisation, fp32
# compute). Both quantise the same fp32 weights to the same bytes, so the logits should agree.
#
# bitsandbytes on a CPU: its dequantiser needs rows that are multiples of 64 (SmolLM2's 576 and
# 1536 are; the tiny model above is built so), and in eval mode on a CPU with AVX-512-BF16 it
# switches to a bf16 kernel (agreement then only to bf16 precision). SmolLM2 has no dropout, so
# train mode computes the same function; we compare in both modes and say which is which.

# %%
from peft import PeftModel  # noqa: E402

qlora_model = BUILD["qlora"](backbone()[0])
cfg = pelib.train.TrainConfig(epochs=1, lr=2e-3, head_lr=1e-2, batch_size=16,
                              max_length=r0["args"]["max_length"], progress=False)
pelib.train.train(qlora_model, tok, data, data, cfg)
adapter_dir = Path(tempfile.mkdtemp(prefix="pelib-nb10-adapter-")) / "qlora"
pelib.save_adapter(qlora_model, adapter_dir)
print("wrote", sorted(p.name for p in adapter_dir.iterdir()))
peft_model = PeftModel.from_pretrained(pelib.peers.quantized_4bit(backbone()[0]), adapter_dir)
assert not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in qlora_model.modules())

# a seeded subset of the test rows in full mode: bitsandbytes' CPU path is slow
test = pelib.load_nlu("banking77", "test", limit=64 if FAST else 1024, seed=0)
test_ids = pelib.train.encode(tok, test.texts, r0["args"]["max_length"])


@torch.no_grad()
def logits_of(model, train_mode: bool, rows: int | None = None):  # (N, 77)
    model.train(train_mode)
    out = []
    for i in range(0, len(test_ids[:rows]), 64):
        idx = list(range(i, min(i + 64, len(test_ids[:rows]))))
        out.append(model(**pelib.train.collate(test_ids, idx, tok.pad_token_id)).logits.float())
    return torch.cat(out)


agreement = {}
for mode, rows_ in [("train mode (fp32 in both)", None), ("eval mode", 64)]:
    train_mode = mode.startswith("train")
    a, b = logits_of(qlora_model, train_mode, rows_), logits_of(peft_model, train_mode, rows_)
    agreement[mode] = ((a.argmax(-1) == b.argmax(-1)).float().mean().item(), (a - b).abs().max().item())
    print(f"{mode:26s} {len(a):5d} test rows: identical labels {agreement[mode][0]:.4f}, "
          f"max |logit difference| {agreement[mode][1]:.2e}{TOY}")

# %% [markdown]
# ## 6. Against the article
#
# The 58.com TEG-AI Lab article reported, on its own data and hardware: LoRA close to full
# fine-tuning (86.44 F1); QLoRA costing little quality while using 0.70 of LoRA's GPU memory
# (39.1 vs 55.7 GB); SoRA slightly above LoRA (86.52 vs 86.44); AdaLoRA below LoRA (82.37). The
# comparisons below are computed from the table of section 1 and the ledger of section 3 (this
# notebook has no AdaLoRA row, so it says nothing about AdaLoRA). With one seed, differences of
# about 0.01 F1 are inside the noise; the second cell reads the full-size rows of the results
# page (`docs/tables/smollm2_banking77.csv`), with their number of seeds.

# %%
f1 = {v["method"]: v["f1"] for v in rows.values()}


def versus(a, b):
    d = f1[a] - f1[b]
    return f"{a} {f1[a]:.4f} vs {b} {f1[b]:.4f}: {d:+.4f}" + (" (inside one-seed noise)" if abs(d) < 0.01 else "")


for line in [versus("lora", "head"), versus("qlora", "lora"), versus("sora", "lora"),
             f"memory: QLoRA's frozen weights {frozen_ratio:.2f} of LoRA's (ledger); the article's "
             f"whole-GPU ratio was 0.70; peak RSS here {rss['qlora'] / rss['lora']:.2f}",
             f"SoRA ends with {final['live_ranks_total']} of {final['initial_ranks_total']} ranks live"]:
    print(line + TOY)

# %%
print("SmolLM2 / Banking77 at full size, 1 epoch (docs/tables/smollm2_banking77.csv):")
for m in ("full", "lora", "qlora", "sora"):
    row = smol[m]
    sd = f" ± {float(row['test_f1_sd']):.4f}" if row["test_f1_sd"] else ""
    print(f"  {row['label']:24s} test macro-F1 {float(row['test_f1_mean']):.4f}{sd} over {row['seeds']} seed(s)")
gap = float(smol["sora"]["test_f1_mean"]) - float(smol["lora"]["test_f1_mean"])
print(f"  SoRA - LoRA = {gap:+.4f}: the article's 'SoRA slightly above LoRA' "
      f"{'holds' if gap > 0 else 'does not hold'} here"
      + (" (a difference inside the noise of one seed)" if abs(gap) < 0.01 and smol["sora"]["seeds"] == "1" else ""))

# %% [markdown]
# ## 7. Check against pelib
#
# What this notebook built must equal what pelib computes: `pelib.compare.summary` (which writes
# `results/summary_llm.md`) has the F1 we tabulated, row by row; the ledger of LoRA equals a hand
# count from parameter shapes; QLoRA's frozen bytes equal `pelib.quant.qlora_nbytes`; the adapter
# reloaded by peft + bitsandbytes predicts exactly what pelib's model predicts (train mode); and
# `pelib.metrics` agrees with macro-F1 written out from its definition.

# %%
text = summary(records)
header = next(l for l in text.splitlines() if l.startswith("| method |")).split("|")
for label, v in rows.items():
    line = next(l for l in text.splitlines() if l.startswith(f"| {label} | pelib |"))
    cell = line.split("|")[header.index(" macro-F1 ")]  # the column by its name, not its place
    assert float(cell.split("±")[0]) == round(v["f1"], 4), line

lora = built["lora"]
train_p = [p for p in lora.parameters() if p.requires_grad]
n_train = sum(p.numel() for p in train_p)
frozen = sum(p.numel() * p.element_size() for p in lora.parameters() if not p.requires_grad) + \
    sum(b.numel() * b.element_size() for b in lora.buffers())
assert ledgers["lora"] == {**ledgers["lora"], "frozen weights": frozen, "trainable (adapter + head)": 4 * n_train,
                           "gradients": 4 * n_train, "optimizer state": 8 * n_train + 4 * len(train_p)}
nb = pelib.quant.qlora_nbytes(built["qlora"])
assert ledgers["qlora"]["frozen weights"] == nb["packed"] + nb["scales"] + nb["code_tables"] + nb["frozen_dense"]
assert ledgers["lora+ckpt"]["activations saved for backward"] < ledgers["lora"]["activations saved for backward"]
assert agreement["train mode (fp32 in both)"][0] == 1.0, agreement


def macro_f1(y, p, n):  # the definition: per class F1, then the unweighted mean over classes seen
    f1s = []
    for c in range(n):
        tp = sum(1 for a, b in zip(y, p) if a == c and b == c)
        fp = sum(1 for a, b in zip(y, p) if a != c and b == c)
        fn = sum(1 for a, b in zip(y, p) if a == c and b != c)
        if tp + fp + fn:
            prec = tp / (tp + fp) if tp + fp else 0.0
            rec = tp / (tp + fn) if tp + fn else 0.0
            f1s.append(2 * prec * rec / (prec + rec) if prec + rec else 0.0)
    return sum(f1s) / len(f1s)


y, p = [0, 0, 1, 2, 2, 2, 3], [0, 1, 1, 2, 2, 0, 1]
assert abs(pelib.metrics.classification_metrics(y, p)["f1"] - macro_f1(y, p, 4)) < 1e-12
print("pelib's summary, ledger, qlora_nbytes and metrics == this notebook's; the peft reload agrees")


# %% [markdown]
# ## Exercises
#
# Solutions: `notebooks/solutions/nb10.py`.
#
# **1. Measure the activations yourself.** Section 3 read $M_{act}$ from `pelib.measure`. Design
# that measurement: write `activation_bytes(model, batch)` that runs one training-mode forward
# (`model(**batch)`, the loss included) and returns the bytes autograd keeps for the backward.
# `torch.autograd.graph.saved_tensors_hooks(pack, unpack)` calls `pack(t)` on every tensor saved
# for backward. Two traps: a saved tensor may be a view of another (a transpose, a reshape), so
# count each **storage** once (`t.untyped_storage()`, its `data_ptr()` and `nbytes()`), and a
# linear layer saves its frozen weight for $dx$, which is a weight, not an activation (leave the
# model's parameters and buffers out). Do not call backward or an optimizer: the forward is
# enough. The checker runs a tiny SmolLM2 with LoRA at two sequence lengths and compares with
# `pelib.measure.memory_ledger`, which it hides while your function runs. With it, the cell
# prints how the activations grow with the number of tokens: the term checkpointing shrinks.

# %%
from checks import attempt  # noqa: E402
from checks.nb10 import exercise_1, exercise_2  # noqa: E402


def activation_bytes(model, batch):
    raise NotImplementedError


if attempt(exercise_1, activation_bytes):
    for k in (1, 2):  # section 3's batch, then each sequence repeated twice over: twice the tokens
        longer = dict(batch, **{key: batch[key].repeat(1, k) for key in ("input_ids", "attention_mask")})
        n = activation_bytes(built["lora"], longer)
        print(f"LoRA, batch {tuple(longer['input_ids'].shape)}: {n / MiB:.2f} MiB saved for backward{TOY}")

# %% [markdown]
# **2. DoRA's bill, before you build it.** Section 3 measured what LoRA, QLoRA and SoRA hold; DoRA
# (notebook 03) was not among them. Write `dora_bill(model, targets, r)` that predicts, from the
# plain model's shapes alone, the bytes DoRA r on the `targets` projections would add to one
# training step: `{"trainable": ..., "gradients": ..., "optimizer state": ...}`, fp32, AdamW, the
# classification head (`score`) training too. Work out which tensors a DoRA layer adds to
# LoRA's $A$ and $B$, and count what `torch.optim.AdamW` keeps per parameter tensor (look at
# `optimizer.state` after one step of a toy model). The checker builds DoRA on a tiny SmolLM2
# for three settings and compares with `pelib.measure.memory_ledger`; both, and `apply_dora`, are
# disabled while your function runs. With it, the cell prints DoRA's bill against LoRA's on
# SmolLM2-135M.

# %%
def dora_bill(model, targets, r):
    raise NotImplementedError


if attempt(exercise_2, dora_bill):
    dora = dora_bill(backbone()[0], TARGETS, 8)
    lora = ledgers["lora"]
    for k, name in (("trainable", "trainable (adapter + head)"), ("optimizer state", "optimizer state")):
        print(f"{k}: DoRA r=8 {dora[k] / MiB:.2f} MiB, LoRA r=8 {lora[name] / MiB:.2f} MiB (measured){TOY}")
