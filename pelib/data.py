"""The NLU data sets that ship in data/: Banking77 and CLINC150 (in-scope), as TSV.

Each split is `text<TAB>label` with a header row. About ten Banking77 rows are quoted
multi-line texts, so the files are read with the csv module, never split on newlines.
Labels become integers in one stable order: the sorted label names of the train split.
"""
from __future__ import annotations

import csv
import random
from pathlib import Path
from typing import NamedTuple

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
DATASETS = {"banking77": "banking77", "clinc150": "clinc150"}
SPLITS = ("train", "dev", "test")


class NLUSplit(NamedTuple):
    texts: list[str]
    labels: list[int]  # indices into label_names
    label_names: list[str]


def _read_tsv(path: Path) -> list[tuple[str, str]]:
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing. The data ships with the repository under data/; "
            "restore it with `git checkout -- data/`."
        )
    with open(path, newline="", encoding="utf-8") as f:
        return [(row["text"], row["label"]) for row in csv.DictReader(f, delimiter="\t")]


def label_names(name: str, data_dir: Path = DATA_DIR) -> list[str]:
    """Sorted label names of the train split: the one label order every split uses."""
    return sorted({label for _, label in _read_tsv(_path(name, "train", data_dir))})


def _path(name: str, split: str, data_dir: Path) -> Path:
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {sorted(DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
    return Path(data_dir) / DATASETS[name] / f"{split}.tsv"


def load_nlu(
    name: str, split: str, limit: int | None = None, seed: int = 0, data_dir: Path = DATA_DIR
) -> NLUSplit:
    """Texts and integer labels of one split; `limit` takes a seeded random subset."""
    rows = _read_tsv(_path(name, split, data_dir))
    names = label_names(name, data_dir)
    index = {label: i for i, label in enumerate(names)}
    unknown = {label for _, label in rows} - index.keys()
    if unknown:
        raise ValueError(f"{name}/{split} has labels not in the train split: {sorted(unknown)[:5]}")
    if limit is not None and limit < len(rows):
        rows = random.Random(seed).sample(rows, limit)
    return NLUSplit([t for t, _ in rows], [index[label] for _, label in rows], names)
