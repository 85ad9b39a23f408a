"""AdamW's parameter groups: the hooks' own groups (SoRA's gates), the classification head at
its own lr, then the rest, with decoupled weight decay on the weight matrices only and, if
asked, a layer-wise lr decay (ULMFiT's discriminative fine-tuning; Sun et al. 2019)."""
from __future__ import annotations

import re

import torch
from torch import nn

from .inject import CLASSIFIER_HEADS


def make_optimizer(model: nn.Module, cfg, hooks) -> torch.optim.AdamW:
    """cfg: lr, head_lr, weight_decay, layer_decay (a pelib.train.TrainConfig)."""
    groups, taken = [], set()
    for h in hooks:
        for g in h.param_groups(model):
            groups.append(g)
            taken |= {id(p) for p in g["params"]}
    if cfg.head_lr is not None:  # the classification head (also inside peft's wrapper)
        head = [p for n, p in model.named_parameters() if p.requires_grad and id(p) not in taken
                and set(CLASSIFIER_HEADS) & set(n.split("."))]
        if head:
            groups += decay_groups(head, cfg.weight_decay, lr=cfg.head_lr)
            taken |= {id(p) for p in head}
    rest = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in taken]
    if not rest and not groups:
        raise ValueError("the model has no trainable parameters; inject a method first")
    if cfg.layer_decay == 1:
        main = decay_groups([p for _, p in rest], cfg.weight_decay)
    else:  # one group per depth, from the embeddings (depth 0) up
        layers = model.config.num_hidden_layers
        depth = {id(p): depth_of(n, layers) for n, p in rest}
        main = [g for d in sorted(set(depth.values())) for g in decay_groups(
            [p for _, p in rest if depth[id(p)] == d], cfg.weight_decay,
            lr=cfg.lr * cfg.layer_decay ** (layers + 1 - d))]
    return torch.optim.AdamW(main + groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def depth_of(name: str, layers: int) -> int:
    """0 for the embeddings, l + 1 for transformer layer l (BERT's `layer.l.`, Llama's
    `layers.l.`), layers + 1 for what sits above the last layer (pooler, final norm)."""
    m = re.search(r"\blayers?\.(\d+)\.", name)
    if m:
        return int(m.group(1)) + 1
    return 0 if "embed" in name else layers + 1


def decay_groups(params: list, weight_decay: float, **extra) -> list[dict]:
    """AdamW's decoupled weight decay on the weight matrices only, as in BERT's recipe (Devlin et
    al. 2019): biases and LayerNorm scales (1-d) are not pulled towards 0. One group without it."""
    if not weight_decay:
        return [dict(params=params, **extra)] if params else []
    split = (dict(params=[p for p in params if p.dim() >= 2], weight_decay=weight_decay, **extra),
             dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0, **extra))
    return [g for g in split if g["params"]]
