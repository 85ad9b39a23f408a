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
* `soft_threshold` is the exact T_lam. The official update (src/sparse_optimizer.py) applies three
  masked in-place statements one after the other; a value with lam < |g| < 2 lam is first
  moved to |g| - lam < lam and then zeroed by the third. `official_threshold` reproduces it (for
  reproduction only: `SoRA(variant="official")`).
* Threshold scale: the paper uses eta_t * xi (`lr_scaled=True`, our default; eta_t is the gate
  group's current lr, read from the optimizer). The official default optimizer uses xi itself
  (`lr_scaled=False`); its `sparse_optimizer_multiply_lr.py` uses lr * xi.
* Gate init: the official code draws g ~ N(0, 1). We default to g = 1 (`gate_init="ones"`):
  the layer starts as plain LoRA with the same alpha/r, every rank starts alive and equal, and
  which ranks die is decided by the data rather than by the draw (with N(0,1) a tenth of the
  gates start within 0.13 of zero). `gate_init="normal"` gives the official choice.
* Gates are vectors of shape (r,) (the official code uses (1, r); both broadcast alike).
* Pruning (`prune`) drops the ranks whose gate is 0, folds g into B and exports plain LoRA with
  a per-module `rank_pattern`, which peft loads. A module with every gate at 0 has no adapter
  left (peft needs r >= 1): it is left out of `target_modules` and keeps its frozen base weight.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import ClassVar, Iterable, Sequence

import torch
from torch import nn

from .hooks import Hook
from .inject import adapter_record, check_alpha, inject_linears
from .io import save_adapter
from .lora import LoRAConfig, LoRALinear, LowRank, check_rank, dropout_p, fold_into_lora
from .recipe import option

GATE_INITS = ("ones", "normal")
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
    save_adapter: str | None = option(None, "write the pruned adapter (peft LoRA format) to DIR",
                                      metavar="DIR")

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


def _check_lam(lam) -> float:
    lam = float(lam)
    if not lam >= 0 or not math.isfinite(lam):
        raise ValueError(f"the sparsity threshold must be a finite number >= 0, got {lam}; "
                         "pass a non-negative sparse lambda (xi)")
    return lam


def soft_threshold(g: torch.Tensor, lam: float) -> torch.Tensor:
    """T_lam(g) = sign(g) * max(|g| - lam, 0): the prox of lam * ||g||_1, exactly."""
    lam = _check_lam(lam)
    return torch.sign(g) * torch.clamp(g.abs() - lam, min=0)


def official_threshold(g: torch.Tensor, lam: float) -> torch.Tensor:
    """The official code's three in-place statements, in their order (for reproduction only).
    Not T_lam: lam < |g| < 2 lam gives 0 instead of |g| - lam (and |g| == lam is kept)."""
    lam = _check_lam(lam)
    p = g.clone()
    p[p > lam] -= lam
    p[p < -lam] += lam
    p[p.abs() < lam] = 0.0
    return p


class SparsitySchedule:
    """xi raised over stages: xi = lambdas[k] during stage k; stages split the run evenly unless
    `stage_steps` fixes their length. The last value holds to the end of training."""

    def __init__(self, lambdas: Sequence[float], stage_steps: int | None = None):
        if not hasattr(lambdas, "__len__"):
            raise ValueError("the sparsity schedule must be a finite list of lambdas, got a "
                             f"{type(lambdas).__name__}; pass e.g. [0.1, 0.2, 0.3]")
        self.lambdas = [_check_lam(v) for v in lambdas]
        if not self.lambdas:
            raise ValueError("the sparsity schedule is empty; give at least one lambda")
        if stage_steps is not None and (not isinstance(stage_steps, int) or stage_steps < 1):
            raise ValueError(f"stage_steps must be a positive integer, got {stage_steps!r}")
        self.stage_steps = stage_steps
        self.total_steps = None

    @classmethod
    def linear(cls, start: float, end: float, stages: int, stage_steps: int | None = None):
        """`stages` values from start to end, evenly spaced (the official 'linear' schedule)."""
        if not isinstance(stages, int) or stages < 1:
            raise ValueError(f"stages must be a positive integer, got {stages!r}")
        if stages == 1:
            return cls([start], stage_steps)
        return cls([start + (end - start) * k / (stages - 1) for k in range(stages)], stage_steps)

    def begin(self, total_steps: int) -> None:
        n = len(self.lambdas)
        if self.stage_steps is None:
            if n > total_steps:
                raise ValueError(f"the schedule has {n} stages but training has only "
                                 f"{total_steps} steps; use fewer stages")
        elif (n - 1) * self.stage_steps >= total_steps:
            raise ValueError(
                f"the schedule does not end within training: its last stage would start at step "
                f"{(n - 1) * self.stage_steps + 1} of {total_steps}; lower stage_steps (or leave "
                f"it None to split the run evenly) or use fewer stages")
        self.total_steps = total_steps

    def __call__(self, step: int) -> float:
        """xi for optimizer step `step` (1-based, as the training loop counts)."""
        if self.stage_steps is not None:
            k = (step - 1) // self.stage_steps
        else:
            if self.total_steps is None:
                raise RuntimeError("call begin(total_steps) first (the training loop does)")
            k = (step - 1) * len(self.lambdas) // self.total_steps
        return self.lambdas[min(k, len(self.lambdas) - 1)]


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


def sora_layers(model: nn.Module) -> list[tuple[str, SoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SoRALinear)]


def live_ranks(model: nn.Module) -> dict[str, int]:
    """Module name -> number of non-zero gates."""
    return {n: int((m.gate != 0).sum()) for n, m in sora_layers(model)}


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


def report(model: nn.Module, hooks, c: SoRAConfig, steps: int) -> dict:
    """What a SoRA run adds to its record: live ranks per module, parameter counts before and
    after pruning, and the exported adapter (c.save_adapter). Every gate at zero is a result,
    0 live ranks and no adapter left, not an error: the record says so and nothing is written."""
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
               live_ranks_history=getattr(hooks[0], "live_history", None), adapter=None)
    print(f"SoRA: {out['live_ranks_total']} of {out['initial_ranks_total']} ranks live; "
          f"{after:,} trainable parameters after pruning ({before:,} before)")
    if c.save_adapter and out["live_ranks_total"]:
        export_lora(model, c.save_adapter)
        out["adapter"] = c.save_adapter
    elif c.save_adapter:
        print(f"SoRA: every gate is zero, so no adapter is left to write to {c.save_adapter}; "
              "a lower --sparse-lambda keeps some ranks")
    return out
