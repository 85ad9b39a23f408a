"""SoRA: Sparse Low-Rank Adaptation (Ding et al., 2023, arXiv:2311.11696).

LoRA with a gate vector g in R^r between A and B, made sparse by a proximal step:

    y = x W^T + b + (alpha/r) * ((dropout(x) A^T) * g) B^T,      A: (r, in), B: (out, r), g: (r,)

so Delta W = (alpha/r) B diag(g) A. After each optimizer step the gates alone go through the
proximal operator of xi * ||g||_1 (the paper's proximal gradient, eq. 5):

    g_{t+1} = T_{eta_t * xi}(g_t - eta_t grad),    T_lam(g) = sign(g) * max(|g| - lam, 0)

The "- eta_t grad" is whatever the optimizer does (AdamW here); the hook then applies T. Rank k of
a module is dead once g_k = 0: its gradient is (alpha/r) (B^T G)_k (x A^T)_k, which does not
vanish, so a dead rank can come back if the loss wants it; a rank dead at the end is pruned.
The sparsity xi is raised in stages (the paper's sparsifying scheduler).

What we keep, and where we differ from the official code (TsinghuaC3I/SoRA):
* The prox is the exact T_lam; the official code's update is there for reproduction
  (`SoRA(variant="official")`, pelib.proximal says how the two differ).
* Threshold scale: the paper uses eta_t * xi (`lr_scaled=True`, our default; eta_t is the gate
  group's current lr, read from the optimizer). The official default optimizer uses xi itself
  (`lr_scaled=False`); its `sparse_optimizer_multiply_lr.py` uses lr * xi.
* Gate init: the official code draws g ~ N(0, 1). We default to g = 1 (`gate_init="ones"`):
  the layer starts as plain LoRA with the same alpha/r, every rank starts alive and equal, and
  which ranks die is decided by the data rather than by the draw (with N(0,1) a tenth of the
  gates start within 0.13 of zero). `gate_init="normal"` gives the official choice.

The parts, one job each (every public name is importable from here):

    pelib.gated_lora   SoRALinear, the gate shapes, prune and export_lora (plain LoRA for peft)
    pelib.proximal     soft_threshold, the official code's update, SparsitySchedule
    here               SoRAConfig (the recipe), the SoRA training hook, apply_sora, report, save
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar, Iterable

import torch
from torch import nn

from .gated_lora import (
    GATE_INITS,
    SoRALinear,
    check_gate_shapes,
    export_lora,
    live_ranks,
    prune,
    sora_layers,
)
from .hooks import Hook
from .inject import adapter_record, check_alpha, inject_linears
from .lora import LoRAConfig, LowRank, check_rank
from .proximal import SparsitySchedule, official_threshold, soft_threshold
from .recipe import option

__all__ = ["GATE_INITS", "VARIANTS", "SoRA", "SoRAConfig", "SoRALinear", "SparsitySchedule",
           "apply_sora", "check_gate_shapes", "export_lora", "live_ranks", "official_threshold",
           "prune", "report", "save", "soft_threshold", "sora_from_config", "sora_layers"]

VARIANTS = ("exact", "official")


@dataclass(frozen=True)
class SoRAConfig(LowRank):
    """SoRA's recipe: r 8, alpha 2r, lr 2e-3; the threshold eta_t * xi with the gates' own lr
    1e-2, xi raised 0.05 -> 0.45 over 3 stages: the better of two settings on the Banking77 dev
    split (docs/benchmarks.md says how they were chosen)."""

    lr: ClassVar[float] = 2e-3
    peft_type: ClassVar[str] = "SORA"  # a pelib-only file (the gates); `prune` makes peft's LORA
    MATCH: ClassVar[tuple[str, ...]] = LoRAConfig.MATCH
    gate_init: str = option("ones", "the gates' initial values", choices=GATE_INITS)
    sparse_lambda: float = option(0.05, "sparsity xi of the gates' L1 prox (the first stage's)",
                                  type=float)
    sparse_lambda_max: float = option(0.45, "xi of the last stage (= --sparse-lambda: no "
                                            "schedule)", type=float)
    sparse_stages: int = option(3, "stages from --sparse-lambda to --sparse-lambda-max, "
                                   "splitting the run evenly", type=int)
    gate_lr: float = option(1e-2, "lr of the gates", type=float)
    threshold_scale: str = option("lr", "prox threshold lr*xi (the paper) or xi (the official "
                                        "code)", choices=("lr", "none"))
    prox_variant: str = option("exact", "exact soft threshold, or the official code's update",
                               choices=VARIANTS)

    def schedule(self) -> "SparsitySchedule":
        stages = self.sparse_stages if self.sparse_lambda != self.sparse_lambda_max else 1
        return SparsitySchedule.linear(self.sparse_lambda, self.sparse_lambda_max, stages)

    def hook(self) -> "SoRA":
        return SoRA(self.schedule(), gate_lr=self.gate_lr,
                    lr_scaled=self.threshold_scale == "lr", variant=self.prox_variant)

    def to_peft(self) -> dict:
        return dict(peft_type=self.peft_type, r=self.r, lora_alpha=self.alpha,
                    lora_dropout=self.dropout, use_rslora=False, gate_init=self.gate_init,
                    rank_pattern={})

    @classmethod
    def from_peft(cls, config: dict) -> "SoRAConfig":
        return cls(r=config["r"], alpha=config["lora_alpha"],
                   dropout=config.get("lora_dropout", 0.0),
                   gate_init=config.get("gate_init", "ones"), targets=config["target_modules"])



class SoRA(Hook):
    """The training hook: gates in their own AdamW group (lr `gate_lr`, no weight decay), and the
    proximal step after every optimizer step (once per step, whatever the accumulation).
    The defaults are the recipe (SoRAConfig): xi 0.05 -> 0.45 in three stages, gate lr 1e-2;
    `gate_lr=None` trains the gates at the optimizer's lr."""

    def __init__(self, sparse_lambda: float | SparsitySchedule | None = None,
                 gate_lr: float | None = SoRAConfig.gate_lr, lr_scaled: bool = True,
                 variant: str = "exact"):
        if sparse_lambda is None:
            sparse_lambda = SoRAConfig().schedule()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if gate_lr is not None and not gate_lr > 0:
            raise ValueError(f"gate_lr must be > 0, got {gate_lr}")
        self.schedule = sparse_lambda if isinstance(sparse_lambda, SparsitySchedule) else \
            SparsitySchedule([sparse_lambda])
        self.gate_lr, self.lr_scaled, self.variant = gate_lr, lr_scaled, variant
        self.prox = soft_threshold if variant == "exact" else official_threshold
        self.group = None
        self.history = []  # per step: (xi, threshold)
        self.live_history = []  # per step: live ranks (non-zero gates) over all layers, after the prox

    def state_dict(self) -> dict:  # for checkpoints (the threshold itself follows from the step)
        return dict(history=self.history, live_history=self.live_history)

    def load_state_dict(self, state: dict) -> None:
        self.history = state["history"]
        self.live_history = state.get("live_history", [])  # checkpoints written before it existed

    def param_groups(self, model: nn.Module) -> list[dict]:
        gates = [m.gate for _, m in sora_layers(model)]
        if not gates:
            raise ValueError("the model has no SoRA layers; call pelib.sora.apply_sora first")
        group = dict(params=gates, weight_decay=0.0)  # the L1 prox is the gates' only penalty
        if self.gate_lr is not None:
            group["lr"] = self.gate_lr
        return [group]

    def begin(self, model: nn.Module, optimizer: torch.optim.Optimizer, total_steps: int) -> None:
        gate_ids = {id(m.gate) for _, m in sora_layers(model)}
        self.group = next((g for g in optimizer.param_groups
                           if gate_ids & {id(p) for p in g["params"]}), None)
        if self.group is None:
            raise ValueError("the optimizer does not train the gates; pass this hook to "
                             "pelib.train.train(hooks=[...]) so it can add their group")
        self.schedule.begin(total_steps)

    @torch.no_grad()
    def step(self, model: nn.Module, step: int) -> None:
        xi = self.schedule(step)
        lam = xi * self.group["lr"] if self.lr_scaled else xi  # eta_t * xi (paper) or xi
        live = 0
        for _, m in sora_layers(model):
            m.gate.copy_(self.prox(m.gate, lam))
            live += int((m.gate != 0).sum())
        self.history.append((xi, lam))
        self.live_history.append(live)


def apply_sora(model: nn.Module, target_modules: str | Iterable[str], r: int = SoRAConfig.r,
               alpha: float | None = None, dropout: float = SoRAConfig.dropout,
               gate_init: str = SoRAConfig.gate_init,
               modules_to_save: Iterable[str] | None = None) -> nn.Module:
    """Wrap every targeted nn.Linear in a SoRALinear of rank r; freeze the rest (the head trains).
    alpha defaults to 2r (SoRAConfig)."""
    config = SoRAConfig(r=r, alpha=alpha, dropout=dropout, gate_init=gate_init)
    alpha = config.alpha
    check_alpha(alpha)

    def make(name: str, module: nn.Linear) -> nn.Module:
        check_rank(r, module)
        return SoRALinear(module, r, alpha, dropout, gate_init)

    inject_linears(model, target_modules, make, "SoRA", modules_to_save, dropout)
    adapter_record(model, "SORA", target_modules, modules_to_save,
                   **{k: v for k, v in config.to_peft().items() if k != "peft_type"})
    return model


def sora_from_config(model: nn.Module, config: dict, modules_to_save=None) -> nn.Module:
    """Inject the gated layers a SORA adapter config describes (for pelib.load_adapter)."""
    c = SoRAConfig.from_peft(config)
    return apply_sora(model, c.targets, r=c.r, alpha=c.alpha, dropout=c.dropout,
                      gate_init=c.gate_init, modules_to_save=modules_to_save)



def report(model: nn.Module, hooks, c: SoRAConfig, steps: int) -> dict:
    """What a SoRA run adds to its record: live ranks per module, parameter counts before and
    after pruning. Every gate at zero is a result, 0 live ranks, not an error."""
    from .inject import trainable_parameters

    live = live_ranks(model)
    gates = torch.cat([m.gate.detach().abs() for _, m in sora_layers(model)])
    before = trainable_parameters(model)
    if sum(live.values()):
        after = trainable_parameters(prune(copy.deepcopy(model)))
    else:  # pruning leaves the frozen base layers: only the head trains
        after = before - sum(p.numel() for _, m in sora_layers(model)
                             for n, p in m.named_parameters() if p.requires_grad
                             and not n.startswith("base_layer."))
    out = dict(live_ranks=live, live_ranks_total=sum(live.values()),
               live_gate_abs_mean=float(gates[gates > 0].mean()) if (gates > 0).any() else 0.0,
               initial_ranks_total=c.r * len(live), params_before_pruning=before,
               params_after_pruning=after,
               live_ranks_history=getattr(hooks[0], "live_history", None))
    print(f"SoRA: {out['live_ranks_total']} of {out['initial_ranks_total']} ranks live; "
          f"{after:,} trainable parameters after pruning ({before:,} before)")
    return out


def save(model: nn.Module, path) -> str | None:
    """`finetune --save-adapter`: the pruned adapter in peft's LoRA format (export_lora). With
    every gate at zero no adapter is left: nothing is written, and None says so."""
    if not sum(live_ranks(model).values()):
        print(f"SoRA: every gate is zero, so no adapter is left to write to {path}; a lower "
              "--sparse-lambda keeps some ranks")
        return None
    return str(export_lora(model, path))
