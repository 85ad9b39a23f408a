"""AdaLoRA's SVD-form update (Zhang et al., ICLR 2023, arXiv:2303.10512, section 3.1).

Each targeted weight gets an update in SVD form, ΔW = P Λ Q, whose triplets (P column, λ, Q row)
can be scored and pruned one by one while training (pelib.rank_allocation does that):

    y = x W^T + b + (alpha / ranknum) * (dropout(x) (Q ⊙ λ)^T) P^T
        Q = lora_A (r, in),  Λ = diag(lora_E), lora_E (r, 1),  P = lora_B (out, r)

As in peft, `ranknum` stays at init_r for the whole run (pruning zeroes λ, it does not rescale)
and E starts at 0 (so ΔW = 0 at step 0) with A, B ~ N(0, 0.02). P and Q are kept near
orthogonal by a regulariser added to the loss,

    R = mean over the 2L matrices of ||P^T P − I||_F and ||Q Q^T − I||_F,  loss += w * R,

so that |λ_i| is a fair size of triplet i (what an SVD would give) and zeroing λ_i removes one
direction without disturbing the others.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Iterable

import torch
from torch import nn

from .inject import adapter_record, check_alpha, inject_linears
from .lora import check_rank
from .recipe import Recipe, option


@dataclass(frozen=True)
class AdaLoRAConfig(Recipe):
    """AdaLoRA's recipe: 12 triplets a module pruned to 8 on average, alpha 2 init_r, lr 2e-3;
    the budget is full for the first 10% of the run, fixed for the last 30%, masked every 10
    steps in between (peft's defaults are 0, 0 and every step)."""

    lr: ClassVar[float] = 2e-3
    peft_type: ClassVar[str] = "ADALORA"
    init_r: int = option(12, "triplets per module at start", type=int)
    target_r: int = option(8, "average triplets at the end", type=int)
    alpha: float | None = option(None, "alpha (default: 2*init_r)", type=float)
    dropout: float = option(0.0, "dropout on the adapter's input", type=float)
    targets: list[str] | None = option(None, "modules to adapt, by name suffix (default: the "
                                             "backbone's usual set)", nargs="+")
    tinit: int | None = option(None, "steps before pruning starts (default: 10%% of the run)",
                               type=int)
    tfinal: int | None = option(None, "steps at the final rank pattern (default: 30%% of the run)",
                                type=int)
    delta_t: int = option(10, "steps between two maskings", type=int)
    orth_reg_weight: float = option(0.5, "weight of the orthogonal regulariser (peft's default)",
                                    type=float)

    def __post_init__(self):
        if self.alpha is None:
            object.__setattr__(self, "alpha", 2 * self.init_r)

    def tag(self) -> str:
        return f"-r{self.init_r}to{self.target_r}"

    def schedule(self, total: int) -> tuple[int, int]:
        """tinit, tfinal of a run of `total` steps: 10% warm-up at full rank, 30% at the final
        pattern unless given."""
        tinit = self.tinit if self.tinit is not None else round(0.1 * total)
        tfinal = self.tfinal if self.tfinal is not None else round(0.3 * total)
        if self.target_r > self.init_r:
            raise ValueError(f"target_r {self.target_r} exceeds init_r {self.init_r}; AdaLoRA "
                             "only prunes: lower --target-r or raise --init-r")
        if tinit >= total - tfinal:
            raise ValueError(f"tinit {tinit} + tfinal {tfinal} leave no steps to prune in a run "
                             f"of {total} steps: lower them or train for more epochs")
        return tinit, tfinal



class SVDLinear(nn.Module):
    def __init__(self, base_layer: nn.Linear, r: int = 12, alpha: float = 24, dropout: float = 0.0):
        super().__init__()
        check_rank(r, base_layer)
        self.base_layer = base_layer
        self.r, self.alpha, self.scaling = r, alpha, alpha
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        w = base_layer.weight
        kw = dict(device=w.device, dtype=w.dtype)
        self.lora_A = nn.Parameter(torch.empty(r, base_layer.in_features, **kw))   # Q (r, in)
        self.lora_E = nn.Parameter(torch.zeros(r, 1, **kw))                        # Λ (r, 1)
        self.lora_B = nn.Parameter(torch.empty(base_layer.out_features, r, **kw))  # P (out, r)
        nn.init.normal_(self.lora_A, std=0.02)
        nn.init.normal_(self.lora_B, std=0.02)
        # fixed at init_r (not saved): zeroing a triplet must not rescale the others
        self.register_buffer("ranknum", torch.tensor([float(r)], device=w.device), persistent=False)
        self.keep: list[bool] | None = None  # the allocator's final mask: which triplets are saved

    in_features = property(lambda self: self.base_layer.in_features)
    out_features = property(lambda self: self.base_layer.out_features)

    def delta_weight(self) -> torch.Tensor:
        return self.lora_B @ (self.lora_A * self.lora_E) * self.scaling / (self.ranknum + 1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)  # (..., out)
        x = x.to(self.lora_A.dtype)
        # same operations, in the same order, as peft's SVDLinear: bitwise equal outputs
        return result + (self.lora_dropout(x) @ (self.lora_A * self.lora_E).T @ self.lora_B.T) \
            * self.scaling / (self.ranknum + 1e-5)

    @torch.no_grad()
    def export_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """What an adapter file holds for this layer: the kept triplets only, as peft saves an
        AdaLoRA adapter (the config's rank_pattern says which of the init_r were kept)."""
        keep = slice(None) if self.keep is None else \
            torch.tensor(self.keep, dtype=torch.bool, device=self.lora_E.device)
        return {f"{name}.lora_A": self.lora_A[keep], f"{name}.lora_E": self.lora_E[keep],
                f"{name}.lora_B": self.lora_B[:, keep]}

    def extra_repr(self) -> str:
        return f"init_r={self.r}, alpha={self.alpha}"



def apply_adalora(model: nn.Module, target_modules: str | Iterable[str],
                  init_r: int = AdaLoRAConfig.init_r, alpha: float | None = None,
                  dropout: float = AdaLoRAConfig.dropout,
                  modules_to_save: Iterable[str] | None = None) -> nn.Module:
    """Wrap every targeted nn.Linear in an SVDLinear with init_r triplets; freeze the rest.
    Train with a RankAllocator as a hook of pelib.train.train (it prunes the triplets)."""
    if not isinstance(init_r, int) or isinstance(init_r, bool) or init_r <= 0:
        raise ValueError(f"init_r must be a positive integer, got {init_r!r}")
    alpha = AdaLoRAConfig(init_r=init_r, alpha=alpha).alpha  # default 2 init_r
    check_alpha(alpha)

    def make(name: str, module: nn.Linear) -> nn.Module:
        return SVDLinear(module, init_r, alpha, dropout)

    inject_linears(model, target_modules, make, "AdaLoRA", modules_to_save, dropout)
    adapter_record(model, "ADALORA", target_modules, modules_to_save, init_r=init_r,
                   lora_alpha=alpha, lora_dropout=dropout, rank_pattern=None,
                   save_blocked="an AdaLoRA adapter needs its schedule to be saved: create a "
                                "pelib.adalora.RankAllocator for the model and train with it first")
    return model



def svd_layers(model: nn.Module) -> list[tuple[str, SVDLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SVDLinear)]


def orthogonal_regularizer(model: nn.Module) -> torch.Tensor:
    """Mean over all P and Q of ||P^T P − I||_F, ||Q Q^T − I||_F (peft sums in this order)."""
    total, n = 0, 0
    for _, m in svd_layers(model):
        for gram in (m.lora_A @ m.lora_A.T, m.lora_B.T @ m.lora_B):  # (r, r) each
            eye = torch.eye(*gram.shape, out=torch.empty_like(gram))
            total, n = total + torch.norm(gram - eye, p="fro"), n + 1
    if n == 0:
        raise ValueError("the model has no AdaLoRA layers; call pelib.adalora.apply_adalora first")
    return total / n

