"""Predictions and metrics of a split: eval mode, no gradients, length-sorted batches; with
several processes (pelib.distributed) each predicts its share and the shares are gathered."""
from __future__ import annotations

import torch
from torch import nn

from .batching import collate, encode
from .distributed import ProcessGroup
from .metrics import classification_metrics


@torch.no_grad()
def predict(model: nn.Module, ids: list[list[int]], pad_id: int, batch_size: int = 128,
            bf16: bool = False, group: ProcessGroup | None = None) -> torch.Tensor:
    """Predicted labels of every row; with several processes each predicts its share (rows
    r, r + W, ...) and the shares are gathered, so the split is covered once."""
    group = group or ProcessGroup()
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    mine = range(group.rank, len(ids), group.world)
    order = sorted(mine, key=lambda i: len(ids[i]))  # little padding
    preds = torch.empty(len(ids), dtype=torch.long)
    for k in range(0, len(order), batch_size):
        index = order[k:k + batch_size]
        batch = {n: t.to(device) for n, t in collate(ids, index, pad_id).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            preds[index] = model(**batch).logits.argmax(-1).cpu()
    model.train(was_training)
    for r, (index, p) in enumerate(group.gather((list(mine), preds[list(mine)]))):
        preds[index] = p
    return preds


def evaluate(model, tokenizer, data, max_length=64, batch_size=128, bf16=False,
             group: ProcessGroup | None = None) -> dict:
    ids = encode(tokenizer, data.texts, max_length)
    return classification_metrics(data.labels, predict(model, ids, tokenizer.pad_token_id,
                                                       batch_size, bf16, group))


def dev_metrics(model, ids, labels, pad_id: int, batch_size: int, bf16: bool,
                group: ProcessGroup) -> dict:
    """The per-epoch dev entry: dev_<metric>, and the F1 as if dev were class-balanced like
    Banking77's test split (pelib.metrics)."""
    preds = predict(model, ids, pad_id, batch_size, bf16, group)
    entry = {f"dev_{k}": v for k, v in classification_metrics(labels, preds).items()}
    entry["dev_f1_balanced"] = classification_metrics(labels, preds, balanced=True)["f1"]
    return entry
