"""The bits-per-parameter ledger: what a 4-bit weight really costs, counted from its bytes.

For n weights in blocks of B (and B2 = 256 for the second quantisation):

    NF4:        4 bits/weight + 32 bits per block                 = 4 + 32/B
    NF4 + DQ:   4 + 8 bits per block + 32 bits per block of blocks + 32 (the offset)
              = 4 + 8/B + 32/(B * B2) + 32/n                       ~ 4.127 at B = 64

(QLoRA, arXiv:2305.14314, section 3: 0.5 -> 0.127 bits per parameter for the constants.)
`bits_per_param` counts the bytes of real tensors; `quantized_nbytes` does the same
arithmetic without building them, for whole models (`model_ledger`). The code tables
(16 and 256 float32 values) are shared by every tensor of a model and are not counted.
"""
import math

import torch

from .blockwise import DQ_BLOCKSIZE, QuantState

# Linear-layer shapes of the two models the course talks about (Llama architecture).
SMOLLM2_135M = dict(n_layers=30, hidden=576, intermediate=1536, n_heads=9, n_kv_heads=3, head_dim=64)
LLAMA_7B = dict(n_layers=32, hidden=4096, intermediate=11008, n_heads=32, n_kv_heads=32, head_dim=128)


def state_nbytes(state: QuantState) -> int:
    """Bytes of the per-tensor quantisation constants (absmax, or qabsmax + absmax2 + offset)."""
    return sum(t.numel() * t.element_size() for t in state.tensors().values())


def bits_per_param(packed: torch.Tensor, state: QuantState) -> float:
    """(bits of the packed weights + bits of the state) / number of weights."""
    bits = 8 * (packed.numel() * packed.element_size() + state_nbytes(state))
    return bits / state.numel


def quantized_nbytes(numel: int, blocksize: int = 64, double_quant: bool = True) -> int:
    """Bytes quantize_4bit stores for `numel` weights: the same count as bits_per_param makes."""
    n_blocks = -(-numel // blocksize)
    packed = -(-numel // 2)  # two weights a byte
    if not double_quant:
        return packed + 4 * n_blocks  # fp32 absmax
    n_blocks2 = -(-n_blocks // DQ_BLOCKSIZE)
    return packed + n_blocks + 4 * n_blocks2 + 4  # uint8 qabsmax, fp32 absmax2, fp32 offset


def llama_linear_shapes(
    n_layers: int, hidden: int, intermediate: int, n_heads: int, n_kv_heads: int, head_dim: int
) -> list[tuple[int, int]]:
    """(out_features, in_features) of every linear layer in the decoder blocks of a Llama model.

    Per layer: q (H*d, h), k and v (H_kv*d, h), o (h, H*d), gate and up (i, h), down (h, i).
    Embeddings and the LM head stay in 16 bits in QLoRA and are not listed.
    """
    q, kv = n_heads * head_dim, n_kv_heads * head_dim
    layer = [(q, hidden), (kv, hidden), (kv, hidden), (hidden, q)]  # attention
    layer += [(intermediate, hidden), (intermediate, hidden), (hidden, intermediate)]  # SwiGLU MLP
    return layer * n_layers


def model_ledger(shapes: list[tuple[int, int]], blocksize: int = 64) -> dict:
    """Totals over linear layers (each quantised on its own): parameters, bytes and bits/param
    in 16 bits, NF4 with fp32 absmax, and NF4 with double quantisation."""
    params = sum(math.prod(s) for s in shapes)
    rows = {
        "bf16": 2 * params,
        "nf4": sum(quantized_nbytes(math.prod(s), blocksize, double_quant=False) for s in shapes),
        "nf4_dq": sum(quantized_nbytes(math.prod(s), blocksize, double_quant=True) for s in shapes),
    }
    out = {"params": params, "blocksize": blocksize}
    for name, nbytes in rows.items():
        out[f"{name}_bytes"] = nbytes
        out[f"{name}_bits_per_param"] = 8 * nbytes / params
    return out
