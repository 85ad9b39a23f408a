"""The course's comparison: every method on the same data, seeds and loop, with the peer beside.

    python -m pelib compare --preset workshop     # `make run`: MiniLM, 7 rows, ~25 min on 2 cores
    python -m pelib compare --preset seeds        # the workshop rows over 3 seeds
    python -m pelib compare --preset full         # every method, both data sets, 3 epochs x 3 seeds (hours)
    python -m pelib compare --preset llm          # SmolLM2: head, LoRA, QLoRA, SoRA, one epoch (hours)
    python -m pelib compare --preset lr           # each method's lr at 1/2, 1, 2x: dev F1
    python -m pelib compare --preset lr-clinc150  # the same grid on CLINC150's dev split
    python -m pelib compare --preset smoke        # toy models, seconds (runs inside `make test`)
    python -m pelib compare --preset full --finished   # run nothing: tables of the runs done

Each run is one `python -m pelib finetune ... --resume` in its own process, so its peak memory
is its own and an interrupted comparison picks up where it stopped: finished runs (their
results/<name>.json exists with the same arguments) are skipped, and the run that was cut off
continues from its last checkpoint. At the end: results/summary.md (one table per model and
data set, mean and spread over seeds) and three figures: F1 against trainable parameters,
peak memory, and loss curves (presets other than workshop add their name: summary_seeds.md).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .files import atomic_write, writable_dir
from .finetune import options, parse, run_name, same_run
from .methods import METHODS


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
# DATA_EXTRA below for the ones that CLINC150's dev split moved.
ROWS = {
    "head": Row("head only (floor)", "head"),  # the frozen backbone: every row is read against it
    "full": Row("full fine-tuning", "full"),
    "lora": Row("LoRA r=8", "lora", ("--r", "8")),
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
}
PELIB_ROWS = ("head", "full", "lora", "qlora", "adalora", "sora", "lora-r2", "houlsby",
              "pfeiffer", "prefix")
PEFT_ROWS = ("peft-lora", "peft-qlora", "peft-adalora")
LLM_ROWS = ("llm-head", "lora", "qlora", "sora")
# `make run`: the floor, full fine-tuning, the four LoRA family methods and one peft twin.
WORKSHOP_ROWS = ("head", "full", "lora", "qlora", "adalora", "sora", "peft-lora")


def rows(names) -> list[tuple[str, list[str]]]:
    """(label, argv) of the named rows."""
    return [(ROWS[n].label, ROWS[n].argv()) for n in names]


# Every training row, batch 32, max length 64. `make run` trains one epoch, starting each
# fine-tune's head from the linear probe (LP-FT, pelib.probe), the head at lr 2e-3: a random head
# spends most of one epoch catching up (head lr chosen on dev, docs/benchmarks.md). The full
# study trains three epochs from a random head.
WORKSHOP_SIZE = ["--epochs", "1"]
LPFT = ["--head-init", "probe", "--head-lr", "2e-3"]
FULL_SIZE = ["--epochs", "3"]
LLM_SIZE = ["--epochs", "1", "--batch-size", "16"]
# Per-method extras: the floor's head trains 3 epochs (the frozen encoder only runs forward);
# prefix tuning clips its gradient norm at 1: without it its loss spiked at the peak lr and the
# run ended below the floor (docs/benchmarks.md).
EXTRA = {"head": ["--epochs", "3"], "prefix": ["--max-grad-norm", "1"]}
# A learning rate chosen on another data set's own dev split, where it differs from Banking77's
# (`--preset lr-clinc150`, docs/benchmarks.md): prefix tuning, the floor's head and SoRA on
# CLINC150, each at half its lr.
DATA_EXTRA = {("clinc150", "prefix"): ["--lr", "1.5e-3"], ("clinc150", "head"): ["--lr", "1.5e-2"],
              ("clinc150", "sora"): ["--lr", "1e-3"]}


def _extra(argv: list[str], data: str = "banking77") -> list[str]:
    method = argv[argv.index("--method") + 1]
    return EXTRA.get(method, []) + DATA_EXTRA.get((data, method), [])


def _floor(method: str) -> bool:
    """Does the method train the head alone (its config has no head lr of its own)?"""
    return METHODS[method].config.head_lr is None


def _lpft(methods):
    """The fine-tunes start from the probe head (the floor's head is what it trains)."""
    return [(label, argv if _floor(argv[argv.index("--method") + 1]) else argv + LPFT)
            for label, argv in methods]


def preset(name: str) -> list[tuple[str, list[str]]]:
    """The runs of a preset as (label, argv) pairs."""
    runs = []

    def add(model, data, methods, seeds, common, extra=True):
        for seed in seeds:
            for label, argv in methods:
                runs.append((label, ["--model", model, "--data", data, "--seed", str(seed)] +
                             argv + common + (_extra(argv, data) if extra else [])))

    if name == "smoke":  # toy-size random models: checks the whole pipeline in seconds
        common = ["--tiny", "--train-limit", "64", "--eval-limit", "32", "--epochs", "1",
                  "--batch-size", "16", "--max-length", "32"]
        # (not peft's QLoRA: bitsandbytes' CPU eval path needs rows that are multiples of 64)
        peft = [n for n in PEFT_ROWS if ROWS[n].method != "qlora"]
        add("minilm", "banking77", rows(PELIB_ROWS + tuple(peft)), [0], common, extra=False)
        add("smollm2", "banking77", rows(LLM_ROWS), [0], common, extra=False)
    elif name == "workshop":  # `make run`: full size, one seed, ~25 minutes on 2 cores
        add("minilm", "banking77", _lpft(rows(WORKSHOP_ROWS)), [0], WORKSHOP_SIZE)
    elif name == "seeds":  # the workshop rows over seeds 0-2 (seed 0 is reused)
        add("minilm", "banking77", _lpft(rows(WORKSHOP_ROWS)), [0, 1, 2], WORKSHOP_SIZE)
    elif name in ("lr", "lr-clinc150"):  # the dev-split grid: each method at 1/2, 1, 2x its lr
        data = "banking77" if name == "lr" else "clinc150"
        for label, argv in rows(PELIB_ROWS):
            method = argv[argv.index("--method") + 1]
            extra = DATA_EXTRA.get((data, method), [])  # the lr this data set's dev chose
            lr = float(extra[extra.index("--lr") + 1]) if "--lr" in extra else METHODS[method].lr
            base = ["--model", "minilm", "--data", data, "--seed", "0", "--eval-split", "dev"]
            for f in (1 / 2, 1, 2):
                runs.append((f"{label} lr={lr * f:.2g}", base + argv + WORKSHOP_SIZE +
                             EXTRA.get(method, []) + ["--lr", f"{lr * f:.2g}"]))
    elif name == "full":  # every method, both data sets, 3 epochs, 3 seeds
        add("minilm", "banking77", rows(PELIB_ROWS + PEFT_ROWS), [0, 1, 2], FULL_SIZE)
        add("minilm", "clinc150", rows(PELIB_ROWS + PEFT_ROWS), [0, 1, 2], FULL_SIZE)
    elif name == "llm":  # SmolLM2-135M on all Banking77 rows, one epoch (about an hour a run here)
        add("smollm2", "banking77", rows(LLM_ROWS), [0], LLM_SIZE)
    else:
        raise SystemExit(f"pelib: unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return runs


PRESETS = ("smoke", "workshop", "seeds", "lr", "lr-clinc150", "full", "llm")


def _read_args(path: Path) -> dict | None:
    """The options a result file was made with; None for a broken file (the run is redone)."""
    try:
        return json.loads(path.read_text())["args"]
    except (ValueError, KeyError, TypeError):
        return None


def _read_record(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise SystemExit(f"pelib: {path} is not valid JSON ({e}); delete it and run again") from None


def run_all(runs, out: Path, progress: bool = True, finished_only: bool = False) -> list[dict]:
    """Run (or skip, when already done) every run in its own process; return their records.
    `finished_only`: run nothing, return the records of the runs already done."""
    from tqdm import tqdm

    records = []
    bar = tqdm(runs, desc="comparison", unit="run", disable=not progress, dynamic_ncols=True)
    for label, argv in bar:
        # The file name carries a hash of the arguments: runs that differ only in, say, the lr
        # or the subset size must not overwrite each other; presets with the same run share it.
        digest = hashlib.sha1(" ".join(argv).encode()).hexdigest()[:6]
        argv = argv + ["--out", str(out)]
        name = f"{run_name(parse(argv))}_{digest}"
        argv = argv + ["--name", name]
        args = parse(argv)
        bar.set_postfix_str(name)
        path = out / f"{name}.json"
        if not (path.exists() and same_run(_read_args(path), options(args))):
            if finished_only:
                continue
            cmd = [sys.executable, "-m", "pelib", "finetune", *argv, "--resume", "--overwrite"]
            if not progress:
                cmd.append("--no-progress")
            done = subprocess.run(cmd, stdout=subprocess.DEVNULL)
            if done.returncode != 0:
                raise SystemExit(f"pelib: run {name} failed (exit {done.returncode}); run it alone to "
                                 f"see why: python -m pelib finetune {' '.join(argv)}")
        records.append(dict(_read_record(path), label=label))
    return records


def _group(records):
    """{(model, data): {(label, impl): [record, ...]}} in first-seen order."""
    groups: dict = {}
    for r in records:
        a = r["args"]
        key = (a["model"] + ("-tiny" if a["tiny"] else ""), a["data"])
        groups.setdefault(key, {}).setdefault((r["label"], a["impl"]), []).append(r)
    return groups


def _mean_sd(xs):
    m = statistics.fmean(xs)
    return (m, statistics.stdev(xs)) if len(xs) > 1 else (m, None)


def _fmt(xs, digits=4):
    m, sd = _mean_sd(xs)
    return f"{m:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")


def summary(records) -> str:
    """The markdown tables: one per model and data set."""
    lines = ["# Results", "",
             "Macro precision / recall / F1 on the evaluation split (dev F1: the dev split after the last "
             "epoch, what choices are made on); ± is the standard deviation over "
             "seeds (none with one seed: then differences of about 0.01 F1 are inside the noise). "
             "Peak memory: process RSS on a CPU, max_memory_allocated on a GPU. Time: optimizer "
             "steps only.", ""]
    for (model, data), rows in _group(records).items():
        r0 = next(iter(rows.values()))[0]
        lines += [f"## {model} on {data}", "",
                  f"train rows {r0['train_rows']}, eval rows {r0['eval_rows']} ({r0['eval_split']}), "
                  f"batch {r0['args']['batch_size']}, max length {r0['args']['max_length']}", "",
                  "| method | impl | seeds | epochs | accuracy | precision | recall | macro-F1 | "
                  "trainable | % of model | peak MB | s/step | train s | dev F1 |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for (label, impl), rs in rows.items():
            m = lambda k: [r["metrics"][k] for r in rs]  # noqa: E731
            t = rs[0]
            lines.append(
                f"| {label} | {impl} | {len(rs)} | {t['args']['epochs']:g} | {_fmt(m('accuracy'))} | "
                f"{_fmt(m('precision'))} | "
                f"{_fmt(m('recall'))} | {_fmt(m('f1'))} | {t['trainable_params']:,} | "
                f"{100 * t['trainable_params'] / t['total_params']:.2f} | "
                f"{statistics.fmean(r['peak_memory_mb'] for r in rs):,.0f} | "
                f"{statistics.fmean(r['seconds_per_step'] for r in rs):.3f} | "
                f"{statistics.fmean(r['train_seconds'] for r in rs):.0f} | "
                f"{_fmt([r['history'][-1].get('dev_f1', float('nan')) for r in rs])} |")
        lines.append("")
    return "\n".join(lines)


def figures(records, out: Path, tag: str = "") -> list[Path]:
    """F1 vs trainable parameters, peak memory bars, loss curves; one panel per model/data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _group(records)
    paths = []

    def save(fig, name):
        path = out / name.replace(".png", f"{tag}.png")
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
        plt.close(fig)
        paths.append(path)

    from matplotlib.ticker import FuncFormatter

    def plain(x, _):  # 2.5M, 360k: no "1e6" offset on the axis
        return f"{x / 1e6:g}M" if x >= 1e6 else f"{x / 1e3:g}k" if x >= 1e3 else f"{x:g}"

    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.5), squeeze=False)
    for ax, ((model, data), rows) in zip(axes[0], groups.items()):
        markers = iter("osD^v<>pP*h")
        for (label, impl), rs in rows.items():
            f1 = statistics.fmean(r["metrics"]["f1"] for r in rs)
            name = f"{label}{' (peft)' if impl == 'peft' else ''}"
            if _floor(rs[0]["args"]["method"]):  # the floor: a line every method is read against
                ax.axhline(f1, color="grey", linestyle="--", linewidth=1, label=f"{name}: {f1:.3f}")
                continue
            # a legend, not labels at the points: methods with equal counts would stack them
            ax.scatter(rs[0]["trainable_params"], f1, s=40, label=f"{name}: {f1:.3f}",
                       marker="x" if impl == "peft" else next(markers, "o"))
        counts = [rs[0]["trainable_params"] for rs in rows.values()]
        wide = max(counts) > 3 * min(counts)  # a log axis only where the counts span a range
        split = next(iter(rows.values()))[0]["eval_split"]
        ax.set(xscale="log" if wide else "linear", ylabel=f"macro-F1 ({split})",
               xlabel="trainable parameters" + (" (log axis)" if wide else ""),
               title=f"{model} / {data}")
        f1s = [statistics.fmean(r["metrics"]["f1"] for r in rs) for rs in rows.values()]
        mid, half = (max(f1s) + min(f1s)) / 2, max(0.02, (max(f1s) - min(f1s)) / 2 + 0.005)
        ax.set_ylim(mid - half, mid + half)  # at least 0.04 tall: noise-sized gaps stay small
        ax.xaxis.set_major_formatter(FuncFormatter(plain))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda x, _: ""))
        ax.legend(fontsize=7, loc="lower right")
    save(fig, "f1_vs_params.png")

    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.5), squeeze=False)
    for ax, ((model, data), rows) in zip(axes[0], groups.items()):
        names = [f"{label}{' (peft)' if impl == 'peft' else ''}" for label, impl in rows]
        mb = [statistics.fmean(r["peak_memory_mb"] for r in rs) for rs in rows.values()]
        ax.barh(names, mb)
        ax.set(xlabel=f"peak memory, MB ({records[0]['memory_kind']})", title=f"{model} / {data}")
        ax.tick_params(axis="y", labelsize=7)
    save(fig, "memory.png")

    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.5), squeeze=False)
    for ax, ((model, data), rows) in zip(axes[0], groups.items()):
        for (label, impl), rs in rows.items():
            losses = rs[0]["losses"]
            k = max(1, len(losses) // 20)
            smooth = [statistics.fmean(losses[max(0, i - k + 1):i + 1]) for i in range(len(losses))]
            ax.plot(smooth, label=f"{label}{' (peft)' if impl == 'peft' else ''}",
                    linestyle="-" if impl == "pelib" else "--")
        ax.set(xlabel="optimizer step", ylabel="loss (moving average)", title=f"{model} / {data}")
        ax.legend(fontsize=6)
    save(fig, "losses.png")
    return paths


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="pelib compare", description=__doc__.splitlines()[0])
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
    tag = "" if args.preset == "workshop" else f"_{args.preset}"  # presets share the run files
    atomic_write(out / f"summary{tag}.md", lambda tmp: Path(tmp).write_text(text))
    atomic_write(out / f"summary{tag}.json", lambda tmp: Path(tmp).write_text(json.dumps(
        [{k: r[k] for k in ("name", "label", "metrics", "trainable_params", "total_params",
                            "peak_memory_mb", "seconds_per_step", "train_seconds", "args", "losses",
                            "history", "train_rows", "eval_rows", "eval_split", "memory_kind")}
         for r in records], indent=1)))
    paths = figures(records, out, tag)
    print(text)
    print(f"wrote {out / f'summary{tag}.md'}, {out / f'summary{tag}.json'} and "
          + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
