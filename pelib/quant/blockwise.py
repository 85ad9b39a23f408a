"""Blockwise absmax quantisation, 4-bit packing and double quantisation (QLoRA, arXiv:2305.14314).

Blockwise absmax. Flatten W (n values), cut it into blocks of B = `blocksize` values and
give each block b its own scale, so one outlier only coarsens its own block:

    absmax_b = max_{i in b} |W_i|
    q_i      = argmin_k |W_i / absmax_b - code_k|      (nearest code value)
    W~_i     = code[q_i] * absmax_b

The nearest code value is found by comparing W_i / absmax_b with the midpoints between
neighbouring sorted code values (`torch.bucketize`); a value exactly on a midpoint goes
to the lower code. A last partial block is padded with zeros (which never change its
absmax) and the padding is dropped again on the way back.

Packing. Two 4-bit indices share a byte; the even element takes the high nibble:
byte_j = q_{2j} << 4 | q_{2j+1}. This is bitsandbytes' layout, so bytes are interchangeable.

Double quantisation (QLoRA section 3). The fp32 absmax costs 32/B bits per weight
(0.5 at B = 64). Quantise the constants themselves: subtract their mean (they are all
positive, and a symmetric 8-bit code would waste its sign), then quantise blockwise with
the 8-bit dynamic map in blocks of B2 = 256:

    offset   = mean_b absmax_b
    qabsmax_b, absmax2_c = quantize_blockwise(absmax - offset, code2, B2)
    absmax_b ~= code2[qabsmax_b] * absmax2_{b // B2} + offset

which costs 8/B + 32/(B*B2) bits per weight: 4.127 bits in all instead of 4.5.

Arithmetic follows bitsandbytes (fp32 absmax, multiply by the fp32 reciprocal, clamp to
[-1, 1]), so the packed bytes match bitsandbytes.functional.quantize_4bit on CPU.

Rounding the double-quantised constants (`dq_rounding`). bitsandbytes' CPU kernel (0.50.2)
rounds the scaled value into one of 65536 bins of [-1, 1], bin = int(((v + 1) / 2) * 65535 + 0.5),
and reads the code nearest that bin's centre from a table: within a bin (3e-5) of a midpoint it
can land one code off (0.2-0.5% of the constants). "bnb" (the default) does the same, so bytes
and state equal the peer's; "nearest" is the exact rule of the equations (notebook 05).
"""
import math
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..dispatch import triton_wanted
from .codes import create_dynamic_map, get_code

SUPPORTED_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DQ_BLOCKSIZE = 256  # blocksize of the second quantisation (QLoRA)
DQ_ROUNDINGS = ("bnb", "nearest")
BNB_BINS = 65536  # bins of [-1, 1] in bitsandbytes' CPU 8-bit quantiser
GRAIN = 32768  # torch's parallel grain size (at::internal::GRAIN_SIZE): smaller ops stay serial

_CODE2: list[torch.Tensor] = []  # the 8-bit dynamic map, built once
_BIN_TABLES: dict = {}  # code (as a tuple) -> its (65536,) bin table
_local = threading.local()  # this thread's scratch tensors (scratch())


def scratch(name: str, numel: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A 1-D tensor of `numel` elements that this thread keeps for the next call asking for `name`
    (grown to the largest asked). A QLoRA step dequantises every layer twice; with its buffers
    reused it allocates nothing on the way, so the heap does not fill with holes between the
    activations. Safe for buffers that never outlive the call that filled them."""
    key = (name, dtype, torch.device(device))
    pool = _local.__dict__.setdefault("pool", {})
    if key not in pool or pool[key].numel() < numel:
        pool.pop(key, None)  # the smaller one goes before the larger one is allocated
        pool[key] = torch.empty(numel, dtype=dtype, device=device)
    return pool[key][:numel]


def _buffer(reuse: bool, name: str, numel: int, dtype: torch.dtype, device) -> torch.Tensor:
    """This thread's scratch `name` with `reuse`, else a new tensor."""
    return scratch(name, numel, dtype, device) if reuse else torch.empty(numel, dtype=dtype, device=device)


def free_scratch() -> None:
    """Drop this thread's scratch tensors."""
    _local.__dict__.pop("pool", None)


def dynamic_code() -> torch.Tensor:
    """The (256,) float32 dynamic map used to quantise the absmax constants."""
    if not _CODE2:
        _CODE2.append(create_dynamic_map(signed=True))
    return _CODE2[0]


@dataclass
class QuantState:
    """Everything besides the packed bytes that dequantisation needs.

    Without double quantisation the scales are `absmax`; with it they are stored as
    (`qabsmax`, `absmax2`, `code2`, `offset`) and `absmax` is None.
    """

    shape: torch.Size
    dtype: torch.dtype  # dtype of the original W, and of dequantize_4bit's output
    blocksize: int
    quant_type: str  # 'nf4' or 'fp4'
    code: torch.Tensor  # (16,) float32
    absmax: torch.Tensor | None = None  # (n_blocks,) float32
    qabsmax: torch.Tensor | None = None  # (n_blocks,) uint8, indices into code2
    absmax2: torch.Tensor | None = None  # (ceil(n_blocks / 256),) float32
    code2: torch.Tensor | None = None  # (256,) float32
    offset: torch.Tensor | None = None  # () float32, mean of the fp32 absmax
    blocksize2: int = DQ_BLOCKSIZE

    @property
    def double_quant(self) -> bool:
        return self.qabsmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    def block_absmax(self, reuse: bool = False) -> torch.Tensor:
        """The fp32 scale of every block, (n_blocks,): stored, or decoded from 8 bits,
        code2[qabsmax_b] * absmax2_{b // B2} + offset (the same fp32 operations as
        dequantize_blockwise(...) + offset, so the same bits). With `reuse` the decoded scales
        are written into this thread's scratch (valid until the next such call).

        The decode is little work (n / B values) in several ops. torch runs an op on more
        than GRAIN elements in parallel, and on a busy machine each fork/join can cost
        milliseconds waiting for a core, more than the work. So decode in pieces of GRAIN
        blocks, each of which runs on the calling thread.
        """
        if not self.double_quant:
            return self.absmax
        n_blocks, B2, device = self.qabsmax.numel(), self.blocksize2, self.qabsmax.device
        absmax = _buffer(reuse, "absmax", n_blocks, torch.float32, device)
        idx = _buffer(reuse, "absmax index", min(GRAIN, n_blocks), torch.int32, device)
        for p0 in range(0, n_blocks, GRAIN):  # GRAIN is a multiple of B2: pieces hold whole blocks
            a, i = absmax[p0 : p0 + GRAIN], idx[: min(GRAIN, n_blocks - p0)]
            i.copy_(self.qabsmax[p0 : p0 + GRAIN])  # uint8 -> int32 (an index, not a mask)
            torch.index_select(self.code2, 0, i, out=a)  # code2[qabsmax]
            full = a.numel() - a.numel() % B2  # a ragged tail only in the last piece
            a[:full].view(-1, B2).mul_(self.absmax2[p0 // B2 : (p0 + full) // B2, None])
            if full < a.numel():
                a[full:].mul_(self.absmax2[-1])
            a.add_(self.offset)
        return absmax

    @classmethod
    def from_bnb(cls, qs) -> "QuantState":
        """The same scales from bitsandbytes' QuantState (`bitsandbytes.functional.quantize_4bit`
        or `bnb.nn.Params4bit.quant_state`): the tensors are shared, not copied. bitsandbytes
        keeps the double-quantised scales as `absmax` (uint8) plus a nested `state2`."""
        state = cls(shape=torch.Size(qs.shape), dtype=qs.dtype, blocksize=qs.blocksize,
                    quant_type=qs.quant_type, code=qs.code)
        if qs.nested:
            state.qabsmax, state.offset = qs.absmax, qs.offset
            state.absmax2, state.code2 = qs.state2.absmax, qs.state2.code
            state.blocksize2 = qs.state2.blocksize
        else:
            state.absmax = qs.absmax
        return state

    def tensors(self) -> dict[str, torch.Tensor]:
        """The per-weight tensors this state stores (what the bits/param ledger counts)."""
        names = ("qabsmax", "absmax2", "offset") if self.double_quant else ("absmax",)
        return {k: getattr(self, k) for k in names}


def _check_finite(x: torch.Tensor, who: str) -> None:
    if not torch.isfinite(x).all():
        n_nan, n_inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
        raise ValueError(
            f"{who}: input has {n_nan} NaN and {n_inf} inf values; absmax scaling needs finite weights"
        )


def _to_blocks(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Flatten to fp32 and pad with zeros to whole blocks: (n_blocks, blocksize)."""
    flat = x.reshape(-1).float()
    pad = -flat.numel() % blocksize
    return F.pad(flat, (0, pad)).view(-1, blocksize)


def nearest_code(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of `code` for each value of `scaled` (ties go down).

    The code need not be sorted (FP4 is in bit-pattern order): sort it, search the midpoints
    of the sorted values, and map the sorted position back to the original index.
    """
    order = torch.argsort(code, stable=True)
    s = code[order]
    midpoints = (s[:-1] + s[1:]) / 2  # float32
    return order[torch.bucketize(scaled, midpoints)]


def bin_table(code: torch.Tensor) -> torch.Tensor:
    """(65536,) int64: for each of bitsandbytes' bins of [-1, 1], the index of the code
    value nearest the bin's centre -1 + 2 i / 65535 (built once per code)."""
    key = tuple(code.tolist())
    if key not in _BIN_TABLES:
        centres = -1.0 + 2.0 * torch.arange(BNB_BINS, dtype=torch.float32) / (BNB_BINS - 1)
        _BIN_TABLES[key] = nearest_code(centres, code.cpu())
    return _BIN_TABLES[key].to(code.device)


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int,
                       rounding: str = "nearest") -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax quantisation: (n,) uint8 indices into `code`, (n_blocks,) fp32 scales.

    rounding="nearest": the nearest code value; "bnb": through bitsandbytes' 65536-bin table.
    """
    if rounding not in DQ_ROUNDINGS:
        raise ValueError(f"rounding must be one of {DQ_ROUNDINGS}, got {rounding!r}")
    n = x.numel()
    blocks = _to_blocks(x, blocksize)  # (n_blocks, B) fp32
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    # Multiply by the reciprocal (as bitsandbytes); an all-zero block keeps q = code index of 0.
    inv = 1.0 / absmax.clamp(min=torch.finfo(torch.float32).tiny)
    scaled = (blocks * inv[:, None]).clamp_(-1, 1).view(-1)  # (n_blocks * B,) in [-1, 1]
    if rounding == "nearest":
        q = nearest_code(scaled, code)
    else:  # the float -> int cast truncates, as the C cast does (the value is >= 0.5)
        q = bin_table(code)[(((scaled + 1) * 0.5) * (BNB_BINS - 1) + 0.5).long()]
    return q[:n].to(torch.uint8), absmax


def dequantize_blockwise(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                         blocksize: int) -> torch.Tensor:
    """code[q] * absmax per block: (n,) float32."""
    n = q.numel()
    values = F.pad(code[q.reshape(-1).long()], (0, -n % blocksize))  # (n_blocks * B,)
    return (values.view(-1, blocksize) * absmax[:, None]).view(-1)[:n]


def pack_4bit(q: torch.Tensor) -> torch.Tensor:
    """(n,) indices < 16 -> (ceil(n/2),) uint8, even element in the high nibble."""
    q = q.reshape(-1).to(torch.uint8)
    if q.numel() % 2:
        raise ValueError("pack_4bit needs an even number of indices (pad first)")
    return (q[0::2] << 4) | q[1::2]


def unpack_4bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """(ceil(n/2),) uint8 -> (n,) uint8 indices: the inverse of pack_4bit."""
    packed = packed.reshape(-1)
    return torch.stack([packed >> 4, packed & 0xF], dim=1).view(-1)[:n]


def quantize_4bit(
    W: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4", double_quant: bool = True,
    dq_rounding: str = "bnb",
) -> tuple[torch.Tensor, QuantState]:
    """Quantise W (any shape; fp32, fp16 or bf16) to packed 4-bit codes.

    Returns (packed, state): packed is (ceil(numel/2),) uint8; state holds the scales.
    dq_rounding ("bnb" or "nearest") picks how the absmax constants find their 8-bit code
    (module docstring); the 4-bit weights always take the nearest code.
    """
    _check_blocksize(blocksize)
    if W.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"quantize_4bit supports float32, float16 and bfloat16 weights, got {W.dtype}")
    if W.numel() == 0:
        raise ValueError("quantize_4bit: W is empty")
    if dq_rounding not in DQ_ROUNDINGS:
        raise ValueError(f"dq_rounding must be one of {DQ_ROUNDINGS}, got {dq_rounding!r}")
    if W.device.type == "meta":
        raise ValueError("quantize_4bit: W is on the meta device and holds no values; load or "
                         "materialise the weights first (model.to_empty(device='cpu'), then load_state_dict)")
    _check_finite(W, "quantize_4bit")
    code = get_code(quant_type).to(W.device)  # also validates quant_type

    n = W.numel()
    q, absmax = quantize_blockwise(W, code, blocksize)  # (n,) uint8, (n_blocks,) fp32
    if n % 2:  # pad one nibble with the index of 0, as zero padding of W would give
        q = torch.cat([q, nearest_code(code.new_zeros(1), code).to(torch.uint8)])
    packed = pack_4bit(q)  # (ceil(n/2),) uint8

    state = QuantState(shape=W.shape, dtype=W.dtype, blocksize=blocksize, quant_type=quant_type, code=code)
    if double_quant:
        code2 = dynamic_code().to(W.device)
        state.offset = absmax.mean()  # () fp32
        state.qabsmax, state.absmax2 = quantize_blockwise(absmax - state.offset, code2, DQ_BLOCKSIZE,
                                                          rounding=dq_rounding)
        state.code2 = code2
    else:
        state.absmax = absmax
    return packed, state


def _check_blocksize(blocksize) -> None:
    # an int: 64.0 == 64 would pass `in` and fail later, deep in a reshape
    if type(blocksize) is not int or blocksize not in SUPPORTED_BLOCKSIZES:
        raise ValueError(f"blocksize {blocksize!r} is not supported; use one of the integers "
                         f"{SUPPORTED_BLOCKSIZES}")


def _check_state(packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None) -> None:
    """Refuse a state that does not describe these bytes: a wrong blocksize or a scale tensor of
    the wrong length would otherwise broadcast, or silently scale blocks by another's absmax."""
    _check_blocksize(state.blocksize)
    if dtype is not None and dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dequantize to float32, float16 or bfloat16, not {dtype}")
    if packed.dtype != torch.uint8 or packed.numel() != -(-state.numel // 2):
        raise ValueError(
            f"packed must hold ceil({state.numel}/2) = {-(-state.numel // 2)} uint8 bytes, "
            f"got {packed.numel()} of {packed.dtype}"
        )
    n_blocks = state.n_blocks
    want = {"code": (16, torch.float32)}
    if state.double_quant:
        if type(state.blocksize2) is not int or state.blocksize2 <= 0:
            raise ValueError(f"state.blocksize2 must be a positive integer, got {state.blocksize2!r}")
        n_blocks2 = -(-n_blocks // state.blocksize2)
        want.update(qabsmax=(n_blocks, torch.uint8), absmax2=(n_blocks2, torch.float32),
                    code2=(256, torch.float32), offset=(1, torch.float32))
    else:
        want["absmax"] = (n_blocks, torch.float32)
    for name, (numel, dt) in want.items():
        t = getattr(state, name)
        if t is None or t.numel() != numel or t.dtype != dt:
            got = "None" if t is None else f"{t.numel()} of {t.dtype}"
            raise ValueError(
                f"state.{name} must hold {numel} {dt} values for {state.numel} weights in blocks of "
                f"{state.blocksize}, got {got}: the state does not belong to these packed bytes "
                "(pass the state quantize_4bit returned with them)"
            )


def dequantize_4bit_ref(packed: torch.Tensor, state: QuantState,
                        dtype: torch.dtype | None = None) -> torch.Tensor:
    """The plain reference: unpack nibbles, look up the code, scale by the block absmax."""
    _check_state(packed, state, dtype)
    q = unpack_4bit(packed, state.numel)  # (n,) uint8
    W = dequantize_blockwise(q, state.block_absmax(), state.code, state.blocksize)  # (n,) fp32
    return W.view(state.shape).to(dtype or state.dtype)


# Byte -> (high nibble, low nibble): the 256 x 2 index table behind the fast path.
_BYTE_NIBBLES = torch.stack([torch.arange(256) >> 4, torch.arange(256) & 0xF], dim=1)  # (256, 2)
# Bytes of packed weights a chunk. With several threads every op is a fork/join (slow on a busy
# machine), so chunks are few and large: 4 MiB, whose int32 indices (16 MiB) stay in a 32 MiB L3.
# On one thread an op costs only its work, and 256 KiB chunks keep the gathered values in L2
# for the multiply (about 30% faster here).
CHUNK_BYTES = 1 << 22
CHUNK_BYTES_1_THREAD = 1 << 18


def dequantize_4bit(
    packed: torch.Tensor,
    state: QuantState,
    dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
    chunk_bytes: int | None = None,
) -> torch.Tensor:
    """Packed bytes + state -> W~ of state.shape, in `dtype` (default: the original dtype).

    `out`, if given, is a contiguous tensor of that shape and dtype to write into; the call then
    allocates nothing after its first (its index and scale buffers are this thread's scratch).

    Fast path, equal (torch.equal) to dequantize_4bit_ref:
      1. a 256-entry table maps a byte straight to its two code values,
         lut[byte] = (code[byte >> 4], code[byte & 15]); viewed as one int64 per byte (the bits of
         two fp32) it is a single 1-D gather per byte instead of unpack + two lookups;
      2. multiply in place by the block absmax;
      3. work through the bytes in chunks, so the int32 indices (index_select wants int32 or
         int64; a uint8 index would be read as a mask) and any fp32 scratch stay in cache:
         the one pass over memory is writing the output. Default chunk size: see CHUNK_BYTES.
    The double-quantised scales are decoded once per call (QuantState.block_absmax).
    Traffic: n/2 bytes read + n * itemsize written (+ 4 n / B for the scales). A new output
    also costs the OS mapping and zeroing its pages, often more than the arithmetic.

    On a GPU (or on the CPU when the kernels backend is "triton": Triton's interpreter) the
    same operations run as one Triton kernel, `pelib.kernels.nf4` (chunk_bytes is not used).
    """
    _check_state(packed, state, dtype)
    n, B = state.numel, state.blocksize
    dtype, device = dtype or state.dtype, packed.device
    if out is not None and (out.shape != state.shape or out.dtype != dtype or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {dtype} tensor of shape {tuple(state.shape)}")
    if chunk_bytes is not None and (type(chunk_bytes) is not int or chunk_bytes <= 0
                                    or chunk_bytes % (B // 2)):
        raise ValueError(f"chunk_bytes must be a positive multiple of blocksize // 2 = {B // 2} bytes "
                         f"(whole blocks), got {chunk_bytes!r}")
    if triton_wanted(packed):  # on a GPU, or with the kernels backend "triton"
        from ..kernels.nf4 import dequantize_4bit_triton  # imports Triton: only when it runs

        t = {k: getattr(state, k) for k in ("absmax", "qabsmax", "absmax2", "code2", "offset")}
        W = dequantize_4bit_triton(packed, state.code, n, B, dtype, **t, blocksize2=state.blocksize2, out=out)
        return W.view(state.shape)
    if chunk_bytes is None:
        chunk_bytes = CHUNK_BYTES_1_THREAD if torch.get_num_threads() == 1 else CHUNK_BYTES
    lut = state.code[_BYTE_NIBBLES.to(device)].reshape(-1).view(torch.int64)  # (256,): two fp32 each
    reuse = out is not None  # the caller manages memory: reuse the scratch buffers too
    absmax = state.block_absmax(reuse)  # (n_blocks,) fp32
    packed = packed.reshape(-1)  # (n_bytes,) uint8
    n_bytes = packed.numel()

    # fp32 with whole bytes is written in place; other dtypes (and an odd n into a given out)
    # go through an fp32 scratch chunk and are rounded on the copy.
    direct = dtype == torch.float32 and (out is None or n % 2 == 0)
    if out is None:
        out = torch.empty(2 * n_bytes if direct else n, dtype=dtype, device=device)
    out_flat = out.view(-1)
    pair_buf = None if direct else _buffer(reuse, "pairs", min(chunk_bytes, n_bytes), torch.int64, device)
    idx = _buffer(reuse, "index", min(chunk_bytes, n_bytes), torch.int32, device)
    for c0 in range(0, n_bytes, chunk_bytes):
        c1 = min(c0 + chunk_bytes, n_bytes)
        i = idx[: c1 - c0]
        i.copy_(packed[c0:c1])  # uint8 -> int32
        pairs = out_flat.view(torch.int64)[c0:c1] if direct else pair_buf[: c1 - c0]
        torch.index_select(lut, 0, i, out=pairs)
        vals = pairs.view(torch.float32)  # (2 * (c1 - c0),) code values
        full = vals.numel() - vals.numel() % B  # whole blocks; a ragged tail only in the last chunk
        b0 = 2 * c0 // B
        vals[:full].view(-1, B).mul_(absmax[b0 : b0 + full // B, None])
        if full < vals.numel():
            vals[full:].mul_(absmax[-1])
        if not direct:
            out_flat[2 * c0 : min(2 * c1, n)].copy_(vals[: min(2 * c1, n) - 2 * c0])  # round to dtype
    return out_flat[:n].view(state.shape)
