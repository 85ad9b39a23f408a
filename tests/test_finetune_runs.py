"""Tiny `finetune` runs through the CLI: a new registry entry trains, a record is never replaced
by another run's, the head-only floor trains the head alone, the device and precision are
recorded."""
import json
from unittest import mock

import pytest
import torch
from conftest import tiny

import pelib
from pelib import methods
from pelib.__main__ import main

pytestmark = pytest.mark.integration  # trains through the CLI


def test_a_new_method_is_one_table_entry(tmp_path, monkeypatch):
    """Add a method (train only the head) as one entry: the CLI offers it, names the run with
    its tag, takes its lr, and trains only what its builder left trainable."""
    from dataclasses import dataclass
    from typing import ClassVar

    from pelib.recipe import Recipe

    @dataclass(frozen=True)
    class ProbeConfig(Recipe):
        lr: ClassVar[float] = 7e-3

        def tag(self):
            return "-head"

    def head_only(model, config, run):
        assert isinstance(config, ProbeConfig)
        for n, p in model.named_parameters():
            p.requires_grad_(n.startswith("classifier"))
        return model, []

    monkeypatch.setitem(methods.METHODS, "probe", methods.Method(
        ProbeConfig, build={"pelib": head_only}, help="the head alone"))
    main(["finetune", "--tiny", "--method", "probe", "--train-limit", "32", "--eval-limit", "16",
          "--epochs", "1", "--out", str(tmp_path), "--no-progress"])
    rec = json.loads((tmp_path / "minilm-tiny_banking77_probe-head_pelib_s0.json").read_text())
    assert rec["config"]["lr"] == 7e-3
    assert rec["trainable_params"] == 32 * 77 + 77  # the 77-way head of a 32-wide model


def test_finetune_never_replaces_another_runs_results(tmp_path):
    common = ["finetune", "--tiny", "--train-limit", "16", "--eval-limit", "8", "--epochs", "1",
              "--r", "2", "--out", str(tmp_path), "--no-progress", "--name", "run"]
    main(common)
    first = (tmp_path / "run.json").read_text()
    with pytest.raises(SystemExit, match="holds a run with other options.*--overwrite"):
        main(common + ["--lr", "0.01"])
    assert (tmp_path / "run.json").read_text() == first
    main(common + ["--lr", "0.01", "--overwrite"])
    assert json.loads((tmp_path / "run.json").read_text())["args"]["lr"] == 0.01
    main(common + ["--lr", "0.01"])  # the same options again: rerunning is fine


def test_head_only_floor_trains_the_head_alone(tmp_path):
    """`--method head` (the floor row): every backbone weight frozen, the head learns."""
    main(["finetune", "--tiny", "--method", "head", "--train-limit", "32", "--eval-limit", "8",
          "--epochs", "2", "--out", str(tmp_path), "--no-progress", "--name", "floor"])
    rec = json.loads((tmp_path / "floor.json").read_text())
    assert rec["trainable_params"] == 32 * 77 + 77  # the classifier of the 32-wide tiny model
    assert rec["config"]["lr"] == methods.METHODS["head"].lr
    model = pelib.inject.train_heads_only(tiny())
    assert [n for n, p in model.named_parameters() if p.requires_grad] == \
        ["classifier.weight", "classifier.bias"]
    with pytest.raises(ValueError, match="already has a head-only setup"):
        pelib.apply_lora(model, ["query"], r=2)


def test_device_precision_and_kernels_are_chosen_and_recorded(tmp_path):
    """On this CPU: fp32 unless --bf16, no kernels; a record says what ran. (The GPU choices,
    bf16 and pelib.patch for SmolLM2, are the same functions with CUDA present.)"""
    from pelib.finetune import parse, same_run, uses_bf16, uses_kernels

    main(["finetune", "--tiny", "--train-limit", "16", "--eval-limit", "8", "--epochs", "1",
          "--out", str(tmp_path), "--no-progress", "--name", "cpu", "--bf16"])
    rec = json.loads((tmp_path / "cpu.json").read_text())
    assert (rec["device"], rec["bf16"], rec["kernels"]) == ("cpu", True, False)
    assert not uses_bf16(parse(["--bf16", "--fp32"])) and not uses_kernels(parse(["--model", "smollm2"]))
    # the default follows the hardware: bf16 on a CPU with bf16 units, fp32 on one without
    cpu = parse(["--device", "cpu"])
    with mock.patch("pelib.finetune.cpu_has_fast_bf16", return_value=True):
        assert uses_bf16(cpu) and not uses_bf16(parse(["--device", "cpu", "--fp32"]))
    with mock.patch("pelib.finetune.cpu_has_fast_bf16", return_value=False):
        assert not uses_bf16(cpu) and uses_bf16(parse(["--device", "cpu", "--bf16"]))
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA GPU"):
            main(["finetune", "--tiny", "--device", "cuda", "--out", str(tmp_path)])
    old = {k: v for k, v in rec["args"].items() if k not in ("device", "fp32", "no_kernels")}
    assert same_run(old, rec["args"])  # a record from before these options: still the same run
