"""Rotary position embedding (Su et al. 2021) on Q and K, HF's rotate_half convention.

For a head vector x of dim D = 2 * half at position t, with angles theta_i(t) = t * base^(-2i/D):

    x = [x1 | x2]                     x1 = x[:half], x2 = x[half:]
    rotate_half(x) = [-x2 | x1]
    RoPE(x) = x * cos + rotate_half(x) * sin
            = [x1 * c - x2 * s | x2 * c + x1 * s]     c = cos(theta), s = sin(theta)

HF builds cos/sin as cat(freqs, freqs).cos(), so both halves of cos (and of sin) are equal, and
each pair (x1_i, x2_i) is rotated by +theta_i: a 2x2 orthogonal matrix R. The kernel still reads
both halves, [c1 | c2] and [s1 | s2], and computes [x1 c1 - x2 s1 | x2 c2 + x1 s2]: the
reference's formula for any cos/sin. Per pair that is the matrix M = [[c1, -s1], [s2, c2]]; the
backward is its transpose M^T = [[c1, s2], [-s1, c2]]: the same kernel with (s1, s2) replaced
by (-s2, -s1) (for equal halves, R(-theta)). Because RoPE is linear in x, nothing of q or k is
saved: only cos and sin.

Shapes: q (B, Hq, T, D), k (B, Hk, T, D) (GQA: Hk divides Hq, e.g. SmolLM2 9 and 3 heads, D 64),
any strides (HF passes transposed views); cos, sin (B or 1, T, D). One program takes BLOCK_T
positions of one sequence, loads their cos/sin once and loops over all Hq + Hk heads.
Traffic: (Hq + Hk) * T * D * 2 * bytes (read and write) + cos/sin T * D * 2 * bytes per
sequence; 3 FLOPs per element: bandwidth-bound.
"""
import torch
import triton
import triton.language as tl

from ._dispatch import interpreting, use_triton


@triton.jit
def _rotate_heads(x_ptr, o_ptr, n_heads, sxh, sxt, soh, sot, t, d, m, c1, c2, s1, s2, HALF: tl.constexpr):
    """Rotate every head of one (sequence, position block): x_ptr/o_ptr point at [b, 0, 0, 0]."""
    for h in range(n_heads):
        xp = x_ptr + h * sxh + t[:, None] * sxt + d[None, :]                  # (BLOCK_T, BLOCK_D)
        x1 = tl.load(xp, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(xp + HALF, mask=m, other=0.0).to(tl.float32)
        op = o_ptr + h * soh + t[:, None] * sot + d[None, :]
        tl.store(op, (x1 * c1 - x2 * s1).to(o_ptr.dtype.element_ty), mask=m)
        tl.store(op + HALF, (x2 * c2 + x1 * s2).to(o_ptr.dtype.element_ty), mask=m)


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr,
    Hq, Hk, T,
    sqb, sqh, sqt, skb, skh, skt,          # strides of q, k (last dim contiguous)
    sqob, sqoh, sqot, skob, skoh, skot,    # strides of the outputs
    scb, sct,                              # strides of cos/sin (scb = 0 when broadcast over B)
    HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BACKWARD: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)                     # (BLOCK_T,)
    d = tl.arange(0, BLOCK_D)                                                 # (BLOCK_D,) first half
    m = (t[:, None] < T) & (d[None, :] < HALF)
    cp = b * scb + t[:, None] * sct + d[None, :]
    c1 = tl.load(cos_ptr + cp, mask=m, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + cp + HALF, mask=m, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + cp, mask=m, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + cp + HALF, mask=m, other=0.0).to(tl.float32)
    if BACKWARD:                                                              # M^T: (s1, s2) -> (-s2, -s1)
        s1, s2 = -s2, -s1
    _rotate_heads(q_ptr + b * sqb, qo_ptr + b * sqob, Hq, sqh, sqt, sqoh, sqot, t, d, m, c1, c2, s1, s2, HALF)
    _rotate_heads(k_ptr + b * skb, ko_ptr + b * skob, Hk, skh, skt, skoh, skot, t, d, m, c1, c2, s1, s2, HALF)


def _launch(q, k, cos, sin, backward):
    B, Hq, T, D = q.shape
    Hk = k.shape[1]
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride() == cos.stride() else sin.contiguous()
    if sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()                        # one layout for both
    qo = torch.empty(q.shape, dtype=q.dtype, device=q.device)                # (B, Hq, T, D) contiguous
    ko = torch.empty(k.shape, dtype=k.dtype, device=k.device)                # (B, Hk, T, D)
    scb = 0 if cos.shape[0] == 1 else cos.stride(0)
    HALF = D // 2
    BLOCK_T = min(triton.next_power_of_2(T), 1024 if interpreting() else 32)
    grid = (B, triton.cdiv(T, BLOCK_T))
    _rope_kernel[grid](
        q, k, qo, ko, cos, sin, Hq, Hk, T,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        qo.stride(0), qo.stride(1), qo.stride(2), ko.stride(0), ko.stride(1), ko.stride(2),
        scb, cos.stride(1),
        HALF=HALF, BLOCK_T=BLOCK_T, BLOCK_D=triton.next_power_of_2(HALF), BACKWARD=backward,
    )
    return qo, ko


class RoPEFunction(torch.autograd.Function):
    """(q, k) -> (RoPE(q), RoPE(k)). Saves for backward: cos and sin only (RoPE is linear)."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _launch(q, k, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dqo, dko):
        cos, sin = ctx.saved_tensors
        dq, dk = _launch(dqo, dko, cos, sin, backward=True)
        return dq, dk, None, None


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_ref(q, k, cos, sin, unsqueeze_dim=1):
    """transformers' llama apply_rotary_pos_emb, as plain torch."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _check(q, k, cos, sin):
    """The kernel's shapes, checked on the host (it would read past cos/sin or k otherwise):
    q (B, Hq, T, D), k (B, Hk, T, D), cos and sin (B or 1, T, D)."""
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be 4-D (B, heads, T, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    B, _, T, D = q.shape
    if k.shape[0] != B or k.shape[2:] != (T, D):
        raise ValueError(f"k {tuple(k.shape)} does not fit q {tuple(q.shape)}: batch, positions and "
                         "head_dim must be equal")
    want = f"({B} or 1, {T}, {D})"
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 3 or t.shape[0] not in (1, B) or t.shape[1:] != (T, D):
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {want}: one angle per "
                             "position of q and k (slice it to the input's positions)")
    if cos.shape != sin.shape:
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have one shape")
    if not (q.device == k.device == cos.device == sin.device):
        raise ValueError("q, k, cos and sin must be on one device")


def apply_rope_triton(q, k, cos, sin, unsqueeze_dim=1):
    if unsqueeze_dim not in (1, 2):
        raise ValueError(f"unsqueeze_dim must be 1 (q (B, H, T, D)) or 2 (q (B, T, H, D)), "
                         f"got {unsqueeze_dim!r}")
    if unsqueeze_dim == 2:       # (B, T, H, D) layout: the kernel takes the (B, H, T, D) view
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    _check(q, k, cos, sin)
    if q.shape[-1] % 2:
        raise ValueError(f"head_dim must be even for RoPE (pairs of dimensions rotate), got {q.shape[-1]}")
    qo, ko = RoPEFunction.apply(q, k, cos, sin)
    return (qo.transpose(1, 2), ko.transpose(1, 2)) if unsqueeze_dim == 2 else (qo, ko)


def apply_rope(q, k, cos, sin, unsqueeze_dim=1):
    """Drop-in for HF's apply_rotary_pos_emb (same arguments, same results)."""
    if q.shape[-1] % 2:
        raise ValueError(f"head_dim must be even for RoPE (pairs of dimensions rotate), got {q.shape[-1]}")
    return (apply_rope_triton if use_triton(q) else apply_rope_ref)(q, k, cos, sin, unsqueeze_dim)
