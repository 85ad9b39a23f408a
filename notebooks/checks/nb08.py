"""Checkers for notebook 08 (SoRA): three proximal steps the notebook did not show.

Each is checked against what defines a proximal operator, not against a library function: the
answer must minimise 1/2 ||x - v||^2 + penalty(x) (a dense grid, or the optimality conditions),
and it must give exact zeros where the penalty asks for them.
"""
import torch


def _soft(v, lam):
    return torch.sign(v) * torch.clamp(v.abs() - lam, min=0)


def exercise_1(prox_elastic):
    """prox_elastic(v, lam1, lam2) = argmin_g 1/2 (g - v)^2 + lam1 |g| + lam2/2 g^2, elementwise."""
    v = torch.tensor([-2.0, -1.1, -0.6, -0.3, -0.1, 0.0, 0.05, 0.3, 0.31, 0.7, 1.0, 2.5],
                     dtype=torch.float64)
    grid = torch.linspace(-3, 3, 60_001, dtype=torch.float64)             # step 1e-4
    for lam1, lam2 in ((0.3, 1.0), (0.3, 0.0), (0.0, 0.5), (0.6, 3.0)):
        got = torch.as_tensor(prox_elastic(v.clone(), lam1, lam2), dtype=torch.float64)
        assert got.shape == v.shape, f"shape {tuple(got.shape)}, expected {tuple(v.shape)}"

        def objective(g):
            return 0.5 * (g - v[:, None]) ** 2 + lam1 * g.abs() + 0.5 * lam2 * g ** 2
        best = objective(grid[None, :]).min(dim=1).values                  # (len(v),) brute force
        mine = objective(got[:, None])[:, 0]
        excess = (mine - best).max().item()
        assert excess < 1e-7, (f"lam1={lam1}, lam2={lam2}: your g is not the minimiser (objective "
                               f"{excess:.2e} above a grid search); got {got.tolist()}")
        dead = v.abs() <= lam1
        assert (got[dead] == 0).all(), f"lam1={lam1}: |v| <= lam1 must give an exact 0, got {got[dead].tolist()}"
        print(f"exercise_1: lam1={lam1}, lam2={lam2}: minimises the objective (grid search), "
              f"{int(dead.sum())} exact zeros")


def _groups(A, B):                                                         # (r, d_in + d_out)
    return torch.cat([A, B.t()], dim=1)


def exercise_2(group_prox):
    """group_prox(A, B, lam): the prox of lam * sum_k ||(A[k, :], B[:, k])||_2, one group per rank."""
    torch.manual_seed(8)
    r, d_in, d_out = 8, 12, 10
    A, B = torch.randn(r, d_in, dtype=torch.float64), torch.randn(d_out, r, dtype=torch.float64)
    A[[1, 4]] *= 0.05                                                      # two small ranks,
    B[:, [1, 6]] *= 0.05                                                   # one small on both sides
    lam = 1.0
    A2, B2 = group_prox(A.clone(), B.clone(), lam)
    assert tuple(A2.shape) == (r, d_in) and tuple(B2.shape) == (d_out, r), \
        f"shapes {tuple(A2.shape)}, {tuple(B2.shape)}: keep A (r, d_in) and B (d_out, r)"
    z, z2 = _groups(A, B), _groups(A2, B2).to(torch.float64)               # (r, d_in + d_out)
    norms = z.norm(dim=1)
    for k in range(r):
        if norms[k] <= lam:       # 0 is the minimiser exactly when ||z_k|| <= lam
            assert (z2[k] == 0).all(), f"rank {k}: ||(A_k, B_k)|| = {norms[k]:.3f} <= lam must be zeroed exactly"
        else:                     # optimality: z_k - z2_k = lam * z2_k / ||z2_k||
            n2 = z2[k].norm()
            assert n2 > 0, f"rank {k}: ||(A_k, B_k)|| = {norms[k]:.3f} > lam must stay live"
            resid = (z[k] - z2[k] - lam * z2[k] / n2).abs().max().item()
            assert resid < 1e-8, f"rank {k}: the optimality condition is off by {resid:.2e}"
    dead = int((norms <= lam).sum())
    print(f"exercise_2: {r} ranks, {dead} removed as whole groups (A row and B column together), "
          "the others shrunk towards 0 by exactly lam: the optimality conditions hold")


def exercise_3(threshold_for_budget):
    """threshold_for_budget(g, budget) -> the smallest lam with at most `budget` gates live after T_lam."""
    gen = torch.Generator().manual_seed(3)
    cases = [(torch.tensor([0.5, -0.2, 0.9, 0.0, -0.7, 0.2, 0.1]), b) for b in (0, 1, 2, 3, 5, 6, 7)]
    for _ in range(20):                                                    # ties and zeros included
        g = torch.randint(-4, 5, (int(torch.randint(1, 12, (1,), generator=gen)),), generator=gen) / 4
        cases.append((g, int(torch.randint(0, len(g) + 2, (1,), generator=gen))))
    for g, budget in cases:
        lam = float(threshold_for_budget(g.clone(), budget))
        live = int((_soft(g, lam) != 0).sum())
        assert lam >= 0 and live <= budget, f"g={g.tolist()}, budget {budget}: lam={lam} leaves {live} live"
        smaller = lam * (1 - 1e-6) - 1e-12
        if smaller >= 0:
            assert int((_soft(g, smaller) != 0).sum()) > budget, \
                f"g={g.tolist()}, budget {budget}: lam={lam} is not the smallest (a smaller lam also fits)"
    print(f"exercise_3: {len(cases)} gate vectors (ties and zeros included): each lam is the smallest "
          "threshold that leaves at most `budget` gates live")
