"""The options of `python -m pelib finetune`: the common ones, and one per field of every
method's config in the registry (pelib.methods.METHODS), so the registry is the only source of
the method options; `check` refuses an option the chosen method's config lacks, and settings
out of range (the loop's settings through pelib.settings, the check TrainConfig runs too).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import re

from .backbone import POOLINGS
from .methods import METHODS
from .recipe import HEAD_LR, LABEL_SMOOTHING, TASKS, flags_of
from .settings import check_settings

IMPLS = ("pelib", "peft")


class Parser(argparse.ArgumentParser):
    """argparse, with a bad option answered in one line (argparse prints the whole usage first,
    dozens of lines for finetune)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        """The loop's settings left out take the --task's defaults (pelib.recipe.TASKS), so a
        parsed run always holds the values it trains with."""
        ns, rest = super().parse_known_args(args, namespace)
        task = TASKS.get(getattr(ns, "task", None))
        filled = []
        for k in TASK_DEFAULTS if task else ():
            if getattr(ns, k, None) is None:
                setattr(ns, k, getattr(task, k))
                filled.append(k)
        # which were not given (options() leaves "_" names out of a record); a subcommand's
        # parser has set it already, and its caller finds nothing left to fill
        if task and not hasattr(ns, "_from_task"):
            ns._from_task = tuple(filled)
        return ns, rest


# The finetune options whose default depends on --task.
TASK_DEFAULTS = ("epochs", "batch_size", "max_length")


def task_default(name: str) -> str:
    return ", ".join(f"{t} {getattr(v, name):g}" for t, v in TASKS.items())


def add_arguments(f: argparse.ArgumentParser) -> None:
    """The finetune options: common ones, then one group per method (from the table)."""
    # argparse reads "-1e-3" as an option name (its negative-number rule knows no exponent), so
    # `--lr -1e-3` said "expected one argument"; read it as a number and let the checks answer.
    # "-inf" likewise ("expected one argument"): a negative infinity reaches the checks too.
    f._negative_number_matcher = re.compile(
        r"^-((\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|inf|infinity|nan)$", re.IGNORECASE)
    f.add_argument("--model", default="minilm", choices=["minilm", "smollm2"])
    f.add_argument("--data", default="banking77", choices=["banking77", "clinc150"])
    f.add_argument("--method", default="lora", choices=list(METHODS),
                   help="; ".join(f"{k}: {m.help}" for k, m in METHODS.items()))
    f.add_argument("--impl", default="pelib", choices=IMPLS,
                   help="build the model with pelib or with the peer library peft (methods: "
                        + ", ".join(k for k, m in METHODS.items() if "peft" in m.build) + ")")
    f.add_argument("--task", default="classify", choices=list(TASKS),
                   help="classify: a fresh classification head (default); sft: instruction "
                        "tuning of a causal LM, which writes the label's name (pelib.sft; smollm2)")
    f.add_argument("--constrained", action="store_true",
                   help="--task sft: decode only label names (a prefix trie), not free text")
    f.add_argument("--epochs", type=float, default=None,
                   help=f"default per --task: {task_default('epochs')}")
    f.add_argument("--lr", type=float, default=None,
                   help="default per method: " + ", ".join(f"{k} {m.lr:g}" for k, m in METHODS.items()))
    f.add_argument("--head-lr", type=float, default=None,
                   help=f"the classification head's own lr (default {HEAD_LR:g}; with --method "
                        "head, --lr is the head's lr)")
    f.add_argument("--label-smoothing", type=float, default=None,
                   help="cross-entropy against a target with 1 - eps on the label and eps spread "
                        f"over all classes (default {LABEL_SMOOTHING:g}; 0: plain cross-entropy)")
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
    f.add_argument("--layer-decay", type=float, default=1.0,
                   help="layer-wise lr decay: layer l of L at lr * d**(L - l), the embeddings "
                        "one step lower (default 1: every layer at --lr)")
    f.add_argument("--batch-size", type=int, default=None,
                   help=f"default per --task: {task_default('batch_size')}")
    f.add_argument("--grad-accum", type=int, default=1)
    f.add_argument("--max-length", type=int, default=None,
                   help=f"tokens per row; default per --task: {task_default('max_length')}")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: a CUDA GPU when there is one, else the CPU")
    f.add_argument("--bf16", action="store_true",
                   help="bf16 autocast also on a CPU without bf16 hardware (slower there); it is "
                        "the default on a GPU and on CPUs with AVX-512 BF16 or AMX")
    f.add_argument("--fp32", action="store_true", help="no bf16 autocast, on any device")
    f.add_argument("--base-dtype", default="auto", choices=["auto", "bf16", "fp32"],
                   help="how the frozen weights are stored: auto (default) bf16 when training runs "
                        "under bf16 autocast, fp32 otherwise (pelib.backbone.cast_frozen)")
    f.add_argument("--no-kernels", action="store_true",
                   help="on a GPU, do not swap pelib's Triton kernels into SmolLM2 (pelib.patch)")
    f.add_argument("--train-limit", type=int, default=None, help="train on a seeded subset")
    f.add_argument("--eval-limit", type=int, default=None)
    f.add_argument("--eval-split", default="test", choices=["dev", "test"])
    f.add_argument("--tiny", action="store_true", help="a toy-size random model (for tests)")
    f.add_argument("--out", default="results")
    f.add_argument("--name", default=None, help="run name (file stem under --out)")
    f.add_argument("--save-adapter", default=None, metavar="DIR",
                   help="write the trained adapter in peft's format to DIR (--method "
                        + ", ".join(k for k, m in METHODS.items() if m.save) + "; sora's pruned "
                        "to plain LoRA)")
    f.add_argument("--overwrite", action="store_true",
                   help="replace results of a run with other options under the same name, and "
                        "the adapter files in --save-adapter DIR")
    f.add_argument("--no-progress", action="store_true")
    f.add_argument("--resume", action="store_true",
                   help="checkpoint to OUT/NAME.ckpt while training and continue from it if it "
                        "exists (removed once the results are written)")
    f.add_argument("--checkpoint-every", type=int, default=50,
                   help="optimizer steps between checkpoints")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for dest, (field, owners) in method_options().items():
        g = groups.get(owners[0]) or groups.setdefault(
            owners[0], f.add_argument_group(f"options of --method {owners[0]}"))
        kw = dict(field.metadata["argparse"])
        if isinstance(field.default, bool):
            kw["action"] = "store_true"
        shown = "" if field.default is None or isinstance(field.default, bool) else \
            f"; default {field.default:g}" if isinstance(field.default, float) else \
            f"; default {field.default}"
        g.add_argument(*flags_of(field), dest=dest, default=None,
                       help=f"{field.metadata['help']} (--method {', '.join(owners)}{shown})", **kw)


def method_options() -> dict[str, tuple[dataclasses.Field, list[str]]]:
    """Every method option: its config field and the methods whose configs have it (the
    registry's configs are the only source of these options)."""
    out: dict[str, tuple[dataclasses.Field, list[str]]] = {}
    for name, m in METHODS.items():
        for field in m.config.options():
            out.setdefault(field.name, (field, []))[1].append(name)
    return out


def config_of(args):
    """The method's config: the options given, the recipe for the rest."""
    return METHODS[args.method].config.from_options(vars(args))


def parse(argv: list[str]) -> argparse.Namespace:
    """The finetune options of `argv` (without the word `finetune`)."""
    p = Parser(prog="pelib finetune")
    add_arguments(p)
    return p.parse_args(argv)


def options(args) -> dict:
    """The options of a run as a plain dict (what its record stores and compare compares)."""
    return {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "command"}


# The options that are settings of the training loop (pelib.train.TrainConfig's fields).
LOOP_SETTINGS = ("epochs", "lr", "head_lr", "max_grad_norm", "weight_decay", "warmup_ratio",
                 "label_smoothing", "layer_decay", "batch_size", "grad_accum", "max_length",
                 "checkpoint_every", "head_init", "schedule")


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


# A seed torch, random and numpy all take (torch.manual_seed overflows past 2**64 - 1).
SEED_MAX = 2**32 - 1
# The longest --name: its files (NAME.json, NAME_loss.png, .NAME.lock and the temporaries
# .NAME.json.<pid>.<random>.tmp) must fit a file system's 255 bytes per file name.
NAME_MAX = 200
# compare writes summary.json / summary_<preset>.json beside the runs: no run takes those names.
SUMMARY_NAME = re.compile(r"^summary(_.*)?$")


def check(args) -> None:
    """Options that do not fit the method: a clear error, never silently ignored."""
    method = METHODS[args.method]
    check_task(args)
    if args.impl not in method.build:
        peft = [k for k, m in METHODS.items() if args.impl in m.build]
        raise ValueError(f"--impl {args.impl} is only for --method {', '.join(peft)}, "
                         f"not {args.method}")
    own = {f.name for f in method.config.options()}
    for dest, (field, owners) in method_options().items():
        if dest not in own and getattr(args, dest, None) is not None:
            raise ValueError(f"{flags_of(field)[0]} is an option of --method {', '.join(owners)}, "
                             f"not {args.method}")
    if args.save_adapter is not None and method.save is None:
        savers = ", ".join(k for k, m in METHODS.items() if m.save)
        raise ValueError(f"--save-adapter writes an adapter file peft reads, and --method "
                         f"{args.method} has none; drop --save-adapter, or train --method {savers}")
    if args.save_adapter is not None and args.impl != "pelib":
        raise ValueError(f"--save-adapter writes the adapter of pelib's build, and --impl "
                         f"{args.impl} builds peft's model; drop --impl {args.impl} (pelib writes "
                         "the same file format)")
    if method.config.head_lr is None and args.head_lr is not None:
        raise ValueError(f"--method {args.method} trains only the head: set its lr with --lr, "
                         "not --head-lr")
    if args.pooling is not None:
        if args.pooling not in POOLINGS[args.model]:
            raise ValueError(f"--pooling {args.pooling} is not one of {args.model}'s "
                             f"{list(POOLINGS[args.model])}")
    # the loop's settings: the same check as pelib.train.TrainConfig, in the flags' names
    check_settings({k: getattr(args, k) for k in LOOP_SETTINGS}, name=flag_of)
    if getattr(args, "r", None) is not None and args.r <= 0:
        raise ValueError(f"--r must be a positive integer, got {args.r}")
    for flag in ("train_limit", "eval_limit"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be a positive number of rows, got {v}")
    if args.name is not None and (not args.name or re.search(r"[/\\]|^\.\.?$", args.name)):
        raise ValueError(f"--name {args.name!r} must be a plain file stem (no path separators); "
                         "use --out to choose the folder")
    check_name(args.name)
    if args.head_init == "probe" and args.train_limit is not None and args.train_limit < 2:
        raise ValueError("--head-init probe standardises the features over the training rows, "
                         f"which needs at least 2; got --train-limit {args.train_limit}; use "
                         "--train-limit >= 2 or --head-init random")
    if args.bf16 and args.fp32:
        raise ValueError("--bf16 and --fp32 contradict each other; pass one of them")
    if args.base_dtype == "bf16" and args.fp32:
        raise ValueError("--base-dtype bf16 stores the frozen weights for bf16 training, which "
                         "--fp32 turns off; drop --fp32, or use --base-dtype auto")
    if args.base_dtype == "bf16" and args.method == "full":
        raise ValueError("--base-dtype bf16 stores the frozen weights, and --method full trains "
                         "every weight; drop --base-dtype")
    if not 0 <= args.seed <= SEED_MAX:
        raise ValueError(f"--seed must be an integer in [0, {SEED_MAX}], got {args.seed}")
    for dest, (field, _) in method_options().items():
        v = getattr(args, dest, None)
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"{flags_of(field)[0]} must be a finite number, got {v}")


# Methods that train nothing but a classification head: nothing to train without one.
HEAD_ONLY = ("head",)
# Options of the classification head, refused by --task sft (a causal LM writes its answer with
# its own LM head): the flag and why.
HEAD_OPTIONS = {"head_lr": "--head-lr", "label_smoothing": "--label-smoothing",
                "pooling": "--pooling"}


# What the zero-shot row does not do: train. Its options, with the value that means "not given".
TRAINING = {"lr": None, "max_grad_norm": None, "train_limit": None, "grad_accum": 1,
            "weight_decay": 0.0, "warmup_ratio": 0.06, "schedule": "linear", "layer_decay": 1.0}


def check_zero_shot(args) -> None:
    """--method zero-shot scores the untrained model by generation: --task sft, and no option
    of training (one given would be silently ignored)."""
    if args.task != "sft":
        raise ValueError("--method zero-shot scores the untrained Instruct model by generation, "
                         "which is --task sft; add --task sft (the classifier's floor is --method "
                         "head)")
    given = [k for k in TASK_DEFAULTS if k not in getattr(args, "_from_task", TASK_DEFAULTS)]
    given += [k for k, v in TRAINING.items() if getattr(args, k) != v]
    if given:
        raise ValueError(f"{flag_of(given[0])} is an option of training, and --method zero-shot "
                         "trains nothing (0 steps); drop it")


def check_task(args) -> None:
    """--task sft: a causal LM (smollm2), a method that trains more than a head, no head options."""
    if args.method == "zero-shot":
        check_zero_shot(args)
    if args.task != "sft":
        if args.constrained:
            raise ValueError("--constrained is a decoding option of --task sft; drop it, or pass "
                             "--task sft")
        return
    if args.model != "smollm2":
        raise ValueError(f"--task sft needs a causal LM: {args.model} is an encoder without an LM "
                         "head; use --model smollm2")
    if args.method in HEAD_ONLY:
        raise ValueError(f"--method {args.method} trains only a classification head, and --task "
                         "sft has none (the LM head writes the answer); choose another method, "
                         "e.g. --method lora, or --task classify")
    if args.impl != "pelib":
        raise ValueError(f"--impl {args.impl} builds --task classify runs; with --task sft pelib "
                         "builds the method (pelib.save_adapter writes a file peft loads); drop "
                         "--impl")
    for dest, flag in HEAD_OPTIONS.items():
        if getattr(args, dest) is not None:
            raise ValueError(f"{flag} is an option of the classification head (--task classify); "
                             "--task sft has no head: drop it")
    if args.head_init != "random":
        raise ValueError(f"--head-init {args.head_init} initialises a classification head (--task "
                         "classify); --task sft has no head: drop it")


def check_name(name: str | None) -> None:
    """A run name is a file name pelib writes beside others: text, short, not compare's."""
    if name is None:
        return
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:  # a byte that is not UTF-8 reaches argv as a lone surrogate
        raise ValueError(f"--name {name.encode('utf-8', 'replace').decode()!r} is not valid "
                         "UTF-8 text; pass a name in letters, digits, '-' and '_'") from None
    if size > NAME_MAX:
        raise ValueError(f"--name is {size} bytes long; use at most {NAME_MAX} (its files must "
                         "fit the file system's 255 bytes per name)")
    if SUMMARY_NAME.match(name):
        raise ValueError(f"--name {name} is where `pelib compare` writes its summary "
                         f"({name}.json); choose another name")
