"""Bottleneck adapters: Houlsby et al. (2019, arXiv:1902.00751) and Pfeiffer et al. (2021,
arXiv:2005.00247).

An adapter is a small residual MLP inserted into a frozen network:

    Adapter(h) = h + W_up f(W_down h + b_down) + b_up,   W_down: (m, d), W_up: (d, m), m << d

with f a nonlinearity. Its parameter count is 2dm + m + d. W_up starts at zero, so at step 0
Adapter(h) = h and the adapted model computes exactly what the base model computes; W_down
starts near zero (normal, std 1e-2), as in Houlsby's paper, so the first steps stay close to
the identity.

Where it goes (the output h of a sub-layer's last projection, before dropout, the residual add
and the LayerNorm):
    houlsby   after the attention output projection and after the feed-forward output:
              2 adapters per layer
    pfeiffer  after the feed-forward output only: 1 adapter per layer (Pfeiffer's search found
              this placement as good at half the parameters and half the extra depth)

    BERT / MiniLM     attention.output.dense, output.dense   (then dropout, + residual, LayerNorm)
    Llama / SmolLM2   self_attn.o_proj, mlp.down_proj        (then + residual)

What we leave out: Houlsby also trains every LayerNorm, and Pfeiffer's adapter takes its
residual from before the LayerNorm; pass `modules_to_save=["LayerNorm", "classifier"]` to train
the LayerNorms too. Unlike LoRA, an adapter cannot be merged: the nonlinearity between W_down
and W_up keeps it a separate layer, so inference pays two extra matmuls per adapter, in
sequence with the rest of the layer (notebook 01 measures it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Iterable

import torch
from torch import nn

from .inject import inject
from .recipe import Recipe, option

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
KINDS = ("houlsby", "pfeiffer")
# Full-name patterns (regular expressions) of the projections each kind adapts, per model_type.
TARGETS = {
    "bert": {"houlsby": r".*\.layer\.\d+\.(attention\.output|output)\.dense",
             "pfeiffer": r".*\.layer\.\d+\.output\.dense"},
    "llama": {"houlsby": r".*\.layers\.\d+\.(self_attn\.o_proj|mlp\.down_proj)",
              "pfeiffer": r".*\.layers\.\d+\.mlp\.down_proj"},
}


class Adapter(nn.Module):
    """h + up(f(down(h))): the bottleneck d -> m -> d with a skip connection."""

    def __init__(self, d: int, m: int, activation: str = "relu", init_std: float = 1e-2,
                 device=None, dtype=None):
        super().__init__()
        self.adapter_down = nn.Linear(d, m, device=device, dtype=dtype)  # W_down: (m, d)
        self.act = ACTIVATIONS[activation]()
        self.adapter_up = nn.Linear(m, d, device=device, dtype=dtype)    # W_up: (d, m)
        nn.init.normal_(self.adapter_down.weight, std=init_std)
        nn.init.zeros_(self.adapter_down.bias)
        nn.init.zeros_(self.adapter_up.weight)  # the adapter starts as the identity
        nn.init.zeros_(self.adapter_up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:                # h: (B, T, d)
        z = self.act(self.adapter_down(h.to(self.adapter_down.weight.dtype)))  # (B, T, m)
        return h + self.adapter_up(z).to(h.dtype)                      # (B, T, d)


class AdapterLinear(nn.Module):
    """A frozen projection followed by an adapter: adapter(base_layer(x))."""

    def __init__(self, base_layer: nn.Linear, bottleneck: int, activation: str = "relu"):
        super().__init__()
        self.base_layer = base_layer
        w = base_layer.weight
        self.adapter = Adapter(base_layer.out_features, bottleneck, activation,
                               device=w.device, dtype=w.dtype)

    in_features = property(lambda self: self.base_layer.in_features)
    out_features = property(lambda self: self.base_layer.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, d_in)
        return self.adapter(self.base_layer(x))         # (B, T, d)


@dataclass(frozen=True)
class AdapterConfig(Recipe):
    """The adapters' recipe: Houlsby's placement, m = 64, lr 1e-3 (chosen on the Banking77 dev
    split). No adapter file: peft has no bottleneck adapters to follow."""

    lr: ClassVar[float] = 1e-3
    adapter_kind: str = option("houlsby", "where the adapters go", choices=("houlsby", "pfeiffer"))
    bottleneck: int = option(64, "adapter width m", type=int)

    def tag(self) -> str:
        return f"-{self.adapter_kind}-m{self.bottleneck}"


def adapter_parameters(d: int, m: int) -> int:
    """Parameters of one adapter: W_down, b_down, W_up, b_up."""
    return d * m + m + m * d + d


def model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def apply_adapters(model: nn.Module, kind: str = AdapterConfig.adapter_kind,
                   bottleneck: int = AdapterConfig.bottleneck,
                   activation: str = "relu",
                   modules_to_save: Iterable[str] | None = None) -> nn.Module:
    """Insert bottleneck adapters after the projections that `kind` names, freeze everything
    else (a classification head, or `modules_to_save`, stays trainable)."""
    if kind not in KINDS:
        raise ValueError(f"unknown adapter kind {kind!r}; choose one of {list(KINDS)}")
    if not isinstance(bottleneck, int) or isinstance(bottleneck, bool) or bottleneck <= 0:
        raise ValueError(f"bottleneck must be a positive integer, got {bottleneck!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}")
    mtype = model_type(model)
    if mtype not in TARGETS:
        raise ValueError(f"apply_adapters knows where to put adapters in model types "
                         f"{sorted(TARGETS)} (MiniLM is 'bert', SmolLM2 is 'llama'), not in "
                         f"{mtype or type(model).__name__!r}")
    if any(isinstance(m, AdapterLinear) for m in model.modules()):
        raise ValueError("this model already has adapters; load a fresh backbone first")

    def wrap(name: str, module: nn.Module) -> nn.Module:
        if not isinstance(module, nn.Linear):
            raise TypeError(f"{name!r} is a {type(module).__name__}; adapters follow nn.Linear")
        return AdapterLinear(module, bottleneck, activation)

    # No `pelib_adapter` record: peft has no bottleneck adapters, so there is no file format
    # for pelib.io to follow (save the trainable state dict with torch.save instead).
    return inject(model, TARGETS[mtype][kind], wrap, modules_to_save, what="adapters")


def adapter_layers(model: nn.Module) -> list[tuple[str, AdapterLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLinear)]
