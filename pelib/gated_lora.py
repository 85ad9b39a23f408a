"""SoRA's gated LoRA layer and its pruning into plain LoRA (Ding et al., 2023, arXiv:2311.11696).

    y = x W^T + b + (alpha/r) * ((dropout(x) A^T) * g) B^T,      A: (r, in), B: (out, r), g: (r,)

* Gates are vectors of shape (r,) (the official code uses (1, r); both broadcast alike).
* Pruning (`prune`) drops the ranks whose gate is 0, folds g into B and exports plain LoRA with
  a per-module `rank_pattern`, which peft loads. A module with every gate at 0 has no adapter
  left (peft needs r >= 1): it is left out of `target_modules` and keeps its frozen base weight.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .io import save_adapter
from .lora import LoRALinear, dropout_p, fold_into_lora

GATE_INITS = ("ones", "normal")


class SoRALinear(LoRALinear):
    """LoRALinear with a gate g of shape (r,) between A and B (peft's names for A and B)."""

    def __init__(self, base_layer: nn.Linear, r: int = 8, alpha: float = 16,
                 dropout: float = 0.0, gate_init: str = "ones"):
        super().__init__(base_layer, r, alpha, dropout)
        if gate_init not in GATE_INITS:
            raise ValueError(f"gate_init must be one of {GATE_INITS}, got {gate_init!r}")
        w = self.lora_A.weight
        gate = torch.ones(r, device=w.device, dtype=w.dtype) if gate_init == "ones" else \
            torch.randn(r, device=w.device, dtype=w.dtype)
        self.gate = nn.Parameter(gate)  # (r,)

    def between(self, h: torch.Tensor) -> torch.Tensor:
        return h * self.gate  # (..., r), gated ranks

    def B(self) -> torch.Tensor:
        return self.lora_B.weight * self.gate  # (out, r): B diag(g)

    def live(self) -> torch.Tensor:
        return (self.gate != 0).nonzero().flatten()  # indices of live ranks

    def extra_repr(self) -> str:
        return super().extra_repr() + f", live={int((self.gate != 0).sum())}"


def sora_layers(model: nn.Module) -> list[tuple[str, SoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SoRALinear)]


def live_ranks(model: nn.Module) -> dict[str, int]:
    """Module name -> number of non-zero gates."""
    return {n: int((m.gate != 0).sum()) for n, m in sora_layers(model)}



def check_gate_shapes(config: dict, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Gates are vectors (r,); the official code saves (1, r): say how to convert."""
    r = config["r"]
    bad = {k: tuple(t.shape) for k, t in tensors.items() if k.endswith(".gate") and t.shape != (r,)}
    if bad:
        k, shape = next(iter(bad.items()))
        raise ValueError(f"{source}: gate {k} has shape {shape}, pelib's gates are vectors of "
                         f"shape (r,) = ({r},) ({len(bad)} bad); an official-code (1, r) gate "
                         "loads after gate.reshape(-1)")



@torch.no_grad()
def prune(model: nn.Module) -> nn.Module:
    """Turn a trained SoRA model into plain LoRA, in place, with the same function:
    keep the live ranks K of each module, A' = A[K], B' = B[:, K] * g[K] * (r'/r) (so that
    (alpha/r') B' A' = (alpha/r) B diag(g) A with r' = |K|); a module with no live rank becomes
    its frozen base layer again and leaves target_modules."""
    layers = sora_layers(model)
    if not layers:
        raise ValueError("the model has no SoRA layers to prune")
    if any(m.merged for _, m in layers):
        raise ValueError("unmerge the SoRA layers (pelib.lora.unmerge) before pruning")
    config = model.pelib_adapter
    r0, alpha = config["r"], config["lora_alpha"]
    ranks = {}
    for name, m in layers:
        keep = m.live()
        k = fold_into_lora(model, name, m.base_layer, m.lora_A.weight[keep],      # A' = A[K]
                           lambda s, m=m, keep=keep:                               # B' = B[:, K] g[K] s/s'
                           m.lora_B.weight[:, keep] * m.gate[keep] * (m.scaling / s),
                           alpha, dropout_p(m))
        if k:
            ranks[name] = k
    kept = list(ranks)
    if not kept:
        raise ValueError("every gate is zero: no adapter is left to export (peft needs r >= 1 "
                         "in some module); lower the sparse lambda")
    model.pelib_adapter = dict(
        peft_type="LORA", r=r0, lora_alpha=alpha, lora_dropout=config["lora_dropout"],
        use_rslora=False, target_modules=kept, modules_to_save=config["modules_to_save"],
        rank_pattern={n: k for n, k in ranks.items() if k != r0})
    return model


def export_lora(model: nn.Module, path, base_model_name_or_path: str | None = None):
    """Save the pruned adapter of a trained SoRA model in peft's LoRA format (model unchanged)."""
    return save_adapter(prune(copy.deepcopy(model)), path, base_model_name_or_path)

