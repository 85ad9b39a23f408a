"""Checkers for notebook 04's exercises: blockwise absmax quantisation (against bitsandbytes'
bytes), the QLoRA paper's NF4 equation (against scipy's norm.ppf), and the NF code for k bits
(against bitsandbytes' NF4 at k = 4 and the construction at k = 2, 3, 5), with its SQNR.

While an answer runs, the library functions that would solve the task (bitsandbytes' and pelib's
quantisers and NF4 builders) are poisoned (`checks._guard.forbidden`)."""
import logging
import math

import torch
from scipy.stats import norm

import pelib.quant
import pelib.quant.blockwise
import pelib.quant.codes

from ._guard import forbidden

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
import bitsandbytes.functional as bnbF  # noqa: E402

OFFSET = 0.9677083

# The quantisers an answer to exercise 1 must not call. pelib's `quantize_4bit` reaches its
# `quantize_blockwise` through the module, so poisoning that also catches a name imported earlier.
QUANTISERS = [(bnbF, "quantize_4bit"), (bnbF, "dequantize_4bit"), (bnbF, "quantize_blockwise"),
              (bnbF, "dequantize_blockwise"), (pelib.quant, "quantize_4bit"),
              (pelib.quant, "dequantize_4bit"), (pelib.quant, "quantize_blockwise"),
              (pelib.quant, "dequantize_blockwise"), (pelib.quant.blockwise, "quantize_blockwise"),
              (pelib.quant.blockwise, "dequantize_blockwise")]
# The NF4 builders an answer to exercise 3 must not call.
NF_BUILDERS = [(bnbF, "get_4bit_type"), (bnbF, "create_normal_map"), (pelib.quant, "create_normal_map"),
               (pelib.quant, "get_code"), (pelib.quant.codes, "create_normal_map"),
               (pelib.quant.codes, "get_code")]


def decode(packed, absmax, code, blocksize):
    """bitsandbytes' bytes read by their definition: two 4-bit indices per byte, the high nibble
    first, each its code value times its block's absmax. Not bnbF.dequantize_4bit: on CPUs with
    AVX-512 its native kernel (0.50.2) is wrong when a row's length is not a multiple of the
    blocksize, as in the (64, 96) case below (docs/benchmarks.md)."""
    b = packed.reshape(-1)
    index = torch.stack([b >> 4, b & 15], 1).reshape(-1).long()
    return (code[index].reshape(-1, blocksize) * absmax[:, None]).reshape(-1)


def exercise_1(absmax_quantise):
    """absmax_quantise(W, code, blocksize) -> W_hat: each block of `blocksize` consecutive values
    divided by its absmax, snapped to the nearest code value, multiplied back."""
    torch.manual_seed(0)
    for quant_type, blocksize, shape in [("nf4", 64, (64, 96)), ("fp4", 128, (32, 64)), ("nf4", 256, (16, 128))]:
        W = torch.randn(shape) * torch.linspace(0.1, 3, shape[0])[:, None]  # blocks of different scales
        code = bnbF.get_4bit_type(quant_type, device="cpu")
        packed, state = bnbF.quantize_4bit(W, blocksize=blocksize, quant_type=quant_type,
                                           compress_statistics=False)
        ref = decode(packed, state.absmax, code, blocksize).reshape(shape)
        with forbidden(*QUANTISERS):
            got = absmax_quantise(W.clone(), code.clone(), blocksize)
        assert got.shape == W.shape, f"W_hat should have W's shape {tuple(W.shape)}"
        err = (got - ref).abs().max().item()
        assert err < 1e-5, f"{quant_type}, blocksize {blocksize}: max |yours - bitsandbytes| = {err:.2e}"
        print(f"exercise_1: {quant_type.upper()}, blocksize {blocksize}, {tuple(shape)}: equals "
              f"bitsandbytes' quantisation, its bytes decoded (max err {err:.1e})")
    print("exercise_1: correct")


def exercise_2(nf4_from_equation):
    """nf4_from_equation(k, offset) -> (2^k,) float64: the paper's equation on 2^k + 1 evenly
    spaced probabilities from 1 - offset to offset, levels = means of neighbouring quantiles,
    divided by the largest |level|, sorted."""
    for k in (2, 3, 4):
        p = torch.linspace(1 - OFFSET, OFFSET, 2**k + 1, dtype=torch.float64).numpy()
        Q = torch.tensor(norm.ppf(p))
        ref = (Q[:-1] + Q[1:]) / 2
        ref = (ref / ref.abs().max()).sort().values
        got = torch.as_tensor(nf4_from_equation(k, OFFSET)).double()
        assert got.shape == ref.shape, f"k={k}: expected {2**k} levels, got shape {tuple(got.shape)}"
        err = (got.sort().values - ref).abs().max().item()
        assert err < 1e-6, f"k={k}: max |yours - the equation| = {err:.2e}"
        print(f"exercise_2: k={k}: {2**k} levels, symmetric, no exact zero: "
              f"{[round(x, 4) for x in ref.tolist()]}" if k < 4 else "exercise_2: k=4: the equation, as computed")
    nf4 = bnbF.get_4bit_type("nf4", device="cpu").double()
    diff = (ref - nf4).abs()
    print(f"exercise_2: vs bitsandbytes' NF4: {int((diff > 1e-3).sum())} of 16 levels differ by more "
          f"than 1e-3, the largest by {diff.max():.3f} (NF4 has an exact 0, the equation has "
          f"+-{ref[8]:.4f} instead). correct")


def _nf_code(k, offset):
    """The NF construction for k bits: 2^(k-1) positive quantiles of float32 probabilities from
    offset down to 0.5 (0.5 dropped), 2^(k-1) - 1 negative ones, a zero; sorted, over the max."""
    n = 2 ** (k - 1)
    p_pos = torch.linspace(offset, 0.5, n + 1)[:-1].numpy()
    p_neg = torch.linspace(offset, 0.5, n)[:-1].numpy()
    v = torch.tensor([*norm.ppf(p_pos), 0.0, *(-norm.ppf(p_neg))], dtype=torch.float32).sort().values
    return v / v.max()


def _sqnr(W, code, blocksize=64):
    blocks = W.reshape(-1, blocksize)
    absmax = blocks.abs().amax(1, keepdim=True)
    s = code.sort().values
    q = torch.bucketize(blocks / absmax, (s[:-1] + s[1:]) / 2)
    return 10 * math.log10(W.square().sum() / (blocks - s[q] * absmax).square().sum())


def exercise_3(answer):
    """(nf_offset, nf_code): nf_offset(k) the offset from bins m = 2^k - 1 and 2^k;
    nf_code(k, offset) the sorted float32 NF table of 2^k levels."""
    nf_offset, nf_code = answer
    with forbidden(*NF_BUILDERS):
        offsets = {k: float(nf_offset(k)) for k in (2, 3, 4, 5)}
        codes = {k: torch.as_tensor(nf_code(k, offsets[k])) for k in (2, 3, 5)}
        nf4 = torch.as_tensor(nf_code(4, OFFSET))
    for k, got in offsets.items():
        a, b = 2**k - 1, 2**k
        ref = ((1 - 1 / (2 * a)) + (1 - 1 / (2 * b))) / 2
        assert abs(got - ref) < 1e-9, f"nf_offset({k}) = {got}, expected {ref:.9f}"
    assert abs(offsets[4] - OFFSET) < 5e-8, f"nf_offset(4) = {offsets[4]} should round to {OFFSET}"
    ref4 = bnbF.get_4bit_type("nf4", device="cpu")
    assert nf4.dtype == torch.float32 and nf4.shape == (16,), \
        f"nf_code(4, ...) must be a (16,) float32 tensor, got {tuple(nf4.shape)} {nf4.dtype}"
    assert torch.equal(nf4, ref4), \
        f"nf_code(4, {OFFSET}) differs from bitsandbytes' NF4 by {(nf4 - ref4).abs().max():.2e} " \
        "(float32 probabilities? sorted? divided by the max?)"
    for k, got in codes.items():
        ref = _nf_code(k, offsets[k])
        assert got.shape == ref.shape, f"nf_code({k}): {2**k} levels expected, got shape {tuple(got.shape)}"
        err = (got.double() - ref.double()).abs().max().item()
        assert err < 1e-6, f"nf_code({k}) differs from the NF construction by {err:.2e}"
        assert (got == 0).sum() == 1 and got.max() == 1, f"nf_code({k}): needs one exact 0 and max 1"
    torch.manual_seed(0)
    W = torch.randn(256, 1024)
    sqnr = {k: _sqnr(W, c) for k, c in {**codes, 4: nf4}.items()}
    line = ", ".join(f"NF{k} {sqnr[k]:.1f} dB" for k in sorted(sqnr))
    print(f"exercise_3: offsets {[round(offsets[k], 6) for k in sorted(offsets)]}; "
          f"NF4 == bitsandbytes bit for bit; on N(0,1), blocksize 64: {line}. correct")
