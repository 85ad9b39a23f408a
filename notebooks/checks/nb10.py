"""Checkers for notebook 10 (the comparison): a head-only row trained on a toy run, and the
Pareto front of F1 against trainable parameters."""
import itertools
import random

import torch

import pelib


def exercise_1(head_only):
    torch.manual_seed(10)
    model, tokenizer = pelib.tiny_backbone("minilm", 77)
    model = head_only(model)
    encoder = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("classifier")}
    head = {n: p.detach().clone() for n, p in model.classifier.named_parameters()}
    data = pelib.load_nlu("banking77", "train", limit=32)
    cfg = pelib.train.TrainConfig(epochs=1, lr=1e-2, batch_size=16, max_length=32, progress=False)
    run = pelib.train.train(model, tokenizer, data, data, cfg)
    n_head = sum(p.numel() for p in model.classifier.parameters())
    assert run.trainable_params == n_head, \
        f"the record says {run.trainable_params:,} trainable parameters; the head has {n_head:,}"
    for n, p in model.named_parameters():
        if n in encoder:
            assert torch.equal(p, encoder[n]), f"{n} changed: only the head may train"
    assert all(not torch.equal(p, head[n]) for n, p in model.classifier.named_parameters()), \
        "the head did not train"
    print(f"head-only row: {run.trainable_params:,} trainable of {run.total_params:,} "
          f"({100 * run.trainable_params / run.total_params:.2f}%), encoder unchanged, head trained; "
          f"F1 {run.metrics['f1']:.3f} (toy)")


def _front(rows):
    def dominates(a, b):
        return a["trainable"] <= b["trainable"] and a["f1"] >= b["f1"] and \
            (a["trainable"] < b["trainable"] or a["f1"] > b["f1"])
    return {k for k, v in rows.items() if not any(dominates(w, v) for j, w in rows.items() if j != k)}


def exercise_2(pareto):
    rows = {"full": dict(trainable=22_700_000, f1=0.83), "LoRA r=8": dict(trainable=370_000, f1=0.89),
            "LoRA r=2": dict(trainable=120_000, f1=0.87), "QLoRA": dict(trainable=370_000, f1=0.88),
            "AdaLoRA": dict(trainable=560_000, f1=0.90), "head": dict(trainable=29_645, f1=0.40),
            "SoRA": dict(trainable=340_000, f1=0.87), "prefix": dict(trainable=120_000, f1=0.87)}
    assert set(pareto(rows)) == _front(rows), f"{set(pareto(rows))} != {_front(rows)}"
    rng = random.Random(10)
    for k in range(30):  # ties in both coordinates included
        rnd = {f"m{i}": dict(trainable=rng.choice([1, 2, 3, 5]), f1=rng.choice([0.1, 0.5, 0.9]))
               for i in range(rng.randint(1, 7))}
        assert set(pareto(rnd)) == _front(rnd), f"{rnd}: {set(pareto(rnd))} != {_front(rnd)}"
    print(f"pareto == the brute-force front on the crafted table {sorted(_front(rows))} and 30 "
          f"random ones with ties ({len(list(itertools.combinations(rows, 2)))} pairs here)")
