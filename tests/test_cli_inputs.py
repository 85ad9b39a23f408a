"""Hostile command lines: each ends in one line that names the option, file or variable and the
fix (refused before training where the options alone tell), or in the right result; a run that
trained never loses its record."""
import dataclasses
import errno
import json
import math
import os
import re
from unittest import mock

import pytest
import torch

import pelib.compare
import pelib.sora
from pelib import methods
from pelib.__main__ import main
from pelib.runs import QUIET_STOP

pytestmark = pytest.mark.integration  # tiny runs through the CLI

TINY = ["--tiny", "--train-limit", "16", "--eval-limit", "16", "--epochs", "1", "--batch-size",
        "8", "--max-length", "16", "--no-progress"]


def finetune(tmp_path, *argv, name="x"):
    return main(["finetune", *TINY, "--out", str(tmp_path), "--name", name, *argv])


def one_line(e: SystemExit) -> str:
    text = str(e.code)
    assert "\n" not in text and "Traceback" not in text, text
    return text


@pytest.mark.parametrize("argv,message", [
    (["--bf16", "--fp32"], "--bf16 and --fp32 contradict each other"),
    (["--seed", str(2**70)], r"--seed must be an integer in \[0, 4294967295\]"),
    (["--seed", "-1"], r"--seed must be an integer in \[0, 4294967295\]"),
    (["--name", "n" * 300], "--name is 300 bytes long; use at most 200"),
    (["--name", "run\udcff"], "is not valid UTF-8 text"),  # the byte 0xff, as Python reads argv
    (["--name", "summary_smoke"], "where `pelib compare` writes its summary"),
    (["--name", "summary"], "where `pelib compare` writes its summary"),
    (["--method", "adalora", "--orth-reg-weight", "nan"], "--orth-reg-weight must be a finite"),
    (["--method", "adalora", "--orth-reg-weight", "inf"], "--orth-reg-weight must be a finite"),
    (["--lr", "-inf"], "--lr must be a finite number > 0"),
    (["--alpha", "-inf"], "--alpha must be a finite number"),
    (["--head-init", "probe", "--train-limit", "1"], "needs at least 2; got --train-limit 1"),
    (["--epochs", "1e-9"], r"less than one optimizer step .* use --epochs >= 0.5"),
    (["--method", "sora", "--save-adapter", "/dev/null"], "--save-adapter /dev/null is not a folder"),
])
def test_refused_before_training_in_one_line(tmp_path, argv, message):
    name = [] if "--name" in argv else ["--name", "x"]
    with mock.patch("pelib.train.train", side_effect=AssertionError("trained")):
        with pytest.raises(SystemExit) as e:
            main(["finetune", *TINY, "--out", str(tmp_path), *name, *argv])
    assert e.value.code != 0
    assert re.search(message, one_line(e.value))
    assert not list(tmp_path.glob("*.json"))


def test_out_empty_and_a_save_adapter_file_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="--out is empty"):
        main(["finetune", *TINY, "--out", ""])
    target = tmp_path / "adapter"
    target.write_text("mine")
    with mock.patch("pelib.train.train", side_effect=AssertionError("trained")):
        with pytest.raises(SystemExit, match=f"--save-adapter {target} is not a folder"):
            finetune(tmp_path, "--method", "sora", "--save-adapter", str(target))
    assert target.read_text() == "mine"


def test_a_folder_where_the_record_goes_is_refused_before_training(tmp_path):
    (tmp_path / "x.json").mkdir()
    with mock.patch("pelib.train.train", side_effect=AssertionError("trained")):
        with pytest.raises(SystemExit, match=r"x\.json is a folder .* pass another --name"):
            finetune(tmp_path)


def test_a_rank_without_a_world_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with mock.patch("pelib.train.train", side_effect=AssertionError("trained")):
        with pytest.raises(SystemExit, match="RANK=1 with WORLD_SIZE=unset: .* unset RANK"):
            finetune(tmp_path / "out")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(SystemExit, match="must be integers"):
        finetune(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_overflowing_loss_names_its_cause(tmp_path):
    """lr and alpha/r both scale LoRA's update: the message names the one that is off the
    recipe, not always the lr (the loop itself knows only the lr)."""
    with pytest.raises(SystemExit) as e:  # a real overflow
        finetune(tmp_path, "--lr", "1e30", "--epochs", "3")
    text = one_line(e.value)
    assert "became" in text and "--lr 1e+30 is 5e+32 times the recipe's 0.002; lower --lr" in text
    overflow = FloatingPointError("loss became nan at step 3; lower the learning rate (now 0.002)")
    with mock.patch("pelib.train.train", side_effect=overflow):
        with pytest.raises(SystemExit) as e:
            finetune(tmp_path, "--alpha", "1e30", "--r", "4", name="y")
    assert one_line(e.value) == ("pelib: the loss became nan at step 3: --alpha 1e+30 is 1.25e+29 "
                                 "times the recipe's 8; lower --alpha")
    with mock.patch("pelib.train.train", side_effect=overflow):
        with pytest.raises(SystemExit, match="at the recipe's settings; clip the gradient"):
            finetune(tmp_path, name="z")


def test_an_empty_checkpoint_is_named(tmp_path):
    (tmp_path / "x.ckpt").write_bytes(b"")
    with pytest.raises(SystemExit) as e:
        finetune(tmp_path, "--resume")
    assert "x.ckpt cannot be read as a pelib checkpoint" in one_line(e.value)
    assert "delete it" in str(e.value.code)


def test_a_full_disk_during_a_checkpoint_leaves_no_half_file(tmp_path, monkeypatch):
    def half_then_full(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", half_then_full)
    with pytest.raises(SystemExit) as e:
        finetune(tmp_path, "--resume", "--checkpoint-every", "1")
    assert "x.ckpt (No space left on device); free space" in one_line(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no checkpoint, temporary or lock


def test_ctrl_c_during_finetune_is_one_line_and_exit_130(tmp_path, capsys, monkeypatch):
    with mock.patch("pelib.train.train", side_effect=KeyboardInterrupt):
        with pytest.raises(SystemExit) as e:
            finetune(tmp_path)
    assert e.value.code == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pelib: stopped;") and "Traceback" not in err
    monkeypatch.setenv(QUIET_STOP, "1")  # a run compare started: compare says it
    with mock.patch("pelib.train.train", side_effect=KeyboardInterrupt):
        with pytest.raises(SystemExit) as e:
            finetune(tmp_path)
    assert e.value.code == 130 and capsys.readouterr().err == ""


def test_ctrl_c_during_compare_quiets_its_run_and_says_one_line(tmp_path, capsys, monkeypatch):
    seen = {}

    def run(cmd, env=None, **kw):
        seen["env"] = env
        raise KeyboardInterrupt  # what subprocess.run raises once the child is stopped

    monkeypatch.setattr(pelib.compare.subprocess, "run", run)
    with pytest.raises(SystemExit) as e:
        main(["compare", "--preset", "smoke", "--only", "LoRA r=2", "--no-progress",
              "--out", str(tmp_path)])
    assert e.value.code == 130 and seen["env"][QUIET_STOP] == "1"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run the same command again" in err


def test_compare_never_replaces_a_record_with_its_summary(tmp_path):
    record = {"name": "summary_smoke", "args": {"method": "lora"}, "metrics": {"f1": 0.5}}
    (tmp_path / "summary_smoke.json").write_text(json.dumps(record))
    with mock.patch.object(pelib.compare.subprocess, "run", side_effect=AssertionError("ran")):
        with pytest.raises(SystemExit, match="summary_smoke.json is a run's record"):
            main(["compare", "--preset", "smoke", "--only", "LoRA r=2", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "summary_smoke.json").read_text()) == record


def test_a_record_without_metrics_is_not_a_finished_run(tmp_path):
    from pelib.options import options, parse

    label, argv = [r for r in pelib.compare.preset("smoke") if r[0] == "LoRA r=2"][0]
    name, argv = pelib.compare.named(argv, tmp_path)
    (tmp_path / f"{name}.json").write_text(json.dumps({"name": name, "args": options(parse(argv))}))
    assert pelib.compare.run_all([(label, argv[:-4])], tmp_path, progress=False,
                                 finished_only=True) == []
    with pytest.raises(SystemExit, match="no run of preset smoke has finished"):
        main(["compare", "--preset", "smoke", "--only", "LoRA r=2", "--finished", "--no-progress",
              "--out", str(tmp_path)])


@pytest.mark.parametrize("option", [["--threshold-scale", "none"], ["--prox-variant", "official"],
                                    ["--sparse-lambda", "1e3", "--sparse-lambda-max", "1e3"]])
def test_sora_with_every_gate_at_zero_keeps_its_record(tmp_path, option):
    """Whatever the report says afterwards, the record of a run that trained is on disk."""
    try:
        finetune(tmp_path, "--method", "sora", "--epochs", "3", *option)
    except SystemExit as e:  # the report may refuse an empty adapter: after the record
        assert "record" in one_line(e)
    rec = json.loads((tmp_path / "x.json").read_text())
    assert rec["steps"] == 6 and set(rec["metrics"]) == {"accuracy", "precision", "recall", "f1"}


def test_sora_report_of_an_empty_adapter_is_a_result(tmp_path, monkeypatch):
    """0 live ranks: recorded, no adapter written, no error (sora.report and sora.save as the
    registry's)."""
    monkeypatch.setitem(methods.METHODS, "sora", dataclasses.replace(
        methods.METHODS["sora"], report=pelib.sora.report, save=pelib.sora.save))
    assert finetune(tmp_path, "--method", "sora", "--epochs", "3", "--threshold-scale", "none",
                    "--save-adapter", str(tmp_path / "adapter")) == 0
    rec = json.loads((tmp_path / "x.json").read_text())
    rep = rec["sora"]
    assert rep["live_ranks_total"] == 0 and rec["adapter"] is None
    assert rep["params_after_pruning"] == 32 * 77 + 77  # the 77-way head of the 32-wide toy
    assert not list((tmp_path / "adapter").iterdir())


@pytest.mark.slow  # two processes: compare and the run it starts
def test_ctrl_c_in_a_terminal_during_compare_prints_one_line(tmp_path):
    """The terminal sends SIGINT to the whole process group: the run inside stops silently, and
    compare prints the one line."""
    import signal
    import subprocess
    import sys
    import time

    env = {k: v for k, v in os.environ.items() if k != QUIET_STOP}
    for attempt in range(5):  # a toy run can end between the poll that sees its lock and the signal
        out = tmp_path / str(attempt)
        p = subprocess.Popen([sys.executable, "-m", "pelib", "compare", "--preset", "smoke",
                              "--only", "LoRA r=2", "--no-progress", "--out", str(out)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                             start_new_session=True,  # its own group, as a shell gives a job
                             # a terminal's default Ctrl-C, even where this test runs with SIGINT
                             # ignored (a job started in the background by a script inherits that)
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        while not list(out.glob(".*.lock")) and p.poll() is None:
            time.sleep(0.01)  # until the run holds its lock: it is inside finetune
        try:
            os.killpg(p.pid, signal.SIGINT)
        except ProcessLookupError:  # it had ended and been reaped already
            pass
        err = p.communicate()[1]
        if p.returncode != 0:  # the signal landed in the run (0: it had finished first; again)
            break
    assert p.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == ["pelib: stopped; run the same command again to continue where it stopped "
                     "(finished runs are kept)"], err


@pytest.mark.slow  # peft + bitsandbytes build the model
def test_qlora_through_peft_trains_on_a_cpu(tmp_path):
    """`--method qlora --impl peft` on a CPU: bitsandbytes' 4-bit layers train there and the run
    ends with its record (it once ended in a bitsandbytes shape error)."""
    finetune(tmp_path, "--method", "qlora", "--impl", "peft", "--device", "cpu", name="q")
    record = json.loads((tmp_path / "q.json").read_text())
    assert record["metrics"]["f1"] >= 0 and record["trainable_params"] > 0
    assert all(math.isfinite(x) for x in record["losses"])
