"""Checkers for notebook 07 (AdaLoRA): folding a pruned layer into plain LoRA (against
SVDLinear.delta_weight), importance scores by hand on a two-matrix toy (against
pelib.adalora.RankAllocator), and the triplets made an exact SVD from the thin factors (against
the singular values of the dense ΔW, with no large SVD allowed while the answer runs)."""
import contextlib

import torch
from torch import nn

import pelib.adalora
from pelib.adalora import RankAllocator, SVDLinear, apply_adalora

from ._guard import forbidden


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
        with forbidden((pelib.adalora, "to_lora"), (SVDLinear, "delta_weight")):
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
        with forbidden((RankAllocator, "update_importance"), (RankAllocator, "triplet_scores")):
            update(state, {f"{n}.{k}": (getattr(model.get_submodule(n), k).detach().clone(),
                                        getattr(model.get_submodule(n), k).grad.clone())
                           for n in names for k in ("lora_A", "lora_E", "lora_B")})
    with forbidden((RankAllocator, "update_importance"), (RankAllocator, "triplet_scores")):
        got = scores(state, names)
    ref = alloc.triplet_scores()
    for n in names:
        g = torch.as_tensor(got[n]).reshape(-1)
        assert g.shape == ref[n].shape, f"{n}: shape {tuple(g.shape)}, expected {tuple(ref[n].shape)}"
        assert torch.allclose(g, ref[n], rtol=1e-5, atol=1e-12), f"{n}: {g} != {ref[n]}"
    print(f"triplet scores after 5 steps == RankAllocator's: a {ref['a'].tolist()}")


# The decompositions an answer to exercise 3 may only apply to matrices of at most r x r.
_DECOMPOSITIONS = [(torch.linalg, "svd"), (torch.linalg, "svdvals"), (torch.linalg, "eig"),
                   (torch.linalg, "eigh"), (torch.linalg, "eigvals"), (torch.linalg, "eigvalsh"),
                   (torch, "svd"), (torch, "svd_lowrank"), (torch, "pca_lowrank"), (torch.Tensor, "svd")]


@contextlib.contextmanager
def _small_decompositions_only(r):
    """Inside the block an SVD or eigendecomposition of a matrix with a side > r raises."""
    saved = [(obj, name, getattr(obj, name)) for obj, name in _DECOMPOSITIONS]

    def guarded(fn, label):
        def call(M, *args, **kwargs):
            if max(M.shape[-2:]) > r:
                raise AssertionError(f"{label} of a {tuple(M.shape[-2:])} matrix: only r x r "
                                     f"(r = {r}) is allowed, use QR on the thin factors")
            return fn(M, *args, **kwargs)
        return call

    try:
        for obj, name, fn in saved:
            setattr(obj, name, guarded(fn, f"{getattr(obj, '__name__', 'Tensor')}.{name}"))
        yield
    finally:
        for obj, name, fn in saved:
            setattr(obj, name, fn)


def exercise_3(svd_triplets):
    """svd_triplets(P, lam, Q) -> (P2, lam2, Q2): the same ΔW/s, P2 and Q2 orthonormal, lam2 the
    singular values in descending order, from QR and an r x r decomposition only."""
    torch.manual_seed(9)
    for d_out, d_in, r in [(48, 40, 6), (30, 70, 4)]:
        P = torch.randn(d_out, r) + torch.randn(d_out, 1)  # overlapping unit columns, as in section 1
        P = P / P.norm(dim=0)
        Q = torch.randn(r, d_in) + torch.randn(1, d_in)  # and overlapping unit rows
        Q = Q / Q.norm(dim=1, keepdim=True)
        lam = torch.randn(r)  # signs too
        dW = P @ torch.diag(lam) @ Q
        with _small_decompositions_only(r):
            P2, lam2, Q2 = (torch.as_tensor(t) for t in svd_triplets(P.clone(), lam.clone(), Q.clone()))
        lam2 = lam2.reshape(-1)
        assert P2.shape == (d_out, r) and lam2.shape == (r,) and Q2.shape == (r, d_in), \
            f"shapes P2 {tuple(P2.shape)}, lam2 {tuple(lam2.shape)}, Q2 {tuple(Q2.shape)}: expected " \
            f"({d_out}, {r}), ({r},), ({r}, {d_in})"
        tol = 1e-4 * dW.abs().max()
        assert torch.allclose(P2 @ torch.diag(lam2) @ Q2, dW, atol=tol), \
            f"P2 diag(lam2) Q2 differs from P diag(lam) Q by {(P2 @ torch.diag(lam2) @ Q2 - dW).abs().max():.2e}"
        I = torch.eye(r)
        assert torch.allclose(P2.T @ P2, I, atol=1e-4), "the columns of P2 are not orthonormal"
        assert torch.allclose(Q2 @ Q2.T, I, atol=1e-4), "the rows of Q2 are not orthonormal"
        sv = torch.linalg.svdvals(dW)[:r]
        assert torch.allclose(lam2, sv, rtol=1e-4, atol=1e-5), \
            f"lam2 {lam2.tolist()} are not the singular values of ΔW {sv.tolist()} (descending, >= 0)"
    full = dW.square().sum()
    removed = torch.stack([full - (P[:, k] @ torch.diag(lam[k]) @ Q[k]).square().sum()
                           for k in (torch.arange(r) != i for i in range(r))])
    print(f"svd_triplets: the same ΔW from orthonormal factors, lam2 == its singular values. Before: "
          f"pruning triplet i takes away {[round(v, 2) for v in removed.tolist()]} of ||ΔW||², while "
          f"λ_i² = {[round(v, 2) for v in (lam**2).tolist()]}; after: exactly λ'_i² = "
          f"{[round(v, 2) for v in (lam2**2).tolist()]}")
