"""Checkers for notebook 09 (Triton). Each compares the learner's kernel with plain torch at small
odd shapes (fast in Triton's interpreter) and prints what it checked."""
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _close(name, got, want, atol, rtol):
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    err = (got.float() - want.float()).abs().max().item()
    assert torch.allclose(got.float(), want.float(), atol=atol, rtol=rtol), f"{name}: max |error| {err:.2e}"
    return err


def exercise_1(rmsnorm_dw):
    """rmsnorm_dw(dy, x, eps) -> dw (H,) == autograd's dw of y = w * x * rsqrt(mean(x^2) + eps)."""
    g = torch.Generator().manual_seed(1)
    for rows, H in ((37, 100), (5, 33), (130, 17)):
        x = torch.randn(rows, H, generator=g).to(DEVICE)
        dy = torch.randn(rows, H, generator=g).to(DEVICE)
        w = torch.ones(H, device=DEVICE, requires_grad=True)
        y = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
        (dw_ref,) = torch.autograd.grad(y, (w,), dy)
        err = _close(f"dw at {rows}x{H}", rmsnorm_dw(dy, x, 1e-6), dw_ref, 1e-4, 1e-4)
        print(f"exercise_1: dw at {rows}x{H} == torch autograd (max |error| {err:.1e})")


def exercise_2(matmul_tiled):
    """matmul_tiled(a, b, BLOCK_M, BLOCK_N, BLOCK_K) == a @ b with ragged tiles in M, N and K."""
    g = torch.Generator().manual_seed(2)
    tol = dict(atol=1e-4, rtol=1e-4) if DEVICE == "cpu" else dict(atol=5e-2, rtol=1e-2)  # TF32 on a GPU
    for (M, K, N), tiles in (((37, 45, 29), (16, 16, 16)), ((37, 45, 29), (32, 16, 32)), ((70, 100, 33), (64, 32, 64))):
        a = torch.randn(M, K, generator=g).to(DEVICE)
        b = torch.randn(K, N, generator=g).to(DEVICE)
        err = _close(f"{M}x{K} @ {K}x{N} in {tiles} tiles", matmul_tiled(a, b, *tiles), a @ b, **tol)
        print(f"exercise_2: {M}x{K} @ {K}x{N} in tiles {tiles} == torch (max |error| {err:.1e})")


def exercise_3(swiglu_bwd):
    """swiglu_bwd(dh, g, u) -> (dg, du) == autograd through silu(g) * u."""
    gen = torch.Generator().manual_seed(3)
    for shape in ((37, 100), (3, 1001)):
        g = (2 * torch.randn(*shape, generator=gen)).to(DEVICE).requires_grad_()
        u = torch.randn(*shape, generator=gen).to(DEVICE).requires_grad_()
        dh = torch.randn(*shape, generator=gen).to(DEVICE)
        dg_ref, du_ref = torch.autograd.grad(torch.nn.functional.silu(g) * u, (g, u), dh)
        dg, du = swiglu_bwd(dh, g.detach(), u.detach())
        e1 = _close(f"dg at {shape}", dg, dg_ref, 1e-5, 1e-4)
        e2 = _close(f"du at {shape}", du, du_ref, 1e-5, 1e-4)
        print(f"exercise_3: dg, du at {shape} == torch autograd (max |error| {max(e1, e2):.1e})")
