"""Benchmarks (never tests): ours against a peer measured in the same run.

    python -m pelib bench lora [--steps 60] [--threads 1]   pelib LoRA vs peft LoRA, s/step
    python -m pelib bench quant [...]                       NF4 dequant vs bitsandbytes (CPU)
    python -m pelib bench kernels [--gpu] [...]             Triton kernels vs torch eager

`lora` trains two MiniLM classifiers, one built by pelib and one by peft, on the same
length-grouped Banking77 batches, alternating steps so both see the same machine load, and
prints the median seconds per step (forward + backward + AdamW) of each and their ratio.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch


def lora_vs_peft(steps: int = 60, threads: int | None = None, r: int = 8) -> dict:
    from peft import LoraConfig, TaskType, get_peft_model

    import pelib
    from pelib.backbone import DEFAULT_TARGETS
    from pelib.train import collate, encode, length_grouped_batches

    if threads:
        torch.set_num_threads(threads)
    targets = DEFAULT_TARGETS["minilm"]
    ours, tokenizer = pelib.load_backbone("minilm", num_labels=77)
    pelib.apply_lora(ours, targets, r=r, alpha=2 * r)
    peer = get_peft_model(pelib.load_backbone("minilm", num_labels=77)[0], LoraConfig(
        task_type=TaskType.SEQ_CLS, r=r, lora_alpha=2 * r, target_modules=targets))
    data = pelib.load_nlu("banking77", "train")
    ids, labels = encode(tokenizer, data.texts, 64), torch.tensor(data.labels)
    batches = length_grouped_batches([len(x) for x in ids], 32, random.Random(0))[:steps]
    models = {"pelib": ours, "peft": peer}
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
            for k, m in models.items()}
    times = {k: [] for k in models}
    for i, index in enumerate(batches):
        batch = collate(ids, index, tokenizer.pad_token_id)
        for k in (("pelib", "peft") if i % 2 else ("peft", "pelib")):  # alternate who goes first
            t0 = time.perf_counter()
            models[k](**batch, labels=labels[index]).loss.backward()
            opts[k].step()
            opts[k].zero_grad()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v[2:]) for k, v in times.items()}  # skip warm-up steps
    out = dict(steps=len(batches), threads=torch.get_num_threads(), pelib_ms=1e3 * med["pelib"],
               peft_ms=1e3 * med["peft"], ratio=med["pelib"] / med["peft"])
    print(f"LoRA r={r} MiniLM, batch 32, {out['steps']} steps, {out['threads']} thread(s): "
          f"pelib {out['pelib_ms']:.1f} ms/step, peft {out['peft_ms']:.1f} ms/step, "
          f"pelib/peft {out['ratio']:.3f}")
    return out


def main(argv: list[str]) -> None:
    what, rest = (argv[0], argv[1:]) if argv else ("", [])
    if what == "lora":
        p = argparse.ArgumentParser(prog="pelib bench lora")
        p.add_argument("--steps", type=int, default=60)
        p.add_argument("--threads", type=int, default=None)
        p.add_argument("--r", type=int, default=8)
        a = p.parse_args(rest)
        lora_vs_peft(a.steps, a.threads, a.r)
    elif what == "quant":
        from .quant.bench import main as quant_main

        quant_main(rest)
    elif what == "kernels":
        from .kernels.bench import main as kernels_main

        kernels_main(rest)
    else:
        raise SystemExit("usage: python -m pelib bench {lora,quant,kernels} [options]; "
                         "see `python -m pelib bench lora --help`")
