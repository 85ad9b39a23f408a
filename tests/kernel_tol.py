"""Per-dtype tolerances for the kernel tests: pass when |out - ref| <= atol + rtol * |ref|."""
import torch

# (atol, rtol) for forward outputs; gradients get their own, looser, entries in each test.
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def assert_close(out, ref, atol, rtol, what=""):
    assert out.shape == ref.shape, (what, out.shape, ref.shape)
    assert out.dtype == ref.dtype, (what, out.dtype, ref.dtype)
    o, r = out.double(), ref.double()
    err = (o - r).abs()
    bound = atol + rtol * r.abs()
    bad = err > bound
    assert not bad.any(), (
        f"{what}: {int(bad.sum())}/{err.numel()} elements off; max |err| {err.max().item():.3g}, "
        f"max err/bound {(err / bound).max().item():.3g} (atol {atol}, rtol {rtol})"
    )
