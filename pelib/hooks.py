"""The training loop's hook protocol, and the two hooks the loop adds itself.

A method's training rule (AdaLoRA's allocator, SoRA's proximal step) is a `Hook` subclass; the
loop calls every event of every hook in order and never asks what method it trains:

    param_groups(model) -> [AdamW group dicts]   its own parameter groups (SoRA's gates)
    begin(model, optimizer, total_steps)        once before the first step (after a resume too)
    prepare(model, rows)                        once before the first step, inside the measured
                                                time (rows: ids, labels, pad_id, cfg, group, step)
    forward(model, index) -> logits or None     the logits of rows `index`, or None: run the model
    loss(model, loss) -> loss                   e.g. AdaLoRA's orthogonal regulariser
    step(model, step)                           after optimizer.step(), before zero_grad()
    state_dict() / load_state_dict(state)       what a checkpoint keeps (None: nothing)

A subclass method whose name is close to an event but not one ("stpe", "steps") is an error
when the class is defined, so a misspelt hook cannot be silently skipped.

The loop's own hooks: `ProbeHead` (LP-FT: Kumar et al. 2022, the head fitted as a linear probe
before fine-tuning) and `FeatureCache` (only the head trains on a frozen trunk without dropout:
the trunk's features are computed once, not every epoch; the same numbers).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch
from torch import nn

from .batching import collate
from .classifier import split_head
from .distributed import ProcessGroup
from .inject import CLASSIFIER_HEADS
from .probe import fit_probe

EVENTS = ("param_groups", "begin", "prepare", "forward", "loss", "step", "state_dict",
          "load_state_dict")


class Hook:
    """The base of every training hook: each event does nothing until a subclass overrides it."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name, value in vars(cls).items():
            if name.startswith("_") or name in EVENTS or not callable(value):
                continue
            near = difflib.get_close_matches(name, EVENTS, n=1, cutoff=0.75)
            if near:
                raise TypeError(f"{cls.__name__}.{name} is not a hook event; did you mean "
                                f"{near[0]}? The events are {', '.join(EVENTS)}")

    def param_groups(self, model: nn.Module) -> list[dict]:
        return []

    def begin(self, model: nn.Module, optimizer, total_steps: int) -> None:
        pass

    def prepare(self, model: nn.Module, rows: "Rows") -> None:
        pass

    def forward(self, model: nn.Module, index: list[int]) -> torch.Tensor | None:
        return None

    def loss(self, model: nn.Module, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def step(self, model: nn.Module, step: int) -> None:
        pass

    def state_dict(self) -> dict | None:
        return None

    def load_state_dict(self, state: dict) -> None:
        pass


def check_hooks(hooks) -> list[Hook]:
    hooks = list(hooks)
    bad = [type(h).__name__ for h in hooks if not isinstance(h, Hook)]
    if bad:
        raise TypeError(f"hooks must subclass pelib.hooks.Hook (its events: {', '.join(EVENTS)}); "
                        f"got {', '.join(bad)}")
    return hooks


@dataclass
class Rows:
    """The training rows as the loop holds them, for `prepare`."""

    ids: list[list[int]]  # token ids per row
    labels: torch.Tensor  # (N,)
    pad_id: int
    cfg: object  # the pelib.train.TrainConfig
    group: ProcessGroup
    step: int  # the loop's step: 0 on a fresh run, more on a resumed one


@torch.no_grad()
def trunk_features(features, model, ids, pad_id, batch_size, bf16) -> torch.Tensor:
    """(N, H): the trunk's pooled features of every row, in eval mode, length-sorted batches."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = None
    for k in range(0, len(order), batch_size):
        index = order[k:k + batch_size]
        batch = {n: t.to(device) for n, t in collate(ids, index, pad_id).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            f = features(**batch).float()
        if out is None:
            out = torch.empty(len(ids), f.shape[-1], device=device)
        out[index] = f
    model.train(was_training)
    return out


def probe_head(model: nn.Module, ids, labels: torch.Tensor, pad_id: int, cfg) -> None:
    """LP-FT's first stage: the trainable head becomes the linear probe of the model's features
    as they are now (the adapters at their identity init), fitted to convergence."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft's wrapper
    parts = split_head(base)
    if parts is None:
        raise ValueError(f"head_init='probe' needs a classifier pelib builds (mean-pooled BERT, "
                         f"[CLS] BERT or a Llama scorer), not {type(base).__name__}; use "
                         "head_init='random'")
    head = {n.rsplit(".", 1)[-1]: p for n, p in model.named_parameters()
            if p.requires_grad and set(CLASSIFIER_HEADS) & set(n.split("."))}
    if set(head) not in ({"weight"}, {"weight", "bias"}):
        raise ValueError(f"head_init='probe' needs one trainable linear head, found {sorted(head)}")
    z = trunk_features(parts[0], model, ids, pad_id, cfg.eval_batch_size, cfg.bf16).cpu()
    weight, bias = fit_probe(z, labels, head["weight"].shape[0], bias="bias" in head)
    with torch.no_grad():
        head["weight"].copy_(weight)
        if bias is not None:
            head["bias"].copy_(bias)


class ProbeHead(Hook):
    """LP-FT: before the first step of a fresh run, the head becomes the linear probe."""

    def prepare(self, model, rows: Rows) -> None:
        if rows.step == 0:
            probe_head(model, rows.ids, rows.labels, rows.pad_id, rows.cfg)


def frozen_trunk(model: nn.Module, cfg, hooks, group: ProcessGroup):
    """(features, head) when the run trains the head alone on fixed features, else None:
    one process, no method hooks, every trainable parameter in the head, no live dropout in
    the trunk."""
    parts = split_head(model) if cfg.cache_features and group.world == 1 and not hooks else None
    if parts is None:
        return None

    def in_head(name):  # the head and its own dropout are top-level modules of the classifier
        return name.split(".")[0] in (*CLASSIFIER_HEADS, "dropout")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    live_dropout = [n for n, m in model.named_modules()
                    if isinstance(m, nn.Dropout) and m.p > 0 and not in_head(n)]
    if not trainable or live_dropout or not all(map(in_head, trainable)):
        return None
    return parts


class FeatureCache(Hook):
    """Where only the head trains on a frozen trunk (frozen_trunk), the trunk's features of
    every row are computed once and the head alone runs each step; else it does nothing."""

    def __init__(self, others):
        self.others, self.head, self.features = list(others), None, None

    def prepare(self, model, rows: Rows) -> None:
        trunk = frozen_trunk(model, rows.cfg, self.others, rows.group)
        if trunk is not None:  # counted as training time: it replaces the trunk's forwards
            self.head = trunk[1]
            self.features = trunk_features(trunk[0], model, rows.ids, rows.pad_id,
                                           rows.cfg.eval_batch_size, rows.cfg.bf16)  # (N, H)
            self.bf16 = rows.cfg.bf16

    def forward(self, model, index) -> torch.Tensor | None:
        if self.head is None:
            return None
        device = self.features.device
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.head(self.features[torch.tensor(index, device=device)])  # (B, K)
