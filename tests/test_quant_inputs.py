"""Bad inputs to the 4-bit quantiser and dequantiser end in one clear ValueError that names the
argument (or state field) and the fix, never a torch traceback or a silently wrong weight."""
from dataclasses import replace

import pytest
import torch

import pelib
from pelib.quant import Linear4bit, apply_qlora, dequantize_4bit, dequantize_4bit_ref, quantize_4bit


def test_quantize_on_the_meta_device_is_refused():
    with pytest.raises(ValueError, match="meta device.*load or materialise the weights"):
        quantize_4bit(torch.empty(64, 64, device="meta"))
    with pytest.raises(ValueError, match="meta device"):
        Linear4bit.from_linear(torch.nn.Linear(64, 64, device="meta"))


@pytest.mark.parametrize("blocksize", [64.0, True, "64", 48])
def test_apply_qlora_blocksize_must_be_a_supported_integer(blocksize):
    model = pelib.tiny_backbone("minilm", 5, with_tokenizer=False)[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"blocksize .* use one of the integers \(32, 64"):
        apply_qlora(model, ["query", "value"], blocksize=blocksize)
    # refused before any layer was swapped: the model is as it was
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("chunk_bytes", [0, -32, 16, 32.0, True])
def test_chunk_bytes_must_be_a_positive_multiple_of_a_block(chunk_bytes):
    packed, state = quantize_4bit(torch.randn(64, 64))
    with pytest.raises(ValueError, match=r"chunk_bytes must be a positive multiple of .* 32 bytes"):
        dequantize_4bit(packed, state, chunk_bytes=chunk_bytes)
    assert torch.equal(dequantize_4bit(packed, state, chunk_bytes=64), dequantize_4bit_ref(packed, state))


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("fn", [dequantize_4bit, dequantize_4bit_ref])
def test_state_that_does_not_fit_the_bytes_is_refused(double_quant, fn):
    """A blocksize other than the one quantised with, or scales of the wrong length, would scale
    blocks by another block's absmax (128 with 64's scales ran without a word) or fail deep in a
    broadcast."""
    packed, state = quantize_4bit(torch.randn(64, 64), 64, double_quant=double_quant)
    scale = "qabsmax" if double_quant else "absmax"
    bad = [replace(state, blocksize=128), replace(state, blocksize=32),
           replace(state, **{scale: getattr(state, scale)[:10]}), replace(state, code=state.code[:8])]
    if double_quant:
        bad += [replace(state, absmax2=torch.ones(5)), replace(state, code2=state.code2[:16]),
                replace(state, qabsmax=state.qabsmax.float()), replace(state, blocksize2=0)]
    else:
        bad += [replace(state, absmax=state.absmax.half())]
    for s in bad:
        with pytest.raises(ValueError, match=r"state\.\w+ must|state does not belong|blocksize2"):
            fn(packed, s)
    assert torch.equal(fn(packed, state), dequantize_4bit_ref(packed, state))


def test_a_bogus_kernels_backend_is_refused_by_the_cpu_dequantiser_too(monkeypatch):
    """Without pelib.kernels loaded, dequantize_4bit reads PELIB_KERNELS itself: it refuses a
    value pelib.kernels would refuse, instead of running as auto."""
    import sys

    from pelib import dispatch

    monkeypatch.setitem(sys.modules, "pelib.kernels._dispatch", None)  # as if never imported
    monkeypatch.setenv("PELIB_KERNELS", "bogus")
    with pytest.raises(ValueError, match=r"PELIB_KERNELS='bogus' is not a kernels backend"):
        dispatch.triton_wanted(torch.zeros(4))
    monkeypatch.setenv("PELIB_KERNELS", "ref")
    assert dispatch.triton_wanted(torch.zeros(4)) is False
