"""The NLU data sets that ship in data/: Banking77 and CLINC150 (in-scope), as TSV.

Each split is `text<TAB>label` with a header row. About ten Banking77 rows are quoted
multi-line texts, so the files are read with the csv module, never split on newlines.
Labels become integers in one stable order: the sorted label names of the train split.

A file is checked as it is read, so a damaged one fails loudly instead of adding a class: the
shipped files must match the sha256 recorded in data/README.md, and any file must have the
header `text<TAB>label`, a label on every row, and labels without surrounding spaces.
"""
from __future__ import annotations

import csv
import functools
import hashlib
import random
import re
from pathlib import Path
from typing import NamedTuple

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
DATASETS = {"banking77": "banking77", "clinc150": "clinc150"}
SPLITS = ("train", "dev", "test")


class NLUSplit(NamedTuple):
    texts: list[str]
    labels: list[int]  # indices into label_names
    label_names: list[str]


@functools.cache
def _recorded_sha256() -> dict[str, str]:
    """{"banking77/train.tsv": sha256} from the checksum table of data/README.md."""
    text = (DATA_DIR / "README.md").read_text()
    return dict(re.findall(r"\|\s*(\S+\.tsv)\s*\|\s*([0-9a-f]{64})\s*\|", text))


def _check_shipped(path: Path) -> None:
    try:
        rel = path.resolve().relative_to(DATA_DIR.resolve()).as_posix()
    except ValueError:
        return  # a data folder of the user's own: no recorded checksum
    want = _recorded_sha256().get(rel)
    if want and hashlib.sha256(path.read_bytes()).hexdigest() != want:
        raise ValueError(f"{path} does not match its sha256 in data/README.md (edited or "
                         "damaged); restore it with `git checkout -- data/`")


@functools.lru_cache(maxsize=16)
def _read_tsv_cached(path: Path, mtime_ns: int) -> tuple[tuple[str, str], ...]:
    _check_shipped(path)
    rows = []
    # utf-8-sig: a byte-order mark written by some editors is not part of the first column name
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter="\t")
        if reader.fieldnames is None or [c.strip() for c in reader.fieldnames] != ["text", "label"]:
            raise ValueError(f"{path}: the header must be `text<TAB>label`, got "
                             f"{reader.fieldnames}")
        try:
            for row in reader:
                text, label = row["text"], row["label"]
                where = f"{path}, row ending on line {reader.line_num}"
                if label is None or None in row:
                    raise ValueError(f"{where}: expected 2 tab-separated columns (an unbalanced "
                                     "quote joins lines); fix the row")
                if (text, label) == ("text", "label"):
                    raise ValueError(f"{where}: a second header row; delete it")
                if label != label.strip() or not label:
                    raise ValueError(f"{where}: label {label!r} is empty or has surrounding "
                                     "spaces (it would become a class of its own); fix the label")
                rows.append((text, label))
        except csv.Error as e:
            raise ValueError(f"{path}, line {reader.line_num}: {e}") from None
    if not rows:
        raise ValueError(f"{path} has a header but no rows")
    return tuple(rows)


def _read_tsv(path: Path) -> list[tuple[str, str]]:
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing. The data ships with the repository under data/; "
            "restore it with `git checkout -- data/`."
        )
    return list(_read_tsv_cached(Path(path), path.stat().st_mtime_ns))


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
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ValueError(f"limit must be a positive integer (or None for all rows), got {limit!r}")
    rows = _read_tsv(_path(name, split, data_dir))
    names = label_names(name, data_dir)
    index = {label: i for i, label in enumerate(names)}
    unknown = {label for _, label in rows} - index.keys()
    if unknown:
        raise ValueError(f"{name}/{split} has labels not in the train split: {sorted(unknown)[:5]}")
    if limit is not None and limit < len(rows):
        rows = random.Random(seed).sample(rows, limit)
    return NLUSplit([t for t, _ in rows], [index[label] for _, label in rows], names)
