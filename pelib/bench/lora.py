"""LoRA training step, pelib against peft (Hu et al. 2021, y = x W^T + (alpha/r) x A^T B^T).

    python -m pelib bench lora [--steps 60] [--threads 1] [--r 8]

Trains two MiniLM classifiers, one built by pelib and one by peft, on the same length-grouped
Banking77 batches (batch 32, max length 64). pelib.measure.time_ms alternates their steps, so
both see the same machine load; step i of each runs on batch i. Prints the median ms per step
(forward + backward + AdamW) of each, their ratio, and the limit: the step's FLOPs (counted by
torch on a median-length batch) at this machine's measured fp32 matmul rate. Peak memory is what
one more step of each adds to the process (RSS on the CPU: a loose figure, see measure.py).
"""
from __future__ import annotations

import random

import torch

from ..measure import count_flops, matmul_rate, peak_added_mb, time_ms
from .options import Parser, int_at_least, thread_count

WARMUP = 2  # steps of each model before timing


def lora_vs_peft(steps: int = 60, threads: int | None = None, r: int = 8) -> dict:
    import pelib
    from pelib import peers
    from pelib.backbone import DEFAULT_TARGETS
    from pelib.train import collate, encode, length_grouped_batches

    if threads:
        torch.set_num_threads(threads)
    targets = DEFAULT_TARGETS["minilm"]
    ours, tokenizer = pelib.load_backbone("minilm", num_labels=77)
    pelib.apply_lora(ours, targets, r=r, alpha=2 * r)
    peer = peers.lora(pelib.load_backbone("minilm", num_labels=77)[0], targets, r, 2 * r)
    data = pelib.load_nlu("banking77", "train")
    ids, labels = encode(tokenizer, data.texts, 64), torch.tensor(data.labels)
    batches = length_grouped_batches([len(x) for x in ids], 32, random.Random(0))[:steps]
    steps = len(batches)
    models = {"pelib": ours, "peft": peer}
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
            for k, m in models.items()}

    def train_step(k, index):
        models[k](**collate(ids, index, tokenizer.pad_token_id), labels=labels[index]).loss.backward()
        opts[k].step()
        opts[k].zero_grad()

    def runner(k):  # call i trains on batch i (each model walks the same batches)
        it = iter(batches)
        return lambda: train_step(k, next(it))

    ms = time_ms({k: runner(k) for k in models}, repeats=max(steps - WARMUP, 1), warmup=WARMUP)

    # the limit: FLOPs of a step on a median-length batch at the measured matmul rate
    timed = batches[WARMUP:] or batches
    median_batch = sorted(timed, key=lambda b: max(len(ids[i]) for i in b))[len(timed) // 2]
    flops = count_flops(lambda: train_step("pelib", median_batch))
    limit_ms = 1e3 * flops / matmul_rate()
    peak = {k: peak_added_mb(lambda k=k: train_step(k, median_batch))[1] for k in models}

    out = dict(steps=steps, threads=torch.get_num_threads(), pelib_ms=ms["pelib"], peft_ms=ms["peft"],
               ratio=ms["pelib"] / ms["peft"], limit_ms=limit_ms, flops=flops,
               pelib_peak_MB=peak["pelib"], peft_peak_MB=peak["peft"])
    print(f"LoRA r={r} MiniLM, batch 32, {steps} steps, {out['threads']} thread(s): "
          f"pelib {out['pelib_ms']:.1f} ms/step, peft {out['peft_ms']:.1f} ms/step, "
          f"pelib/peft {out['ratio']:.3f}, limit {limit_ms:.1f} ms "
          f"({flops / 1e9:.1f} GFLOP at the measured matmul rate); "
          f"peak added pelib {peak['pelib']:.0f} MiB, peft {peak['peft']:.0f} MiB")
    return out


def main(argv: list[str]) -> None:
    p = Parser(prog="pelib bench lora", description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int_at_least(WARMUP + 1, f"{WARMUP} warm-up steps and at least one "
                                                 "timed"), default=60)
    p.add_argument("--threads", type=thread_count, default=None,
                   help="torch.set_num_threads (default: torch's)")
    p.add_argument("--r", type=int_at_least(1, "the LoRA rank", high=384), default=8,
                   help="LoRA rank (MiniLM's layers are 384 wide)")
    a = p.parse_args(argv)
    lora_vs_peft(a.steps, a.threads, a.r)

