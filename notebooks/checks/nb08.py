"""Checkers for notebook 08 (SoRA): the official threshold's update, and pruning a gated matrix
to plain LoRA."""
import torch

from pelib.sora import official_threshold, soft_threshold


def exercise_1(my_official):
    lam = 0.25
    v = torch.tensor([-0.8, -0.5, -0.45, -0.3, -0.25, -0.2, 0.0, 0.1, 0.25, 0.26, 0.4, 0.5,
                      0.51, 0.75])  # both sides of lam and 2 lam, and exactly on them
    g = v.clone()
    got = my_official(g, lam)
    assert torch.equal(g, v), "my_official changed its input: work on a copy"
    ref = official_threshold(v, lam)
    assert torch.equal(torch.as_tensor(got), ref), f"{got} != {ref}"
    band = (v.abs() > lam) & (v.abs() < 2 * lam)
    assert (ref[band] == 0).all() and (soft_threshold(v, lam)[band] != 0).all()
    print(f"my_official == pelib.sora.official_threshold on {len(v)} crafted values; it zeroes "
          f"{int(band.sum())} values the exact prox keeps, and keeps |g| = lam")


def exercise_2(prune_one):
    torch.manual_seed(8)
    r, d_in, d_out, alpha = 8, 12, 10, 16.0
    A, B = torch.randn(r, d_in), torch.randn(d_out, r)
    g = torch.tensor([0.7, 0.0, -0.3, 0.0, 0.0, 1.2, 0.05, 0.0])
    A2, B2, scaling2 = prune_one(A.clone(), B.clone(), g.clone(), alpha)
    live = int((g != 0).sum())
    assert tuple(A2.shape) == (live, d_in) and tuple(B2.shape) == (d_out, live), \
        f"shapes {tuple(A2.shape)}, {tuple(B2.shape)}: expected rank {live}"
    assert abs(scaling2 - alpha / live) < 1e-12, f"scaling {scaling2}, expected alpha / r' = {alpha / live}"
    ref = alpha / r * B @ torch.diag(g) @ A
    got = scaling2 * B2 @ A2
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6), f"max diff {(got - ref).abs().max():.3g}"
    print(f"rank {r} -> {live}: scaling2 * B2 A2 == (alpha/r) B diag(g) A")
