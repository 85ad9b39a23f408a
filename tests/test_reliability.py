"""Bad input gets a clear error that names the fix, never a traceback from deep inside or a
silent wrong result (docs/reliability.md lists the classes; the CLI, checkpoint and loader cases
are in test_methods)."""
import copy
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pelib
from pelib.data import load_nlu
from pelib.files import atomic_write
from pelib.quant import QuantState, dequantize_4bit, dequantize_4bit_ref, quantize_4bit

pytestmark = pytest.mark.integration  # a subprocess, kernels in the interpreter, tiny CLI runs

HEADER = "text\tlabel\n"


def write_split(folder, rows, header=HEADER, name="train.tsv"):
    (folder / "banking77").mkdir(exist_ok=True)
    (folder / "banking77" / name).write_text(header + rows, encoding="utf-8")
    return folder


@pytest.mark.parametrize("header,rows,message", [
    (HEADER, "hello\tcard_arrival\ntext\tlabel\n", "second header row"),
    (HEADER, "hello\tcard_arrival\nbye\tcard_arrival \n", "surrounding spaces"),
    (HEADER, "hello\tcard_arrival\n\"bye\tcard_arrival\nmore\tcard_arrival\n", "2 tab-separated"),
    ("sentence\tintent\n", "hello\tcard_arrival\n", "header must be"),
    (HEADER, "", "no rows"),
])
def test_a_damaged_data_file_is_refused(tmp_path, header, rows, message):
    write_split(tmp_path, rows, header)
    with pytest.raises(ValueError, match=message):
        load_nlu("banking77", "train", data_dir=tmp_path)


def test_a_byte_order_mark_is_not_part_of_the_header(tmp_path):
    write_split(tmp_path, "hello\tcard_arrival\n", header="\ufeff" + HEADER)
    assert load_nlu("banking77", "train", data_dir=tmp_path).label_names == ["card_arrival"]


def test_shipped_files_are_checked_against_their_recorded_sha256(tmp_path, monkeypatch):
    import pelib.data as data

    for split in ("train", "dev", "test"):  # a copy of the shipped folder, one file edited
        write_split(tmp_path, "x\ty\n", name=f"{split}.tsv")
    (tmp_path / "README.md").write_text((data.DATA_DIR / "README.md").read_text())
    original = (data.DATA_DIR / "banking77" / "train.tsv").read_text(encoding="utf-8")
    (tmp_path / "banking77" / "train.tsv").write_text(original.replace("card", "crad", 1),
                                                      encoding="utf-8")
    monkeypatch.setattr(data, "DATA_DIR", tmp_path)
    data._recorded_sha256.cache_clear()
    try:
        with pytest.raises(ValueError, match="sha256 in pelib/_data/README.md.*reinstall pelib"):
            load_nlu("banking77", "train", data_dir=tmp_path)
    finally:
        data._recorded_sha256.cache_clear()


@pytest.mark.parametrize("limit", [0, -5, 2.5, True])
def test_limits_must_be_positive_integers(limit):
    with pytest.raises(ValueError, match="positive integer"):
        load_nlu("banking77", "dev", limit=limit)


def test_targets_that_are_bad_regular_expressions_or_suffixes_say_so():
    model = pelib.tiny_backbone("minilm", 5, with_tokenizer=False)[0]
    with pytest.raises(ValueError, match="not a valid regular expression"):
        pelib.apply_lora(model, "query(", r=2)
    with pytest.raises(ValueError, match=r"pass a list: \['query'\]"):
        pelib.apply_lora(model, "query", r=2)


def test_adalora_run_too_short_to_score_is_refused_up_front():
    from pelib.adalora import RankAllocator, apply_adalora

    model = apply_adalora(pelib.tiny_backbone("minilm", 5, with_tokenizer=False)[0], ["query"],
                          init_r=4)
    with pytest.raises(ValueError, match="no step to score importance"):
        RankAllocator(model, target_r=2, tinit=0, tfinal=1, total_step=2)


def test_quantisation_refuses_float_blocksizes_and_integer_outputs():
    W = torch.randn(64, 64)
    with pytest.raises(ValueError, match="integers"):
        quantize_4bit(W, blocksize=64.0)
    packed, state = quantize_4bit(W)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        dequantize_4bit(packed, state, dtype=torch.int32)


def test_cross_entropy_kernel_refuses_labels_outside_the_vocabulary():
    from pelib.kernels.cross_entropy_kernel import cross_entropy_triton

    logits = torch.randn(4, 11)
    for bad in (11, -3):
        labels = torch.tensor([0, 3, bad, -100])
        with pytest.raises(ValueError, match=r"labels must be in \[0, 11\)"):
            cross_entropy_triton(logits, labels)
    ok = torch.tensor([0, 3, 10, -100])
    assert torch.allclose(cross_entropy_triton(logits, ok),
                          torch.nn.functional.cross_entropy(logits, ok), atol=1e-5)


def test_cross_entropy_kernel_bf16_gradient_rounds_to_nearest():
    """bf16 gradients are rounded to nearest even (as torch rounds), not truncated."""
    from pelib.kernels.cross_entropy_kernel import cross_entropy_triton

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 37, generator=g).bfloat16()
    labels = torch.randint(0, 37, (16,), generator=g)
    x = logits.clone().requires_grad_()
    cross_entropy_triton(x, labels).backward()
    x32 = logits.float().requires_grad_()
    torch.nn.functional.cross_entropy(x32, labels).backward()
    assert torch.equal(x.grad, x32.grad.bfloat16())  # the fp32 gradient, rounded by torch


def test_atomic_write_removes_temporaries_of_killed_writers(tmp_path):
    target = tmp_path / "r.json"
    code = (f"import os; from pelib.files import atomic_write; "
            f"atomic_write({str(target)!r}, lambda tmp: os.kill(os.getpid(), 9))")
    subprocess.run([sys.executable, "-c", code], check=False)
    assert len(list(tmp_path.glob(".r.json.*.tmp"))) == 1  # SIGKILL: no cleanup ran
    atomic_write(target, lambda tmp: open(tmp, "w").write("ok"))
    assert target.read_text() == "ok" and not list(tmp_path.glob(".r.json.*.tmp"))


def test_a_second_process_on_the_same_run_is_refused(tmp_path):
    import fcntl

    from pelib.__main__ import main

    with open(tmp_path / ".run.lock", "w") as lock:  # as a live run holds it
        fcntl.flock(lock, fcntl.LOCK_EX)
        with pytest.raises(SystemExit, match="another process is running run"):
            main(["finetune", "--tiny", "--train-limit", "8", "--out", str(tmp_path), "--name",
                  "run", "--no-progress"])


def test_a_finished_run_leaves_no_lock_file(tmp_path):
    from pelib.__main__ import main

    main(["finetune", "--tiny", "--train-limit", "8", "--eval-limit", "8", "--out", str(tmp_path),
          "--name", "run", "--no-progress"])
    assert (tmp_path / "run.json").exists() and not list(tmp_path.glob(".*lock"))


def test_negative_numbers_reach_the_range_checks(tmp_path):
    from pelib.__main__ import main

    with pytest.raises(SystemExit, match="lr must be a finite number > 0, got -0.001"):
        main(["finetune", "--tiny", "--lr", "-1e-3", "--train-limit", "8", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--train-limit must be a positive number of rows"):
        main(["finetune", "--tiny", "--train-limit=-5", "--out", str(tmp_path)])


# -- properties: quantisation against bitsandbytes, LoRA merge/unmerge ----------------------
SHAPES = st.tuples(st.integers(1, 9).map(lambda k: 64 * k), st.integers(1, 70))


@settings(max_examples=25, deadline=None)
@given(shape=SHAPES, dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       blocksize=st.sampled_from([64, 128, 256]), double_quant=st.booleans(),
       transpose=st.booleans(), seed=st.integers(0, 2**16))
def test_property_quantize_matches_bitsandbytes(shape, dtype, blocksize, double_quant, transpose,
                                                seed):
    """Any shape (rows a multiple of 64: see the pinned bitsandbytes CPU bug), dtype, blocksize,
    with or without double quantisation, contiguous or not: the same bytes as bitsandbytes, and
    the fast dequantisation equals the reference."""
    import bitsandbytes.functional as bnbF

    W = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    if transpose:
        W = W.t()  # a non-contiguous view
    packed, state = quantize_4bit(W, blocksize, "nf4", double_quant)
    b_packed, b_state = bnbF.quantize_4bit(W.contiguous(), blocksize=blocksize, quant_type="nf4",
                                           compress_statistics=double_quant)
    assert torch.equal(packed, b_packed.reshape(-1))
    assert torch.equal(dequantize_4bit(packed, state), dequantize_4bit_ref(packed, state))
    ours_of_theirs = dequantize_4bit(b_packed.reshape(-1), QuantState.from_bnb(b_state))
    # bitsandbytes 0.50.2's native CPU kernel, on CPUs with AVX-512, decodes a 2-d tensor wrongly
    # when its last dim is not a multiple of the blocksize (bytes and absmax are right; measured
    # on 2026-12-02, docs/benchmarks.md). As one flat row its blocks are the true ones.
    flat = copy.copy(b_state)
    flat.shape = torch.Size([W.numel()])
    assert torch.equal(ours_of_theirs, bnbF.dequantize_4bit(b_packed, flat).reshape(W.shape))
    if W.shape[-1] % blocksize == 0:  # how a model's layers are decoded: also 2-d
        assert torch.equal(ours_of_theirs, bnbF.dequantize_4bit(b_packed, b_state))


@settings(max_examples=10, deadline=None)
@given(bad=st.sampled_from([float("nan"), float("inf"), -float("inf")]),
       where=st.integers(0, 64 * 64 - 1))
def test_property_non_finite_weights_are_refused(bad, where):
    W = torch.randn(64, 64)
    W.view(-1)[where] = bad
    with pytest.raises(ValueError, match="NaN.*inf"):
        quantize_4bit(W)


@settings(max_examples=15, deadline=None)
@given(r=st.integers(1, 8), alpha=st.floats(0.5, 64), rslora=st.booleans(),
       seed=st.integers(0, 2**16))
def test_property_lora_merge_unmerge_round_trip(r, alpha, rslora, seed):
    """merge gives the adapted function with no adapter path; unmerge gives W back (to fp32
    rounding of W + dW - dW)."""
    from pelib.lora import LoRALinear

    torch.manual_seed(seed)
    base = torch.nn.Linear(24, 16)
    W0 = base.weight.detach().clone()
    layer = LoRALinear(base, r=r, alpha=alpha, use_rslora=rslora)
    torch.nn.init.normal_(layer.lora_B.weight, std=0.2)
    x = torch.randn(5, 24)
    with torch.no_grad():
        y = layer(x)
        layer.merge()
        assert torch.allclose(layer(x), y, atol=1e-5, rtol=1e-5)
        layer.unmerge()
        assert torch.allclose(layer.base_layer.weight, W0, atol=1e-6)
        assert torch.allclose(layer(x), y, atol=1e-5, rtol=1e-5)



def test_compare_redoes_a_broken_result_and_names_an_unreadable_one(tmp_path):
    from pelib.compare import _read_args, _read_record

    (tmp_path / "r.json").write_text('{"args": {"lr": 0.1}, "metr')  # cut off mid-write
    assert _read_args(tmp_path / "r.json") is None  # so run_all runs it again
    with pytest.raises(SystemExit, match=r"r\.json is not valid JSON.*delete it"):
        _read_record(tmp_path / "r.json")


def test_ctrl_c_during_compare_says_how_to_continue(monkeypatch, capsys):
    import pelib.compare
    from pelib.__main__ import main

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(pelib.compare, "main", interrupted)
    with pytest.raises(SystemExit) as e:
        main(["compare", "--preset", "smoke"])
    assert e.value.code == 130  # the shell's status for SIGINT
    assert "stopped; run the same command again" in capsys.readouterr().err


def test_an_integer_adapter_tensor_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from pelib.io import WEIGHTS_NAME

    model = pelib.apply_lora(pelib.tiny_backbone("minilm", 5, with_tokenizer=False)[0],
                             ["query"], r=2)
    pelib.save_adapter(model, tmp_path)
    sd = load_file(tmp_path / WEIGHTS_NAME)
    key = next(k for k in sd if "lora_B" in k)
    sd[key] = sd[key].to(torch.int32)
    save_file(sd, tmp_path / WEIGHTS_NAME)
    with pytest.raises(ValueError, match="non-float tensors"):
        pelib.load_adapter(pelib.tiny_backbone("minilm", 5, with_tokenizer=False)[0], tmp_path)


def test_where_results_go_does_not_make_a_run_different():
    from pelib.finetune import options, parse, same_run

    a = options(parse(["--tiny", "--out", "results"]))
    b = options(parse(["--tiny", "--out", "/abs/path/results", "--no-progress"]))
    assert same_run(a, b) and not same_run(a, options(parse(["--tiny", "--lr", "0.1"])))


def test_a_record_from_before_a_default_changed_ran_at_the_old_value():
    """Label smoothing became 0.1 by default; a record written before the option existed ran at
    0, so it is the same run as `--label-smoothing 0` and not the same as today's default."""
    from pelib.finetune import options, parse, same_run

    old = options(parse(["--tiny"]))
    del old["label_smoothing"]
    from pelib.runs import numbers

    assert numbers(options(parse(["--tiny"])))["label_smoothing"] == 0.1  # the recipe's
    assert same_run(old, options(parse(["--tiny", "--label-smoothing", "0"])))
    assert not same_run(old, options(parse(["--tiny"])))
