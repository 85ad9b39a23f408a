"""DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al., 2024, arXiv:2402.09353).

DoRA splits a weight into a magnitude and a direction (weight normalisation, Salimans & Kingma
2016), trains the magnitude directly and the direction through LoRA. In the paper's notation,
with W0 of shape (d, k) and ||.||_c the norm of each column (one per output unit):

    W0 = m V / ||V||_c,  m = ||W0||_c,  V = W0           (eq. 2: magnitude times direction)
    W' = m (W0 + B A) / ||W0 + B A||_c                    (eq. 5: m trains, V = W0 + BA)

In torch's (out, in) layout the paper's columns are our rows, so m has shape (out,) and
||V||_c = ||V_j,:|| over the input dim. With LoRA's `scaling` s on the update and x: (..., in),

    y = x W'^T + b = m / ||W + s B A||_c * (x W^T + s x A^T B^T) + b

At init B = 0 and m = ||W||_c, so W' = W: the adapted model equals the base model at step 0.

What is kept from the paper, as peft's `LoraConfig(use_dora=True)` does it:
- The norm is detached (section 4.3): ||W + s B A||_c is recomputed every step, so it follows
  the update, but it is treated as a constant in backprop. Its gradient would need the whole
  (out, in) matrix W + sBA in the backward graph; detached, the gradient of the direction is
  LoRA's gradient scaled by m / ||V||_c, and the paper reports the accuracy it costs as
  negligible against the memory it saves.
- The base output is reused: y = x W^T + b  +  (g - 1) (x W^T)  +  g s x A^T B^T with
  g = m / ||V||_c, so no second product with W runs. With active dropout, the adapter sees
  dropout(x) and the base does not: y = x W^T + b + (g - 1) dropout(x) W^T + g s dropout(x) A^T B^T,
  which needs one extra product with W (peft's rule; without dropout both readings agree).
- The bias is outside the decomposition: it is neither normalised nor scaled by g.
- merge: W <- g (W + s B A) with g from the unmerged weight; unmerge divides g out again,
  with the g stored at merge time.

The layer is pelib's LoRALinear plus one parameter, `lora_magnitude_vector`, named as in
peft's adapter files, so its tensors map one to one onto peft's (`lora_A.weight`,
`lora_B.weight`, `lora_magnitude_vector`) and an adapter file in peft's format has
`"use_dora": true` in its adapter_config.json. DoRAConfig is the recipe (LoRA's options and
defaults) and that flag; its one entry in pelib.methods.METHODS is all the CLI, the adapter
files and compare's presets need.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from . import io
from .inject import adapter_record, check_alpha, inject_linears
from .lora import LoRAConfig, LoRALinear, check_rank

NOT_DORA = ("adapter_config.json has no `use_dora: true`, so it is a plain LoRA adapter; load it "
            "with pelib.load_adapter")


@dataclass(frozen=True)
class DoRAConfig(LoRAConfig):
    """DoRA's recipe: LoRA's options and defaults (r 8, alpha 2r, dropout, targets, rsLoRA) and
    LoRA's lr 2e-3; its file is peft's LORA file with `use_dora: true`."""

    lr: ClassVar[float] = 2e-3
    FLAGS: ClassVar[tuple[str, ...]] = ("use_dora",)
    MATCH: ClassVar[tuple[str, ...]] = LoRAConfig.MATCH + ("use_dora",)

    def to_peft(self) -> dict:
        return dict(super().to_peft(), use_dora=True)

    @classmethod
    def from_peft(cls, config: dict) -> "DoRAConfig":
        if not config.get("use_dora"):
            raise ValueError(NOT_DORA)
        return super().from_peft(config)


class DoRALinear(LoRALinear):
    """LoRALinear whose output is rescaled per output unit by m / ||W + s B A||_c."""

    def __init__(self, base_layer: nn.Linear, r: int = 8, alpha: float = 16,
                 dropout: float = 0.0, use_rslora: bool = False):
        if not isinstance(getattr(base_layer, "weight", None), torch.Tensor):
            raise TypeError(f"DoRA needs the dense weight of its base layer for the column norm; "
                            f"a {type(base_layer).__name__} has none (DoRA here wraps nn.Linear)")
        super().__init__(base_layer, r, alpha, dropout, use_rslora)
        self.lora_magnitude_vector = nn.Parameter(self.weight_norm())  # m: (out,) = ||W + sBA||_c

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """||W + s B A||_c: (out,), the norm of each output row over the input dim. Computed
        without a graph: section 4.3's constant."""
        W = self.base_layer.weight.to(self.lora_A.weight.dtype)  # (out, in)
        return torch.linalg.norm(W + self.delta_weight(), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)  # (..., out) = x W^T + b
        if self.merged:
            return result
        x = x.to(self.lora_A.weight.dtype)
        g = (self.lora_magnitude_vector / self.weight_norm()).view(1, -1)  # (1, out)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            bias = self.base_layer.bias
            base = result if bias is None else result - bias  # (..., out) = x W^T
        else:  # the adapter sees dropout(x), the base output keeps x
            x = self.lora_dropout(x)
            base = F.linear(x, self.base_layer.weight.to(x.dtype))  # (..., out)
        lora = self.lora_B(self.lora_A(x))  # (..., out) = x A^T B^T
        return result + ((g - 1) * base + g * lora * self.scaling)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            norm = self.weight_norm()  # (out,), from the unmerged weight, as forward sees it
            self._merged_norm = norm  # unmerge needs this g: the merged weight's norm is m
            g = (self.lora_magnitude_vector / norm).view(-1, 1)  # (out, 1)
            W = self.base_layer.weight
            W.copy_((g * (W + self.delta_weight())).to(W.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            g = (self.lora_magnitude_vector / self._merged_norm).view(-1, 1)  # (out, 1)
            W = self.base_layer.weight
            W.copy_((W / g - self.delta_weight()).to(W.dtype))
            del self._merged_norm
            self.merged = False

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora=True"


def apply_dora(model: nn.Module, target_modules: str | Iterable[str], r: int = DoRAConfig.r,
               alpha: float | None = None, dropout: float = DoRAConfig.dropout,
               use_rslora: bool = DoRAConfig.rslora,
               modules_to_save: Iterable[str] | None = None) -> nn.Module:
    """Wrap every targeted nn.Linear in a DoRALinear and freeze the rest (a classification
    head, or `modules_to_save`, stays trainable); targets follow pelib.inject's rules. alpha
    defaults to 2r (DoRAConfig)."""
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"r must be a positive integer, got {r!r}")
    alpha = DoRAConfig(r=r, alpha=alpha).alpha
    check_alpha(alpha)

    def make(name: str, module: nn.Linear) -> nn.Module:
        check_rank(r, module)
        return DoRALinear(module, r, alpha, dropout, use_rslora)

    inject_linears(model, target_modules, make, "DoRA", modules_to_save, dropout)
    adapter_record(model, "LORA", target_modules, modules_to_save, r=r, lora_alpha=alpha,
                   lora_dropout=dropout, use_rslora=use_rslora, use_dora=True)
    return model


def dora_from_config(model: nn.Module, config: dict, modules_to_save=None) -> nn.Module:
    """Inject the DoRA layers a peft LORA config with `use_dora: true` describes (what
    pelib.load_adapter does with such a file)."""
    for k in ("rank_pattern", "alpha_pattern"):
        if config.get(k):
            raise ValueError(f"adapter_config.json sets {k} = {config[k]}; pelib's DoRA uses "
                             f"one r and one alpha for every layer")
    c = DoRAConfig.from_peft(config)
    return apply_dora(model, c.targets, r=c.r, alpha=c.alpha, dropout=c.dropout,
                      use_rslora=c.rslora, modules_to_save=modules_to_save)


def dora_layers(model: nn.Module) -> list[tuple[str, DoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, DoRALinear)]


# ---- peft's format ---------------------------------------------------------------------------

def dora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of peft's adapter_model.safetensors for this model, under peft's keys:
    `base_model.model.<layer>.lora_A.weight`, `.lora_B.weight`, `.lora_magnitude_vector`,
    and a trained head as `base_model.model.classifier.weight`."""
    _require_dora(model)
    return {io.PREFIX + n: t.contiguous() for n, t in io.adapter_state_dict(model).items()}


def load_dora_state(model: nn.Module, tensors: dict[str, torch.Tensor], source="") -> nn.Module:
    """Copy peft-format tensors (keys with or without `base_model.model.`) into a model that
    apply_dora built with the same targets and rank; every key must fit, else a clear error."""
    _require_dora(model)
    if any(m.merged for _, m in dora_layers(model)):
        raise ValueError("cannot load DoRA tensors into a merged model; call "
                         "pelib.lora.unmerge(model) first")
    io.load_adapter_weights(model, {k.removeprefix(io.PREFIX): v for k, v in tensors.items()},
                            source=source or "tensors")
    return model


def save_dora(model: nn.Module, path: str | os.PathLike, **kwargs) -> Path:
    """Write an adapter folder in peft's format (loads with PeftModel.from_pretrained)."""
    _require_dora(model)
    return io.save_adapter(model, path, **kwargs)


def load_dora(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a peft DoRA adapter folder (LORA with `use_dora: true`) into a fresh base model,
    or into a model that already has the same DoRA layers."""
    return io.load_with(model, path, ("LORA",), dora_from_config, check_dora_file,
                        match=DoRAConfig.MATCH)


def check_dora_file(config: dict, tensors: dict, source: str) -> None:
    if not config.get("use_dora"):
        raise ValueError(f"{source}: {NOT_DORA}")


def _require_dora(model: nn.Module) -> None:
    if not dora_layers(model):
        raise ValueError(f"{type(model).__name__} has no DoRA layers; call "
                         "pelib.dora.apply_dora(model, targets) first")
