"""Notebook 10's first checker rejects an answer that asks pelib's ledger instead of measuring."""
import importlib
import sys
from pathlib import Path

import pytest

from pelib.measure import memory_ledger

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "notebooks"))
checks = importlib.import_module("checks.nb10")
sys.path.pop(0)


def asks_the_ledger(model, batch):  # as a notebook would, with the name imported at its top
    return memory_ledger(model, batch)["activations saved for backward"]


def test_checker_rejects_an_answer_that_calls_the_ledger():
    with pytest.raises(AssertionError, match="calls"):
        checks.exercise_1(asks_the_ledger)


def builds_dora_and_asks_the_ledger(model, targets, r):  # the reference, under another name
    import torch

    import pelib

    batch = {"input_ids": torch.randint(0, 100, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long),
             "labels": torch.tensor([0, 1])}
    led = memory_ledger(pelib.apply_dora(model, targets, r=r), batch)
    return {"trainable": led["trainable (adapter + head)"], "gradients": led["gradients"],
            "optimizer state": led["optimizer state"]}


def test_dora_checker_rejects_an_answer_that_builds_dora():
    with pytest.raises(AssertionError, match="calls"):
        checks.exercise_2(builds_dora_and_asks_the_ledger)
