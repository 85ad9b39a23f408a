"""The course's comparison: every method on the same data, seeds and loop, with the peer beside.

    python -m pelib compare --preset workshop     # `make run`: MiniLM, 7 rows, one epoch each
    python -m pelib compare --preset seeds        # the workshop rows over 3 seeds
    python -m pelib compare --preset full         # every method, both data sets, 3 epochs x 3 seeds (hours)
    python -m pelib compare --preset llm          # SmolLM2: head, full, LoRA, QLoRA, SoRA, one epoch (hours)
    python -m pelib compare --preset sft          # SmolLM2 SFT: zero-shot floor, LoRA, QLoRA, SoRA, DoRA
    python -m pelib compare --preset sft-seeds    # SFT LoRA and QLoRA over 3 seeds (seed 0 is reused)
    python -m pelib compare --preset lr           # each method's lr at 1/2, 1, 2x: dev F1
    python -m pelib compare --preset lr-clinc150  # the same grid on CLINC150's dev split
    python -m pelib compare --preset sft-lr       # SFT LoRA's lr at 1/2, 1, 2x on a third of an epoch
    python -m pelib compare --preset smoke        # toy models, seconds (runs inside `make test`)
    python -m pelib compare --preset full --finished   # run nothing: tables of the runs done

Each run is one `python -m pelib finetune ... --resume` in its own process, so its peak memory
is its own and an interrupted comparison picks up where it stopped: finished runs (their
results/<name>.json exists with the same arguments) are skipped, and the run that was cut off
continues from its last checkpoint. At the end: results/summary.md (one table per model and
data set, mean and spread over seeds, and each run's memory ledger beside its peak) and three
figures: F1 against trainable parameters, memory (the ledger stacked by kind, the peak as a
marker), and loss curves (presets other than workshop add their name: summary_seeds.md).
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .files import atomic_write, writable_dir
from .methods import METHODS
from .options import Parser, options, parse
from .report import figures, floor, summary
from .runs import QUIET_STOP, finished, is_record, read_args, read_record, run_name

# what callers reach through pelib.compare (notebook 10 reads summary; the reliability tests
# read records through the private names)
__all__ = ["main", "preset", "run_all", "summary", "Row", "ROWS"]
_read_args, _read_record = read_args, read_record


@dataclass(frozen=True)
class Row:
    """One row of a table: its label, the registry entry it trains, the finetune options it
    adds to the method's recipe, and the implementation (pelib or the peer library)."""

    label: str
    method: str  # a key of pelib.methods.METHODS
    options: tuple[str, ...] = ()
    impl: str = "pelib"

    def argv(self) -> list[str]:
        return ["--method", self.method, *self.options] + \
            (["--impl", self.impl] if self.impl != "pelib" else [])


# Every row the presets draw from, by name. One learning rate per method: its recipe's
# (pelib.methods.METHODS[m].config.lr, chosen on the Banking77 dev split, docs/benchmarks.md);
# DATA_LR below for the ones that CLINC150's dev split moved.
ROWS = {
    "head": Row("head only (floor)", "head"),  # the frozen backbone: every row is read against it
    "full": Row("full fine-tuning", "full"),
    "lora": Row("LoRA r=8", "lora", ("--r", "8")),
    "dora": Row("DoRA r=8", "dora", ("--r", "8")),
    "qlora": Row("QLoRA r=8 (NF4+DQ)", "qlora", ("--r", "8")),
    "adalora": Row("AdaLoRA r 12->8", "adalora"),
    "sora": Row("SoRA r=8", "sora", ("--r", "8")),
    "lora-r2": Row("LoRA r=2", "lora", ("--r", "2")),
    "houlsby": Row("Houlsby adapter m=64", "adapter"),
    "pfeiffer": Row("Pfeiffer adapter m=64", "adapter", ("--adapter-kind", "pfeiffer")),
    "prefix": Row("prefix tuning L=16", "prefix"),
    # The same runs through the peer library. peft has no SoRA and no Houlsby or Pfeiffer
    # adapters, and its prefix tuning refuses BERT under transformers 5 ("Model does not support
    # past key values"), so MiniLM has no peft prefix row (`--impl peft` works on SmolLM2).
    "peft-lora": Row("LoRA r=8", "lora", ("--r", "8"), "peft"),
    "peft-qlora": Row("QLoRA r=8 (NF4+DQ)", "qlora", ("--r", "8"), "peft"),
    "peft-adalora": Row("AdaLoRA r 12->8", "adalora", (), "peft"),
    # SmolLM2's last-token states have outlier dimensions: its head learns best at a lower lr
    # than MiniLM's, chosen on the dev split (docs/benchmarks.md)
    "llm-head": Row("head only (floor)", "head", ("--lr", "1e-2")),
    # Instruction tuning (--task sft): the LM writes the intent's name, scored by greedy decoding;
    # the task's recipe (pelib.recipe.TASKS) sets one epoch, batch 16 and the max length
    # the floor of the SFT table: the untrained Instruct model, every label name in its prompt
    "sft-zero-shot": Row("zero-shot (floor), SFT", "zero-shot", ("--task", "sft")),
    "sft-lora": Row("LoRA r=8, SFT", "lora", ("--r", "8", "--task", "sft")),
    "sft-qlora": Row("QLoRA r=8 (NF4+DQ), SFT", "qlora", ("--r", "8", "--task", "sft")),
    "sft-sora": Row("SoRA r=8, SFT", "sora", ("--r", "8", "--task", "sft")),
    "sft-dora": Row("DoRA r=8, SFT", "dora", ("--r", "8", "--task", "sft")),
}
PELIB_ROWS = ("head", "full", "lora", "qlora", "adalora", "sora", "lora-r2", "houlsby",
              "pfeiffer", "prefix")
PEFT_ROWS = ("peft-lora", "peft-qlora", "peft-adalora")
# the full study adds DoRA (at LoRA's recipe) beside LoRA r=8
FULL_ROWS = ("head", "full", "lora", "dora", "qlora", "adalora", "sora", "lora-r2", "houlsby",
             "pfeiffer", "prefix")
LLM_ROWS = ("llm-head", "full", "lora", "qlora", "sora")
SFT_ROWS = ("sft-zero-shot", "sft-lora", "sft-qlora", "sft-sora", "sft-dora")
# `make run`: the floor, full fine-tuning, the four LoRA family methods and one peft twin.
WORKSHOP_ROWS = ("head", "full", "lora", "qlora", "adalora", "sora", "peft-lora")


# Every training row, batch 32, max length 64. `make run` trains one epoch, starting each
# fine-tune's head from the linear probe (LP-FT, pelib.probe), the head at lr 2e-3: a random head
# spends most of one epoch catching up (head lr chosen on dev, docs/benchmarks.md). The full
# study trains three epochs from a random head.
WORKSHOP_SIZE = ["--epochs", "1"]
LPFT = ["--head-init", "probe", "--head-lr", "2e-3"]
FULL_SIZE = ["--epochs", "3"]
LLM_SIZE = ["--epochs", "1", "--batch-size", "16"]
SMOKE_SIZE = ["--tiny", "--train-limit", "64", "--eval-limit", "32", "--epochs", "1",
              "--batch-size", "16", "--max-length", "32"]
# an instruction-tuning row keeps its task's max length: the chat prompt alone is ~40 tokens
SMOKE_SFT_SIZE = ["--tiny", "--train-limit", "32", "--eval-limit", "16"]
SMOKE_ZERO_SHOT_SIZE = ["--tiny", "--eval-limit", "16"]  # no training rows: it trains nothing
# SFT's dev grid trains on a third of the rows (a seeded sample): at about an hour a full epoch on
# 2 cores, three full runs would take the afternoon
SFT_GRID_SIZE = ["--train-limit", "3000"]
# Per-method extras: the floor's head trains 3 epochs (the frozen encoder only runs forward);
# prefix tuning clips its gradient norm at 1: without it its loss spiked at the peak lr and the
# run ended below the floor (docs/searches.md).
EXTRA = {"head": ["--epochs", "3"], "prefix": ["--max-grad-norm", "1"]}
# A learning rate chosen on another data set's own dev split, where it differs from Banking77's
# (`--preset lr-clinc150`, docs/benchmarks.md): prefix tuning, the floor's head and SoRA on
# CLINC150, each at half its lr.
DATA_LR = {("clinc150", "prefix"): "1.5e-3", ("clinc150", "head"): "1.5e-2",
           ("clinc150", "sora"): "1e-3"}


@dataclass(frozen=True)
class Part:
    """Runs of a preset: the named rows on one model and data set, over seeds."""

    model: str
    data: str
    rows: tuple[str, ...]  # keys of ROWS
    size: tuple[str, ...] | list[str]  # the finetune options every run adds
    seeds: tuple[int, ...] = (0,)
    lpft: bool = False  # the fine-tunes start from the probe head (LPFT)
    extras: bool = True  # EXTRA and DATA_LR
    lr_grid: bool = False  # each row at 1/2, 1 and 2x its lr, scored on the dev split


B77, C150 = "banking77", "clinc150"
PRESETS = {
    # toy-size random models: checks the whole pipeline in seconds (not peft's QLoRA:
    # bitsandbytes' CPU eval path needs rows that are multiples of 64)
    "smoke": (Part("minilm", B77, PELIB_ROWS + ("peft-lora", "peft-adalora"), SMOKE_SIZE,
                   extras=False),
              Part("smollm2", B77, LLM_ROWS, SMOKE_SIZE, extras=False),
              Part("smollm2", B77, ("sft-zero-shot",), SMOKE_ZERO_SHOT_SIZE, extras=False),
              Part("smollm2", B77, ("sft-lora",), SMOKE_SFT_SIZE, extras=False)),
    # `make run`: full size, one seed, one epoch
    "workshop": (Part("minilm", B77, WORKSHOP_ROWS, WORKSHOP_SIZE, lpft=True),),
    # the workshop rows over seeds 0-2 (seed 0 is reused)
    "seeds": (Part("minilm", B77, WORKSHOP_ROWS, WORKSHOP_SIZE, (0, 1, 2), lpft=True),),
    # the dev-split grids: each method at 1/2, 1, 2x its lr
    "lr": (Part("minilm", B77, PELIB_ROWS, WORKSHOP_SIZE, lr_grid=True),),
    "lr-clinc150": (Part("minilm", C150, PELIB_ROWS, WORKSHOP_SIZE, lr_grid=True),),
    # every method, both data sets, 3 epochs, 3 seeds
    "full": tuple(Part("minilm", data, FULL_ROWS + PEFT_ROWS, FULL_SIZE, (0, 1, 2))
                  for data in (B77, C150)),
    # SmolLM2-135M on all Banking77 rows, one epoch (hours on a CPU)
    "llm": (Part("smollm2", B77, LLM_ROWS, LLM_SIZE),),
    # SmolLM2-135M instruction-tuned on all Banking77 rows, one epoch each, greedy decoding on
    # the test split, below the zero-shot floor (the same model untrained, the names in its prompt)
    "sft": (Part("smollm2", B77, SFT_ROWS, ()),),
    # SFT's LoRA and QLoRA over seeds 0-2, to compare means; seed 0 is the sft preset's run
    "sft-seeds": (Part("smollm2", B77, ("sft-lora", "sft-qlora"), (), (0, 1, 2)),),
    # SFT LoRA's lr at 1/2, 1 and 2x, on 3,000 training rows, by greedy decoding on the dev split
    "sft-lr": (Part("smollm2", B77, ("sft-lora",), SFT_GRID_SIZE, lr_grid=True),),
}


def expand(part: Part) -> list[tuple[str, list[str]]]:
    """The (label, finetune argv) of every run of a part."""
    runs = []
    for seed in part.seeds:
        for row in (ROWS[n] for n in part.rows):
            head = ["--model", part.model, "--data", part.data, "--seed", str(seed)]
            argv = row.argv() + (LPFT if part.lpft and not floor(row.method) else [])
            if part.lr_grid:
                lr = float(DATA_LR.get((part.data, row.method), METHODS[row.method].lr))
                runs += [(f"{row.label} lr={lr * f:.2g}",
                          head + ["--eval-split", "dev"] + argv + list(part.size) +
                          EXTRA.get(row.method, []) + ["--lr", f"{lr * f:.2g}"])
                         for f in (1 / 2, 1, 2)]
                continue
            extra = EXTRA.get(row.method, []) + (
                ["--lr", DATA_LR[part.data, row.method]] if (part.data, row.method) in DATA_LR
                else [])
            runs.append((row.label, head + argv + list(part.size) + (extra if part.extras else [])))
    return runs


def preset(name: str) -> list[tuple[str, list[str]]]:
    """The runs of a preset as (label, argv) pairs."""
    if name not in PRESETS:
        raise SystemExit(f"pelib: unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return [run for part in PRESETS[name] for run in expand(part)]


def named(argv: list[str], out: Path) -> tuple[str, list[str]]:
    """A run's file name and its finetune argv with --out and --name. The name carries a hash
    of the arguments: runs that differ only in, say, the lr or the subset size must not
    overwrite each other; presets with the same run share it."""
    digest = hashlib.sha1(" ".join(argv).encode()).hexdigest()[:6]
    argv = argv + ["--out", str(out)]
    name = f"{run_name(parse(argv))}_{digest}"
    return name, argv + ["--name", name]


def run_all(runs, out: Path, progress: bool = True, finished_only: bool = False) -> list[dict]:
    """Run (or skip, when already done) every run in its own process; return their records.
    `finished_only`: run nothing, return the records of the runs already done."""
    from tqdm import tqdm

    records = []
    bar = tqdm(runs, desc="comparison", unit="run", disable=not progress, dynamic_ncols=True)
    for label, argv in bar:
        name, argv = named(argv, out)
        args = parse(argv)
        bar.set_postfix_str(name)
        path = out / f"{name}.json"
        if not finished(path, options(args)):  # absent, other options, or cut short
            if finished_only:
                continue
            cmd = [sys.executable, "-m", "pelib", "finetune", *argv, "--resume", "--overwrite"]
            if not progress:
                cmd.append("--no-progress")
            # Ctrl-C reaches the run too; it stops without a word (QUIET_STOP) and this
            # process prints the one line that says how to continue.
            done = subprocess.run(cmd, stdout=subprocess.DEVNULL,
                                  env=dict(os.environ, **{QUIET_STOP: "1"}))
            if done.returncode != 0:
                raise SystemExit(f"pelib: run {name} failed (exit {done.returncode}); run it alone to "
                                 f"see why: python -m pelib finetune {' '.join(argv)}")
        records.append(dict(read_record(path), label=label))
    return records


def main(argv=None) -> None:
    ap = Parser(prog="pelib compare", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="workshop", choices=PRESETS)
    ap.add_argument("--out", default="results")
    ap.add_argument("--only", nargs="+", default=None,
                    help="run only the methods whose label contains one of these words")
    ap.add_argument("--finished", action="store_true",
                    help="run nothing: summarise the runs of the preset already in --out (a "
                         "long preset, part done)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    try:
        out = writable_dir(args.out)
    except ValueError as e:
        raise SystemExit(f"pelib: {e}") from None
    runs = preset(args.preset)
    tag = "" if args.preset == "workshop" else f"_{args.preset}"  # presets share the run files
    for path in (out / f"summary{tag}.json", out / f"summary{tag}.md"):
        if is_record(path):  # a run named like a summary, before finetune refused such names
            raise SystemExit(f"pelib: {path} is a run's record, not a summary; move it away "
                             "(this preset's summary is written there)")
    if args.only:
        runs = [(label, a) for label, a in runs
                if any(w.lower() in label.lower() for w in args.only)]
        if not runs:
            raise SystemExit(f"pelib: --only {args.only} matches no run of preset {args.preset}")
    records = run_all(runs, out, progress=not args.no_progress, finished_only=args.finished)
    if args.finished:
        if not records:
            raise SystemExit(f"pelib: no run of preset {args.preset} has finished in {out}; "
                             "run it without --finished")
        print(f"{len(records)} of the {len(runs)} runs have finished; the tables cover those only")
    text = summary(records)
    atomic_write(out / f"summary{tag}.md", lambda tmp: Path(tmp).write_text(text))
    atomic_write(out / f"summary{tag}.json", lambda tmp: Path(tmp).write_text(json.dumps(
        [{k: r[k] for k in ("name", "label", "metrics", "trainable_params", "total_params",
                            "peak_memory_mb", "seconds_per_step", "train_seconds", "args", "losses",
                            "history", "train_rows", "eval_rows", "eval_split", "memory_kind")}
         | {"ledger": r.get("ledger")}  # None in records written before runs kept it
         for r in records], indent=1)))
    paths = figures(records, out, tag)
    print(text)
    print(f"wrote {out / f'summary{tag}.md'}, {out / f'summary{tag}.json'} and "
          + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
