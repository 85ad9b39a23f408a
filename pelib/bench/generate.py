"""Greedy answers of SmolLM2-135M-Instruct on Banking77 test rows, the prompts' shared prefix run
once against every prompt run whole:

    python -m pelib bench generate [--rows 32] [--batch 16] [--zero-shot] [--repeats 3]

Both ways are pelib.sft.generate_answers (share_prefix on and off), timed in alternating turns,
and must write the same answers (the count of identical ones is printed). The limit is the
prompt pass's: with R rows of T prompt tokens of which P are shared, the prefix run once does
P + R (T - P) tokens' work instead of R T, so the whole-prompt time over that ratio is how fast
the shared-prefix way could be if the prompt pass were all of the work (decoding the answer's
tokens is the same both ways, and is not). `--zero-shot`: the prompt lists the 77 names (the
zero-shot row's prompt), otherwise the fine-tune's prompt. The untrained Instruct model answers
(the answers' quality is not the point). A benchmark, not a test.
"""
import json
import os
import platform

import torch

from ..measure import time_ms
from .options import Parser, int_at_least, positive_int, thread_count


def main(argv: list[str] | None = None) -> None:
    ap = Parser(prog="pelib bench generate", description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int_at_least(2, "test rows; one row shares no prefix"),
                    default=32)
    ap.add_argument("--batch", type=positive_int, default=16, help="rows per generate call")
    ap.add_argument("--zero-shot", action="store_true", help="the prompt that lists the names")
    ap.add_argument("--repeats", type=positive_int, default=3)
    ap.add_argument("--threads", type=thread_count, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from ..backbone import load_backbone
    from ..data import load_nlu
    from ..sft import generate_answers, prompt_ids, shared_prefix

    model, tok = load_backbone("smollm2", task="causal_lm", num_labels=None)
    model.requires_grad_(False)
    test = load_nlu("banking77", "test", limit=args.rows, seed=0)
    names = test.label_names
    prompts = [prompt_ids(tok, t, names if args.zero_shot else None) for t in test.texts]
    R, T, P = len(prompts), sum(map(len, prompts)) / len(prompts), shared_prefix(prompts)

    outs = {}

    def way(share: bool):
        def run():
            outs[share] = generate_answers(model, tok, test.texts, names, zero_shot=args.zero_shot,
                                           batch_size=args.batch, share_prefix=share).texts
        return run

    ms = time_ms({"whole prompts": way(False), "shared prefix": way(True)},
                 repeats=args.repeats, warmup=0)
    ideal = R * T / (P + R * (T - P))                  # prompt tokens' work, whole over shared
    print(json.dumps({
        "rows": R, "batch": args.batch, "zero_shot": args.zero_shot,
        "prompt_tokens_mean": round(T, 1), "shared_prefix_tokens": P,
        "whole_prompts_s": round(ms["whole prompts"] / 1e3, 2),
        "shared_prefix_s": round(ms["shared prefix"] / 1e3, 2),
        "speedup": round(ms["whole prompts"] / ms["shared prefix"], 2),
        "prompt_pass_speedup_limit": round(ideal, 2),
        "identical_answers": sum(a == b for a, b in zip(outs[False], outs[True])),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "load": [round(x, 2) for x in os.getloadavg()]}))
