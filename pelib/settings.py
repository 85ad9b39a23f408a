"""One check of the training loop's settings, for the Python API (pelib.train.TrainConfig) and
the command line (`pelib finetune`), so both refuse the same values with the same words; the
command line names its flags (`--warmup-ratio`), the API its fields (`warmup_ratio`)."""
from __future__ import annotations

import math
from typing import Callable

from .schedule import SCHEDULES

HEAD_INITS = ("random", "probe")
INTEGERS = ("batch_size", "grad_accum", "max_length", "eval_batch_size", "checkpoint_every", "seed")
NUMBERS = ("epochs", "lr", "head_lr", "max_grad_norm", "warmup_ratio", "weight_decay",
           "label_smoothing", "layer_decay")


def check_settings(values: dict, name: Callable[[str], str] = str) -> None:
    """Raise ValueError naming the first setting of `values` that is out of range (settings not
    in `values`, or None where None means "off", are not checked)."""
    def get(k):
        return values.get(k)

    if "seed" in values and get("seed") is None:  # not "off": torch would draw a fresh seed
        raise ValueError(f"{name('seed')} must be an integer (the same seed gives the same run), "
                         "got None; pass 0 or any other integer")
    for k in INTEGERS:  # 2.5 or "32" would be truncated or fail deep inside the loop
        v = get(k)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
            raise ValueError(f"{name(k)} must be an integer, got {v!r}")
    for k in NUMBERS:
        v = get(k)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool)):
            raise ValueError(f"{name(k)} must be a number, got {v!r} ({type(v).__name__}); "
                             f"write it without quotes, e.g. {name(k)}=1e-3")
    for k in ("batch_size", "grad_accum", "max_length", "eval_batch_size", "checkpoint_every"):
        if get(k) is not None and int(get(k)) < 1:
            raise ValueError(f"{name(k)} must be >= 1, got {get(k)}")
    if get("head_init") is not None and get("head_init") not in HEAD_INITS:
        raise ValueError(f"{name('head_init')} must be one of {HEAD_INITS}, got {get('head_init')!r}")
    if get("schedule") is not None and get("schedule") not in SCHEDULES:
        raise ValueError(f"{name('schedule')} must be one of {SCHEDULES}, got {get('schedule')!r}")
    if get("layer_decay") is not None and not 0 < get("layer_decay") <= 1:
        raise ValueError(f"{name('layer_decay')} must be in (0, 1] (1: no decay), got "
                         f"{get('layer_decay')}")
    if get("weight_decay") is not None and not 0 <= get("weight_decay") < math.inf:  # and nan
        raise ValueError(f"{name('weight_decay')} must be a finite number >= 0, got "
                         f"{get('weight_decay')}")
    if get("warmup_ratio") is not None and not 0 <= get("warmup_ratio") < 1:
        raise ValueError(f"{name('warmup_ratio')} is a share of the steps in [0, 1), got "
                         f"{get('warmup_ratio')}")
    if get("label_smoothing") is not None and not 0 <= get("label_smoothing") < 1:
        raise ValueError(f"{name('label_smoothing')} is a share of the target in [0, 1), got "
                         f"{get('label_smoothing')}")
    for k in ("epochs", "lr", "head_lr", "max_grad_norm"):
        v = get(k)
        if v is not None and not (v > 0 and math.isfinite(v)):
            raise ValueError(f"{name(k)} must be a finite number > 0, got {v}")


def check_data(num_labels: int | None, splits: dict) -> None:
    """Refuse data the model cannot learn from as asked: a label outside the head's classes
    (an IndexError deep in the loss otherwise), or a training split with a single class (the
    loss reaches 0 and F1 1.0 by predicting it). `splits`: {"train_data": data, ...}, each
    with `.labels` (integers) or None."""
    for what, data in splits.items():
        if data is None:
            continue
        labels = list(data.labels)
        if not labels:
            raise ValueError(f"{what} has no rows; pass at least one labelled text")
        if num_labels is not None:
            bad = sorted({y for y in labels if not 0 <= y < num_labels})
            if bad:
                raise ValueError(f"{what} has labels {bad[:5]} outside the model's num_labels="
                                 f"{num_labels} classes (0..{num_labels - 1}); build the backbone "
                                 f"with num_labels={max(labels) + 1} or more "
                                 "(len(data.label_names))")
    train = splits.get("train_data")
    if train is not None and len(set(train.labels)) < 2:
        raise ValueError(f"train_data has a single label ({train.labels[0]}): a classifier "
                         "needs examples of at least 2 classes to learn anything; use more rows "
                         "(a larger limit) or another data set")
