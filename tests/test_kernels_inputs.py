"""Bad input to the kernels gets a clear error before any launch (a kernel given the wrong shapes
reads past a tensor: a wrong result or a crash), and inputs the kernel cannot keep are computed
right. Most checks run on the host before the launch, so these tests are quick; the ones that
compare a kernel's result run it in the interpreter on tiny sizes.
"""
import os
import subprocess
import sys

import pytest
import torch

from pelib.kernels import _dispatch, apply_rope, backend, cross_entropy, rms_norm, swiglu
from pelib.kernels.cross_entropy_kernel import cross_entropy_triton
from pelib.kernels.rmsnorm import rms_norm_triton
from pelib.kernels.rope import apply_rope_ref, apply_rope_triton
from pelib.kernels.swiglu_kernel import swiglu_ref, swiglu_triton

pytestmark = pytest.mark.integration  # Triton kernels in the interpreter

BACKENDS = ["triton", "ref"]  # the check holds whichever path would run


# ---- cross-entropy ------------------------------------------------------------------------------

@pytest.mark.parametrize("path", BACKENDS)
@pytest.mark.parametrize("logits,labels,message", [
    (torch.randn(6, 11), torch.tensor([0, 3, 1, 2]), r"labels has shape \(4,\); expected \(6,\)"),
    (torch.randn(6, 11), torch.zeros(6, 1, dtype=torch.long), r"labels has shape \(6, 1\); expected \(6,\)"),
    (torch.randn(0, 11), torch.zeros(0, dtype=torch.long), r"logits is empty"),
    (torch.randn(6, 0), torch.zeros(6, dtype=torch.long), r"logits is empty"),
    (torch.randn(6, 11), torch.tensor([0., 3, 1, 2, 4, 5]), r"labels must be integer .*labels\.long\(\)"),
    (torch.randn(2, 3, 11), torch.zeros(6, dtype=torch.long), r"logits must be 2-D .*reshape\(-1, V\)"),
])
def test_cross_entropy_shapes_and_types(path, logits, labels, message):
    """The first case killed the process (SIGSEGV) before: the kernel read past the labels."""
    with backend(path), pytest.raises(ValueError, match=message):
        cross_entropy(logits, labels)


@pytest.mark.parametrize("reduction", ["none", "avg", None])
def test_cross_entropy_unsupported_reduction(reduction):
    for f in (cross_entropy, cross_entropy_triton):
        with pytest.raises(ValueError, match=r"reduction must be 'mean' or 'sum'.*reduction='none'"):
            f(torch.randn(4, 5), torch.tensor([0, 1, 2, 3]), reduction=reduction)


# ---- RMSNorm ------------------------------------------------------------------------------------

@pytest.mark.parametrize("f", [rms_norm, rms_norm_triton])
@pytest.mark.parametrize("w", [torch.ones(7), torch.ones(1), torch.ones(8, 1), torch.ones(9)])
def test_rms_norm_weight_of_the_wrong_length(f, w):
    """torch broadcasts a (1,) weight and the kernel read 8 weights from a 7-long one."""
    with pytest.raises(ValueError, match=r"weight has shape .*; expected \(8,\): one weight per feature"):
        f(torch.randn(3, 8), w)


def test_rms_norm_empty_input():
    with pytest.raises(ValueError, match="empty x"):
        rms_norm(torch.randn(0, 8), torch.ones(8))


# ---- RoPE ---------------------------------------------------------------------------------------

def qkcs(B=2, Hq=4, Hk=2, T=6, D=16, Tc=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, Hq, T, D, generator=g), torch.randn(B, Hk, T, D, generator=g)
    ang = torch.randn(B, Tc or T, D // 2, generator=g).repeat(1, 1, 2)      # HF: equal halves
    return q, k, ang.cos(), ang.sin()


@pytest.mark.parametrize("f", [apply_rope, apply_rope_triton])
def test_rope_cos_sin_for_fewer_positions(f):
    q, k, cos, sin = qkcs(T=6, Tc=4)
    with pytest.raises(ValueError, match=r"cos has shape \(2, 4, 16\); expected \(2 or 1, 6, 16\)"):
        with backend("triton"):
            f(q, k, cos, sin)


def test_rope_shapes_that_do_not_fit():
    q, k, cos, sin = qkcs()
    for args, message in [((q, k[:1], cos, sin), "does not fit q"),
                          ((q, k, cos, sin[:, :, :8]), r"sin has shape"),
                          ((q[0], k, cos, sin), "must be 4-D"),
                          ((q, k, cos[:, :, :8], sin[:, :, :8]), r"cos has shape")]:
        with pytest.raises(ValueError, match=message):
            apply_rope_triton(*args)
    with pytest.raises(ValueError, match="unsqueeze_dim must be 1 .* or 2"):
        apply_rope_triton(q, k, cos, sin, unsqueeze_dim=3)


@pytest.mark.parametrize("path", BACKENDS)
def test_rope_odd_head_dim(path):
    q, k = torch.randn(1, 2, 4, 7), torch.randn(1, 2, 4, 7)
    with backend(path), pytest.raises(ValueError, match="head_dim must be even .* got 7"):
        apply_rope(q, k, torch.randn(1, 4, 7), torch.randn(1, 4, 7))


def test_rope_cos_sin_whose_halves_differ_match_the_reference():
    """A kernel that read only the first half of cos/sin fails here: any cos/sin gives the
    reference's result, forward and backward (interpreter, tiny sizes)."""
    q, k, _, _ = qkcs()
    g = torch.Generator().manual_seed(1)
    cos, sin = torch.randn(1, 6, 16, generator=g), torch.randn(1, 6, 16, generator=g)
    qa, ka = q.clone().requires_grad_(), k.clone().requires_grad_()
    qb, kb = q.clone().requires_grad_(), k.clone().requires_grad_()
    out, ref = apply_rope_triton(qa, ka, cos, sin), apply_rope_ref(qb, kb, cos, sin)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    (out[0] * dq).sum().add((out[1] * dk).sum()).backward()
    (ref[0] * dq).sum().add((ref[1] * dk).sum()).backward()
    torch.testing.assert_close(qa.grad, qb.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ka.grad, kb.grad, atol=1e-5, rtol=1e-5)


# ---- SwiGLU -------------------------------------------------------------------------------------

def test_swiglu_fp64_is_computed_in_fp64():
    g, u = torch.randn(5, 33, dtype=torch.float64), torch.randn(5, 33, dtype=torch.float64)
    with backend("triton"):
        h = swiglu(g, u)
    assert h.dtype == torch.float64 and torch.equal(h, swiglu_ref(g, u))
    with pytest.raises(ValueError, match=r"computes in fp32 .* got torch\.float64; call swiglu"):
        swiglu_triton(g, u)


@pytest.mark.parametrize("f", [swiglu, swiglu_triton])
@pytest.mark.parametrize("u", [torch.randn(5, 32), torch.randn(33), torch.randn(5, 33).half()])
def test_swiglu_inputs_that_do_not_match(f, u):
    with pytest.raises(ValueError, match="g and u of one shape, dtype and device"):
        f(torch.randn(5, 33), u)


# ---- the backend switch -------------------------------------------------------------------------

def test_a_bogus_backend_in_the_environment_is_refused(monkeypatch):
    monkeypatch.setenv("PELIB_KERNELS", "bogus")
    with pytest.raises(ValueError, match=r"PELIB_KERNELS='bogus' is not a kernels backend; set it to "
                                         r"one of auto, triton, ref"):
        _dispatch._backend_from_env()
    for name in ("auto", "triton", "ref"):
        monkeypatch.setenv("PELIB_KERNELS", name)
        assert _dispatch._backend_from_env() == name


@pytest.mark.slow  # a subprocess
def test_importing_the_kernels_with_a_bogus_backend_fails_with_one_clear_line():
    env = dict(os.environ, PELIB_KERNELS="bogus")
    r = subprocess.run([sys.executable, "-c", "import pelib.kernels"], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode != 0
    assert "ValueError: PELIB_KERNELS='bogus' is not a kernels backend" in r.stderr.splitlines()[-1]


@pytest.mark.parametrize("packed,n,blocksize", [
    (torch.zeros(32, dtype=torch.uint8), 64, 63),      # odd blocksize
    (torch.zeros(31, dtype=torch.uint8), 64, 64),      # a byte short
    (torch.zeros(32, dtype=torch.int8), 64, 64),       # not uint8
])
def test_nf4_dequant_refuses_bytes_that_do_not_fit(packed, n, blocksize):
    from pelib.kernels.nf4 import dequantize_4bit_triton

    with pytest.raises(ValueError, match="NF4 dequant needs an even blocksize"):
        dequantize_4bit_triton(packed, torch.zeros(16), n, blocksize, torch.float32,
                               absmax=torch.ones(1))
