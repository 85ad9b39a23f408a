"""Checkers for notebook 07 (AdaLoRA): folding a pruned layer into plain LoRA (against
SVDLinear.delta_weight), and importance scores by hand on a two-matrix toy (against
pelib.adalora.RankAllocator)."""
import torch
from torch import nn

from pelib.adalora import RankAllocator, SVDLinear, apply_adalora


def exercise_1(fold):
    torch.manual_seed(3)
    for d_out, d_in, r in [(6, 5, 4), (12, 20, 8), (7, 9, 6)]:
        layer = SVDLinear(nn.Linear(d_in, d_out), r=r, alpha=2 * r)
        keep = torch.rand(r) > 0.4
        keep[0] = True
        with torch.no_grad():
            for p in (layer.lora_A, layer.lora_E, layer.lora_B):
                p.normal_()
            layer.lora_E[~keep] = 0.0  # a pruned triplet has λ = 0, as the allocator leaves it
        P, lam, Q = layer.lora_B.detach(), layer.lora_E.detach().view(-1), layer.lora_A.detach()
        B, A = fold(P.clone(), lam.clone(), Q.clone(), keep.clone(), 2 * r / r)
        k = int(keep.sum())
        assert tuple(B.shape) == (d_out, k) and tuple(A.shape) == (k, d_in), \
            f"rank {k} of {r} kept: B must be ({d_out}, {k}) and A ({k}, {d_in}), got " \
            f"{tuple(B.shape)} and {tuple(A.shape)}"
        assert torch.allclose(B @ A, layer.delta_weight(), rtol=1e-4, atol=1e-5), \
            f"B A differs from the layer's ΔW by {(B @ A - layer.delta_weight()).abs().max():.3g}"
    print("fold: B A == SVDLinear.delta_weight() at rank k = kept triplets, for 3 random layers")


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
