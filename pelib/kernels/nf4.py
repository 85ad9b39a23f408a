"""NF4 dequantisation, with double quantisation, as one Triton kernel.

QLoRA (Dettmers et al. 2023) stores a frozen weight W (numel n) as

    q[i]     in {0..15}      a 4-bit index into the 16-entry NF4 code map `code`
    absmax[b]                one fp32 scale per block of `blocksize` (64) elements
    W[i] ~= code[q[i]] * absmax[i // blocksize]

Packing (bitsandbytes' layout, also pelib.quant's): two indices per byte, the EVEN element in
the HIGH nibble, so byte j holds elements 2j (bits 7..4) and 2j+1 (bits 3..0). The flat
element order is W.reshape(-1); the last block may be partial (n % blocksize != 0) and an odd
n leaves the low nibble of the last byte unused.

Double quantisation (DQ) quantises the scales themselves: subtract their mean `offset`, store
each as an uint8 index `qabsmax[b]` into the 8-bit signed dynamic map `code2` (256 entries),
with one fp32 `absmax2` per 256 blocks:

    absmax[b] = code2[qabsmax[b]] * absmax2[b // 256] + offset

Exactness: bitsandbytes computes the product, rounds it to fp32, then adds `offset` (two
roundings), then `code[q] * absmax` in fp32 and casts to the output dtype. The kernel does the
same operations in the same order; on a GPU the launch disables FMA contraction
(`enable_fp_fusion=False`) so `c2 * a2 + offset` is not fused into one rounding. The result is
then bit-equal (`torch.equal`) to `bitsandbytes.functional.dequantize_4bit`.

Memory traffic per element (the kernel is purely bandwidth-bound; ~3 FLOPs per element):
    read   1/2 byte (packed) + 1/64 byte (qabsmax, DQ) or 4/64 byte (fp32 absmax)
    write  2 bytes (fp16/bf16) or 4 bytes (fp32)
    e.g. 4096 x 14336 -> fp16: 58.7M elements, 29.4 MB + 0.9 MB read, 117 MB written,
         ~148 MB in all: 34 us at 4.3 TB/s (H200 HBM).
"""
from dataclasses import dataclass
from math import prod

import torch
import triton
import triton.language as tl

from ._dispatch import interpreting, launch_options, use_triton


@triton.jit
def _nf4_dequant_kernel(
    packed_ptr,    # (n_bytes,) uint8, two 4-bit indices per byte
    absmax_ptr,    # (n_blocks,) fp32 scales            (when not DOUBLE)
    qabsmax_ptr,   # (n_blocks,) uint8 indices into code2 (when DOUBLE)
    absmax2_ptr,   # (cdiv(n_blocks, BLOCKSIZE2),) fp32  (when DOUBLE)
    code2_ptr,     # (256,) fp32 dynamic map             (when DOUBLE)
    offset_ptr,    # (1,) fp32 mean of the scales         (when DOUBLE)
    code_ptr,      # (16,) fp32 NF4 code map
    out_ptr,       # (n,) output, fp32/fp16/bf16
    n_bytes,
    n,
    HALF_BLOCKSIZE: tl.constexpr,  # blocksize // 2: bytes per quantisation block
    BLOCKSIZE2: tl.constexpr,      # blocks per absmax2 entry (256)
    DOUBLE: tl.constexpr,
    BLOCK: tl.constexpr,           # bytes per program -> 2 * BLOCK outputs
):
    pid = tl.program_id(0)
    byte = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)        # (BLOCK,) byte indices
    in_range = byte < n_bytes
    q = tl.load(packed_ptr + byte, mask=in_range, other=0).to(tl.int32)
    v_even = tl.load(code_ptr + (q >> 4))                         # (BLOCK,) high nibble
    v_odd = tl.load(code_ptr + (q & 0xF))                         # (BLOCK,) low nibble

    blk = byte // HALF_BLOCKSIZE                                  # both nibbles share a block
    if DOUBLE:
        qa = tl.load(qabsmax_ptr + blk, mask=in_range, other=0).to(tl.int32)
        c2 = tl.load(code2_ptr + qa)
        a2 = tl.load(absmax2_ptr + blk // BLOCKSIZE2, mask=in_range, other=0.0)
        scale = c2 * a2 + tl.load(offset_ptr)                     # two roundings (no FMA)
    else:
        scale = tl.load(absmax_ptr + blk, mask=in_range, other=0.0)

    # interleave: (BLOCK, 2) -> (2 * BLOCK,) = even0, odd0, even1, odd1, ...
    w = tl.reshape(tl.join(v_even * scale, v_odd * scale), (2 * BLOCK,))
    idx = pid.to(tl.int64) * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
    tl.store(out_ptr + idx, w.to(out_ptr.dtype.element_ty), mask=idx < n)


def _unpack_absmax(absmax, device):
    """absmax is a fp32 tensor, or the DQ tuple (qabsmax, absmax2, code2, offset)."""
    if isinstance(absmax, torch.Tensor):
        return None
    qabsmax, absmax2, code2, offset = absmax
    if not isinstance(offset, torch.Tensor):
        offset = torch.tensor(float(offset), dtype=torch.float32, device=device)
    return qabsmax, absmax2.float(), code2.float(), offset.reshape(1).float()


def nf4_dequantize_ref(packed, absmax, code, shape, blocksize=64, dtype=torch.float32, blocksize2=256):
    """Pure-torch NF4 (+DQ) dequantisation, operation for operation as bitsandbytes."""
    n = prod(shape)
    dq = _unpack_absmax(absmax, packed.device)
    if dq is not None:
        qabsmax, absmax2, code2, offset = dq
        b = torch.arange(qabsmax.numel(), device=packed.device) // blocksize2
        absmax = code2[qabsmax.long()] * absmax2[b] + offset      # (n_blocks,) fp32
    byte = packed.reshape(-1)
    q = torch.stack((byte >> 4, byte & 0xF), dim=-1).reshape(-1)[:n]   # (n,) high nibble first
    scale = absmax.float().repeat_interleave(blocksize)[:n]           # (n,)
    return (code.float()[q.long()] * scale).to(dtype).reshape(shape)


def nf4_dequantize_triton(packed, absmax, code, shape, blocksize=64, dtype=torch.float32, blocksize2=256):
    """The Triton kernel; same arguments and result as `nf4_dequantize_ref`."""
    n = prod(shape)
    assert blocksize % 2 == 0
    packed = packed.reshape(-1)
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 1) // 2
    dq = _unpack_absmax(absmax, packed.device)
    if dq is None:
        absmax = absmax.float().contiguous()
        qabsmax = absmax2 = code2 = offset = absmax       # unused by the DOUBLE=False kernel
    else:
        qabsmax, absmax2, code2, offset = dq
        absmax = absmax2                                  # unused by the DOUBLE=True kernel
    # The interpreter truncates on a bf16 cast: it writes fp32 and torch rounds to bf16.
    kdtype = torch.float32 if (dtype == torch.bfloat16 and interpreting()) else dtype
    out = torch.empty(n, dtype=kdtype, device=packed.device)
    BLOCK = 1 << 15 if interpreting() else 1024
    grid = (triton.cdiv(packed.numel(), BLOCK),)
    _nf4_dequant_kernel[grid](
        packed, absmax, qabsmax, absmax2, code2, offset, code.float().contiguous(), out,
        packed.numel(), n,
        HALF_BLOCKSIZE=blocksize // 2, BLOCKSIZE2=blocksize2, DOUBLE=dq is not None, BLOCK=BLOCK,
        **launch_options(),
    )
    return out.to(dtype).reshape(shape)


def nf4_dequantize(packed, absmax, code, shape, blocksize=64, dtype=torch.float32, blocksize2=256):
    """Dequantise a packed NF4 weight to a dense `dtype` tensor of `shape`.

    packed    (cdiv(n, 2),) or (cdiv(n, 2), 1) uint8, even element in the high nibble
    absmax    (n_blocks,) fp32, or with double quantisation the tuple
              (qabsmax (n_blocks,) uint8, absmax2 (cdiv(n_blocks, blocksize2),) fp32,
               code2 (256,) fp32, offset scalar)
    code      (16,) fp32 NF4 code map
    """
    f = nf4_dequantize_triton if use_triton(packed) else nf4_dequantize_ref
    return f(packed, absmax, code, shape, blocksize, dtype, blocksize2)


@dataclass
class NF4Weight:
    """A frozen 4-bit weight as plain tensors: what fused LoRA saves instead of a dense W."""

    packed: torch.Tensor
    absmax: object              # fp32 tensor, or (qabsmax, absmax2, code2, offset)
    code: torch.Tensor
    shape: tuple
    blocksize: int = 64
    dtype: torch.dtype = torch.float16
    blocksize2: int = 256

    def dequantize(self, dtype=None):
        return nf4_dequantize(self.packed, self.absmax, self.code, self.shape, self.blocksize,
                              dtype or self.dtype, self.blocksize2)

    @classmethod
    def from_quant_state(cls, packed, state):
        """From packed bytes and either library's quantisation state.

        `state` is pelib's `pelib.quant.QuantState` (e.g. `Linear4bit.quant_state`), whose double
        quantisation fields are `qabsmax`, `absmax2`, `code2`, `offset`, `blocksize2`, or
        bitsandbytes' QuantState (recognised by its `nested` flag; see `from_bnb`). The kernel
        only looks values up in `state.code`, so a 16-entry FP4 code works as NF4 does.
        """
        if hasattr(state, "nested"):                                       # bitsandbytes
            return cls.from_bnb(packed, state)
        if state.qabsmax is not None:                                      # pelib, double quant
            absmax = (state.qabsmax, state.absmax2, state.code2, state.offset)
        else:
            absmax = state.absmax
        return cls(packed, absmax, state.code, tuple(state.shape), state.blocksize, state.dtype,
                   state.blocksize2)

    @classmethod
    def from_bnb(cls, packed, quant_state):
        """From the (packed, QuantState) pair of `bitsandbytes.functional.quantize_4bit`."""
        qs = quant_state
        if qs.nested:
            absmax = (qs.absmax, qs.state2.absmax, qs.state2.code, qs.offset)
            b2 = qs.state2.blocksize
        else:
            absmax, b2 = qs.absmax, 256
        return cls(packed, absmax, qs.code, tuple(qs.shape), qs.blocksize, qs.dtype, b2)
