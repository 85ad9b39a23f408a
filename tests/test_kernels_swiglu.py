"""SwiGLU h = silu(g) * u: Triton forward/backward vs F.silu(g) * u under autograd."""
import pytest
import torch
from conftest import TOL, assert_close

from pelib.kernels.swiglu_kernel import swiglu_ref, swiglu_triton

pytestmark = pytest.mark.integration  # Triton kernels in the interpreter

GRAD_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 577), (3, 11, 129)])
def test_swiglu_vs_torch(shape, dtype):
    gen = torch.Generator().manual_seed(0)
    g = (3 * torch.randn(shape, generator=gen)).to(dtype)
    u = torch.randn(shape, generator=gen).to(dtype)
    dh = torch.randn(shape, generator=gen).to(dtype)
    gr, ur = g.clone().requires_grad_(), u.clone().requires_grad_()
    # the peer: upcast to fp32 for the reference gradients, then round once (a torch
    # half-precision autograd rounds every intermediate and is itself the less exact one)
    h_ref = swiglu_ref(gr.float(), ur.float())
    h_ref.backward(dh.float())
    gt, ut = g.clone().requires_grad_(), u.clone().requires_grad_()
    h = swiglu_triton(gt, ut)
    h.backward(dh)
    assert_close(h, swiglu_ref(g, u), *TOL[dtype], "h vs torch in dtype")
    assert_close(gt.grad, gr.grad.to(dtype), *GRAD_TOL[dtype], "dg")
    assert_close(ut.grad, ur.grad.to(dtype), *GRAD_TOL[dtype], "du")


def test_swiglu_gradcheck_float64_reference():
    g = torch.randn(4, 50, dtype=torch.float64)
    u = torch.randn(4, 50, dtype=torch.float64)
    assert torch.autograd.gradcheck(swiglu_ref, (g.requires_grad_(), u.requires_grad_()))
    gt, ut = g.detach().float().requires_grad_(), u.detach().float().requires_grad_()
    dh = torch.randn(4, 50)
    swiglu_triton(gt, ut).backward(dh)
    gr, ur = g.detach().clone().requires_grad_(), u.detach().clone().requires_grad_()
    swiglu_ref(gr, ur).backward(dh.double())
    assert_close(gt.grad.double(), gr.grad, 1e-6, 1e-5, "dg vs float64")
    assert_close(ut.grad.double(), ur.grad, 1e-6, 1e-5, "du vs float64")
