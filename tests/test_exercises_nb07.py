"""Notebook 07's checkers reject an answer that calls the reference they compare against."""
import pytest
import torch


@pytest.fixture(autouse=True)
def notebooks_on_path(monkeypatch, request):
    monkeypatch.syspath_prepend(str(request.config.rootpath / "notebooks"))


def test_exercise_3_rejects_an_svd_of_the_dense_delta_w_and_restores_torch():
    from checks.nb07 import exercise_3

    svd = torch.linalg.svd

    def dense_svd(P, lam, Q):
        U, S, Vh = torch.linalg.svd(P @ torch.diag(lam) @ Q, full_matrices=False)
        r = lam.numel()
        return U[:, :r], S[:r], Vh[:r]

    with pytest.raises(AssertionError, match="only r x r"):
        exercise_3(dense_svd)
    assert torch.linalg.svd is svd


def test_exercise_2_rejects_pelib_allocator():
    from checks.nb07 import exercise_2
    from solutions.nb07 import update

    from pelib.adalora import RankAllocator

    def scores_via_pelib(state, modules):
        return RankAllocator.triplet_scores(state["allocator"])

    def update_and_keep(state, params):
        state.setdefault("allocator", None)
        update(state, params)

    with pytest.raises(AssertionError, match="calls"):
        exercise_2((update_and_keep, scores_via_pelib))


def test_exercise_1_rejects_pelibs_to_lora():
    """An answer that rebuilds an SVDLinear from P, Λ, Q and lets pelib fold it."""
    from checks.nb07 import exercise_1
    from torch import nn

    import pelib.adalora
    from pelib.adalora import SVDLinear

    def via_pelib(P, lam, Q, keep, scale):
        layer = SVDLinear(nn.Linear(Q.shape[1], P.shape[0]), r=len(lam), alpha=scale * len(lam))
        with torch.no_grad():
            layer.lora_B.copy_(P), layer.lora_E.copy_((lam * keep).view(-1, 1)), layer.lora_A.copy_(Q)
        delta = layer.delta_weight()  # (d_out, d_in), rank k
        U, S, Vh = torch.linalg.svd(delta)
        k = int(keep.sum())
        return U[:, :k] * S[:k], Vh[:k]

    assert pelib.adalora.to_lora.__name__ == "to_lora"
    with pytest.raises(AssertionError, match="calls"):
        exercise_1(via_pelib)
