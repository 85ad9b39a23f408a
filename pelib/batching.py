"""Batches for the training loop and for evaluation: tokenise once, group rows of similar
length, pad to the longest row of a batch (right padding, an attention mask of ones and zeros)."""
from __future__ import annotations

import random

import torch


def encode(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    return tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]


def length_grouped_batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffle, sort within windows of 50 batches by length, cut into batches, shuffle those:
    random order, and little padding (so fewer wasted FLOPs than a plain shuffle)."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = 50 * batch_size
    batches = []
    for i in range(0, len(order), window):
        chunk = sorted(order[i:i + window], key=lambda j: lengths[j])
        batches += [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(ids: list[list[int]], index: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    T = max(len(ids[i]) for i in index)
    input_ids = torch.full((len(index), T), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(index), T), dtype=torch.long)               # (B, T)
    for row, i in enumerate(index):  # right padding
        input_ids[row, :len(ids[i])] = torch.tensor(ids[i])
        mask[row, :len(ids[i])] = 1
    return dict(input_ids=input_ids, attention_mask=mask)
