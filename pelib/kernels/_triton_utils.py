"""Small `@triton.jit` helpers shared by the kernels."""
import triton
import triton.language as tl


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """Round fp32 `x` to the nearest DTYPE value (ties to even) and return it as fp32.

    Used where the torch peer rounds an intermediate (HF's `hidden_states.to(input_dtype)`).
    bf16 is done on the bits (keep the top 16 bits of the fp32 word, rounding to nearest
    even) because Triton's interpreter truncates in `.to(tl.bfloat16)`; on a GPU the two
    agree. NaN/inf are not special-cased (the kernels never produce them from finite input).
    """
    if DTYPE == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
        y = u.to(tl.float32, bitcast=True)
    elif DTYPE == tl.float32:
        y = x
    else:
        y = x.to(DTYPE).to(tl.float32)
    return y
