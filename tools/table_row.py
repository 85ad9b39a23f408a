"""One row of a docs/tables CSV from run records: `python tools/table_row.py TABLE METHOD LABEL RECORD...`

Reads the records (`<run>.json`, as `python -m pelib finetune --out DIR` writes them) of one
setting over several seeds, checks they are that setting (same arguments but the seed), and
writes the row into TABLE: test macro-F1 mean and sample standard deviation, the seeds, the
trainable parameters, the command (with `S` for the seed), the date and the CPU. A row with the
same METHOD is replaced, so re-running the seeds regenerates the row the notebooks read.

    python tools/table_row.py docs/tables/lora_rank.csv lora-r2 "LoRA r=2" results/lora-r2-s*.json
"""
import argparse
import csv
import io
import json
import statistics
import sys
from datetime import date
from pathlib import Path

from pelib.files import write_text

COLUMNS = ["method", "label", "test_f1_mean", "test_f1_sd", "seeds", "trainable", "command", "date", "cpu"]
# Arguments that name the run, not the setting: they may differ between seeds.
NOT_THE_SETTING = {"seed", "out", "name", "overwrite", "no_progress", "resume", "checkpoint_every"}


def cpu_model() -> str:
    """lscpu's model name and whether the CPU multiplies bf16 in hardware."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines()
                  if line.startswith("model name")), "unknown CPU")
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines()
                      if line.startswith("flags")), []))
    bf16 = "AVX-512 BF16" if "avx512_bf16" in flags else "AMX" if "amx_bf16" in flags else "AVX2"
    return f"{model} ({bf16})"


def command(args: dict) -> str:
    """The finetune command of a record's arguments, the seed written S."""
    parts = ["python -m pelib finetune"]
    for key, value in args.items():
        if key in NOT_THE_SETTING - {"seed"} or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if key == "seed":
            parts.append(f"{flag} S")
        elif value is True:
            parts.append(flag)
        elif key in DEFAULTS and DEFAULTS[key] == value:
            continue
        else:
            parts.append(f"{flag} {value:g}" if isinstance(value, float) else f"{flag} {value}")
    return " ".join(parts)


# The CLI's defaults, left out of the printed command (as a user would type it).
DEFAULTS = {"impl": "pelib", "label_smoothing": 0.1, "head_init": "random", "weight_decay": 0.0,
            "warmup_ratio": 0.06, "schedule": "linear", "layer_decay": 1.0, "batch_size": 32,
            "grad_accum": 1, "max_length": 64, "device": "auto", "eval_split": "test"}


def row(method: str, label: str, paths: list[Path], day: str, cpu: str) -> dict:
    records = [json.loads(p.read_text()) for p in paths]
    settings = [{k: v for k, v in r["args"].items() if k not in NOT_THE_SETTING} for r in records]
    if any(s != settings[0] for s in settings):
        sys.exit("table_row: the records are not one setting (their arguments differ beyond the seed)")
    seeds = sorted(r["args"]["seed"] for r in records)
    if len(set(seeds)) != len(seeds):
        sys.exit(f"table_row: a seed appears twice among {seeds}")
    if any(r["eval_split"] != "test" for r in records):
        sys.exit("table_row: the table reports the test split; a record evaluated another split")
    f1 = [r["metrics"]["f1"] for r in records]
    return {"method": method, "label": label, "test_f1_mean": f"{statistics.mean(f1):.4f}",
            "test_f1_sd": f"{statistics.stdev(f1):.4f}" if len(f1) > 1 else "",
            "seeds": len(f1), "trainable": records[0]["trainable_params"],
            "command": command(records[0]["args"]), "date": day, "cpu": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table", type=Path)
    parser.add_argument("method")
    parser.add_argument("label")
    parser.add_argument("records", type=Path, nargs="+")
    parser.add_argument("--date", default=date.today().isoformat(), help="the day of the runs")
    parser.add_argument("--cpu", default=cpu_model(), help="the CPU of the runs")
    a = parser.parse_args()
    new = row(a.method, a.label, a.records, a.date, a.cpu)
    rows = list(csv.DictReader(a.table.open(newline=""))) if a.table.exists() else []
    rows = [r for r in rows if r["method"] != a.method] + [new]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(a.table, out.getvalue())  # atomic, and never through a link
    print(",".join(str(new[c]) for c in COLUMNS))


if __name__ == "__main__":
    main()
