"""RMSNorm: Triton forward/backward (dx and dw) vs the torch reference and HF LlamaRMSNorm."""
import pytest
import torch
from conftest import TOL, assert_close
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from pelib.kernels.rmsnorm import rms_norm_ref, rms_norm_triton

pytestmark = pytest.mark.integration  # Triton kernels in the interpreter

# gradient tolerances: dw sums over all rows, so it gets more room in half precision
GRAD_TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (1e-2, 1e-2), torch.bfloat16: (6e-2, 3e-2)}


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(dtype)
    dy = torch.randn(shape, generator=g).to(dtype)
    return x, w, dy


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 577), (2, 5, 64)])
def test_rmsnorm_forward_backward_vs_hf(shape, dtype):
    x, w, dy = _inputs(shape, dtype)
    hf = LlamaRMSNorm(shape[-1], eps=1e-6).to(dtype)
    with torch.no_grad():
        hf.weight.copy_(w)
    xr = x.clone().requires_grad_()
    y_hf = hf(xr)
    y_hf.backward(dy)

    xt, wt = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = rms_norm_triton(xt, wt, 1e-6)
    y.backward(dy)
    assert_close(y, y_hf.detach(), *TOL[dtype], "y")
    assert_close(xt.grad, xr.grad, *GRAD_TOL[dtype], "dx")
    assert_close(wt.grad, hf.weight.grad, *GRAD_TOL[dtype], "dw")

    # and the in-file reference is HF's formula
    assert torch.equal(rms_norm_ref(x, w, 1e-6), y_hf.detach())


def test_rmsnorm_fp32_weight_half_input_and_gradcheck():
    # mixed: fp16 activations, fp32 weight -> fp32 output (torch type promotion, as HF)
    x, _, _ = _inputs((7, 33), torch.float16)
    w = torch.randn(33)
    y = rms_norm_triton(x, w, 1e-5)
    assert y.dtype == torch.float32
    assert_close(y, rms_norm_ref(x, w, 1e-5), *TOL[torch.float32], "mixed")
    # float64 gradcheck of the analytic backward (the kernel computes in fp32 internally,
    # so compare the fp32 kernel's grads against the float64 autograd of the reference)
    x = torch.randn(5, 40, dtype=torch.float64)
    w = torch.randn(40, dtype=torch.float64)
    dy = torch.randn(5, 40, dtype=torch.float64)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    rms_norm_ref(xr, wr).backward(dy)
    xt, wt = x.float().requires_grad_(), w.float().requires_grad_()
    rms_norm_triton(xt, wt, 1e-6).backward(dy.float())
    assert_close(xt.grad.double(), xr.grad, 1e-5, 1e-4, "dx vs float64")
    assert_close(wt.grad.double(), wr.grad, 1e-5, 1e-4, "dw vs float64")
