"""Checkers for notebook 09 (Triton). Each compares the learner's kernel with plain torch at small
odd shapes (fast in Triton's interpreter) and prints what it checked.

A pure-torch answer computes the same numbers, so every checker also records the @triton.jit
launches the answer makes: none, or none handed the tensor the answer returns (torch maths beside a
dummy kernel), is rejected; and it poisons the torch function it compares against while the
answer runs.
"""
import torch
import torch.nn.functional as F

from checks._guard import forbidden, triton_launches

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _close(name, got, want, atol, rtol):
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    err = (got.float() - want.float()).abs().max().item()
    assert torch.allclose(got.float(), want.float(), atol=atol, rtol=rtol), f"{name}: max |error| {err:.2e}"
    return err


def _run_as_kernel(name, answer, *args, poison=()):
    """answer(*args) with the references poisoned; it must launch a Triton kernel."""
    with forbidden(*poison), triton_launches() as seen:
        out = answer(*args)
    assert seen.n > 0, f"{name}: no @triton.jit kernel was launched; write the computation as a Triton kernel"
    for t in (out if isinstance(out, (tuple, list)) else (out,)):
        assert seen.wrote(t), (f"{name}: a kernel was launched, but the result is a tensor no kernel "
                               "was handed; let the kernel write the result")
    return out


def exercise_1(layernorm):
    """layernorm(x, w, b, eps) == F.layer_norm over the last dim, one row per program."""
    g = torch.Generator().manual_seed(1)
    poison = ((F, "layer_norm"), (torch, "layer_norm"), (torch, "var_mean"), (torch, "var"))
    for rows, H in ((37, 100), (5, 33), (3, 1000)):                   # H never a power of two
        x = (3 + 2 * torch.randn(rows, H, generator=g)).to(DEVICE)      # a mean far from 0
        w = (1 + 0.1 * torch.randn(H, generator=g)).to(DEVICE)
        b = (0.1 * torch.randn(H, generator=g)).to(DEVICE)
        y = _run_as_kernel("exercise_1", layernorm, x, w, b, 1e-5, poison=poison)
        err = _close(f"LayerNorm at {rows}x{H}", y, F.layer_norm(x, (H,), w, b, 1e-5), 1e-5, 1e-4)
        print(f"exercise_1: LayerNorm at {rows}x{H} == F.layer_norm (max |error| {err:.1e})")


def exercise_2(geglu):
    """geglu(g, u) == gelu_tanh(g) * u, elementwise."""
    gen = torch.Generator().manual_seed(2)
    for shape in ((37, 100), (3, 1001)):
        g = (3 * torch.randn(*shape, generator=gen)).to(DEVICE)
        u = torch.randn(*shape, generator=gen).to(DEVICE)
        h = _run_as_kernel("exercise_2", geglu, g, u, poison=((F, "gelu"), (torch, "tanh")))
        err = _close(f"GeGLU at {shape}", h, F.gelu(g, approximate="tanh") * u, 1e-5, 1e-4)
        print(f"exercise_2: GeGLU at {shape} == F.gelu(g, approximate='tanh') * u (max |error| {err:.1e})")


def exercise_3(swiglu_bwd):
    """swiglu_bwd(dh, g, u) -> (dg, du) == autograd through silu(g) * u."""
    gen = torch.Generator().manual_seed(3)
    for shape in ((37, 100), (3, 1001)):
        g = (2 * torch.randn(*shape, generator=gen)).to(DEVICE).requires_grad_()
        u = torch.randn(*shape, generator=gen).to(DEVICE).requires_grad_()
        dh = torch.randn(*shape, generator=gen).to(DEVICE)
        dg, du = _run_as_kernel("exercise_3", swiglu_bwd, dh, g.detach(), u.detach(),
                                poison=((torch.autograd, "grad"), (F, "silu")))
        dg_ref, du_ref = torch.autograd.grad(F.silu(g) * u, (g, u), dh)
        e1 = _close(f"dg at {shape}", dg, dg_ref, 1e-5, 1e-4)
        e2 = _close(f"du at {shape}", du, du_ref, 1e-5, 1e-4)
        print(f"exercise_3: dg, du at {shape} == torch autograd (max |error| {max(e1, e2):.1e})")
