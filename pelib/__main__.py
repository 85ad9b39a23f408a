"""Command line: `python -m pelib finetune ...` (and `pelib finetune ...` once installed).

    python -m pelib finetune --model minilm --data banking77 --method lora --r 8 --epochs 3

prints a result table and writes results/<run>.json (metrics, trainable parameters, time, peak
memory, config) and results/<run>_loss.png.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

METHODS = ("full", "lora", "qlora", "adapter", "prefix", "adalora", "sora")
# prefix: 1e-2 (common without the MLP) collapsed to chance through the MLP on Banking77;
# 3e-3 beat 1e-3 on the dev split.
DEFAULT_LR = {"full": 1e-4, "lora": 2e-3, "qlora": 2e-3, "adapter": 1e-3, "prefix": 3e-3,
              "adalora": 2e-3, "sora": 2e-3}


# SoRA: threshold eta_t * xi with the gates' own lr, xi 0.05 -> 0.45 over 3 stages: the better of
# two settings on the Banking77 dev split (docs/benchmarks.md says how they were chosen).
SORA_DEFAULTS = {"sparse_lambda": 0.05, "sparse_lambda_max": 0.45, "sparse_stages": 3,
                 "gate_lr": 1e-2}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pelib", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("compare", help="every method side by side: `compare --preset workshop|full|smoke`")
    sub.add_parser("bench", help="benchmarks: `bench lora|quant|kernels` (see pelib/bench.py)")
    f = sub.add_parser("finetune", help="fine-tune a packaged backbone on a packaged data set")
    f.add_argument("--model", default="minilm", choices=["minilm", "smollm2"])
    f.add_argument("--data", default="banking77", choices=["banking77", "clinc150"])
    f.add_argument("--method", default="lora", choices=METHODS)
    f.add_argument("--impl", default="pelib", choices=["pelib", "peft"],
                   help="build the LoRA / AdaLoRA model with pelib or with the peer library peft")
    f.add_argument("--r", type=int, default=8)
    f.add_argument("--alpha", type=float, default=None, help="default: 2*r")
    f.add_argument("--rslora", action="store_true")
    f.add_argument("--dropout", type=float, default=0.0)
    f.add_argument("--targets", nargs="+", default=None, help="default: the backbone's usual set")
    f.add_argument("--adapter-kind", default="houlsby", choices=["houlsby", "pfeiffer"])
    f.add_argument("--bottleneck", type=int, default=64, help="adapter width m")
    f.add_argument("--prefix-length", type=int, default=16, help="prefix tuning: L_p")
    f.add_argument("--prefix-hidden", type=int, default=None,
                   help="width of the prefix MLP (default: the model width)")
    f.add_argument("--init-r", type=int, default=12, help="AdaLoRA: triplets per module at start")
    f.add_argument("--target-r", type=int, default=8, help="AdaLoRA: average triplets at the end")
    f.add_argument("--tinit", type=int, default=None,
                   help="AdaLoRA: steps before pruning starts (default: 10%% of the run)")
    f.add_argument("--tfinal", type=int, default=None,
                   help="AdaLoRA: steps at the final rank pattern (default: 30%% of the run)")
    f.add_argument("--delta-t", type=int, default=10, help="AdaLoRA: steps between two maskings")
    f.add_argument("--orth-reg-weight", type=float, default=0.5,
                   help="AdaLoRA: weight of the orthogonal regulariser (peft's default)")
    f.add_argument("--sparse-lambda", type=float, default=None,
                   help="SoRA: sparsity xi of the gates' L1 prox (first stage if a schedule); "
                        f"default {SORA_DEFAULTS['sparse_lambda']}")
    f.add_argument("--sparse-lambda-max", type=float, default=None,
                   help="SoRA: xi of the last stage (default "
                        f"{SORA_DEFAULTS['sparse_lambda_max']}; = --sparse-lambda: no schedule)")
    f.add_argument("--sparse-stages", type=int, default=None,
                   help="SoRA: stages from --sparse-lambda to --sparse-lambda-max, splitting the "
                        f"run evenly (default {SORA_DEFAULTS['sparse_stages']})")
    f.add_argument("--gate-lr", type=float, default=None,
                   help=f"SoRA: lr of the gates (default {SORA_DEFAULTS['gate_lr']})")
    f.add_argument("--threshold-scale", default="lr", choices=["lr", "none"],
                   help="SoRA: prox threshold lr*xi (the paper) or xi (the official code)")
    f.add_argument("--prox-variant", default="exact", choices=["exact", "official"],
                   help="SoRA: exact soft threshold, or the official code's update")
    f.add_argument("--gate-init", default="ones", choices=["ones", "normal"])
    f.add_argument("--save-adapter", default=None, metavar="DIR",
                   help="SoRA: write the pruned adapter (peft LoRA format) to DIR")
    f.add_argument("--epochs", type=float, default=3)
    f.add_argument("--lr", type=float, default=None, help=f"default per method: {DEFAULT_LR}")
    f.add_argument("--batch-size", type=int, default=32)
    f.add_argument("--grad-accum", type=int, default=1)
    f.add_argument("--max-length", type=int, default=64)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--bf16", action="store_true", help="bf16 autocast (a real speed-up on AMX CPUs)")
    f.add_argument("--train-limit", type=int, default=None, help="train on a seeded subset")
    f.add_argument("--eval-limit", type=int, default=None)
    f.add_argument("--eval-split", default="test", choices=["dev", "test"])
    f.add_argument("--tiny", action="store_true", help="a toy-size random model (for tests)")
    f.add_argument("--out", default="results")
    f.add_argument("--name", default=None, help="run name (file stem under --out)")
    f.add_argument("--no-progress", action="store_true")
    f.add_argument("--resume", action="store_true",
                   help="checkpoint to OUT/NAME.ckpt while training and continue from it if it "
                        "exists (removed once the results are written)")
    f.add_argument("--checkpoint-every", type=int, default=50, help="optimizer steps between checkpoints")
    return p


def writable_dir(path: str) -> Path:
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".pelib-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise SystemExit(f"pelib: cannot write results to {out}/ ({e.strerror}); pass --out DIR "
                         "with a folder you can write to")
    return out


def build(args, cfg):
    """The model with the method injected, its tokenizer, the train split, and the method's
    training hooks (see pelib/train.py: AdaLoRA's allocator, SoRA's proximal step)."""
    import pelib
    from pelib.backbone import DEFAULT_TARGETS

    data = pelib.load_nlu(args.data, "train", limit=args.train_limit, seed=args.seed)
    n_labels = len(data.label_names)
    if args.tiny:
        model, tokenizer = pelib.tiny_backbone(args.model, n_labels, seed=args.seed)
    else:
        import torch

        torch.manual_seed(args.seed)  # the new classification head
        model, tokenizer = pelib.load_backbone(args.model, num_labels=n_labels)
    targets = args.targets or DEFAULT_TARGETS[args.model]
    alpha = args.alpha if args.alpha is not None else \
        2 * (args.init_r if args.method == "adalora" else args.r)
    hooks = []
    if args.method == "adalora":
        hooks = [build_adalora(args, cfg, model, targets, alpha, len(data.texts))]
        if args.impl == "peft":
            model = hooks[0].model
    elif args.method == "lora" and args.impl == "peft":
        from peft import LoraConfig, TaskType, get_peft_model

        model = get_peft_model(model, LoraConfig(
            task_type=TaskType.SEQ_CLS, r=args.r, lora_alpha=alpha, lora_dropout=args.dropout,
            target_modules=targets, use_rslora=args.rslora))
    elif args.method == "qlora" and args.impl == "peft":
        model = peft_qlora(model, targets, r=args.r, alpha=alpha, dropout=args.dropout,
                           use_rslora=args.rslora)
    elif args.method == "lora":
        pelib.apply_lora(model, targets, r=args.r, alpha=alpha, dropout=args.dropout,
                         use_rslora=args.rslora)
    elif args.method == "sora" and args.impl == "pelib":
        from pelib.sora import SoRA, apply_sora

        apply_sora(model, targets, r=args.r, alpha=alpha, dropout=args.dropout,
                   gate_init=args.gate_init)
        from pelib.train import total_steps

        schedule = sora_schedule(args)
        schedule.begin(total_steps(len(data.texts), cfg))  # a schedule must end within the run
        hooks.append(SoRA(schedule, gate_lr=sora_arg(args, "gate_lr"),
                          lr_scaled=args.threshold_scale == "lr", variant=args.prox_variant))
    elif args.method == "adapter" and args.impl == "pelib":
        from pelib.adapter import apply_adapters

        apply_adapters(model, kind=args.adapter_kind, bottleneck=args.bottleneck)
    elif args.method == "prefix" and args.impl == "pelib":
        from pelib.prefix import apply_prefix

        apply_prefix(model, prefix_length=args.prefix_length, hidden=args.prefix_hidden)
    elif args.method == "prefix" and args.impl == "peft":
        from peft import PrefixTuningConfig, TaskType, get_peft_model

        hidden = model.config.hidden_size
        model = get_peft_model(model, PrefixTuningConfig(
            task_type=TaskType.SEQ_CLS, num_virtual_tokens=args.prefix_length,
            prefix_projection=True, encoder_hidden_size=args.prefix_hidden or hidden))
    elif args.impl == "peft":
        raise SystemExit(f"pelib: --impl peft is only for --method lora, qlora, adalora or prefix, "
                         f"not {args.method}")
    elif args.method == "qlora":  # NF4 + double quantisation base, fp32 LoRA (pelib.quant)
        pelib.quant.apply_qlora(model, targets, r=args.r, alpha=alpha, dropout=args.dropout,
                                use_rslora=args.rslora)
    return model, tokenizer, data, hooks


def peft_qlora(model, targets, r, alpha, dropout, use_rslora):
    """The peer's QLoRA: the same weights reloaded through transformers' bitsandbytes NF4 +
    double quantisation (fp32 compute, the head kept dense), then peft's LoRA on top."""
    import tempfile

    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    heads = [n for n in ("classifier", "score") if hasattr(model, n)]  # pelib keeps these dense
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32,
                                llm_int8_skip_modules=heads)
    with tempfile.TemporaryDirectory() as tmp:  # same base weights and head as pelib's run
        model.save_pretrained(tmp)
        model = AutoModelForSequenceClassification.from_pretrained(
            tmp, quantization_config=config, dtype=torch.float32, device_map="cpu",
            attn_implementation=model.config._attn_implementation)
    return get_peft_model(model, LoraConfig(
        task_type=TaskType.SEQ_CLS, r=r, lora_alpha=alpha, lora_dropout=dropout,
        target_modules=targets, use_rslora=use_rslora))


class PeftAdaLoRA:
    """Hook for --impl peft: peft adds the regulariser in forward; update_and_allocate must be
    called after every optimizer step, or peft silently trains plain LoRA (peft #1801)."""

    def __init__(self, model):
        self.model, self.history = model, []

    def state_dict(self) -> dict:  # for checkpoints: peft's allocator keeps its scores here
        ra = self.model.base_model.rankallocator
        return dict(history=self.history, ipt=ra.ipt, exp_avg_ipt=ra.exp_avg_ipt,
                    exp_avg_unc=ra.exp_avg_unc, rank_pattern=self.model.peft_config["default"].rank_pattern)

    def load_state_dict(self, state: dict) -> None:
        ra = self.model.base_model.rankallocator
        self.history, ra.ipt, ra.exp_avg_ipt, ra.exp_avg_unc = (
            state["history"], state["ipt"], state["exp_avg_ipt"], state["exp_avg_unc"])
        self.model.peft_config["default"].rank_pattern = state["rank_pattern"]

    def step(self, model, step):
        model.base_model.update_and_allocate(step)
        pattern = model.peft_config["default"].rank_pattern
        ranks = None if pattern is None else \
            {k.removesuffix(".default").removesuffix(".lora_E"): sum(v) for k, v in pattern.items()}
        self.history.append(dict(step=step, ranks=ranks,
                                 budget=model.base_model.rankallocator.budget_schedule(step)[0]))


def adalora_schedule(args, total: int) -> tuple[int, int]:
    """tinit, tfinal: 10% warm-up at full rank, 30% at the final pattern unless given."""
    tinit = args.tinit if args.tinit is not None else round(0.1 * total)
    tfinal = args.tfinal if args.tfinal is not None else round(0.3 * total)
    return tinit, tfinal


def build_adalora(args, cfg, model, targets, alpha, n_train):
    from pelib.train import total_steps

    if args.target_r > args.init_r:
        raise ValueError(f"--target-r {args.target_r} exceeds --init-r {args.init_r}; AdaLoRA "
                         "only prunes: lower --target-r or raise --init-r")
    total = total_steps(n_train, cfg)
    tinit, tfinal = adalora_schedule(args, total)
    if tinit >= total - tfinal:
        raise ValueError(f"--tinit {tinit} + --tfinal {tfinal} leave no steps to prune in a run "
                         f"of {total} steps: lower them or train for more epochs")
    if args.impl == "peft":
        from peft import AdaLoraConfig, TaskType, get_peft_model

        return PeftAdaLoRA(get_peft_model(model, AdaLoraConfig(
            task_type=TaskType.SEQ_CLS, init_r=args.init_r, target_r=args.target_r,
            lora_alpha=alpha, lora_dropout=args.dropout, target_modules=targets, tinit=tinit,
            tfinal=tfinal, deltaT=args.delta_t, orth_reg_weight=args.orth_reg_weight,
            total_step=total)))
    from pelib.adalora import RankAllocator, apply_adalora

    apply_adalora(model, targets, init_r=args.init_r, alpha=alpha, dropout=args.dropout)
    return RankAllocator(model, target_r=args.target_r, tinit=tinit, tfinal=tfinal,
                         deltaT=args.delta_t, orth_reg_weight=args.orth_reg_weight,
                         total_step=total)
def sora_arg(args, key):
    value = getattr(args, key)
    return SORA_DEFAULTS[key] if value is None else value


def sora_schedule(args):
    from pelib.sora import SparsitySchedule

    start, end = sora_arg(args, "sparse_lambda"), sora_arg(args, "sparse_lambda_max")
    stages = sora_arg(args, "sparse_stages") if start != end else 1
    return SparsitySchedule.linear(start, end, stages)


def run_name(args) -> str:
    if args.name:
        return args.name
    method = args.method + {"full": "", "lora": f"-r{args.r}", "qlora": f"-r{args.r}",
                            "adapter": f"-{args.adapter_kind}-m{args.bottleneck}",
                            "prefix": f"-L{args.prefix_length}",
                            "adalora": f"-r{args.init_r}to{args.target_r}",
                            "sora": f"-r{args.r}"}[args.method]
    return "_".join([args.model + ("-tiny" if args.tiny else ""), args.data, method, args.impl,
                     f"s{args.seed}"])


def plot_losses(losses: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io import atomic_write

    k = max(1, len(losses) // 50)  # moving average over ~2% of the run
    smooth = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1])
              for i in range(len(losses))]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses, alpha=0.3, label="loss per step")
    ax.plot(smooth, label=f"moving average ({k} steps)")
    ax.set(xlabel="optimizer step", ylabel="cross-entropy", title=title)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def table(rows: list[dict]) -> str:
    cols = ["run", "acc", "P", "R", "F1", "trainable", "s/epoch", "peak MB"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        m = r["metrics"]
        lines.append(f"| {r['name']} | {m['accuracy']:.4f} | {m['precision']:.4f} | "
                     f"{m['recall']:.4f} | {m['f1']:.4f} | {r['trainable_params']:,} | "
                     f"{r['seconds_per_epoch']:.1f} | {r['peak_memory_mb']:.0f} |")
    return "\n".join(lines)


def sora_summary(model, args) -> dict:
    """Live ranks per module and parameter counts before/after pruning (a pruned copy)."""
    import copy

    from pelib.inject import trainable_parameters
    import torch

    from pelib.sora import export_lora, live_ranks, prune, sora_layers

    live = live_ranks(model)
    gates = torch.cat([m.gate.detach().abs() for _, m in sora_layers(model)])
    pruned = prune(copy.deepcopy(model))
    summary = dict(live_ranks=live, live_ranks_total=sum(live.values()),
                   live_gate_abs_mean=float(gates[gates > 0].mean()) if (gates > 0).any() else 0.0,
                   initial_ranks_total=args.r * len(live),
                   params_before_pruning=trainable_parameters(model),
                   params_after_pruning=trainable_parameters(pruned))
    if args.save_adapter:
        export_lora(model, args.save_adapter)
        summary["adapter"] = args.save_adapter
    return summary


def finetune(args) -> dict:
    import pelib
    from pelib.io import atomic_write
    from pelib.train import TrainConfig, train

    if args.save_adapter and args.method != "sora":
        raise SystemExit("pelib: --save-adapter writes SoRA's pruned adapter; use it with "
                         "--method sora")
    out = writable_dir(args.out)
    if args.r <= 0:
        raise SystemExit(f"pelib: --r must be a positive integer, got {args.r}")
    name = run_name(args)
    ckpt = out / f"{name}.ckpt" if args.resume else None
    try:
        cfg = TrainConfig(epochs=args.epochs, lr=args.lr or DEFAULT_LR[args.method],
                          batch_size=args.batch_size, grad_accum=args.grad_accum,
                          max_length=args.max_length, bf16=args.bf16, seed=args.seed,
                          progress=not args.no_progress, checkpoint=ckpt and str(ckpt),
                          checkpoint_every=args.checkpoint_every)
        model, tokenizer, data, hooks = build(args, cfg)
    except (ValueError, TypeError) as e:
        raise SystemExit(f"pelib: {e}")
    evaluation = pelib.load_nlu(args.data, args.eval_split, limit=args.eval_limit, seed=args.seed)
    dev = pelib.load_nlu(args.data, "dev", limit=args.eval_limit, seed=args.seed)
    try:
        result = train(model, tokenizer, data, evaluation, cfg, hooks=hooks, dev_data=dev)
    except ValueError as e:  # e.g. a checkpoint left by a run with other settings
        raise SystemExit(f"pelib: {e}")
    record = dict(name=name, **asdict(result), seconds_per_epoch=result.train_seconds / args.epochs,
                  args=vars(args), eval_split=args.eval_split, train_rows=len(data.texts),
                  eval_rows=len(evaluation.texts))
    for h in hooks if args.method == "adalora" else ():  # the budget per step, final ranks
        if getattr(h, "history", None):
            record["adalora"] = dict(budget=[e["budget"] for e in h.history],
                                     final_ranks=h.history[-1]["ranks"],
                                     schedule=dict(zip(("tinit", "tfinal"),
                                                       adalora_schedule(args, result.steps)),
                                                   deltaT=args.delta_t, total_step=result.steps))
    if args.method == "sora":
        record["sora"] = sora_summary(model, args)
        s = record["sora"]
        print(f"SoRA: {s['live_ranks_total']} of {s['initial_ranks_total']} ranks live; "
              f"{s['params_after_pruning']:,} adapter parameters after pruning "
              f"({s['params_before_pruning']:,} before)")
    atomic_write(out / f"{name}.json",
                 lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2)))
    plot_losses(result.losses, out / f"{name}_loss.png", name)
    if ckpt and ckpt.exists():
        ckpt.unlink()  # the results are written: nothing left to resume
    print(table([record]))
    print(f"wrote {out / name}.json and {out / name}_loss.png")
    return record


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["compare"]:  # the whole study: see pelib/compare.py
        from .compare import main as compare_main

        compare_main(argv[1:])
        return 0
    if argv[:1] == ["bench"]:  # sub-benchmarks parse their own options
        from .bench import main as bench_main

        bench_main(argv[1:])
        return 0
    args = parser().parse_args(argv)
    if args.command == "finetune":
        finetune(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
