"""AdaLoRA's rank allocation (Zhang et al., ICLR 2023, arXiv:2303.10512, sections 3.2-3.3).

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

import torch
from torch import nn

from .hooks import Hook
from .svd_adaptation import AdaLoRAConfig, orthogonal_regularizer, svd_layers


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

