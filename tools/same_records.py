"""Do two result folders hold the same numbers? `python tools/same_records.py BEFORE AFTER`

Compares every run record (`<run>.json`, as `python -m pelib compare --out DIR` writes them) of
two folders, matched by file name: the metrics, the per-step losses, the per-epoch history,
the parameter counts and the method's own report must be equal, bit for bit (times and memory
are not compared). Exits 1 and names the differences if any; used to check that a refactoring
of the library changed no number (`compare --preset smoke`, before and after).
"""
import json
import sys
from pathlib import Path

SAME = ("metrics", "losses", "history", "trainable_params", "total_params", "steps")


def records(folder: Path) -> dict:
    out = {}
    for path in sorted(folder.glob("*.json")):
        record = json.loads(path.read_text())
        if isinstance(record, dict) and "metrics" in record:  # not the summary
            out[path.name] = record
    return out


def differences(before: dict, after: dict) -> list[str]:
    problems = [f"{name}: only in one folder" for name in sorted(set(before) ^ set(after))]
    for name in sorted(set(before) & set(after)):
        a, b = before[name], after[name]
        keys = SAME + tuple(k for k in a if k == a["args"]["method"])  # the method's report
        problems += [f"{name}: {k} differs" for k in keys if a.get(k) != b.get(k)]
    return problems


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.splitlines()[0])
    before, after = (records(Path(p)) for p in sys.argv[1:])
    problems = differences(before, after)
    print("\n".join(problems) or f"{len(before)} records: the same numbers, bit for bit")
    sys.exit(1 if problems else 0)
