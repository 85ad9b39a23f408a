"""Checkers for notebook 05 (double quantisation): decoding the double-quantised scales, the
scales in FP8 E4M3 instead of the dynamic map, and the blocksize that double quantisation buys.

While an answer runs, the library functions that would solve the task (pelib's and
bitsandbytes' quantisers, decoders and ledger) are poisoned (`checks._guard.forbidden`)."""
import logging
import math

import torch
import torch.nn.functional as F

import pelib.quant
import pelib.quant.blockwise
import pelib.quant.ledger
from pelib.quant import bits_per_param, dequantize_4bit, quantize_4bit

from ._guard import forbidden

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
import bitsandbytes.functional as bnbF  # noqa: E402

# pelib's quantize_4bit reaches quantize_blockwise through its module, and QuantState decodes
# its scales in block_absmax: poisoning those also catches names imported before the check.
LIBRARY = [(bnbF, "quantize_4bit"), (bnbF, "dequantize_4bit"), (bnbF, "quantize_blockwise"),
           (bnbF, "dequantize_blockwise"), (pelib.quant, "quantize_4bit"), (pelib.quant, "dequantize_4bit"),
           (pelib.quant, "quantize_blockwise"), (pelib.quant, "dequantize_blockwise"),
           (pelib.quant.blockwise, "quantize_blockwise"), (pelib.quant.blockwise, "dequantize_blockwise"),
           (pelib.quant.blockwise.QuantState, "block_absmax"), (pelib.quant, "bits_per_param"),
           (pelib.quant.ledger, "bits_per_param"), (pelib.quant, "quantized_nbytes"),
           (pelib.quant.ledger, "quantized_nbytes"), (pelib.quant, "model_ledger"),
           (pelib.quant.ledger, "model_ledger")]


def _weight():
    torch.manual_seed(5)
    return 0.02 * torch.distributions.StudentT(5.0).sample((259, 1019))  # ragged: 4124 blocks of 64, the last partial


def exercise_1(decode_scales):
    W = 0.02 * torch.randn(1000, 77)  # 1204 blocks of 64: 5 blocks of scales, the last ragged
    _, st = quantize_4bit(W, 64, "nf4", double_quant=True)
    with forbidden(*LIBRARY):
        got = decode_scales(st.qabsmax.clone(), st.absmax2.clone(), st.offset.clone(), st.code2.clone())
    got = torch.as_tensor(got)
    # the decoding rule, written against pelib's stored state
    ref = st.code2[st.qabsmax.long()] * st.absmax2.repeat_interleave(256)[: st.qabsmax.numel()] \
        + st.offset
    assert got.shape == ref.shape, f"shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
    assert torch.allclose(got.float(), ref, rtol=1e-6, atol=0), "scales differ from the decoded ones"
    blocks = W.reshape(-1)[: 64 * (W.numel() // 64)].view(-1, 64).abs().amax(1)  # full blocks
    rel = ((got[: len(blocks)] - blocks).abs() / blocks).max().item()
    assert rel < 0.02, rel
    print(f"decode_scales == code2[q] * absmax2[b // 256] + offset on {got.numel()} scales; "
          f"within {100 * rel:.2f}% of the true block absmax")


def _fp8_reference(absmax):
    c = absmax.mean()
    x = absmax - c
    n = x.numel()
    blocks = F.pad(x, (0, -n % 256)).view(-1, 256)  # (n_blocks2, 256)
    s = blocks.abs().amax(1, keepdim=True) / 448  # the largest value lands on E4M3's 448
    q = (blocks / s).to(torch.float8_e4m3fn)
    return (q.float() * s).view(-1)[:n] + c


def exercise_2(fp8_double_quant):
    W = _weight()
    _, st = quantize_4bit(W, 64, "nf4", double_quant=False)
    absmax = st.absmax  # (4124,) fp32
    with forbidden(*LIBRARY):
        got = torch.as_tensor(fp8_double_quant(absmax.clone())).float()
    ref = _fp8_reference(absmax)
    assert got.shape == ref.shape, f"shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
    rel = lambda a: ((a - absmax).abs() / absmax).mean().item()  # noqa: E731
    same = (got == ref).float().mean().item()
    # a reciprocal instead of a division may move a value across a rounding midpoint: allow a few
    assert same > 0.99, (f"only {100 * same:.1f}% of the scales equal the E4M3 decoding; "
                         f"mean relative error {rel(got):.2e} (E4M3 gives {rel(ref):.2e})")
    assert rel(got) < 1.05 * rel(ref), f"mean relative error {rel(got):.2e}, E4M3 gives {rel(ref):.2e}"
    _, st_dyn = quantize_4bit(W, 64, "nf4", double_quant=True, dq_rounding="nearest")
    dyn = st_dyn.block_absmax()
    print(f"fp8_double_quant == E4M3 decoding on {100 * same:.1f}% of {got.numel()} scales. Mean "
          f"relative error of the scales: FP8 E4M3 {rel(got):.2e}, dynamic map {rel(dyn):.2e}; "
          f"largest: {((got - absmax).abs() / absmax).max():.2e} and "
          f"{((dyn - absmax).abs() / absmax).max():.2e}")


def exercise_3(dq_tradeoff):
    W = _weight()
    sizes = [32, 64, 128, 256]
    with forbidden(*LIBRARY):
        got = dq_tradeoff(W.clone(), sizes)
    for B in sizes:
        packed, st = quantize_4bit(W, B, "nf4", double_quant=True, dq_rounding="nearest")
        bits = bits_per_param(packed, st)
        err = (dequantize_4bit(packed, st).view_as(W) - W).abs().mean().item()
        assert B in got, f"no entry for blocksize {B}"
        g_bits, g_err = (float(v) for v in got[B])
        assert math.isclose(g_bits, bits, rel_tol=1e-9), \
            f"B={B}: {g_bits:.6f} bits/param, pelib stores {bits:.6f} (count every stored tensor)"
        assert math.isclose(g_err, err, rel_tol=1e-4), f"B={B}: mean |err| {g_err:.4e}, pelib's {err:.4e}"
    packed, st = quantize_4bit(W, 64, "nf4", double_quant=False)
    bits64 = bits_per_param(packed, st)
    err64 = (dequantize_4bit(packed, st).view_as(W) - W).abs().mean().item()
    better = [B for B in sizes if got[B][0] < bits64 and got[B][1] < err64]
    print("dq_tradeoff == pelib: " + ", ".join(f"B={B} {got[B][0]:.3f} bits, |err| {got[B][1]:.3e}"
                                               for B in sizes))
    print(f"without double quantisation, B=64: {bits64:.3f} bits, |err| {err64:.3e}; smaller and more "
          f"accurate with DQ: B = {better}")
