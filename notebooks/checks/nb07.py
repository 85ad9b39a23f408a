"""Checkers for notebook 07 (AdaLoRA): the cubic budget, and importance scores by hand on a
two-matrix toy, both against pelib.adalora.RankAllocator."""
import torch
from torch import nn

from pelib.adalora import RankAllocator, apply_adalora


def exercise_1(my_budget):
    cases = [(37, 12, 8, 85, 254, 846), (6, 4, 0, 0, 3, 20), (5, 10, 2, 7, 0, 31)]
    for L, init_r, target_r, tinit, tfinal, T in cases:  # L matrices of rank init_r -> target_r
        model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(L)])
        apply_adalora(model, [str(i) for i in range(L)], init_r=init_r, alpha=1)
        alloc = RankAllocator(model, target_r=target_r, tinit=tinit, tfinal=tfinal, total_step=T)
        c = dict(init_bgt=L * init_r, target_bgt=L * target_r, tinit=tinit, tfinal=tfinal, T=T)
        for t in range(1, T + 1):
            got, ref = my_budget(t, **c), alloc.budget_schedule(t)[0]
            assert int(got) == ref, f"{c}: step {t}: {got} != {ref}"
    print("my_budget == RankAllocator.budget_schedule at every step of 3 schedules")


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(7, 6), nn.Linear(6, 5)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def exercise_2(answer):
    update, scores = answer
    torch.manual_seed(7)
    model = apply_adalora(_Toy(), ["a", "b"], init_r=4, alpha=8)
    for _, p in model.named_parameters():
        if p.requires_grad:
            with torch.no_grad():
                p.normal_(0, 0.3)  # λ != 0, so every |w ∇w| is informative
    alloc = RankAllocator(model, target_r=2, total_step=100)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    state, names = {}, ["a", "b"]
    for _ in range(5):
        x, y = torch.randn(16, 7), torch.randn(16, 5)
        loss = ((model(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        alloc.update_importance()
        update(state, {f"{n}.{k}": (getattr(model.get_submodule(n), k).detach().clone(),
                                    getattr(model.get_submodule(n), k).grad.clone())
                       for n in names for k in ("lora_A", "lora_E", "lora_B")})
    got, ref = scores(state, names), alloc.triplet_scores()
    for n in names:
        g = torch.as_tensor(got[n]).reshape(-1)
        assert g.shape == ref[n].shape, f"{n}: shape {tuple(g.shape)}, expected {tuple(ref[n].shape)}"
        assert torch.allclose(g, ref[n], rtol=1e-5, atol=1e-12), f"{n}: {g} != {ref[n]}"
    print(f"triplet scores after 5 steps == RankAllocator's: a {ref['a'].tolist()}")
