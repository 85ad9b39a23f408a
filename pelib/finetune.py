"""`python -m pelib finetune`: fine-tune a packaged backbone on a packaged data set, one run.

    python -m pelib finetune --model minilm --data banking77 --method lora --r 8 --epochs 3

prints a result table and writes results/<run>.json (metrics, trainable parameters, time, peak
memory, config) and results/<run>_loss.png. The methods and their options come from the method
table (pelib.methods); this module only turns options into a run.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
from dataclasses import asdict
from pathlib import Path

from . import distributed
from .backbone import DEFAULT_TARGETS, POOLINGS
from .files import atomic_write, open_lock, writable_dir
from .methods import HEAD_LR, LABEL_SMOOTHING, METHODS, Run

IMPLS = ("pelib", "peft")


def add_arguments(f: argparse.ArgumentParser) -> None:
    """The finetune options: common ones, then one group per method (from the table)."""
    # argparse reads "-1e-3" as an option name (its negative-number rule knows no exponent), so
    # `--lr -1e-3` said "expected one argument"; read it as a number and let the checks answer.
    f._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
    f.add_argument("--model", default="minilm", choices=["minilm", "smollm2"])
    f.add_argument("--data", default="banking77", choices=["banking77", "clinc150"])
    f.add_argument("--method", default="lora", choices=list(METHODS),
                   help="; ".join(f"{k}: {m.help}" for k, m in METHODS.items()))
    f.add_argument("--impl", default="pelib", choices=IMPLS,
                   help="build the model with pelib or with the peer library peft (methods: "
                        + ", ".join(k for k, m in METHODS.items() if "peft" in m.build) + ")")
    # --lora-r: under torchrun, whose own parser reads "--r" as a prefix of its --rdzv-* options
    f.add_argument("--r", "--lora-r", type=int, default=8, help="the LoRA rank")
    f.add_argument("--alpha", type=float, default=None, help="default: 2*r")
    f.add_argument("--rslora", action="store_true")
    f.add_argument("--dropout", type=float, default=0.0)
    f.add_argument("--targets", nargs="+", default=None, help="default: the backbone's usual set")
    f.add_argument("--epochs", type=float, default=3)
    f.add_argument("--lr", type=float, default=None,
                   help="default per method: " + ", ".join(f"{k} {m.lr:g}" for k, m in METHODS.items()))
    f.add_argument("--head-lr", type=float, default=None,
                   help=f"the classification head's own lr (default {HEAD_LR:g}; with --method "
                        "head, --lr is the head's lr)")
    f.add_argument("--head-init", default="random", choices=["random", "probe"],
                   help="probe: fit the head as a linear probe on the frozen features before "
                        "fine-tuning (LP-FT, pelib.probe)")
    f.add_argument("--pooling", default=None, choices=["mean", "cls", "last"],
                   help="how the classifier pools token states: minilm mean (default) or cls, "
                        "smollm2 last")
    f.add_argument("--max-grad-norm", type=float, default=None,
                   help="clip the gradient norm before each step (default: no clipping)")
    f.add_argument("--weight-decay", type=float, default=0.0,
                   help="AdamW's decoupled weight decay on the weight matrices (biases and "
                        "LayerNorm scales are not decayed; default 0)")
    f.add_argument("--warmup-ratio", type=float, default=0.06,
                   help="the share of the steps over which the lr warms up linearly from 0 "
                        "(then it follows --schedule; default 0.06)")
    f.add_argument("--schedule", default="linear", choices=["linear", "cosine", "constant"],
                   help="the lr after the warm-up: linear decay to 0 (default), half a cosine "
                        "down to 0, or constant")
    f.add_argument("--label-smoothing", type=float, default=LABEL_SMOOTHING,
                   help="cross-entropy against a target with 1 - eps on the label and eps spread "
                        f"over all classes (default {LABEL_SMOOTHING:g}; 0: plain cross-entropy)")
    f.add_argument("--layer-decay", type=float, default=1.0,
                   help="layer-wise lr decay: layer l of L at lr * d**(L - l), the embeddings "
                        "one step lower (default 1: every layer at --lr)")
    f.add_argument("--batch-size", type=int, default=32)
    f.add_argument("--grad-accum", type=int, default=1)
    f.add_argument("--max-length", type=int, default=64)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: a CUDA GPU when there is one, else the CPU")
    f.add_argument("--bf16", action="store_true",
                   help="bf16 autocast also on a CPU without bf16 hardware (slower there); it is "
                        "the default on a GPU and on CPUs with AVX-512 BF16 or AMX")
    f.add_argument("--fp32", action="store_true", help="no bf16 autocast, on any device")
    f.add_argument("--no-kernels", action="store_true",
                   help="on a GPU, do not swap pelib's Triton kernels into SmolLM2 (pelib.patch)")
    f.add_argument("--train-limit", type=int, default=None, help="train on a seeded subset")
    f.add_argument("--eval-limit", type=int, default=None)
    f.add_argument("--eval-split", default="test", choices=["dev", "test"])
    f.add_argument("--tiny", action="store_true", help="a toy-size random model (for tests)")
    f.add_argument("--out", default="results")
    f.add_argument("--name", default=None, help="run name (file stem under --out)")
    f.add_argument("--overwrite", action="store_true",
                   help="replace results of a run with other options under the same name")
    f.add_argument("--no-progress", action="store_true")
    f.add_argument("--resume", action="store_true",
                   help="checkpoint to OUT/NAME.ckpt while training and continue from it if it "
                        "exists (removed once the results are written)")
    f.add_argument("--checkpoint-every", type=int, default=50,
                   help="optimizer steps between checkpoints")
    owners = {}
    for name, m in METHODS.items():
        if m.options is not None:
            g = f.add_argument_group(f"--method {name}")
            m.options(g)
            owners.update({a.dest: name for a in g._group_actions})
    f.set_defaults(_owners=owners)


def parse(argv: list[str]) -> argparse.Namespace:
    """The finetune options of `argv` (without the word `finetune`)."""
    p = argparse.ArgumentParser(prog="pelib finetune")
    add_arguments(p)
    return p.parse_args(argv)


def options(args) -> dict:
    """The options of a run as a plain dict (what its record stores and compare compares)."""
    return {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "command"}


# The value an option had before its default changed: a record written without it ran at that.
BEFORE = {"label_smoothing": 0.0}

# Options that do not change a run's numbers: where it writes, whether it shows progress.
NOT_NUMBERS = {"no_progress", "resume", "checkpoint_every", "command", "out", "name", "overwrite"}


def same_run(a: dict | None, b: dict) -> bool:
    """Do two option sets give the same numbers? (None: unknown, so no)"""
    if a is None:
        return False
    # an option added since a record was written: its default then (BEFORE), else its default
    defaults = {**options(parse([])), **BEFORE}
    a, b = {**defaults, **a}, {**defaults, **b}
    return ({k: v for k, v in a.items() if k not in NOT_NUMBERS}
            == {k: v for k, v in b.items() if k not in NOT_NUMBERS})


def run_name(args) -> str:
    if args.name:
        return args.name
    model = args.model + ("-tiny" if args.tiny else "") + (f"-{args.pooling}" if args.pooling else "")
    return "_".join([model, args.data,
                     args.method + METHODS[args.method].tag(args), args.impl, f"s{args.seed}"])


def check(args) -> None:
    """Options that do not fit the method: a clear error, never silently ignored."""
    method = METHODS[args.method]
    if args.impl not in method.build:
        peft = [k for k, m in METHODS.items() if args.impl in m.build]
        raise ValueError(f"--impl {args.impl} is only for --method {', '.join(peft)}, "
                         f"not {args.method}")
    defaults = parse([])
    for dest, owner in getattr(args, "_owners", {}).items():
        if owner != args.method and getattr(args, dest) != getattr(defaults, dest):
            flag = "--" + dest.replace("_", "-")
            raise ValueError(f"{flag} is an option of --method {owner}, not {args.method}")
    if args.method == "head" and args.head_lr is not None:
        raise ValueError("--method head trains only the head: set its lr with --lr, not --head-lr")
    if args.pooling is not None:
        if args.pooling not in POOLINGS[args.model]:
            raise ValueError(f"--pooling {args.pooling} is not one of {args.model}'s "
                             f"{list(POOLINGS[args.model])}")
    if not 0 <= args.weight_decay < float("inf"):  # also refuses nan
        raise ValueError(f"--weight-decay must be a finite number >= 0, got {args.weight_decay}")
    if not 0 <= args.warmup_ratio < 1:
        raise ValueError(f"--warmup-ratio is a share of the steps in [0, 1), got {args.warmup_ratio}")
    if not 0 <= args.label_smoothing < 1:
        raise ValueError(f"--label-smoothing is a share of the target in [0, 1), got "
                         f"{args.label_smoothing}")
    if not 0 < args.layer_decay <= 1:
        raise ValueError(f"--layer-decay must be in (0, 1] (1: no decay), got {args.layer_decay}")
    if args.r <= 0:
        raise ValueError(f"--r must be a positive integer, got {args.r}")
    for flag in ("train_limit", "eval_limit"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be a positive number of rows, got {v}")
    if args.name is not None and (not args.name or re.search(r"[/\\]|^\.\.?$", args.name)):
        raise ValueError(f"--name {args.name!r} must be a plain file stem (no path separators); "
                         "use --out to choose the folder")


def plot_losses(losses: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def device_of(args) -> str:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA GPU; use --device auto or cpu")
    return "cuda" if args.device == "cuda" or (args.device == "auto" and
                                               torch.cuda.is_available()) else "cpu"


def cpu_has_fast_bf16() -> bool:
    """Does this CPU multiply bf16 in hardware (AVX-512 BF16 or AMX)? On AVX2 alone bf16
    matmuls are converted to fp32 and run slower than fp32 (docs/benchmarks.md)."""
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private: may vanish
    return any(getattr(torch.cpu, f, lambda: False)() for f in probes)


def uses_bf16(args) -> bool:
    """bf16 autocast unless --fp32: on a GPU, and on a CPU with bf16 hardware or with --bf16."""
    if args.fp32:
        return False
    return args.bf16 or device_of(args) == "cuda" or cpu_has_fast_bf16()


def uses_kernels(args) -> bool:
    """pelib's Triton kernels (pelib.patch) on a GPU for the Llama backbone, unless --no-kernels."""
    return device_of(args) == "cuda" and args.model == "smollm2" and not args.no_kernels


def build(args, cfg):
    """The model with the method injected, its tokenizer, the train split and the hooks."""
    import torch

    from .backbone import load_backbone, tiny_backbone
    from .data import load_nlu
    from .train import total_steps

    data = load_nlu(args.data, "train", limit=args.train_limit, seed=args.seed)
    n_labels = len(data.label_names)
    if args.tiny:
        model, tokenizer = tiny_backbone(args.model, n_labels, seed=args.seed, pooling=args.pooling)
    else:
        torch.manual_seed(args.seed)  # the new classification head
        model, tokenizer = load_backbone(args.model, num_labels=n_labels, pooling=args.pooling)
    device = device_of(args)
    run = Run(targets=args.targets or DEFAULT_TARGETS[args.model],
              total_steps=total_steps(len(data.texts), cfg), device=device)
    model, hooks = METHODS[args.method].build[args.impl](model, args, run)
    model.to(device)
    if uses_kernels(args):
        from .patch import patch

        patch(model)  # RMSNorm, RoPE, SwiGLU and the LoRA linears on Triton kernels
    return model, tokenizer, data, hooks


@contextlib.contextmanager
def _only_process(out: Path, name: str):
    """One process per run name and folder: a second would share (and fight over) its files.
    The lock file goes when the run ends; a process that locked a file another had just removed
    sees that the path is no longer its file and locks the new one."""
    path = out / f".{name}.lock"
    while True:
        lock = open_lock(path)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise ValueError(f"another process is running {name} in {out}/ right now; wait for it "
                             "to finish, or pass another --name") from None
        try:
            if os.stat(path).st_ino == os.fstat(lock.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        lock.close()
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # still holding the lock: no one else owns this path
        lock.close()


def finetune(args) -> dict:
    """One run: build, train, evaluate, write the record and the loss curve; return the record.
    Bad options raise ValueError with a message that names the fix."""
    check(args)
    name = run_name(args)
    if distributed.rank() != 0:  # under torchrun: rank 0 alone checks, locks and writes
        record = _finetune(args, Path(args.out), name)
    else:
        out = writable_dir(args.out)
        with _only_process(out, name):
            record = _finetune(args, out, name)
    distributed.finish()  # under torchrun: every process leaves the group after rank 0 wrote
    return record


def _finetune(args, out: Path, name: str) -> dict:
    from .data import load_nlu
    from .train import TrainConfig, train

    previous = out / f"{name}.json"
    # never replace another run's results
    if distributed.rank() == 0 and previous.exists() and not args.overwrite:
        try:
            theirs = json.loads(previous.read_text())["args"]
        except (ValueError, KeyError, TypeError):
            theirs = None
        if not same_run(theirs, options(args)):
            raise ValueError(f"{previous} holds a run with other options; pass --name to keep "
                             "both, or --overwrite to replace it")
    ckpt = out / f"{name}.ckpt" if args.resume else None
    method = METHODS[args.method]
    lr = method.lr if args.lr is None else args.lr
    head_lr = lr if args.method == "head" else HEAD_LR if args.head_lr is None else args.head_lr
    cfg = TrainConfig(epochs=args.epochs, lr=lr, head_lr=head_lr,
                      batch_size=args.batch_size, grad_accum=args.grad_accum,
                      max_length=args.max_length, bf16=uses_bf16(args), seed=args.seed,
                      progress=not args.no_progress, checkpoint=ckpt and str(ckpt),
                      checkpoint_every=args.checkpoint_every,
                      max_grad_norm=args.max_grad_norm, head_init=args.head_init,
                      weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio,
                      schedule=args.schedule, label_smoothing=args.label_smoothing,
                      layer_decay=args.layer_decay,
                      run={k: v for k, v in options(args).items() if k not in NOT_NUMBERS})
    model, tokenizer, data, hooks = build(args, cfg)
    evaluation = load_nlu(args.data, args.eval_split, limit=args.eval_limit, seed=args.seed)
    dev = load_nlu(args.data, "dev", limit=args.eval_limit, seed=args.seed)
    result = train(model, tokenizer, data, evaluation, cfg, hooks=hooks, dev_data=dev)
    record = dict(name=name, **asdict(result), seconds_per_epoch=result.train_seconds / args.epochs,
                  args=options(args), eval_split=args.eval_split, train_rows=len(data.texts),
                  eval_rows=len(evaluation.texts), device=device_of(args), bf16=uses_bf16(args),
                  kernels=uses_kernels(args))
    if distributed.rank() != 0:
        return record  # the same weights and metrics as rank 0's, which writes them
    report = method.report(model, hooks, args, result.steps) if method.report else None
    if report:
        record[args.method] = report
    atomic_write(out / f"{name}.json",
                 lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2)))
    plot_losses(result.losses, out / f"{name}_loss.png", name)
    if ckpt and ckpt.exists():
        ckpt.unlink()  # the results are written: nothing left to resume
    print(table([record]))
    print(f"wrote {out / name}.json and {out / name}_loss.png")
    return record
