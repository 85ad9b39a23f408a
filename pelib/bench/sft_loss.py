"""The LM head's bill in one instruction-tuning loss step, three ways, on SmolLM2's shapes:

    python -m pelib bench sft-loss [--batch 16] [--tokens 64] [--answer 6] [--chunk 1024]

- all logits: the head over every position, then torch's cross-entropy in fp32 (what
  `model(..., labels=...)` does in transformers);
- labelled rows: the head only where a label is (the answer's tokens), then the same loss;
- chunked: pelib.linear_ce, the head and the loss over the labelled rows in chunks, the
  gradients made in the forward: the logits of one chunk at a time.

For each: the bytes autograd keeps for the backward (the ledger: saved tensors, each storage
once, without the head and the hidden states, which exist anyway), the peak RSS the forward +
backward add (sampled, a loose upper bound), and the median ms of forward + backward, timed in
alternating turns. The hidden states are random (B, T, H) with a frozen head (V, H) (LoRA
freezes it; SmolLM2 ties it to the embedding), in bf16 where the CPU multiplies bf16 in hardware
and fp32 elsewhere (`--dtype`). The limit: the head's FLOPs at this machine's measured matmul
rate in that dtype. A benchmark, not a test.
"""
import json
import os
import platform

import torch

from ..linear_ce import labelled_rows, linear_cross_entropy, linear_cross_entropy_ref
from ..measure import MiB, cpu_has_fast_bf16, matmul_rate, peak_added_mb, time_ms
from .options import Parser, positive_int


def _saved_bytes(fn, inputs) -> tuple[torch.Tensor, int]:
    """fn()'s result and the bytes autograd saved for its backward, each storage once, the
    storages of `inputs` (the head, the hidden states: they exist anyway) not counted."""
    seen, total = {t.untyped_storage().data_ptr() for t in inputs}, [0]

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total[0] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total[0]


def main(argv: list[str] | None = None) -> None:
    ap = Parser(prog="pelib bench sft-loss", description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=positive_int, default=16)
    ap.add_argument("--tokens", type=positive_int, default=64, help="sequence length T")
    ap.add_argument("--answer", type=positive_int, default=6, help="labelled tokens per row")
    ap.add_argument("--chunk", type=positive_int, default=1024, help="rows per chunk")
    ap.add_argument("--vocab", type=positive_int, default=49152)
    ap.add_argument("--hidden", type=positive_int, default=576)
    ap.add_argument("--repeats", type=positive_int, default=5)
    ap.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                    help="of the head and hidden states; auto: bf16 where the CPU multiplies it in "
                         "hardware (as finetune trains), else fp32")
    args = ap.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(
        args.dtype, torch.bfloat16 if cpu_has_fast_bf16() else torch.float32)
    if args.answer >= args.tokens:
        raise SystemExit(f"pelib: --answer {args.answer} must be below --tokens {args.tokens}")

    g = torch.Generator().manual_seed(0)
    B, T, H, V = args.batch, args.tokens, args.hidden, args.vocab
    w = (torch.randn(V, H, generator=g) / H**0.5).to(dtype)              # frozen head (V, H)
    hidden = torch.randn(B * T, H, generator=g).to(dtype).requires_grad_()  # (B*T, H)
    labels = torch.full((B, T), -100)
    labels[:, T - args.answer:] = torch.randint(0, V, (B, args.answer), generator=g)
    labels = labels.flatten()                                              # (B*T,)

    ways = {
        "all logits": lambda: linear_cross_entropy_ref(hidden, w, labels),
        "labelled rows": lambda: linear_cross_entropy_ref(*_rows(hidden, labels, w)),
        "chunked": lambda: linear_cross_entropy(*_rows(hidden, labels, w), chunk=args.chunk),
    }
    result = {}
    for name, fn in ways.items():
        loss, kept = _saved_bytes(fn, (w, hidden))
        del loss
        _, rss = peak_added_mb(lambda fn=fn: fn().backward())
        result[name] = {"ledger_mb": round(kept / MiB, 1), "peak_rss_added_mb": round(rss, 1)}
    ms = time_ms({k: (lambda fn=fn: fn().backward()) for k, fn in ways.items()},
                 repeats=args.repeats)
    n = B * args.answer
    limit_ms = 1e3 * 2 * 2 * n * H * V / matmul_rate(dtype=dtype)          # z and dh
    for k in ways:
        result[k]["ms"] = round(ms[k], 1)
    print(json.dumps({"shape": {"B": B, "T": T, "H": H, "V": V, "labelled": n}, "dtype": str(dtype),
                      **result, "limit_ms_labelled_rows": round(limit_ms, 1),
                      "cpu": platform.processor() or platform.machine(),
                      "load": [round(x, 2) for x in os.getloadavg()]}))


def _rows(hidden, labels, w):
    h, y = labelled_rows(hidden, labels)
    return h, w, y
