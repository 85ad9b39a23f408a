"""Run identity, locks and records, shared by `pelib finetune` (one run) and `pelib compare`
(many): a run's name, whether a record holds the numbers of the same options, one process per
run name and folder, and the record files themselves (written atomically).
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
from pathlib import Path

from .files import atomic_write, open_lock
from .methods import METHODS
from .options import HEAD_OPTIONS, config_of, method_options, options, parse

# The value an option had before its default changed: a record written without it ran at that.
BEFORE = {"label_smoothing": 0.0}

# Options that do not change a run's numbers: where it writes, whether it shows progress.
NOT_NUMBERS = {"no_progress", "resume", "checkpoint_every", "command", "out", "name", "overwrite",
               "save_adapter"}


def numbers(opts: dict) -> dict:
    """What decides a run's numbers: the common options and the method's config, resolved (an
    option left out and the recipe's value are the same run; another method's options are not
    part of it). An option added since a record was written takes its value then (BEFORE)."""
    opts = {**options(parse([])), **BEFORE, **opts}
    config = METHODS[opts["method"]].config
    resolved = config.from_options(opts)
    out = {k: v for k, v in opts.items() if k not in NOT_NUMBERS and k not in method_options()}
    out["lr"] = config.lr if opts["lr"] is None else opts["lr"]
    out["head_lr"] = opts["head_lr"] if opts["head_lr"] is not None else config.head_lr or out["lr"]
    if out["label_smoothing"] is None:
        out["label_smoothing"] = config.label_smoothing
    if out.get("task") == "sft":  # no classification head: its settings are not the run's
        for k in (*HEAD_OPTIONS, "head_init"):
            out.pop(k, None)
    return dict(out, config=dataclasses.asdict(resolved))


def same_run(a: dict | None, b: dict) -> bool:
    """Do two option sets give the same numbers? (None or an unknown method: unknown, so no)"""
    if a is None or a.get("method") not in METHODS:
        return False
    try:
        return numbers(a) == numbers(b)
    except (TypeError, ValueError):  # a record whose options no config takes: not this run
        return False


def run_name(args) -> str:
    if args.name:
        return args.name
    model = args.model + ("-tiny" if args.tiny else "") + (f"-{args.pooling}" if args.pooling else "")
    parts = [model, args.data, args.method + config_of(args).tag(), args.impl, f"s{args.seed}"]
    # an instruction-tuning run must not share the classifier's name for the same method
    return "_".join(parts + (["sft"] if getattr(args, "task", "classify") == "sft" else []))


@contextlib.contextmanager
def only_process(out: Path, name: str):
    """One process per run name and folder: a second would share (and fight over) its files.
    The lock file goes when the run ends; a process that locked a file another had just removed
    sees that the path is no longer its file and locks the new one."""
    path = out / f".{name}.lock"
    while True:
        lock = open_lock(path)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise ValueError(f"another process is running {name} in {out}/ right now; wait for it "
                             "to finish, or pass another --name") from None
        try:
            if os.stat(path).st_ino == os.fstat(lock.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        lock.close()
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # still holding the lock: no one else owns this path
        lock.close()


def check_outputs(out: Path, name: str) -> None:
    """A run's files are files: a folder in the place of one is refused before training (not
    after, when the record could not be written)."""
    for path in (out / f"{name}.json", out / f"{name}_loss.png", out / f"{name}.ckpt"):
        if path.exists() and not path.is_file():
            raise ValueError(f"{path} is a folder (or not a plain file) where the run writes a "
                             "file; move it away or pass another --name")


# What compare's tables read from a record: one without them (cut short, edited) is unfinished.
SUMMARY_KEYS = ("name", "metrics", "trainable_params", "total_params", "peak_memory_mb",
                "seconds_per_step", "train_seconds", "args", "losses", "history", "train_rows",
                "eval_rows", "eval_split", "memory_kind")


def finished(path: Path, opts: dict) -> bool:
    """Does `path` hold the complete record of a run of these options?"""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and all(k in record for k in SUMMARY_KEYS) and \
        isinstance(record["metrics"], dict) and same_run(record["args"], opts)


def is_record(path: Path) -> bool:
    """Is `path` a run's record (a JSON object with its options), not compare's summary (a
    list)? A file of another kind is not a record."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and "args" in record


# Set by `pelib compare` for the runs it starts: a run stopped by Ctrl-C then exits without a
# word, and compare prints the one line that says how to continue.
QUIET_STOP = "PELIB_QUIET_STOP"


def read_args(path: Path) -> dict | None:
    """The options a result file was made with; None for a broken file (the run is redone)."""
    try:
        return json.loads(path.read_text())["args"]
    except (OSError, ValueError, KeyError, TypeError):  # OSError: a folder, unreadable
        return None


def read_record(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise SystemExit(f"pelib: {path} is not valid JSON ({e}); delete it and run again") from None


def refuse_other_run(path: Path, opts: dict) -> None:
    """Never replace another run's results: a record at `path` of other options is an error."""
    if path.exists() and not same_run(read_args(path), opts):
        raise ValueError(f"{path} holds a run with other options; pass --name to keep both, or "
                         "--overwrite to replace it")


def write_record(path: Path, record: dict) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2)))


def run_ledger(model, tokenizer, data, cfg, task: str = "classify") -> dict:
    """The memory ledger of the run's largest step (pelib.measure.memory_ledger): its
    `cfg.batch_size` longest training rows (batches are grouped by length, so the longest batch
    is about these), under the run's autocast. Bytes by kind, and the batch shape [B, T]. The
    record keeps it, so compare's figure reads what the run held instead of counting again.

    task "sft": the rows are the run's chat conversations (pelib.sft.encode: labels -100 outside
    the answer), padded on the right, and the step's loss is the answer-only chunked loss
    (pelib.sft.sft_loss), so the activations are the ones an instruction-tuning step saves. A
    model that trains nothing (--method zero-shot) holds its weights alone: batch [] (no step)."""
    import torch

    from .measure import memory_ledger, weights_ledger

    if not any(p.requires_grad for p in model.parameters()):  # a zero-shot row: no step at all
        return dict(bytes=weights_ledger(model), batch=[])
    device = next(model.parameters()).device
    if task == "sft":
        from .sft import collate_train, sft_loss
        from .sft_train import encode_rows

        rows = encode_rows(tokenizer, data, cfg.max_length)
        longest = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))[:cfg.batch_size]
        batch = collate_train([rows[i] for i in longest], tokenizer.pad_token_id)  # (B, T) each
        loss_fn = sft_loss
    else:
        from .batching import collate, encode

        ids = encode(tokenizer, data.texts, cfg.max_length)
        longest = sorted(range(len(ids)), key=lambda i: -len(ids[i]))[:cfg.batch_size]
        batch = collate(ids, longest, tokenizer.pad_token_id)
        batch["labels"] = torch.tensor([data.labels[i] for i in longest])
        loss_fn = None  # the classifier's own loss (its output's .loss)
    batch = {k: t.to(device) for k, t in batch.items()}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
        ledger = memory_ledger(model, batch, loss_fn=loss_fn)
    return dict(bytes=ledger, batch=list(batch["input_ids"].shape))
