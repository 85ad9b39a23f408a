"""A property of the command line: whatever options a user types, `pelib finetune` either
finishes (exit 0 and its record on disk) or stops with one line that says why (a non-zero
exit, no traceback). Hypothesis draws the options from a small grammar of names and values,
sensible and hostile, over toy-size runs."""
import contextlib
import io
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pelib.__main__ import main
from pelib.methods import METHODS

pytestmark = pytest.mark.integration  # tiny runs through the CLI

TINY = ["--tiny", "--train-limit", "8", "--eval-limit", "8", "--epochs", "1", "--batch-size", "4",
        "--max-length", "8", "--no-progress"]

NUMBERS = ["0", "-1", "1", "2", "0.5", "1e-9", "1e30", "-1e-3", "nan", "inf", "-inf", "abc", "2.5"]
OPTIONS = {  # option -> the values it is drawn with (None: a switch)
    "--method": list(METHODS) + ["dora-typo"],
    "--impl": ["pelib", "peft"],
    "--lr": NUMBERS,
    "--head-lr": NUMBERS,
    "--epochs": ["1", "0.5", "1e-9", "0", "-2", "inf", "2"],
    "--batch-size": ["0", "4", "-1", "2.5", "8"],
    "--grad-accum": ["0", "1", "2"],
    "--max-length": ["1", "8", "1000", "-8"],
    "--r": ["0", "2", "4", "64", "-1"],
    "--alpha": NUMBERS,
    "--dropout": ["0", "0.1", "1.5", "-0.1", "nan"],
    "--targets": ["query", "(", "nothing", "query value"],
    "--seed": ["0", "-1", str(2**70), "7"],
    "--warmup-ratio": ["0", "1", "0.5", "-0.5"],
    "--label-smoothing": ["0", "1", "0.1", "nan"],
    "--layer-decay": ["0", "0.5", "1", "2"],
    "--weight-decay": ["0", "0.01", "-1", "inf"],
    "--max-grad-norm": ["1", "0", "-1"],
    "--head-init": ["random", "probe", "bogus"],
    "--schedule": ["linear", "cosine", "constant", "step"],
    "--pooling": ["mean", "cls", "last"],
    "--train-limit": ["1", "2", "0", "-5"],
    "--name": ["run", "", "../x", "n" * 300, "summary", "a b"],
    "--bf16": None,
    "--base-dtype": ["auto", "bf16", "fp32", "fp16"],
    "--fp32": None,
    "--resume": None,
    "--orth-reg-weight": ["0.1", "nan", "inf"],
    "--sparse-lambda": ["0.05", "1e3", "-1"],
    "--threshold-scale": ["lr", "none"],
    "--bottleneck": ["0", "4", "-3"],
    "--prefix-length": ["0", "2", "-1"],
}


def option():
    return st.sampled_from(sorted(OPTIONS)).flatmap(
        lambda k: st.just([k]) if OPTIONS[k] is None else
        st.sampled_from(OPTIONS[k]).map(lambda v: [k, v]))


def outcome(argv: list[str]) -> tuple[int, str]:
    """(exit status, what a user would read on stderr) of `pelib finetune ARGV`, in-process."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            return main(["finetune", *argv]), err.getvalue()
        except SystemExit as e:  # a str code is what Python prints on exit
            return (1, e.code + "\n") if isinstance(e.code, str) else (e.code, err.getvalue())


@pytest.mark.slow  # up to 25 toy trainings
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(options=st.lists(option(), min_size=1, max_size=4))
def test_property_every_run_ends_with_its_record_or_one_line(options):
    with tempfile.TemporaryDirectory() as tmp:
        argv = TINY + ["--out", tmp, "--name", "drawn"] + [x for o in options for x in o]
        code, err = outcome(argv)
        records = list(Path(tmp).glob("*.json"))
        if code == 0:
            assert len(records) == 1, argv
            assert set(json.loads(records[0].read_text())["metrics"]) >= {"f1", "accuracy"}
        else:
            lines = [line for line in err.splitlines() if line.strip()]
            assert len(lines) == 1 and lines[0].startswith("pelib"), (argv, err)
            assert "Traceback" not in err, (argv, err)
