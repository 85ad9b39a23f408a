"""tools/table_row.py: a docs/tables row regenerated from run records."""
import csv
import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).parents[1] / "tools" / "table_row.py"
spec = importlib.util.spec_from_file_location("table_row", TOOL)
table_row = importlib.util.module_from_spec(spec)
spec.loader.exec_module(table_row)

ARGS = {"model": "minilm", "data": "banking77", "method": "lora", "epochs": 3.0, "seed": 0, "r": 2,
        "alpha": None, "label_smoothing": 0.1, "fp32": False, "out": "x", "name": "x"}


def record(tmp_path, seed, f1, **change):
    args = dict(ARGS, seed=seed, name=f"r-s{seed}", **change)
    path = tmp_path / f"r-s{seed}.json"
    path.write_text(json.dumps({"args": args, "metrics": {"f1": f1}, "eval_split": "test",
                                "trainable_params": 112589}))
    return path


def test_a_row_is_the_mean_and_sample_sd_of_the_seeds_and_replaces_its_old_row(tmp_path):
    table = tmp_path / "t.csv"
    table.write_text("method,label,test_f1_mean,test_f1_sd,seeds,trainable,command,date,cpu\n"
                     "lora-r8,LoRA r=8,0.9371,0.0018,3,361421,cmd,2026-12-02,cpu\n"
                     "lora-r2,old,0.1,0.1,1,1,old,old,old\n")
    f1 = [0.931, 0.9352, 0.9307]
    paths = [record(tmp_path, s, v) for s, v in enumerate(f1)]
    row = table_row.row("lora-r2", "LoRA r=2", paths, "2026-12-07", "cpu")
    assert row["test_f1_mean"] == f"{statistics.mean(f1):.4f}"
    assert row["test_f1_sd"] == f"{statistics.stdev(f1):.4f}"
    assert row["seeds"] == 3 and row["trainable"] == 112589
    assert row["command"] == ("python -m pelib finetune --model minilm --data banking77 --method lora "
                              "--epochs 3 --seed S --r 2")
    argv = sys.argv
    sys.argv = ["table_row", str(table), "lora-r2", "LoRA r=2", *map(str, paths), "--date", "d", "--cpu", "c"]
    try:
        table_row.main()
    finally:
        sys.argv = argv
    rows = list(csv.DictReader(table.open()))
    assert [r["method"] for r in rows] == ["lora-r8", "lora-r2"]
    assert rows[1]["label"] == "LoRA r=2" and rows[0]["test_f1_mean"] == "0.9371"


def test_records_of_two_settings_are_refused(tmp_path):
    paths = [record(tmp_path, 0, 0.93), record(tmp_path, 1, 0.94, r=4)]
    with pytest.raises(SystemExit, match="not one setting"):
        table_row.row("lora-r2", "LoRA r=2", paths, "d", "c")
