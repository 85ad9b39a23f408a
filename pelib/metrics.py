"""Accuracy and macro-averaged precision, recall and F1: the metrics of the tables of the source
article, the 58.com TEG-AI Lab article on PEFT methods (LoRA, QLoRA, AdaLoRA, SoRA, Unsloth).

Macro averaging gives every class the same weight: per class c,
    P_c = TP_c / (TP_c + FP_c),  R_c = TP_c / (TP_c + FN_c),  F1_c = 2 P_c R_c / (P_c + R_c)
and the macro score is the plain mean over the classes that occur in the true or the predicted
labels (scikit-learn's default), with 0 where a denominator is 0 (zero_division=0).

`balanced=True` scores the split as if every class had the same number of rows: each row of
the confusion matrix is divided by its class's count, so a frequent class's mistakes weigh no
more than a rare one's. Recall is unchanged; precision is the one a class-balanced test split
would show. Banking77's dev split has 3-19 rows an intent, its test split 40 each.

Scored by generation (pelib.sft), a model may write text that is no label name. Such an output
is wrong, and `generation_metrics` gives it a class of its own, K (after the K labels): it
lowers the recall of the true class as any wrong answer does, and the invalid class itself
enters the macro mean (with F1 0, as it is never true) when it occurs, so invalid outputs cost
more than a wrong name spread over the real classes.
"""
from __future__ import annotations

import torch


def confusion_matrix(y_true, y_pred, num_labels: int | None = None) -> torch.Tensor:
    t, p = torch.as_tensor(y_true).long(), torch.as_tensor(y_pred).long()
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in shape: {tuple(t.shape)} vs {tuple(p.shape)}")
    n = num_labels or int(max(t.max(), p.max())) + 1
    return torch.bincount(t * n + p, minlength=n * n).reshape(n, n)  # rows: true, cols: predicted


def classification_metrics(y_true, y_pred, balanced: bool = False) -> dict[str, float]:
    cm = confusion_matrix(y_true, y_pred).double()
    if balanced:  # every true class weighs one row's worth in total
        cm = cm / cm.sum(1, keepdim=True).clamp(min=1)
    tp = cm.diag()
    support, predicted = cm.sum(1), cm.sum(0)
    present = (support + predicted) > 0  # classes seen in either list
    div = lambda a, b: torch.where(b > 0, a / torch.where(b > 0, b, 1.0), 0.0)  # noqa: E731
    precision, recall = div(tp, predicted), div(tp, support)
    f1 = div(2 * precision * recall, precision + recall)
    return dict(accuracy=(tp.sum() / cm.sum()).item(),
                precision=precision[present].mean().item(),
                recall=recall[present].mean().item(),
                f1=f1[present].mean().item())


INVALID = -1  # a generated answer that is no label name (pelib.sft.Generated.predictions)


def generation_metrics(y_true, y_pred, num_labels: int) -> dict[str, float]:
    """The metrics of generated answers: y_pred holds label indices or INVALID (-1); an invalid
    output is class `num_labels`, and `invalid_rate` is its share of the rows."""
    t, p = torch.as_tensor(y_true).long(), torch.as_tensor(y_pred).long()
    if t.numel() == 0:
        raise ValueError("no rows to score")
    if ((t < 0) | (t >= num_labels)).any():
        raise ValueError(f"y_true holds labels outside 0..{num_labels - 1}")
    if ((p < INVALID) | (p >= num_labels)).any():
        raise ValueError(f"y_pred holds values outside {INVALID} (invalid) and 0..{num_labels - 1}")
    invalid = p == INVALID
    metrics = classification_metrics(t, torch.where(invalid, num_labels, p))
    return dict(metrics, invalid_rate=invalid.double().mean().item())
