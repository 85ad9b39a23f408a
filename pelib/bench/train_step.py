"""Seconds per training step and peak memory of one method on a packaged backbone, one method per
process (peak RSS is per process), on a fixed batch of random tokens:

    python -m pelib bench train-step --model smollm2 --method qlora --batch 8 --tokens 128 --steps 4
    python -m pelib bench train-step --model smollm2 --method lora  --batch 8 --tokens 128 --steps 4
    python -m pelib bench train-step --model smollm2 --method lora  --bf16 --base-dtype bfloat16

With --bf16 the step runs under bf16 autocast; --base-dtype bfloat16 also stores the frozen weights
in bf16 (pelib.backbone.cast_frozen), so autocast does not cast them again on every forward.

Prints one JSON line: model state bytes by kind (pelib.quant.qlora_nbytes), the bytes autograd
saves for the backward (activations: storages that are not the model's own tensors), resident
memory with the model built, after the warm-up step, and its peak over the timed steps (sampled
every 20 ms; glibc keeps freed memory, so RSS is a loose upper bound; pelib.measure.PeakMemory),
the median seconds per step (forward + backward + AdamW) after one warm-up step
(pelib.measure.time_ms), and the limit: the step's FLOPs (counted by torch) at this machine's
measured matmul rate (bf16 with --bf16). The peer is the other method, run in its own process
(peak RSS is per process). A benchmark, not a test: on a shared machine the times move with the
load (the line includes the load average).
"""
import ctypes
import gc
import json
import os

import psutil
import torch

from ..measure import MiB, PeakMemory, count_flops, matmul_rate, time_ms
from .options import Parser, int_at_least, positive_int, thread_count


def main(argv: list[str] | None = None) -> None:
    import pelib
    from pelib.backbone import DEFAULT_TARGETS, cast_frozen
    from pelib.quant import apply_qlora, qlora_nbytes

    ap = Parser(prog="pelib bench train-step", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", choices=["minilm", "smollm2"])
    ap.add_argument("--method", default="qlora", choices=["lora", "qlora"])
    ap.add_argument("--r", type=int_at_least(1, "the LoRA rank"), default=8)
    ap.add_argument("--batch", type=positive_int, default=8)
    ap.add_argument("--tokens", type=int_at_least(1, "tokens a row", high=8192), default=128)
    ap.add_argument("--steps", type=positive_int, default=4)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast")
    ap.add_argument("--base-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="dtype of the frozen weights (pelib.backbone.cast_frozen); bfloat16 with --bf16")
    ap.add_argument("--threads", type=thread_count, default=None, help="torch.set_num_threads")
    args = ap.parse_args(argv)
    if args.base_dtype == "bfloat16" and not args.bf16:
        ap.error("--base-dtype bfloat16 stores the frozen weights for bf16 training: add --bf16")
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model, _ = pelib.load_backbone(args.model, num_labels=77)
    inject = apply_qlora if args.method == "qlora" else pelib.apply_lora
    inject(model, DEFAULT_TARGETS[args.model], r=args.r, alpha=2 * args.r)
    cast_frozen(model, getattr(torch, args.base_dtype))
    # transformers maps the checkpoint file: the weights are views of one file-backed storage,
    # whose pages stay resident while any tensor of the file lives, even after quantisation has
    # replaced most of them. Copy the tensors out so the file is unmapped, and give the freed heap
    # back to the OS: the resident size is then what the model really holds.
    for t in {id(t): t for t in [*model.parameters(), *model.buffers()]}.values():
        t.data = t.data.clone()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    rss_model = psutil.Process().memory_info().rss
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, model.config.vocab_size, (args.batch, args.tokens), generator=g)
    labels = torch.randint(0, 77, (args.batch,), generator=g)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved = {}  # storage -> bytes, for what autograd keeps that is not the model's

    def keep(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    def step():
        saved.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16), \
                torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: allocates Adam's moments and the gradient buffers
    rss_before = psutil.Process().memory_info().rss
    with PeakMemory(torch.device("cpu")) as mem:
        ms = time_ms({"step": step}, repeats=args.steps, warmup=0)["step"]
    flops = count_flops(step)
    limit_ms = 1e3 * flops / matmul_rate(dtype=torch.bfloat16 if args.bf16 else torch.float32)
    print(json.dumps(dict(
        model=args.model, method=args.method, r=args.r, batch=f"{args.batch}x{args.tokens}", bf16=args.bf16,
        base_dtype=args.base_dtype,
        threads=torch.get_num_threads(), load_avg=round(os.getloadavg()[0], 2),
        state_MiB={k: round(v / MiB, 1) for k, v in qlora_nbytes(model).items()},
        saved_activations_MiB=round(sum(saved.values()) / MiB, 1),  # of the last step
        rss_model_MiB=round(rss_model / MiB), rss_before_MiB=round(rss_before / MiB),
        peak_rss_MiB=round(mem.peak / MiB),
        s_per_step=round(ms / 1e3, 3), limit_s_per_step=round(limit_ms / 1e3, 3),
        gflop_per_step=round(flops / 1e9, 1))))
