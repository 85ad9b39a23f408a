"""The benchmarks refuse a bad option with one line that names it and the fix, before any work."""
import re

import pytest
import torch

from pelib.bench import main


@pytest.mark.parametrize("argv,message", [
    (["lora", "--steps", "0"], r"argument --steps: must be an integer >= 3 \(2 warm-up steps"),
    (["lora", "--steps", "-5"], r"argument --steps: must be an integer >= 3 .*got -5"),
    (["lora", "--steps", "2"], r"argument --steps: must be an integer >= 3"),
    (["lora", "--steps", "1e9"], r"argument --steps: must be an integer >= 3 .*got '1e9'"),
    (["lora", "--threads", "0"], r"argument --threads: must be an integer >= 1 \(CPU threads"),
    (["lora", "--threads", "-1"], r"argument --threads: must be an integer >= 1"),
    (["lora", "--r", "0"], r"argument --r: must be an integer in \[1, 384\] \(the LoRA rank\), got 0"),
    (["lora", "--r", "1000"], r"argument --r: must be an integer in \[1, 384\]"),
    (["kernels", "--out", "/dev/null"], r"--out /dev/null is not a folder; pass --out DIR"),
    (["quant", "--n", "0"], r"argument --n: must be an integer >= 64"),
    (["quant", "--n", "-1"], r"argument --n: must be an integer >= 64"),
    (["quant", "--repeats", "0"], r"argument --repeats: must be an integer >= 1"),
    (["quant", "--tokens", "0"], r"argument --tokens: must be an integer in \[1, 16384\]"),
    (["quant", "--tokens", "100000"], r"argument --tokens: must be an integer in \[1, 16384\]"),
    (["quant", "--threads", "-1"], r"argument --threads: must be an integer >= 1"),
    (["sft-loss", "--batch", "0"], r"argument --batch: must be an integer >= 1"),
    (["generate", "--rows", "1"], r"argument --rows: must be an integer >= 2 \(test rows; one row"),
    (["generate", "--threads", "0"], r"argument --threads: must be an integer >= 1"),
])
def test_bad_options_end_in_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"pelib bench {argv[0]}: error: ")
    assert re.search(message, err), err


def test_gpu_without_cuda_is_refused(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without CUDA
    with pytest.raises(SystemExit) as e:
        main(["kernels", "--gpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "--gpu needs a CUDA device and torch sees none; run without --gpu" in err


def test_an_unknown_benchmark_is_named(capsys):
    names = r"\{lora,quant,kernels,train-step,sft-loss,generate\}"
    with pytest.raises(SystemExit, match=r"usage: python -m pelib bench " + names):
        main(["lroa"])
