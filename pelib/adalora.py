"""AdaLoRA: adaptive budget allocation (Zhang et al., ICLR 2023, arXiv:2303.10512).

LoRA whose rank follows the data: each update is kept in SVD form, ΔW = P Λ Q, and while training
the least important triplets (P column, λ, Q row) are pruned until the budget of triplets over
the whole model falls from L init_r to L target_r. The parts, one job each:

    pelib.svd_adaptation   the SVD-form layer (SVDLinear), apply_adalora, the orthogonal regulariser
    pelib.rank_allocation  RankAllocator: importance scores and the budget schedule, as a train hook
    here                   to_lora: a pruned model as plain LoRA, for peft's file format

Every public name is importable from here (`from pelib.adalora import RankAllocator`).
"""
from __future__ import annotations

import torch
from torch import nn

from .lora import dropout_p, fold_into_lora
from .rank_allocation import RankAllocator
from .svd_adaptation import (
    AdaLoRAConfig,
    SVDLinear,
    apply_adalora,
    orthogonal_regularizer,
    svd_layers,
)

__all__ = ["AdaLoRAConfig", "RankAllocator", "SVDLinear", "apply_adalora", "orthogonal_regularizer",
           "svd_layers", "to_lora"]


@torch.no_grad()
def to_lora(model: nn.Module) -> nn.Module:
    """Turn a pruned AdaLoRA model into plain LoRA, in place: each SVDLinear becomes a LoRALinear
    of rank k = its kept triplets, A = Q[keep], B = P[:, keep] diag(λ_keep) * (alpha/init_r) / (alpha/k),
    so the outputs stay the same; a module that kept nothing gets its base layer back. Then
    pelib.save_adapter writes a peft LORA adapter with a per-module rank_pattern."""
    config = getattr(model, "pelib_adapter", None) or {}
    layers = svd_layers(model)
    if not layers or config.get("peft_type") != "ADALORA":
        raise ValueError("to_lora needs a model built by pelib.adalora.apply_adalora")
    pattern = config.get("rank_pattern") or {}
    alpha, ranks = config["lora_alpha"], {}
    for name, m in layers:
        keep = torch.tensor(pattern.get(f"{name}.lora_E", [True] * m.r), dtype=torch.bool)
        keep &= (m.lora_E.view(-1) != 0).cpu()  # a zero λ contributes nothing either
        keep = keep.to(m.lora_E.device)
        k = fold_into_lora(model, name, m.base_layer, m.lora_A[keep],                  # (k, in)
                           lambda s, m=m, keep=keep: m.lora_B[:, keep] * m.lora_E[keep].view(1, -1)
                           * (m.scaling / (m.ranknum + 1e-5)) / s,                   # (out, k)
                           alpha, dropout_p(m))
        if k:
            ranks[name] = k
    if not ranks:
        raise ValueError("every triplet was pruned: there is no LoRA adapter left to export")
    model.pelib_adapter = dict(
        peft_type="LORA", r=max(ranks.values()), lora_alpha=alpha,
        lora_dropout=config.get("lora_dropout", 0.0), use_rslora=False,
        target_modules=sorted(ranks), modules_to_save=config.get("modules_to_save"),
        rank_pattern=ranks)
    return model
