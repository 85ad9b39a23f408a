"""Checkers for notebook 10 (the comparison): a measurement of the activations a training step
keeps for backward, and the Pareto front of F1 against trainable parameters on the course's own
result tables."""
import csv
import random
from pathlib import Path

import torch

import pelib
import pelib.measure
from checks._guard import forbidden

TABLES = Path(__file__).resolve().parents[2] / "docs" / "tables"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _batch(tokenizer, T, rows=4):
    texts = pelib.load_nlu("banking77", "train", limit=rows, seed=0).texts
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=T, return_tensors="pt")
    return dict(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                labels=torch.arange(rows) % 77)


def exercise_1(activation_bytes):
    """activation_bytes(model, batch) == the bytes autograd saves in one forward, each storage
    once, the model's own weights excluded (pelib.measure.memory_ledger's last entry)."""
    model, tok = pelib.tiny_backbone("smollm2", 77, hidden_size=64, intermediate_size=128,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    pelib.apply_lora(model, TARGETS, r=8, alpha=16)
    got = {}
    for T in (16, 32):
        batch = _batch(tok, T)
        # the reference, and anything that calls it (a backward, an optimizer), is off limits here
        with forbidden((pelib.measure, "memory_ledger"), (torch.optim, "AdamW"), (torch.Tensor, "backward")):
            got[T] = int(activation_bytes(model, batch))
        want = pelib.measure.memory_ledger(model, batch)["activations saved for backward"]
        assert got[T] == want, (f"T={T}: you counted {got[T]:,} bytes, the ledger {want:,}: count each "
                                "storage once (views share one) and leave out the model's weights")
    per_token = (got[32] - got[16]) / (4 * 16)
    print(f"exercise_1: {got[16]:,} bytes at 4 x 16 tokens, {got[32]:,} at 4 x 32 == the ledger; "
          f"about {per_token:,.0f} bytes per extra token on this tiny model")


def _front(rows):
    def dominates(a, b):
        return a["trainable"] <= b["trainable"] and a["f1"] >= b["f1"] and \
            (a["trainable"] < b["trainable"] or a["f1"] > b["f1"])
    return {k for k, v in rows.items() if not any(dominates(w, v) for j, w in rows.items() if j != k)}


def course_table(name):
    """{label: {"trainable", "f1"}} from one of the course's result tables in docs/tables."""
    with open(TABLES / name) as f:
        return {r["label"]: dict(trainable=int(r["trainable"]), f1=float(r["test_f1_mean"]))
                for r in csv.DictReader(f)}


def exercise_2(pareto):
    tables = {name: course_table(name) for name in ("banking77_minilm.csv", "smollm2_banking77.csv")}
    for name, rows in tables.items():
        assert set(pareto(rows)) == _front(rows), f"{name}: {set(pareto(rows))} != {_front(rows)}"
    rng = random.Random(10)
    for k in range(30):  # ties in both coordinates included
        rnd = {f"m{i}": dict(trainable=rng.choice([1, 2, 3, 5]), f1=rng.choice([0.1, 0.5, 0.9]))
               for i in range(rng.randint(1, 7))}
        assert set(pareto(rnd)) == _front(rnd), f"{rnd}: {set(pareto(rnd))} != {_front(rnd)}"
    for name, rows in tables.items():
        print(f"exercise_2: {name}: the front is {sorted(_front(rows))}")
    print("exercise_2: and 30 random tables with ties agree with the brute-force front")
