"""Solutions to notebook 05's exercises (and a plausible wrong answer for each)."""
import torch


def bits_per_weight(B, double_quant):
    return 4 + 8 / B + 32 / (256 * B) if double_quant else 4 + 32 / B


def bits_no_second_level(B, double_quant):  # forgets absmax2
    return 4 + 8 / B if double_quant else 4 + 32 / B


def decode_scales(qabsmax, absmax2, offset, code2):
    block2 = torch.arange(qabsmax.numel()) // 256  # which absmax2 each scale uses
    return code2[qabsmax.long()] * absmax2[block2] + offset


def decode_scales_no_offset(qabsmax, absmax2, offset, code2):
    block2 = torch.arange(qabsmax.numel()) // 256
    return code2[qabsmax.long()] * absmax2[block2]


def _ledger(n_kv_heads):
    L, h, i, H, d = 80, 8192, 28672, 64, 128
    shapes = [(H * d, h), (n_kv_heads * d, h), (n_kv_heads * d, h), (h, H * d),
              (i, h), (i, h), (h, i)] * L
    out = dict(params=0, nf4_bytes=0, nf4_dq_bytes=0)
    for o, k in shapes:
        n = o * k
        blocks = -(-n // 64)
        out["params"] += n
        out["nf4_bytes"] += -(-n // 2) + 4 * blocks  # packed + fp32 absmax
        out["nf4_dq_bytes"] += -(-n // 2) + blocks + 4 * -(-blocks // 256) + 4  # + absmax2, offset
    return out


def ledger_70b():
    return _ledger(n_kv_heads=8)


def ledger_70b_without_gqa():  # 64 key/value heads, as Llama-1
    return _ledger(n_kv_heads=64)


SOLUTIONS = {1: bits_per_weight, 2: decode_scales, 3: ledger_70b}
WRONG = {1: bits_no_second_level, 2: decode_scales_no_offset, 3: ledger_70b_without_gqa}
