"""Cross-entropy over a large vocabulary, chunked, with logsumexp computed online.

For a row of logits x (V,) and its label y:

    lse  = log sum_j exp(x_j)           (stable: m + log sum_j exp(x_j - m), m = max_j x_j)
    loss = lse - x_y
    d loss / d x_j = softmax(x)_j - [j == y] = exp(x_j - lse) - [j == y]

Rows whose label is `ignore_index` (-100) contribute nothing; the mean divides by the number of
the other rows (as F.cross_entropy(reduction="mean"); HF's causal-LM loss with
num_items_in_batch uses reduction "sum" and its own divisor, which `scale` below covers).

Chunking. The forward walks each row in chunks of BLOCK_V logits and keeps a running maximum m
and running sum s of exp(x - m): after a chunk with maximum m_c,
    m' = max(m, m_c),   s' = s * exp(m - m') + sum_chunk exp(x - m').
So the logits are read once, in their own dtype, upcast to fp32 only in registers: no fp32
copy of the (N, V) logits is made (HF's loss starts with `logits.float()`). Only lse (N fp32)
is kept. The backward reads the logits once more and writes the gradient once, in the logits'
dtype, into a new buffer, or, with inplace_backward=True, over the saved logits themselves
(as Unsloth does; the logits are garbage afterwards). For SmolLM2 (V = 49152) and 8 x 512
tokens in bf16 that is one 403 MB buffer, where eager torch makes an fp32 copy (805 MB), an fp32
log-softmax (805 MB) and an fp32 gradient (805 MB) before casting it back.

Traffic: forward N*V*B read; backward N*V*B read + N*V*B written (B = bytes per logit).
"""
import torch
import triton
import triton.language as tl

from ._dispatch import interpreting, use_triton
from ._triton_utils import round_to


@triton.jit
def _ce_fwd_kernel(
    x_ptr, y_ptr, loss_ptr, lse_ptr,       # x (N, V) row stride sx; y (N,) int64; loss, lse (N,) fp32
    N, V, sx, ignore_index,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)               # (BLOCK_N,)
    rmask = rows < N
    base = x_ptr + rows[:, None].to(tl.int64) * sx                          # (BLOCK_N, 1)
    m = tl.full((BLOCK_N,), -1e30, tl.float32)                              # running max
    s = tl.zeros((BLOCK_N,), tl.float32)                                    # running sum exp(x - m)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        msk = rmask[:, None] & (cols[None, :] < V)
        x = tl.load(base + cols[None, :], mask=msk, other=0.0).to(tl.float32)
        x = tl.where(msk, x, float("-inf"))                                 # (BLOCK_N, BLOCK_V)
        m_new = tl.maximum(m, tl.max(x, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
        m = m_new
    lse = m + tl.log(tl.where(rmask, s, 1.0))
    y = tl.load(y_ptr + rows, mask=rmask, other=ignore_index)
    valid = rmask & (y != ignore_index)
    x_y = tl.load(x_ptr + rows.to(tl.int64) * sx + tl.where(valid, y, 0), mask=valid,
                  other=0.0).to(tl.float32)
    tl.store(loss_ptr + rows, tl.where(valid, lse - x_y, 0.0), mask=rmask)
    tl.store(lse_ptr + rows, lse, mask=rmask)


@triton.jit
def _ce_bwd_kernel(
    x_ptr, y_ptr, lse_ptr, scale_ptr, dx_ptr,   # dx may alias x (in-place backward)
    N, V, sx, sdx, ignore_index,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    y = tl.load(y_ptr + rows, mask=rmask, other=ignore_index)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    g = tl.where(y != ignore_index, tl.load(scale_ptr), 0.0)                # (BLOCK_N,) d loss / d loss_row
    xb = x_ptr + rows[:, None].to(tl.int64) * sx
    db = dx_ptr + rows[:, None].to(tl.int64) * sdx
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        msk = rmask[:, None] & (cols[None, :] < V)
        x = tl.load(xb + cols[None, :], mask=msk, other=0.0).to(tl.float32)
        p = tl.exp(x - lse[:, None])                                        # softmax chunk
        d = g[:, None] * (p - tl.where(cols[None, :] == y[:, None], 1.0, 0.0))
        # round to nearest even, as the RMSNorm and SwiGLU kernels do (the interpreter's
        # .to(bf16) truncates, which biases every gradient towards zero)
        d = round_to(d, dx_ptr.dtype.element_ty)
        tl.store(db + cols[None, :], d.to(dx_ptr.dtype.element_ty), mask=msk)


def _blocks(N, V, block_v):
    if interpreting():
        BLOCK_N = min(triton.next_power_of_2(N), 64)
        BLOCK_V = block_v or min(triton.next_power_of_2(V), (1 << 16) // BLOCK_N)
    else:
        BLOCK_N, BLOCK_V = 1, block_v or min(triton.next_power_of_2(V), 4096)
    return BLOCK_N, BLOCK_V


class CrossEntropyFunction(torch.autograd.Function):
    """Per-row losses reduced to a sum or mean.

    Saves for backward: the logits tensor itself (the autograd input, no copy), the labels, lse
    (N fp32) and the scalar divisor. No softmax and no gradient is kept between the passes.
    """

    @staticmethod
    def forward(ctx, logits, labels, ignore_index, divisor, inplace_backward, block_v):
        N, V = logits.shape
        if logits.stride(-1) != 1:
            logits = logits.contiguous()
        labels = labels.contiguous()
        loss_rows = torch.empty(N, dtype=torch.float32, device=logits.device)
        lse = torch.empty(N, dtype=torch.float32, device=logits.device)
        BLOCK_N, BLOCK_V = _blocks(N, V, block_v)
        _ce_fwd_kernel[(triton.cdiv(N, BLOCK_N),)](logits, labels, loss_rows, lse, N, V, logits.stride(0),
                                                   ignore_index, BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V)
        ctx.save_for_backward(logits, labels, lse, divisor)
        ctx.ignore_index, ctx.inplace, ctx.block_v = ignore_index, inplace_backward, block_v
        return loss_rows.sum() / divisor

    @staticmethod
    def backward(ctx, dloss):
        logits, labels, lse, divisor = ctx.saved_tensors
        N, V = logits.shape
        dx = logits if ctx.inplace else torch.empty_like(logits)
        scale = (dloss.float() / divisor).reshape(1)                          # device scalar, no sync
        BLOCK_N, BLOCK_V = _blocks(N, V, ctx.block_v)
        _ce_bwd_kernel[(triton.cdiv(N, BLOCK_N),)](logits, labels, lse, scale, dx, N, V, logits.stride(0),
                                                   dx.stride(0), ctx.ignore_index, BLOCK_N=BLOCK_N,
                                                   BLOCK_V=BLOCK_V)
        return dx, None, None, None, None, None


def ce_loss_and_grad_(logits, labels, scale: float, ignore_index=-100) -> torch.Tensor:
    """The chunk step of a fused linear cross-entropy (pelib.linear_ce): returns the sum of the
    rows' losses (an fp32 scalar) and overwrites `logits` (N, V) with scale * (softmax - onehot)
    per labelled row (0 for ignored rows), in the logits' own dtype: the forward kernel, then
    the backward kernel in place. No other (N, V) buffer is made."""
    _check(logits, labels, "sum")
    if logits.stride(-1) != 1 or logits.stride(0) != logits.shape[1]:
        raise ValueError("ce_loss_and_grad_ overwrites the logits in place: pass a contiguous tensor")
    N, V = logits.shape
    labels = labels.contiguous()
    loss_rows = torch.empty(N, dtype=torch.float32, device=logits.device)
    lse = torch.empty(N, dtype=torch.float32, device=logits.device)
    g = torch.full((1,), scale, dtype=torch.float32, device=logits.device)
    BLOCK_N, BLOCK_V = _blocks(N, V, None)
    grid = (triton.cdiv(N, BLOCK_N),)
    _ce_fwd_kernel[grid](logits, labels, loss_rows, lse, N, V, V, ignore_index,
                         BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V)
    _ce_bwd_kernel[grid](logits, labels, lse, g, logits, N, V, V, V, ignore_index,
                         BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V)
    return loss_rows.sum()


def _divisor(labels, ignore_index, reduction, num_items):
    if reduction == "sum":
        return torch.ones((), dtype=torch.float32, device=labels.device)
    if num_items is not None:                                               # HF's gradient accumulation
        return torch.as_tensor(num_items, device=labels.device).float()
    return (labels != ignore_index).sum().float()                          # "mean": 0/0 -> nan, as torch


def cross_entropy_ref(logits, labels, ignore_index=-100, reduction="mean", num_items=None):
    """F.cross_entropy in fp32 (as HF's loss upcasts), with the same reductions as ours."""
    loss = torch.nn.functional.cross_entropy(logits.float(), labels, ignore_index=ignore_index,
                                             reduction="sum")
    return loss / _divisor(labels, ignore_index, reduction, num_items)


def _check(logits, labels, reduction):
    """Shapes and types on the host: the kernel reads one label per row and would read past a
    shorter labels tensor (a crash), or read float labels as indices."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r} (per-row losses: "
                         "use torch.nn.functional.cross_entropy(..., reduction='none'))")
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D (N rows, V classes), got shape {tuple(logits.shape)}; "
                         "flatten it with logits.reshape(-1, V)")
    if logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"logits is empty (shape {tuple(logits.shape)}); pass at least one row and "
                         "one class")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices (torch.long), got {labels.dtype}; "
                         "convert them with labels.long()")
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"labels has shape {tuple(labels.shape)}; expected ({logits.shape[0]},), one "
                         f"label per row of logits {tuple(logits.shape)}")
    if labels.device != logits.device:
        raise ValueError(f"labels are on {labels.device} and logits on {logits.device}; put them on "
                         "one device")


def cross_entropy_triton(logits, labels, ignore_index=-100, reduction="mean", num_items=None,
                         inplace_backward=False, block_v=None):
    _check(logits, labels, reduction)
    V = logits.shape[-1]
    # The kernel would read past the row for such a label and return a finite loss, where torch
    # raises: check on the host (one reduction over N labels).
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
    if bool(bad.any()):
        raise ValueError(f"labels must be in [0, {V}) or ignore_index={ignore_index}; got "
                         f"{labels[bad][:5].tolist()}")
    divisor = _divisor(labels, ignore_index, reduction, num_items)
    return CrossEntropyFunction.apply(logits, labels, ignore_index, divisor, inplace_backward, block_v)


def cross_entropy(logits, labels, ignore_index=-100, reduction="mean", num_items=None,
                  inplace_backward=False):
    """Mean (or sum) cross-entropy of logits (N, V) against labels (N,), skipping ignore_index.

    num_items: divide the summed loss by this count instead of the number of valid labels (HF's
    `num_items_in_batch`). Returns an fp32 scalar.
    """
    _check(logits, labels, reduction)
    if use_triton(logits):
        return cross_entropy_triton(logits, labels, ignore_index, reduction, num_items, inplace_backward)
    return cross_entropy_ref(logits, labels, ignore_index, reduction, num_items)
