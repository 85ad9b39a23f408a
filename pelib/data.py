"""The NLU data sets that ship inside the package: Banking77 and CLINC150 (in-scope), as TSV.

The files are package data (pelib/_data/, read through importlib.resources), so an installed
pelib has them wherever it is installed. Each split is `text<TAB>label` with a header row.
About ten Banking77 rows are quoted multi-line texts, so the files are read with the csv
module, never split on newlines. Labels become integers in one stable order: the sorted label
names of the train split. `data_dir=` reads a folder of the user's own with the same layout
(`<name>/{train,dev,test}.tsv`).

A file is checked as it is read, so a damaged one fails loudly instead of adding a class: the
shipped files must match the sha256 recorded in pelib/_data/README.md, and any file must have
the header `text<TAB>label`, a label on every row, and labels without surrounding spaces.
"""
from __future__ import annotations

import csv
import functools
import hashlib
import importlib.resources
import io
import random
import re
from pathlib import Path
from typing import NamedTuple

DATA_DIR = importlib.resources.files("pelib") / "_data"  # a Path for an ordinary install
DATASETS = {"banking77": "banking77", "clinc150": "clinc150"}
SPLITS = ("train", "dev", "test")
REINSTALL = "reinstall pelib (`pip install --force-reinstall pelib`, or `pip install -e .` in a clone)"


class NLUSplit(NamedTuple):
    texts: list[str]
    labels: list[int]  # indices into label_names
    label_names: list[str]


@functools.cache
def _recorded_sha256() -> dict[str, str]:
    """{"banking77/train.tsv": sha256} from the checksum table of the shipped README.md."""
    text = (DATA_DIR / "README.md").read_text(encoding="utf-8")
    return dict(re.findall(r"\|\s*(\S+\.tsv)\s*\|\s*([0-9a-f]{64})\s*\|", text))


def _shipped(data_dir) -> bool:
    """True for the data that ships with pelib (None), not a folder of the user's own."""
    if data_dir is None or data_dir is DATA_DIR:
        return True
    try:
        return Path(data_dir).resolve() == Path(str(DATA_DIR)).resolve()
    except (TypeError, OSError):
        return False


def _check_shipped(rel: str, raw: bytes) -> None:
    want = _recorded_sha256().get(rel)
    if want and hashlib.sha256(raw).hexdigest() != want:
        raise ValueError(f"pelib's data file {rel} does not match its sha256 in pelib/_data/README.md "
                         f"(edited or damaged); {REINSTALL}")


@functools.lru_cache(maxsize=16)
def _read_tsv_cached(path, rel: str | None, mtime_ns: int | None) -> tuple[tuple[str, str], ...]:
    raw = path.read_bytes()
    if rel is not None:
        _check_shipped(rel, raw)
    try:  # utf-8-sig: a byte-order mark written by some editors is not part of the first column name
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: byte {e.start} is not UTF-8 ({e.reason}); save the file as "
                         "UTF-8 (from Latin-1: `iconv -f latin1 -t utf-8 IN > OUT`)") from None
    rows = []
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t")
    if reader.fieldnames is None or [c.strip() for c in reader.fieldnames] != ["text", "label"]:
        raise ValueError(f"{path}: the header must be `text<TAB>label`, got "
                         f"{reader.fieldnames}")
    reader.fieldnames = ["text", "label"]  # spaces around a column name mean nothing
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


def _read_tsv(name: str, split: str, data_dir) -> list[tuple[str, str]]:
    path = _path(name, split, data_dir)
    rel = f"{DATASETS[name]}/{split}.tsv"
    if _shipped(data_dir):
        if not path.is_file():
            raise FileNotFoundError(f"pelib's data file {rel} is missing from the installed "
                                    f"package; {REINSTALL}")
        stat = getattr(path, "stat", None)  # a zipped install has no mtime: read once
        return list(_read_tsv_cached(path, rel, stat().st_mtime_ns if stat else None))
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"data_dir={str(data_dir)!r} has no {rel}: a data folder holds "
            f"<name>/{{train,dev,test}}.tsv with the header `text<TAB>label` (omit data_dir for the "
            "data that ships with pelib)")
    return list(_read_tsv_cached(path, None, path.stat().st_mtime_ns))


def label_names(name: str, data_dir: str | Path | None = None) -> list[str]:
    """Sorted label names of the train split: the one label order every split uses."""
    return sorted({label for _, label in _read_tsv(name, "train", data_dir)})


def _path(name: str, split: str, data_dir):
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {sorted(DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
    if _shipped(data_dir):
        return DATA_DIR / DATASETS[name] / f"{split}.tsv"  # a Traversable: Path or zip entry
    return Path(data_dir) / DATASETS[name] / f"{split}.tsv"


def load_nlu(
    name: str, split: str, limit: int | None = None, seed: int = 0, data_dir: str | Path | None = None
) -> NLUSplit:
    """Texts and integer labels of one split; `limit` takes a seeded random subset.

    data_dir: a folder of the user's own (`<name>/{train,dev,test}.tsv`); None: pelib's data."""
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ValueError(f"limit must be a positive integer (or None for all rows), got {limit!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):  # None would draw another subset each call
        raise ValueError(f"seed must be an integer (the same seed gives the same subset), got "
                         f"{seed!r}; pass seed=0 or any other integer")
    rows = _read_tsv(name, split, data_dir)
    names = label_names(name, data_dir)
    index = {label: i for i, label in enumerate(names)}
    unknown = {label for _, label in rows} - index.keys()
    if unknown:
        raise ValueError(f"{name}/{split} has labels not in the train split: {sorted(unknown)[:5]}")
    if limit is not None and limit < len(rows):
        rows = random.Random(seed).sample(rows, limit)
    return NLUSplit([t for t, _ in rows], [index[label] for _, label in rows], names)
