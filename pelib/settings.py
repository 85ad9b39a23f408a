"""One check of the training loop's settings, for the Python API (pelib.train.TrainConfig) and
the command line (`pelib finetune`), so both refuse the same values with the same words; the
command line names its flags (`--warmup-ratio`), the API its fields (`warmup_ratio`)."""
from __future__ import annotations

import math
from typing import Callable

from .schedule import SCHEDULES

HEAD_INITS = ("random", "probe")


def check_settings(values: dict, name: Callable[[str], str] = str) -> None:
    """Raise ValueError naming the first setting of `values` that is out of range (settings not
    in `values`, or None where None means "off", are not checked)."""
    def get(k):
        return values.get(k)

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
