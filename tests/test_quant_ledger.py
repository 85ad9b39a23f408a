"""Bits per parameter counted from real bytes, and model totals from layer shapes."""
import math
from fractions import Fraction

import pytest
import torch

from pelib.quant import (
    LLAMA_7B,
    SMOLLM2_135M,
    bits_per_param,
    llama_linear_shapes,
    model_ledger,
    quantize_4bit,
    quantized_nbytes,
    state_nbytes,
)


def test_nf4_costs_4_5_bits():
    W = torch.randn(256, 256)  # a whole number of blocks
    packed, state = quantize_4bit(W, 64, "nf4", double_quant=False)
    assert bits_per_param(packed, state) == 4 + 32 / 64 == 4.5


def test_double_quant_costs_4_127_bits():
    W = torch.randn(512, 512)  # 4096 blocks of 64 = 16 blocks of 256 blocks
    packed, state = quantize_4bit(W, 64, "nf4", double_quant=True)
    n = W.numel()
    # 4 bits + an 8-bit absmax per 64 + an fp32 absmax2 per 64 * 256 + one fp32 offset.
    expected = 4 + Fraction(8, 64) + Fraction(32, 64 * 256) + Fraction(32, n)
    assert bits_per_param(packed, state) == float(expected)
    assert abs(bits_per_param(packed, state) - 4.127) < 1e-3
    assert state_nbytes(state) == 4096 + 16 * 4 + 4


@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("double_quant", [True, False])
def test_arithmetic_matches_real_bytes(blocksize, double_quant):
    W = torch.randn(523, 77)  # odd: ragged last block, odd number of nibbles
    packed, state = quantize_4bit(W, blocksize, "nf4", double_quant)
    assert quantized_nbytes(W.numel(), blocksize, double_quant) == packed.numel() + state_nbytes(state)


def test_llama_shapes():
    shapes = llama_linear_shapes(**SMOLLM2_135M)
    assert len(shapes) == 30 * 7
    assert shapes[:7] == [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576),
                          (576, 1536)]


def test_model_totals():
    small = model_ledger(llama_linear_shapes(**SMOLLM2_135M))
    assert small["params"] == 30 * (2 * 576 * 576 + 2 * 192 * 576 + 3 * 576 * 1536) == 106_168_320
    assert small["bf16_bytes"] == 2 * small["params"]
    assert small["nf4_bits_per_param"] == 4.5
    assert 4.1269 < small["nf4_dq_bits_per_param"] < 4.1271  # a ragged absmax2 block per tensor

    big = model_ledger(llama_linear_shapes(**LLAMA_7B))
    assert big["params"] == 32 * (4 * 4096**2 + 3 * 4096 * 11008) == 6_476_005_376
    assert big["nf4_bytes"] == big["params"] // 2 + 4 * big["params"] // 64
    assert math.isclose(big["nf4_dq_bits_per_param"], 4 + 8 / 64 + 32 / (64 * 256), rel_tol=1e-6)
