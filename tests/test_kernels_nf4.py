"""The NF4 (+ double quantisation) Triton kernel behind pelib.quant.dequantize_4bit: bit-exact
against bitsandbytes and against pelib.quant's reference, on the CPU (Triton's interpreter)."""
import pytest
import torch

import pelib.kernels as K
import pelib.kernels.nf4 as nf4
from pelib.quant import QuantState, dequantize_4bit, dequantize_4bit_ref

pytestmark = pytest.mark.integration  # Triton kernels in the interpreter

bnbF = pytest.importorskip("bitsandbytes.functional")

SHAPES = [(300, 777), (37, 577), (64, 64)]  # padded last block; odd numel (half-used last byte)


def _quantize(shape, dtype, double):
    torch.manual_seed(0)
    W = torch.randn(shape, dtype=dtype)
    packed, qs = bnbF.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=double)
    return packed, qs


def _launch(packed, state, dtype, out=None):
    """The kernel called directly, with the state's plain tensors."""
    t = {k: getattr(state, k) for k in ("absmax", "qabsmax", "absmax2", "code2", "offset")}
    return nf4.dequantize_4bit_triton(packed, state.code, state.numel, state.blocksize, dtype, **t,
                                      blocksize2=state.blocksize2, out=out).view(state.shape)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("double", [True, False])
def test_dequant_bit_exact_vs_bitsandbytes(shape, dtype, double):
    packed, qs = _quantize(shape, dtype, double)
    expected = bnbF.dequantize_4bit(packed, qs)
    state = QuantState.from_bnb(qs)
    assert torch.equal(_launch(packed, state, dtype), expected)
    assert torch.equal(dequantize_4bit_ref(packed, state), expected)
    with K.backend("triton"):
        assert torch.equal(dequantize_4bit(packed, state), expected)


def test_dispatch_and_out(monkeypatch):
    """One op: "triton" runs the kernel (into `out` too), "auto" on a CPU and "ref" the torch path."""
    packed, qs = _quantize((37, 577), torch.float16, True)
    expected = bnbF.dequantize_4bit(packed, qs)
    state = QuantState.from_bnb(qs)
    calls = []
    launch = nf4.dequantize_4bit_triton
    monkeypatch.setattr(nf4, "dequantize_4bit_triton", lambda *a, **k: calls.append(1) or launch(*a, **k))
    expected_bf16 = dequantize_4bit_ref(packed, state, torch.bfloat16)
    for name, n_calls in (("auto", 0), ("ref", 0), ("triton", 1)):
        with K.backend(name):
            assert torch.equal(dequantize_4bit(packed.reshape(-1), state), expected)
            out = torch.empty(37, 577, dtype=torch.bfloat16)
            assert dequantize_4bit(packed, state, torch.bfloat16, out).data_ptr() == out.data_ptr()
            assert torch.equal(out, expected_bf16)
        assert len(calls) == 2 * n_calls, name
        calls.clear()


# pelib's own quantiser: the kernel dequantises pelib.quant.QuantState to exactly what the torch
# paths give (it does their operations in their order). FP4 too: the kernel only looks codes up.
PELIB_CASES = [((300, 777), 64, "nf4"), ((37, 577), 64, "nf4"), ((129, 65), 128, "nf4"),
               ((37, 577), 64, "fp4")]


@pytest.mark.parametrize("shape,blocksize,quant_type", PELIB_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("double", [True, False])
def test_dequant_bit_exact_vs_pelib_quant(shape, blocksize, quant_type, dtype, double):
    from pelib.quant import Linear4bit, quantize_4bit

    torch.manual_seed(0)
    W = torch.randn(shape, dtype=dtype)
    packed, state = quantize_4bit(W, blocksize, quant_type, double)
    for out_dtype in (torch.float32, torch.float16, torch.bfloat16):
        expected = dequantize_4bit(packed, state, dtype=out_dtype)
        assert torch.equal(_launch(packed, state, out_dtype), expected), out_dtype
        assert torch.equal(dequantize_4bit_ref(packed, state, out_dtype), expected), out_dtype

    # the same through a Linear4bit's buffers (what patch() hands to the fused LoRA)
    layer = Linear4bit.from_linear(torch.nn.Linear(shape[1], shape[0], bias=False).to(dtype),
                                   blocksize, quant_type, double)
    with K.backend("triton"):
        dq = layer.dequantized_weight()
    assert torch.equal(dq, dequantize_4bit_ref(layer.packed, layer.quant_state))


def test_quant_state_from_bnb_shares_tensors():
    packed, qs = _quantize((37, 577), torch.float16, True)
    state = QuantState.from_bnb(qs)
    assert state.double_quant and state.qabsmax is qs.absmax and state.absmax2 is qs.state2.absmax
    assert state.shape == (37, 577) and state.dtype == torch.float16 and state.blocksize2 == 256
    assert torch.equal(dequantize_4bit(packed, state), bnbF.dequantize_4bit(packed, qs))
    _, qs1 = _quantize((37, 577), torch.float16, False)
    assert not QuantState.from_bnb(qs1).double_quant and QuantState.from_bnb(qs1).absmax is qs1.absmax
