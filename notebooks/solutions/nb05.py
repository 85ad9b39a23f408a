"""Solutions to notebook 05's exercises (and a plausible wrong answer for each)."""
import torch
import torch.nn.functional as F
from scipy.stats import norm


def decode_scales(qabsmax, absmax2, offset, code2):
    block2 = torch.arange(qabsmax.numel()) // 256  # which absmax2 each scale uses
    return code2[qabsmax.long()] * absmax2[block2] + offset


def decode_scales_no_offset(qabsmax, absmax2, offset, code2):
    block2 = torch.arange(qabsmax.numel()) // 256
    return code2[qabsmax.long()] * absmax2[block2]


def _fp8(absmax, centre):
    c = absmax.mean() if centre else torch.zeros(())
    x = absmax - c
    n = x.numel()
    blocks = F.pad(x, (0, -n % 256)).view(-1, 256)  # (n_blocks2, 256)
    s = blocks.abs().amax(1, keepdim=True) / 448  # E4M3's largest finite value
    return ((blocks / s).to(torch.float8_e4m3fn).float() * s).view(-1)[:n] + c


def fp8_double_quant(absmax):
    return _fp8(absmax, centre=True)


def fp8_double_quant_uncentred(absmax):  # forgets to subtract the mean
    return _fp8(absmax, centre=False)


# Exercise 3, from the notebook's pieces (repeated here so the solution runs on its own).
_p_pos = norm.ppf(torch.linspace(0.9677083, 0.5, 9)[:-1].numpy())
_p_neg = -norm.ppf(torch.linspace(0.9677083, 0.5, 8)[:-1].numpy())
_code = torch.tensor([*_p_pos, 0.0, *_p_neg], dtype=torch.float32).sort().values
CODE = _code / _code.max()  # (16,) NF4, sorted
_levels = []
for _i in range(7):
    _edges = torch.linspace(0.1, 1, 2**_i + 1, dtype=torch.float32)
    _c = (_edges[:-1] + _edges[1:]) / 2
    _levels += [_c * 10.0 ** (_i - 6), -_c * 10.0 ** (_i - 6)]
CODE2 = torch.cat([*_levels, torch.tensor([0.0, 1.0])]).sort().values  # (256,) dynamic map


def quantize_blockwise(W, code, blocksize):  # notebook 05, section 1
    flat = W.reshape(-1).float()
    blocks = F.pad(flat, (0, -flat.numel() % blocksize)).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks * (1.0 / absmax.clamp(min=torch.finfo(torch.float32).tiny))[:, None]
    q = torch.bucketize(scaled.clamp(-1, 1).view(-1), (code[:-1] + code[1:]) / 2)
    return q[: flat.numel()], absmax


def dequantize_blockwise(q, absmax, code, blocksize):
    n = q.numel()
    values = F.pad(code[q], (0, -n % blocksize)).view(-1, blocksize)
    return (values * absmax[:, None]).view(-1)[:n]


def _tradeoff(W, blocksizes, count_absmax2):
    out, n = {}, W.numel()
    for B in blocksizes:
        q, absmax = quantize_blockwise(W, CODE, B)
        offset = absmax.mean()
        qabsmax, absmax2 = quantize_blockwise(absmax - offset, CODE2, 256)
        scales = dequantize_blockwise(qabsmax, absmax2, CODE2, 256) + offset
        W_hat = dequantize_blockwise(q, scales, CODE, B)
        stored = -(-n // 2) + qabsmax.numel() + 4 * offset.numel()  # packed, uint8 qabsmax, offset
        stored += 4 * absmax2.numel() if count_absmax2 else 0  # fp32 absmax2
        out[B] = (8 * stored / n, (W_hat - W.reshape(-1)).abs().mean().item())
    return out


def dq_tradeoff(W, blocksizes):
    return _tradeoff(W, blocksizes, count_absmax2=True)


def dq_tradeoff_without_absmax2(W, blocksizes):  # forgets the second-level scales in the bill
    return _tradeoff(W, blocksizes, count_absmax2=False)


SOLUTIONS = {1: decode_scales, 2: fp8_double_quant, 3: dq_tradeoff}
WRONG = {1: decode_scales_no_offset, 2: fp8_double_quant_uncentred, 3: dq_tradeoff_without_absmax2}
