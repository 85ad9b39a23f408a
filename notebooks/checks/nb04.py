"""Checkers for notebook 04's exercises: blockwise absmax quantisation (against bitsandbytes'
quantize_4bit/dequantize_4bit) and the QLoRA paper's NF4 equation (against scipy's norm.ppf),
compared with bitsandbytes' NF4 table."""
import logging

import torch
from scipy.stats import norm

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
import bitsandbytes.functional as bnbF  # noqa: E402

OFFSET = 0.9677083


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
