"""AdaLoRA: adaptive budget allocation (Zhang et al., ICLR 2023, arXiv:2303.10512).

Each targeted weight gets an update in SVD form, ΔW = P Λ Q, whose triplets (P column, λ, Q row)
can be scored and pruned one by one while training:

    y = x W^T + b + (alpha / ranknum) * (dropout(x) (Q ⊙ λ)^T) P^T
        Q = lora_A (r, in),  Λ = diag(lora_E), lora_E (r, 1),  P = lora_B (out, r)

As in peft, `ranknum` stays at init_r for the whole run (pruning zeroes λ, it does not rescale)
and E starts at 0 (so ΔW = 0 at step 0) with A, B ~ N(0, 0.02). P and Q are kept near
orthogonal by a regulariser added to the loss,

    R = mean over the 2L matrices of ||P^T P − I||_F and ||Q Q^T − I||_F,  loss += w * R,

so that |λ_i| is a fair size of triplet i (what an SVD would give) and zeroing λ_i removes one
direction without disturbing the others.

Importance (eq. 8-11 of the paper), for every entry w of P, λ, Q after each optimizer step:

    I = |w ∇w|,   Ī ← β1 Ī + (1−β1) I,   Ū ← β2 Ū + (1−β2) |I − Ī|,   s(w) = Ī Ū
    S_i = s(λ_i) + mean_j s(Q_ij) + mean_j s(P_ji)                  (triplet i of one matrix)

Budget b(t), the number of triplets kept over all matrices (eq. 12): b(0) = L init_r during
the first tinit steps, then a cubic decay to L target_r at step T − tfinal, then constant;
every deltaT steps the triplets with the b(t)-th lowest score or less get λ = 0. At step
T − tfinal the final mask is fixed (the rank pattern) and re-applied after every later step,
since the optimizer moves a zeroed λ again. These rules, including peft's step boundaries and
its "<= threshold" tie rule, follow peft 0.21 (tuners/adalora), so both allocate identically
for the same gradients (tests/test_adalora.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Iterable

import torch
from torch import nn

from .hooks import Hook
from .inject import adapter_record, check_alpha, inject_linears
from .lora import check_rank, dropout_p, fold_into_lora
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


class RankAllocator(Hook):
    """The training-time rule of AdaLoRA as a pelib.train hook: `loss` adds the orthogonal
    regulariser, `step` (after optimizer.step, before zero_grad) updates the importance scores
    and masks triplets to the budget. State a notebook or test can read after each step:
    `budget`, `rank_pattern` ({module: [kept?] * init_r}), `history` (step, budget, ranks).
    The defaults are the recipe (AdaLoRAConfig): tinit 10% and tfinal 30% of the run (None:
    resolved once the run's length is known), a masking every deltaT = 10 steps."""

    def __init__(self, model: nn.Module, target_r: int = AdaLoRAConfig.target_r,
                 tinit: int | None = None, tfinal: int | None = None,
                 deltaT: int = AdaLoRAConfig.delta_t, beta1: float = 0.85, beta2: float = 0.85,
                 orth_reg_weight: float = AdaLoRAConfig.orth_reg_weight,
                 total_step: int | None = None):
        self.layers = dict(svd_layers(model))
        if not self.layers:
            raise ValueError("the model has no AdaLoRA layers; call pelib.adalora.apply_adalora "
                             "before creating the RankAllocator")
        self.init_r = next(iter(self.layers.values())).r
        if not isinstance(target_r, int) or target_r < 0 or target_r > self.init_r:
            raise ValueError(f"target_r={target_r!r} must be an integer in [0, init_r={self.init_r}]"
                             f"; lower target_r or raise init_r in apply_adalora")
        for k, v in dict(tinit=tinit, tfinal=tfinal).items():
            if v is not None and (not isinstance(v, int) or v < 0):
                raise ValueError(f"{k} must be an integer >= 0 (None: the recipe's share of the "
                                 f"run), got {v!r}")
        self.given = dict(tinit=tinit, tfinal=tfinal)
        if not isinstance(deltaT, int) or deltaT < 1:
            raise ValueError(f"deltaT must be an integer >= 1, got {deltaT!r}")
        if not (0 < beta1 < 1 and 0 < beta2 < 1):
            raise ValueError(f"beta1 and beta2 must be in (0, 1), got {beta1}, {beta2}")
        if not isinstance(orth_reg_weight, (int, float)) or isinstance(orth_reg_weight, bool) \
                or not 0 <= orth_reg_weight < float("inf"):  # nan fails both comparisons
            raise ValueError(f"orth_reg_weight must be a finite number >= 0 (0: no regulariser), "
                             f"got {orth_reg_weight!r}")
        self.target_r, self.tinit, self.tfinal, self.deltaT = target_r, tinit, tfinal, deltaT
        self.beta1, self.beta2, self.orth_reg_weight = beta1, beta2, orth_reg_weight
        self.init_bgt = sum(m.r for m in self.layers.values())
        self.target_bgt = target_r * len(self.layers)
        self.total_step = None
        if total_step is not None:
            self.set_total_step(total_step)
        self.model_config = getattr(model, "pelib_adapter", None)
        if self.model_config is not None:  # peft's AdaLoraConfig fields, for save_adapter
            self.model_config.update(target_r=target_r, tinit=self.tinit, tfinal=self.tfinal, deltaT=deltaT,
                                     beta1=beta1, beta2=beta2, orth_reg_weight=orth_reg_weight,
                                     total_step=self.total_step)
            if self.total_step is not None:
                self.model_config.pop("save_blocked", None)
        self.budget, self.rank_pattern, self.history = self.init_bgt, None, []
        self.reset_importance()

    # -- schedule -------------------------------------------------------------------------
    def set_total_step(self, total_step: int) -> None:
        if not isinstance(total_step, int) or total_step <= 0:
            raise ValueError(f"total_step must be a positive integer, got {total_step!r}")
        # the recipe's shares of the run, where not given (AdaLoRAConfig.schedule)
        self.tinit = self.given["tinit"] if self.given["tinit"] is not None else round(0.1 * total_step)
        self.tfinal = self.given["tfinal"] if self.given["tfinal"] is not None else \
            round(0.3 * total_step)
        if total_step - self.tfinal < 2:  # the final allocation needs scores from a step before
            raise ValueError(f"tfinal={self.tfinal} leaves no step to score importance before the "
                             f"final allocation in a run of total_step={total_step}: lower tfinal "
                             "or train for more steps")
        if self.tinit >= total_step - self.tfinal:
            raise ValueError(f"tinit={self.tinit} + tfinal={self.tfinal} leave no steps to prune "
                             f"in a run of total_step={total_step}: lower tinit/tfinal or train "
                             "for more steps")
        self.total_step = total_step
        if getattr(self, "model_config", None) is not None:
            self.model_config["total_step"] = total_step
            self.model_config.pop("save_blocked", None)  # peft's config needs total_step

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(budget b(t), whether to mask at this step); cubic decay between the two phases."""
        if self.total_step is None:
            raise ValueError("total_step is unknown: pass RankAllocator(..., total_step=N) or "
                             "train through pelib.train.train, whose begin() supplies it")
        if step <= self.tinit:
            return self.init_bgt, False
        if step > self.total_step - self.tfinal:
            return self.target_bgt, True
        mul_coeff = 1 - (step - self.tinit) / (self.total_step - self.tfinal - self.tinit)
        budget = int((self.init_bgt - self.target_bgt) * (mul_coeff ** 3) + self.target_bgt)
        return budget, step % self.deltaT == 0

    # -- importance -----------------------------------------------------------------------
    def reset_importance(self) -> None:
        self.ipt, self.exp_avg_ipt, self.exp_avg_unc = {}, {}, {}

    @torch.no_grad()
    def update_importance(self) -> None:
        for name, m in self.layers.items():
            for key in ("lora_A", "lora_E", "lora_B"):
                p, n = getattr(m, key), f"{name}.{key}"
                if p.grad is None:
                    raise ValueError(f"{n} has no gradient: call RankAllocator.step after "
                                     "loss.backward() and optimizer.step(), before zero_grad()")
                if n not in self.ipt:
                    self.exp_avg_ipt[n] = torch.zeros_like(p)
                    self.exp_avg_unc[n] = torch.zeros_like(p)
                self.ipt[n] = (p * p.grad).abs()  # sensitivity |w ∇w|
                self.exp_avg_ipt[n] = self.beta1 * self.exp_avg_ipt[n] + (1 - self.beta1) * self.ipt[n]
                self.exp_avg_unc[n] = (self.beta2 * self.exp_avg_unc[n]
                                       + (1 - self.beta2) * (self.ipt[n] - self.exp_avg_ipt[n]).abs())

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """S_i per module, (init_r,): s(λ_i) + mean of s over Q's row i + mean over P's column i."""
        s = {n: self.exp_avg_ipt[n] * self.exp_avg_unc[n] for n in self.exp_avg_ipt}
        if not s:
            raise ValueError("no importance scores yet: call step() after a backward pass first")
        return {name: s[f"{name}.lora_E"].view(-1) + (s[f"{name}.lora_A"].mean(dim=1)
                                                      + s[f"{name}.lora_B"].mean(dim=0))
                for name in self.layers}

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        scores = self.triplet_scores()
        k = self.init_bgt - budget
        if k <= 0:  # nothing to prune (target_r == init_r)
            pattern = {n: [True] * m.r for n, m in self.layers.items()}
        else:
            threshold = torch.kthvalue(torch.cat(list(scores.values())), k=k)[0].item()
            pattern = {n: (scores[n] > threshold).tolist() for n in self.layers}
        self.apply_pattern(pattern)
        return pattern

    @torch.no_grad()
    def apply_pattern(self, pattern: dict[str, list[bool]]) -> None:
        for name, m in self.layers.items():
            keep = torch.tensor(pattern[name], device=m.lora_E.device).unsqueeze(-1)  # (r, 1)
            m.lora_E.masked_fill_(~keep, 0.0)

    def _set_pattern(self, pattern) -> None:
        self.rank_pattern = pattern
        for name, m in self.layers.items():
            m.keep = list(pattern[name])
        if self.model_config is not None:  # what save_adapter exports
            self.model_config["rank_pattern"] = {f"{n}.lora_E": v for n, v in pattern.items()}

    def ranks(self) -> dict[str, int]:
        """Triplets each module keeps under the current pattern (init_r before any masking)."""
        if self.rank_pattern is None:
            return {n: m.r for n, m in self.layers.items()}
        return {n: sum(v) for n, v in self.rank_pattern.items()}

    # -- checkpoints (pelib.train saves and restores hook state) ----------------------------
    def state_dict(self) -> dict:
        return dict(ipt=self.ipt, exp_avg_ipt=self.exp_avg_ipt, exp_avg_unc=self.exp_avg_unc,
                    budget=self.budget, rank_pattern=self.rank_pattern, history=self.history)

    def load_state_dict(self, state: dict) -> None:
        self.ipt, self.exp_avg_ipt = state["ipt"], state["exp_avg_ipt"]
        self.exp_avg_unc, self.budget, self.history = state["exp_avg_unc"], state["budget"], state["history"]
        if state["rank_pattern"] is not None:
            self._set_pattern(state["rank_pattern"])

    # -- pelib.train hooks ----------------------------------------------------------------
    def begin(self, model, optimizer, total_steps: int) -> None:
        if self.total_step is None:
            self.set_total_step(total_steps)
        elif self.total_step > total_steps:
            raise ValueError(f"total_step={self.total_step} exceeds this run's {total_steps} "
                             "optimizer steps, so the budget would never reach target_r; pass "
                             "total_step=None to take the run's length")

    def loss(self, model, loss: torch.Tensor) -> torch.Tensor:
        if self.orth_reg_weight == 0:
            return loss
        return loss + self.orth_reg_weight * orthogonal_regularizer(model)

    def step(self, model, step: int) -> None:
        """After optimizer.step(): update scores, mask to the budget (peft's update_and_allocate)."""
        budget, mask_now = self.budget_schedule(step)
        end = self.total_step - self.tfinal
        if step < end:
            self.update_importance()
            if mask_now:
                self._set_pattern(self.mask_to_budget(budget))
        elif step == end:  # the final allocation, from the last scores; then fixed
            self._set_pattern(self.mask_to_budget(budget))
            self.reset_importance()
        else:
            self.apply_pattern(self.rank_pattern)
        self.budget = budget
        self.history.append(dict(step=step, budget=budget, ranks=self.ranks()))


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
