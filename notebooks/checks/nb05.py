"""Checkers for notebook 05 (double quantisation): the bits/weight formula, decoding the
double-quantised scales, and the byte ledger of Llama-2-70B."""
import math

import torch

from pelib.quant import llama_linear_shapes, model_ledger, quantize_4bit
from pelib.quant.ledger import quantized_nbytes

LLAMA2_70B = dict(n_layers=80, hidden=8192, intermediate=28672, n_heads=64, n_kv_heads=8,
                  head_dim=128)


def exercise_1(bits_per_weight):
    for B in (32, 64, 128, 256):
        n = 256 * B * 1000  # large: the offset's 32 bits vanish, blocks fill exactly
        for dq in (False, True):
            ref = 8 * (quantized_nbytes(n, B, dq) - 4 * dq) / n  # pelib's byte count, no offset
            got = float(bits_per_weight(B, dq))
            assert math.isclose(got, ref, rel_tol=1e-9), f"B={B}, double_quant={dq}: {got} != {ref}"
    print("bits_per_weight == pelib's byte counts for B in 32..256, with and without DQ "
          f"(B=64: {bits_per_weight(64, False)} and {bits_per_weight(64, True):.4f})")


def exercise_2(decode_scales):
    torch.manual_seed(5)
    W = 0.02 * torch.randn(1000, 77)  # 1204 blocks of 64: 5 blocks of scales, the last ragged
    _, st = quantize_4bit(W, 64, "nf4", double_quant=True)
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


def exercise_3(ledger_70b):
    got = ledger_70b()
    ref = model_ledger(llama_linear_shapes(**LLAMA2_70B))
    for k, r in (("params", ref["params"]), ("nf4_bytes", ref["nf4_bytes"]),
                 ("nf4_dq_bytes", ref["nf4_dq_bytes"])):
        assert int(got[k]) == r, f"{k}: {int(got[k]):,} != {r:,} (pelib.quant.model_ledger)"
    saved = (ref["nf4_bytes"] - ref["nf4_dq_bytes"]) / 1e9
    print(f"Llama-2-70B linear layers: {ref['params']:,} weights; NF4 {ref['nf4_bytes'] / 1e9:.2f} GB, "
          f"NF4+DQ {ref['nf4_dq_bytes'] / 1e9:.2f} GB: double quantisation saves {saved:.2f} GB "
          f"({8 * ref['nf4_dq_bytes'] / ref['params']:.4f} bits/weight)")
