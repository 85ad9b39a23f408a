"""Tables and figures of run records, shared by `pelib finetune` (one run: its row and its loss
curve) and `pelib compare` (one table per model and data set, F1 against trainable parameters,
memory, loss curves). Every figure is written atomically.

Memory is shown twice. The ledger (pelib.measure.memory_ledger, recorded by each run: frozen
weights, trainable weights, gradients, optimizer state, saved activations) says what a step
holds and why methods differ; the peak of the process (RSS on a CPU) is what the machine gave.
A record written before runs kept their ledger shows its peak alone, with a note.
"""
from __future__ import annotations

import statistics
from pathlib import Path

from .files import atomic_write
from .measure import LEDGER_KINDS, MiB  # PeakMemory's "MB" are MiB too
from .methods import METHODS


def floor(method: str) -> bool:
    """Does the method train the head alone (its config has no head lr of its own)? Its row is
    the floor every other row is read against."""
    return METHODS[method].config.head_lr is None


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
    cols = ["run", "acc", "P", "R", "F1", "trainable", "s/epoch", "peak MiB"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        m = r["metrics"]
        lines.append(f"| {r['name']} | {m['accuracy']:.4f} | {m['precision']:.4f} | "
                     f"{m['recall']:.4f} | {m['f1']:.4f} | {r['trainable_params']:,} | "
                     f"{r['seconds_per_epoch']:.1f} | {r['peak_memory_mb']:.0f} |")
    return "\n".join(lines)


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


def _dev_f1(rs) -> str:
    """The dev F1 after the last epoch; "-" where a run scored no dev split (an instruction-tuned
    run, which is scored by generation on the evaluation split only)."""
    last = [r["history"][-1] if r["history"] else {} for r in rs]
    return _fmt([h["dev_f1"] for h in last]) if all("dev_f1" in h for h in last) else "-"


def summary(records) -> str:
    """The markdown tables: one per model and data set."""
    lines = ["# Results", "",
             "Macro precision / recall / F1 on the evaluation split (dev F1: the dev split after the last "
             "epoch, what choices are made on; invalid: the share of generated answers that are no "
             "label name, in tables with instruction-tuned rows); ± is the standard deviation over "
             "seeds (none with one seed: then differences of about 0.01 F1 are inside the noise). "
             "Peak memory: process RSS on a CPU, max_memory_allocated on a GPU. Time: optimizer "
             "steps only.", ""]
    for (model, data), rows in _group(records).items():
        # the header's settings: of the first row that trained (a zero-shot floor trains nothing)
        firsts = [rs[0] for rs in rows.values()]
        r0 = next((r for r in firsts if r["train_rows"]), firsts[0])
        # scored by generation: the share of outputs that are no label name (a classifier's
        # row has none, "-")
        sft = any(r["args"].get("task") == "sft" for rs in rows.values() for r in rs)
        lines += [f"## {model} on {data}", "",
                  f"train rows {r0['train_rows']}, eval rows {r0['eval_rows']} ({r0['eval_split']}), "
                  f"batch {r0['args']['batch_size']}, max length {r0['args']['max_length']}", "",
                  "| method | impl | seeds | epochs | accuracy | precision | recall | macro-F1 | " +
                  ("invalid | " if sft else "") +
                  "trainable | % of model | peak MiB | s/step | train s | dev F1 |",
                  "|---" * (15 if sft else 14) + "|"]
        for (label, impl), rs in rows.items():
            m = lambda k: [r["metrics"][k] for r in rs]  # noqa: E731
            t = rs[0]
            invalid = (_fmt(m("invalid_rate")) if all("invalid_rate" in r["metrics"] for r in rs)
                       else "-") + " | " if sft else ""
            lines.append(
                f"| {label} | {impl} | {len(rs)} | {0 if t.get('steps') == 0 else t['args']['epochs']:g} | "
                f"{_fmt(m('accuracy'))} | "
                f"{_fmt(m('precision'))} | "
                f"{_fmt(m('recall'))} | {_fmt(m('f1'))} | {invalid}{t['trainable_params']:,} | "
                f"{100 * t['trainable_params'] / t['total_params']:.2f} | "
                f"{statistics.fmean(r['peak_memory_mb'] for r in rs):,.0f} | "
                f"{statistics.fmean(r['seconds_per_step'] for r in rs):.3f} | "
                f"{statistics.fmean(r['train_seconds'] for r in rs):.0f} | "
                f"{_dev_f1(rs)} |")
        lines.append("")
        lines += _memory_table(rows, r0["memory_kind"])
    return "\n".join(lines)


# The ledger's kinds, in pelib.measure's order, and what the table and the figure call them
LEDGER_SHORT = dict(zip(LEDGER_KINDS, ("frozen weights", "trainable weights", "gradients",
                                       "optimizer state", "saved activations"), strict=True))
RSS_NOTE = ("Peak RSS adds what no tensor of the step is: the Python interpreter and the code and "
            "data of torch and the other libraries, the same for every method, and the freed memory "
            "the allocator keeps, which varies from run to run and can exceed the differences "
            "between methods; so RSS compresses, and can even reorder, what the ledger shows (the "
            "ledger is what the method needs).")
GPU_NOTE = ("max_memory_allocated adds the transient buffers alive at the peak (dequantised "
            "weights, the logits, temporaries of the backward), which the ledger does not list.")


def ledger_of(rs: list[dict]) -> list[float] | None:
    """The mean ledger of a row's runs in MiB, in LEDGER_SHORT's order; None when a run's record
    has none (written before runs recorded it, or a data-parallel run)."""
    if not all(r.get("ledger") for r in rs):
        return None
    return [statistics.fmean(r["ledger"]["bytes"][k] for r in rs) / MiB for k in LEDGER_SHORT]


def _memory_table(rows: dict, kind: str) -> list[str]:
    """The ledger of each row beside its peak, in MiB, and the sentence that reads them."""
    lines = [f"**Memory, MiB.** The ledger: the tensors one training step holds on the run's "
             f"longest batch (B x T), counted storage by storage; peak: {kind}.", "",
             "| memory of | batch | " + " | ".join(LEDGER_SHORT.values()) +
             " | ledger | peak | peak - ledger |", "|---" * (len(LEDGER_SHORT) + 5) + "|"]
    missing = False
    for (label, impl), rs in rows.items():
        led = ledger_of(rs)
        peak = statistics.fmean(r["peak_memory_mb"] for r in rs)
        cells = ["-"] * (len(LEDGER_SHORT) + 2) + [f"{peak:,.0f}", "-"] if led is None else \
            ["x".join(map(str, rs[0]["ledger"]["batch"])) or "no step"] + [f"{v:,.2f}" for v in led] + \
            [f"{sum(led):,.2f}", f"{peak:,.0f}", f"{peak - sum(led):,.0f}"]
        missing |= led is None
        lines.append(f"| {label}{' (peft)' if impl == 'peft' else ''} | " + " | ".join(cells) + " |")
    lines += ["", RSS_NOTE if "RSS" in kind else GPU_NOTE]
    if missing:
        lines[-1] += " Rows with '-' come from records written before runs kept their ledger: " \
                     "their peak alone."
    return lines + [""]


def memory_panel(ax, rows: dict, kind: str) -> None:
    """Per row the ledger stacked by kind (a bar) and the peak of the run (a marker beside it)."""
    names = [f"{label}{' (peft)' if impl == 'peft' else ''}" for label, impl in rows]
    y = list(range(len(names)))[::-1]  # the first row on top
    ledgers = [ledger_of(rs) for rs in rows.values()]
    colours = ("#9e9e9e", "#1f77b4", "#ff7f0e", "#d62728", "#2ca02c")
    for i, short in enumerate(LEDGER_SHORT.values()):
        left = [sum(led[:i]) if led else 0.0 for led in ledgers]
        ax.barh(y, [led[i] if led else 0.0 for led in ledgers], left=left, height=0.6,
                color=colours[i], label=short)
    peaks = [statistics.fmean(r["peak_memory_mb"] for r in rs) for rs in rows.values()]
    ax.plot(peaks, y, linestyle="none", marker="D", color="black", label=f"peak ({kind})")
    for yi, peak, led in zip(y, peaks, ledgers):
        if led is None:
            ax.annotate("no ledger in this record", (peak, yi), xytext=(-6, 0),
                        textcoords="offset points", ha="right", va="center", fontsize=7)
    ax.set_yticks(y, names)
    ax.set_xlim(0, 1.08 * max(peaks + [sum(led) for led in ledgers if led]))
    ax.tick_params(axis="y", labelsize=7)


def figures(records, out: Path, tag: str = "") -> list[Path]:
    """F1 vs trainable parameters, peak memory bars, loss curves; one panel per model/data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _group(records)
    paths = []

    def save(fig, name, rect=(0, 0, 1, 1)):
        path = out / name.replace(".png", f"{tag}.png")
        fig.tight_layout(rect=rect)
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
            if floor(rs[0]["args"]["method"]):  # the floor: a line every method is read against
                ax.axhline(f1, color="grey", linestyle="--", linewidth=1, label=f"{name}: {f1:.3f}")
                continue
            # a legend, not labels at the points: methods with equal counts would stack them
            ax.scatter(rs[0]["trainable_params"], f1, s=40, label=f"{name}: {f1:.3f}",
                       marker="x" if impl == "peft" else next(markers, "o"))
        counts = [rs[0]["trainable_params"] for rs in rows.values()
                  if rs[0]["trainable_params"]] or [1]  # a zero-shot floor trains none
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

    kind = records[0]["memory_kind"]
    fig, axes = plt.subplots(1, len(groups), figsize=(7 * len(groups), 5.2), squeeze=False)
    for ax, ((model, data), rows) in zip(axes[0], groups.items()):
        memory_panel(ax, rows, kind)
        ax.set(xlabel="MiB: bars the ledger of one step, markers the run's peak",
               title=f"{model} / {data}")
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=6, fontsize=8,
               bbox_to_anchor=(0.5, 0.07))
    fig.text(0.01, 0.01, RSS_NOTE if "RSS" in kind else GPU_NOTE, fontsize=8, wrap=True,
             va="bottom")
    save(fig, "memory.png", rect=(0, 0.15, 1, 1))  # room for the legend and the note below

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
