"""The LM head and its cross-entropy without the full logits (a fused linear cross-entropy).

A causal LM's loss over N tokens is the mean over labelled rows of

    z = h W^T            h (N, H) last hidden states, W (V, H) the LM head, z (N, V) logits
    loss_i = lse(z_i) - z_i[y_i],        lse(z) = log sum_j exp(z_j)

For SmolLM2 (V = 49,152) a batch of 16 x 128 tokens has 2,048 x 49,152 logits: 403 MB in fp32,
and eager autograd keeps more than that alive for the backward (the logits, their fp32 softmax).
Two savings, both exact:

1. Only rows that carry a label. An instruction-tuning batch labels the answer alone, a few
   tokens of each example: `h[labels != -100]` first, then the head.
2. Chunks, with the gradient computed in the forward (the idea of Liger-Kernel's fused linear
   cross-entropy and of Cut Cross-Entropy). For a chunk of C rows,

       z_c = h_c W^T                    (C, V), fp32
       p_c = softmax(z_c)
       dz_c = (p_c - onehot(y_c)) / n   n = number of labelled rows (the mean's divisor)
       dh_c = dz_c W                    (C, H)
       dW  += dz_c^T h_c                (V, H)

   and z_c is dropped before the next chunk. The forward keeps dh (N, H) and dW (V, H) instead
   of the logits; the backward only scales them by the incoming gradient of the loss (a scalar).
   The peak extra memory is one chunk's C x V logits instead of N x V.

dW is computed only when W requires a gradient: with LoRA the head is frozen, and skipping
dz^T h saves a third of the head's FLOPs. The matmuls run in h's dtype (bf16 under autocast), the
softmax in fp32, as the unfused path under autocast does.

On a GPU (pelib.dispatch.triton_wanted) the softmax and dz of each chunk are notebook 09's Triton
cross-entropy kernels (`pelib.kernels.cross_entropy_kernel.ce_loss_and_grad_`): z_c stays in h's
dtype, is read once for the log-sum-exp and once more to be overwritten by dz_c, with fp32 only
in registers. On a CPU the chunk is torch's, in fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import triton_wanted

IGNORE_INDEX = -100


def _check(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int) -> None:
    if h.dim() != 2 or weight.dim() != 2 or labels.dim() != 1:
        raise ValueError(f"linear_cross_entropy takes h (N, H), weight (V, H), labels (N,); got "
                         f"{tuple(h.shape)}, {tuple(weight.shape)}, {tuple(labels.shape)}: flatten "
                         "the batch first (h.flatten(0, 1), labels.flatten())")
    if h.shape[1] != weight.shape[1]:
        raise ValueError(f"h has {h.shape[1]} features but the head's weight has {weight.shape[1]}")
    if h.shape[0] != labels.shape[0]:
        raise ValueError(f"{h.shape[0]} hidden rows but {labels.shape[0]} labels: one label per row")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be integer class indices, not {labels.dtype}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive number of rows, not {chunk!r}")


class LinearCrossEntropyFunction(torch.autograd.Function):
    """loss = mean over labelled rows of CE(h W^T, y), in chunks of rows (see the module).

    Saves for backward: dh (N, H) in h's dtype and dW (V, H) in W's dtype (None when W is
    frozen), both already divided by n. Backward: (g * dh, g * dW) for the scalar gradient g.
    """

    @staticmethod
    def forward(ctx, h, weight, labels, chunk):
        valid = labels != IGNORE_INDEX
        n = int(valid.sum())
        if n == 0:
            raise ValueError("no row has a label (every label is -100): the batch has nothing to "
                             "learn from; check that truncation did not cut the answers off")
        V = weight.shape[0]
        bad = valid & ((labels < 0) | (labels >= V))
        if bad.any():
            raise ValueError(f"label {int(labels[bad][0])} is outside the vocabulary [0, {V})")
        want_dh, want_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        kernel = triton_wanted(h)
        if kernel:
            from .kernels.cross_entropy_kernel import ce_loss_and_grad_
        acc = torch.promote_types(h.dtype, torch.float32)            # fp32, or fp64 for fp64
        w = weight.to(h.dtype)                                        # (V, H), once per call
        dh = torch.zeros_like(h) if want_dh else None                 # (N, H)
        dw = torch.zeros(weight.shape, dtype=acc, device=h.device) if want_dw else None
        total = torch.zeros((), dtype=acc, device=h.device)
        for s in range(0, h.shape[0], chunk):
            h_c, y_c = h[s:s + chunk], labels[s:s + chunk]            # (C, H), (C,)
            keep = y_c != IGNORE_INDEX
            if not keep.any():
                continue
            if not keep.all():
                rows = keep.nonzero().squeeze(1)
                h_c, y_c = h_c[rows], y_c[rows]
            if kernel:  # z_c in h's dtype, overwritten by dz_c (fp32 in registers only)
                dz = h_c @ w.T                                        # (C, V)
                total += ce_loss_and_grad_(dz, y_c, 1.0 / n)
            else:
                z = (h_c @ w.T).to(acc)                               # (C, V) logits, fp32
                lse = torch.logsumexp(z, dim=1)                       # (C,)
                total += (lse - z.gather(1, y_c[:, None]).squeeze(1)).sum()
                dz = torch.exp_(z.sub_(lse[:, None]))                 # softmax, in z's memory
                dz[torch.arange(len(y_c), device=z.device), y_c] -= 1.0
                dz = dz.div_(n).to(h.dtype)                           # (C, V)
            if want_dh:
                g = dz @ w                                            # (C, H)
                if keep.all():
                    dh[s:s + chunk] = g
                else:
                    dh[s:s + chunk][rows] = g
            if want_dw:
                dw += (dz.T @ h_c).to(acc)                             # (V, H)
        ctx.save_for_backward(dh, dw.to(weight.dtype) if want_dw else None)
        return total / n

    @staticmethod
    def backward(ctx, grad_loss):
        dh, dw = ctx.saved_tensors
        return (dh * grad_loss.to(dh.dtype) if dh is not None else None,
                dw * grad_loss.to(dw.dtype) if dw is not None else None, None, None)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         chunk: int = 1024) -> torch.Tensor:
    """Mean cross-entropy of the logits h @ weight.T against labels (-100 = no label), without
    ever holding more than `chunk` rows of logits. Equal to `linear_cross_entropy_ref`."""
    _check(h, weight, labels, chunk)
    return LinearCrossEntropyFunction.apply(h, weight, labels, chunk)


def linear_cross_entropy_ref(h: torch.Tensor, weight: torch.Tensor,
                             labels: torch.Tensor) -> torch.Tensor:
    """The unfused path: all N x V logits, then torch's cross-entropy (fp32, as HF's loss)."""
    _check(h, weight, labels, 1)
    return F.cross_entropy((h @ weight.to(h.dtype).T).float(), labels, ignore_index=IGNORE_INDEX)


def shift_for_next_token(hidden: torch.Tensor, labels: torch.Tensor):
    """A causal LM predicts token t+1 from position t: hidden (B, T, H) and labels (B, T) ->
    hidden[:, :-1] and labels[:, 1:], flattened to (B*(T-1), H) and (B*(T-1),)."""
    return hidden[:, :-1].flatten(0, 1), labels[:, 1:].flatten()


def labelled_rows(h: torch.Tensor, labels: torch.Tensor):
    """Keep only the rows that carry a label: (N, H), (N,) -> (n, H), (n,)."""
    keep = labels != IGNORE_INDEX
    return h[keep], labels[keep]
