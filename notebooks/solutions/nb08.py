"""Solutions to notebook 08's exercises (and a plausible wrong answer for each)."""
import torch


def _soft(v, lam):
    return torch.sign(v) * torch.clamp(v.abs() - lam, min=0)


# 1. Elastic net: for g > 0 the stationarity condition g - v + lam1 + lam2 g = 0 gives
#    g = (v - lam1) / (1 + lam2); with the other two cases, T_lam1(v) / (1 + lam2).
def prox_elastic(v, lam1, lam2):
    return _soft(v, lam1) / (1 + lam2)


def prox_elastic_scaled_first(v, lam1, lam2):  # wrong: shrinks by 1 + lam2 before thresholding
    return _soft(v / (1 + lam2), lam1)


# 2. Group lasso over ranks: z_k = (A[k, :], B[:, k]) is one vector; its prox is a block soft
#    threshold, z_k * max(0, 1 - lam / ||z_k||), which zeroes a whole rank at once.
def group_prox(A, B, lam):
    z = torch.cat([A, B.t()], dim=1)                                 # (r, d_in + d_out)
    n = z.norm(dim=1, keepdim=True)                                  # (r, 1)
    z = z * torch.clamp(1 - lam / n.clamp_min(torch.finfo(z.dtype).tiny), min=0)
    return z[:, :A.shape[1]], z[:, A.shape[1]:].t()


def group_prox_separate(A, B, lam):  # wrong: A's row and B's column as two groups
    def block(m):                    # rows of m, each its own group
        n = m.norm(dim=1, keepdim=True).clamp_min(1e-300)
        return m * torch.clamp(1 - lam / n, min=0)
    return block(A), block(B.t()).t()


# 3. T_lam zeroes |g| <= lam: at most `budget` live means lam >= the (budget+1)-th largest |g|.
def threshold_for_budget(g, budget):
    mags = g.abs().sort(descending=True).values
    return float(mags[budget]) if budget < len(mags) else 0.0


def threshold_for_budget_off_by_one(g, budget):  # wrong: the budget-th largest keeps one too few
    mags = g.abs().sort(descending=True).values
    return float(mags[budget - 1]) if 0 < budget <= len(mags) else float(mags[0]) if budget == 0 else 0.0


SOLUTIONS = {1: prox_elastic, 2: group_prox, 3: threshold_for_budget}
WRONG = {1: prox_elastic_scaled_first, 2: group_prox_separate, 3: threshold_for_budget_off_by_one}
