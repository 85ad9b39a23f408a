"""LoRA: Low-Rank Adaptation (Hu et al., 2021, arXiv:2106.09685).

A frozen linear layer y = x W^T + b gets a trainable low-rank update:

    y = x W^T + b + scaling * (dropout(x) A^T) B^T,     A: (r, in), B: (out, r)

    scaling = alpha / r            (the paper)
    scaling = alpha / sqrt(r)      (rsLoRA, Kalajdzievski 2023: keeps the update's scale
                                    stable as r grows)

A is initialised like nn.Linear (kaiming-uniform, a=sqrt(5)) and B = 0, so the adapted model
equals the base model at step 0 and the first gradient flows into B only.
After training, W' = W + scaling * B A can be merged: inference then costs nothing extra.

The module and parameter names follow peft (`base_layer`, `lora_A`, `lora_B`), so a state dict
maps one to one onto peft's adapter files, and the forward pass does the same operations in
the same order as peft's, which makes the two bitwise equal.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterable

import torch
from torch import nn

from .inject import (
    adapter_record,
    check_alpha,
    check_lora_args,
    get_submodule_parent,
    inject_linears,
    pattern_value,
)
from .recipe import Recipe, option


@dataclass(frozen=True)
class LowRank(Recipe):
    """The options every LoRA-family method has: rank, alpha (default 2r), dropout, targets."""

    r: int = option(8, "the LoRA rank", flags=("--r", "--lora-r"), type=int)
    # alpha = 2r: the scaling alpha/r stays 2 whatever the rank (the tables' setting)
    alpha: float | None = option(None, "alpha (default: 2*r)", type=float)
    dropout: float = option(0.0, "dropout on the adapter's input", type=float)
    targets: list[str] | None = option(None, "modules to adapt, by name suffix (default: the "
                                             "backbone's usual set)", nargs="+")

    def __post_init__(self):
        if self.alpha is None:
            object.__setattr__(self, "alpha", 2 * self.r)

    def tag(self) -> str:
        return f"-r{self.r}"


@dataclass(frozen=True)
class LoRAConfig(LowRank):
    """LoRA's recipe: r 8, alpha 2r, lr 2e-3 (chosen on the Banking77 dev split)."""

    lr: ClassVar[float] = 2e-3
    peft_type: ClassVar[str] = "LORA"
    MATCH: ClassVar[tuple[str, ...]] = ("peft_type", "r", "lora_alpha", "use_rslora",
                                        "target_modules", "rank_pattern", "alpha_pattern")
    rslora: bool = option(False, "scaling alpha/sqrt(r) (rsLoRA) instead of alpha/r")

    def to_peft(self) -> dict:
        return dict(peft_type=self.peft_type, r=self.r, lora_alpha=self.alpha,
                    lora_dropout=self.dropout, use_rslora=self.rslora)

    @classmethod
    def from_peft(cls, config: dict) -> "LoRAConfig":
        return cls(r=config["r"], alpha=config["lora_alpha"],
                   dropout=config.get("lora_dropout", 0.0),
                   rslora=bool(config.get("use_rslora", False)),
                   targets=config["target_modules"])


class LoRALinear(nn.Module):
    def __init__(self, base_layer: nn.Linear, r: int = 8, alpha: float = 16,
                 dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        check_rank(r, base_layer)
        self.base_layer = base_layer
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        dev, dtype = adapter_device_dtype(base_layer)
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, device=dev, dtype=dtype)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, device=dev, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.merged = False

    in_features = property(lambda self: self.base_layer.in_features)
    out_features = property(lambda self: self.base_layer.out_features)

    # What sits between A and B: nothing in LoRA; a subclass (SoRA's gate) overrides these two.
    def between(self, h: torch.Tensor) -> torch.Tensor:
        return h  # (..., r)

    def B(self) -> torch.Tensor:
        return self.lora_B.weight  # (out, r): B times what sits between

    def delta_weight(self) -> torch.Tensor:
        return (self.B() @ self.lora_A.weight) * self.scaling  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)  # (..., out)
        if self.merged:
            return result
        x = x.to(self.lora_A.weight.dtype)
        return result + self.lora_B(self.between(self.lora_A(self.lora_dropout(x)))) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if not hasattr(self.base_layer, "weight"):
            raise TypeError(f"cannot merge into a {type(self.base_layer).__name__} base layer in "
                            "place; use pelib.quant.merge_qlora(model, strategy=...)")
        if not self.merged:
            self.base_layer.weight += self.delta_weight().to(self.base_layer.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base_layer.weight -= self.delta_weight().to(self.base_layer.weight.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}"


def adapter_device_dtype(base_layer: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where A and B live: beside a float weight, in its dtype; beside a quantised base (no
    `weight`, e.g. pelib.quant.Linear4bit) in float32, as peft trains QLoRA adapters."""
    weight = getattr(base_layer, "weight", None)
    if weight is not None:
        return weight.device, weight.dtype
    buffer = next(base_layer.buffers())
    return buffer.device, torch.float32


def check_rank(r, layer: nn.Module) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"r must be a positive integer, got {r!r}")
    limit = min(layer.in_features, layer.out_features)
    if r > limit:
        raise ValueError(f"r={r} exceeds min(in_features, out_features)={limit} of a "
                         f"{layer.in_features}->{layer.out_features} layer; choose r <= {limit}")


def _pattern(pattern: dict, name: str, default):
    """peft's rank_pattern / alpha_pattern rule (a key is a regular expression; see inject)."""
    return pattern_value(pattern, name, default)


def apply_lora(model: nn.Module, target_modules: str | Iterable[str], r: int = LoRAConfig.r,
               alpha: float | None = None, dropout: float = LoRAConfig.dropout,
               use_rslora: bool = LoRAConfig.rslora,
               modules_to_save: Iterable[str] | None = None,
               rank_pattern: dict[str, int] | None = None,
               alpha_pattern: dict[str, float] | None = None,
               base_wrap: Callable[[nn.Linear], nn.Module] | None = None) -> nn.Module:
    """Wrap every targeted nn.Linear in a LoRALinear, freeze the rest (a classification head,
    or `modules_to_save`, stays trainable). `rank_pattern` / `alpha_pattern` map a regular
    expression over module names to its own r / alpha (peft's fields and rule, pelib.inject);
    alpha defaults to 2r (LoRAConfig).
    `base_wrap`, if given, turns each target into the frozen base first (QLoRA quantises it:
    pelib.quant.apply_qlora)."""
    check_lora_args(target_modules, r, alpha, dropout)
    alpha = LoRAConfig(r=r, alpha=alpha).alpha
    rank_pattern, alpha_pattern = dict(rank_pattern or {}), dict(alpha_pattern or {})
    for a in [alpha, *alpha_pattern.values()]:
        check_alpha(a)

    def make(name: str, module: nn.Linear) -> nn.Module:
        r_here = _pattern(rank_pattern, name, r)
        check_rank(r_here, module)  # before any (costly) base_wrap
        base = base_wrap(module) if base_wrap is not None else module
        return LoRALinear(base, r_here, _pattern(alpha_pattern, name, alpha), dropout, use_rslora)

    inject_linears(model, target_modules, make, "LoRA", modules_to_save, dropout)
    adapter_record(model, "LORA", target_modules, modules_to_save, r=r, lora_alpha=alpha,
                   lora_dropout=dropout, use_rslora=use_rslora, rank_pattern=rank_pattern,
                   alpha_pattern=alpha_pattern)
    return model


def lora_from_config(model: nn.Module, config: dict, modules_to_save=None, **kwargs) -> nn.Module:
    """Inject the LoRA layers a peft LORA config describes (pelib.load_adapter's job for LORA
    files); `kwargs` go to apply_lora (QLoRA passes its base_wrap this way)."""
    c = LoRAConfig.from_peft(config)
    return apply_lora(model, c.targets, r=c.r, alpha=c.alpha, dropout=c.dropout,
                      use_rslora=c.rslora, modules_to_save=modules_to_save,
                      rank_pattern=config.get("rank_pattern") or None,
                      alpha_pattern=config.get("alpha_pattern") or None, **kwargs)


@torch.no_grad()
def fold_into_lora(model: nn.Module, name: str, base: nn.Module, A: torch.Tensor, B_for,
                   alpha: float, dropout: float) -> int:
    """Put a plain LoRALinear of rank k = len(A) at `name`, holding A (k, in) and B_for(its
    scaling) (out, k), so a pruned adapter (SoRA's live ranks, AdaLoRA's kept triplets) keeps its
    function as plain LoRA; k = 0 puts the frozen base layer back. Returns k."""
    parent, child = get_submodule_parent(model, name)
    if len(A) == 0:
        setattr(parent, child, base)
        return 0
    new = LoRALinear(base, len(A), alpha, dropout)
    new.lora_A.weight.copy_(A)
    new.lora_B.weight.copy_(B_for(new.scaling))
    setattr(parent, child, new)
    return len(A)


def dropout_p(layer: nn.Module) -> float:
    return layer.lora_dropout.p if isinstance(layer.lora_dropout, nn.Dropout) else 0.0


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def merge(model: nn.Module) -> nn.Module:
    """Fold scaling * B A into every base weight; forward then skips the adapter path."""
    for _, m in lora_layers(model):
        m.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    for _, m in lora_layers(model):
        m.unmerge()
    return model
