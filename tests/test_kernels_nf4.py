"""NF4 (+ double quantisation) dequantisation: bit-exact against bitsandbytes on the CPU."""
import pytest
import torch

import pelib.kernels as K
from pelib.kernels.nf4 import NF4Weight, nf4_dequantize_ref, nf4_dequantize_triton

bnbF = pytest.importorskip("bitsandbytes.functional")

SHAPES = [(300, 777), (37, 577), (64, 64)]  # padded last block; odd numel (half-used last byte)


def _quantize(shape, dtype, double):
    torch.manual_seed(0)
    W = torch.randn(shape, dtype=dtype)
    packed, qs = bnbF.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=double)
    return packed, qs


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("double", [True, False])
def test_dequant_bit_exact_vs_bitsandbytes(shape, dtype, double):
    packed, qs = _quantize(shape, dtype, double)
    expected = bnbF.dequantize_4bit(packed, qs)
    w = NF4Weight.from_bnb(packed, qs)
    args = (w.packed, w.absmax, w.code, w.shape, w.blocksize, dtype, w.blocksize2)
    assert torch.equal(nf4_dequantize_triton(*args), expected)
    assert torch.equal(nf4_dequantize_ref(*args), expected)


def test_plain_tensor_signature_and_dispatch():
    packed, qs = _quantize((37, 577), torch.float16, True)
    expected = bnbF.dequantize_4bit(packed, qs)
    dq = (qs.absmax, qs.state2.absmax, qs.state2.code, float(qs.offset))  # offset as a float
    out = K.nf4_dequantize(packed, dq, qs.code, (37, 577), 64, torch.float16)
    assert out.shape == (37, 577) and out.dtype == torch.float16
    assert torch.equal(out, expected)
    with K.backend("ref"):
        assert torch.equal(K.nf4_dequantize(packed.reshape(-1), dq, qs.code, (37, 577), 64, torch.float16), expected)


# pelib's own quantiser: NF4Weight.from_quant_state(packed, pelib.quant.QuantState) dequantises
# to exactly what pelib.quant.dequantize_4bit gives (the kernel does its operations in its order).
PELIB_CASES = [((300, 777), 64, "nf4"), ((37, 577), 64, "nf4"), ((129, 65), 128, "nf4"),
               ((37, 577), 64, "fp4")]


@pytest.mark.parametrize("shape,blocksize,quant_type", PELIB_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("double", [True, False])
def test_dequant_bit_exact_vs_pelib_quant(shape, blocksize, quant_type, dtype, double):
    from pelib.quant import Linear4bit, dequantize_4bit, quantize_4bit

    torch.manual_seed(0)
    W = torch.randn(shape, dtype=dtype)
    packed, state = quantize_4bit(W, blocksize, quant_type, double)
    w = NF4Weight.from_quant_state(packed, state)
    assert w.dtype == dtype and w.shape == shape and w.blocksize2 == state.blocksize2
    for out_dtype in (torch.float32, torch.float16, torch.bfloat16):
        expected = dequantize_4bit(packed, state, dtype=out_dtype)
        args = (w.packed, w.absmax, w.code, w.shape, w.blocksize, out_dtype, w.blocksize2)
        assert torch.equal(nf4_dequantize_triton(*args), expected), out_dtype
        assert torch.equal(nf4_dequantize_ref(*args), expected), out_dtype

    # the same through a Linear4bit's buffers (what patch() hands to the fused LoRA)
    layer = Linear4bit.from_linear(torch.nn.Linear(shape[1], shape[0], bias=False).to(dtype),
                                   blocksize, quant_type, double)
    w = NF4Weight.from_quant_state(layer.packed, layer.quant_state)
    assert torch.equal(w.dequantize(), layer.dequantized_weight())


def test_from_quant_state_takes_bitsandbytes_state_too():
    packed, qs = _quantize((37, 577), torch.float16, True)
    w = NF4Weight.from_quant_state(packed, qs)
    assert torch.equal(w.dequantize(), bnbF.dequantize_4bit(packed, qs))
