"""NF4 dequantisation, with double quantisation, as one Triton kernel: the GPU fast path of
`pelib.quant.dequantize_4bit`. A leaf: plain tensors in, no state class of its own.

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
         ~148 MB in all: about 31 us at the H200's spec-sheet 4.8 TB/s.
"""
import torch
import triton
import triton.language as tl

from ._dispatch import interpreting, launch_options


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


def dequantize_4bit_triton(packed, code, n, blocksize, dtype, absmax=None, qabsmax=None, absmax2=None,
                           code2=None, offset=None, blocksize2=256, out=None):
    """Launch the kernel on plain tensors; returns the (n,) dequantised values in `dtype`.

    packed   (cdiv(n, 2),) uint8 (any shape of that many bytes), even element in the high nibble
    code     (16,) fp32 code map (NF4, or any 16-entry code such as FP4: it is only looked up)
    absmax   (n_blocks,) fp32 scales, or with double quantisation, instead:
    qabsmax  (n_blocks,) uint8, absmax2 (cdiv(n_blocks, blocksize2),) fp32, code2 (256,) fp32,
             offset () fp32
    out      optional contiguous tensor of n elements of `dtype` to write into

    The one public op is `pelib.quant.dequantize_4bit(packed, state)`, which calls this on a GPU;
    its torch reference is `pelib.quant.dequantize_4bit_ref`.
    """
    double = qabsmax is not None
    packed = packed.reshape(-1)
    if blocksize % 2 or packed.dtype != torch.uint8 or packed.numel() != (n + 1) // 2:
        raise ValueError(f"NF4 dequant needs an even blocksize (got {blocksize}) and (n + 1) // 2 = "
                         f"{(n + 1) // 2} packed uint8 bytes for n = {n} values (got "
                         f"{packed.numel()} of {packed.dtype}): pass the state quantize_4bit made")
    if double:                 # DOUBLE=True never reads absmax_ptr: absmax2 stands in
        absmax2, code2 = absmax2.float().contiguous(), code2.float().contiguous()
        absmax, offset = absmax2, offset.reshape(1).float()
    else:                      # DOUBLE=False reads only absmax_ptr: the others are placeholders
        absmax = qabsmax = absmax2 = code2 = offset = absmax.float().contiguous()
    # The interpreter truncates on a bf16 cast: it writes fp32 and torch rounds to bf16.
    kdtype = torch.float32 if (dtype == torch.bfloat16 and interpreting()) else dtype
    direct = out is not None and kdtype == dtype
    res = out.view(-1) if direct else torch.empty(n, dtype=kdtype, device=packed.device)
    BLOCK = 1 << 15 if interpreting() else 1024
    grid = (triton.cdiv(packed.numel(), BLOCK),)
    _nf4_dequant_kernel[grid](
        packed, absmax, qabsmax, absmax2, code2, offset,
        code.float().contiguous(), res, packed.numel(), n,
        HALF_BLOCKSIZE=blocksize // 2, BLOCKSIZE2=blocksize2, DOUBLE=double, BLOCK=BLOCK,
        **launch_options(),
    )
    if out is None:
        return res.to(dtype)
    if not direct:
        out.view(-1).copy_(res)                             # round fp32 -> bf16 (interpreter)
    return out.view(-1)
