"""`pelib finetune --task sft`: instruction tuning from the command line, on the toy SmolLM2.
Its defaults come from the task's recipe, options that belong to a classification head are
refused, every method that trains more than a head trains, a killed run resumes to the same
numbers, and its record is a run `compare` reads beside the classifier's."""
import json
import os

import pytest
import torch
from conftest import stop_at

import pelib
from pelib.__main__ import main
from pelib.finetune import build
from pelib.options import config_of, options, parse
from pelib.recipe import TASKS
from pelib.runs import finished, numbers, same_run
from pelib.sft_train import train_sft
from pelib.train import TrainConfig

pytestmark = pytest.mark.integration  # trains toy models through the command line

TINY = ["--model", "smollm2", "--task", "sft", "--tiny", "--no-progress"]


def test_the_task_sets_the_loops_defaults_and_classify_keeps_todays():
    cls, sft = parse([]), parse(["--task", "sft"])
    assert (cls.task, cls.epochs, cls.batch_size, cls.max_length) == ("classify", 3, 32, 64)
    assert (sft.epochs, sft.batch_size, sft.max_length) == (1, 16, TASKS["sft"].max_length)
    assert parse(["--task", "sft", "--batch-size", "4"]).batch_size == 4  # given: kept
    # a record written before --task existed is today's classify run with the same options
    old = options(parse(["--tiny", "--label-smoothing", "0.1"]))
    del old["task"], old["constrained"]
    assert same_run(old, options(parse(["--tiny"])))
    assert not same_run(options(parse(["--tiny"])), options(parse(["--tiny", "--task", "sft",
                                                                   "--model", "smollm2"])))


def test_an_sft_runs_numbers_hold_no_setting_of_a_classification_head():
    run = numbers(options(parse(["--task", "sft", "--model", "smollm2"])))
    assert not {"head_lr", "label_smoothing", "pooling", "head_init"} & set(run)
    assert run["lr"] == 2e-3 and run["task"] == "sft"
    assert {"head_lr", "label_smoothing"} <= set(numbers(options(parse([]))))  # classify keeps them


def test_sft_run_writes_a_record_scored_by_generation(tmp_path, capsys):
    argv = TINY + ["--train-limit", "32", "--eval-limit", "16", "--r", "2", "--out", str(tmp_path),
                   "--resume"]
    main(["finetune", *argv])
    name = "smollm2-tiny_banking77_lora-r2_pelib_s0_sft"
    rec = json.loads((tmp_path / f"{name}.json").read_text())
    assert rec["task"] == "sft" and rec["args"]["task"] == "sft" and rec["decoding"] == "greedy"
    assert set(rec["metrics"]) == {"accuracy", "precision", "recall", "f1", "invalid_rate"}
    assert rec["steps"] == 2 and len(rec["losses"]) == 2 and rec["eval_rows"] == 16
    assert rec["config"]["batch_size"] == 16 and rec["config"]["label_smoothing"] == 0
    assert finished(tmp_path / f"{name}.json", options(parse(argv)))  # compare would skip it
    assert not (tmp_path / f"{name}.ckpt").exists()  # the run finished: nothing to resume
    assert f"| {name} |" in capsys.readouterr().out

    main(["finetune", *TINY, "--train-limit", "32", "--eval-limit", "16", "--r", "2",
          "--constrained", "--out", str(tmp_path), "--name", "c"])
    rec = json.loads((tmp_path / "c.json").read_text())
    assert rec["decoding"] == "constrained" and rec["metrics"]["invalid_rate"] == 0.0


@pytest.mark.parametrize("argv, message", [
    (["--model", "minilm", "--task", "sft"], "needs a causal LM: minilm is an encoder"),
    (TINY + ["--method", "head"], "--method head trains only a classification head"),
    (TINY + ["--head-lr", "1e-2"], "--head-lr is an option of the classification head"),
    (TINY + ["--label-smoothing", "0.1"], "--label-smoothing is an option of the classification"),
    (TINY + ["--pooling", "last"], "--pooling is an option of the classification head"),
    (TINY + ["--head-init", "probe"], "--head-init probe initialises a classification head"),
    (TINY + ["--impl", "peft"], "--impl peft builds --task classify runs"),
    (["--tiny", "--constrained"], "--constrained is a decoding option of --task sft"),
])
def test_options_that_do_not_apply_to_sft_are_refused(tmp_path, argv, message):
    with pytest.raises(SystemExit, match=message):
        main(["finetune", *argv, "--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())  # refused before anything was written


def run_of(argv: list[str]):
    """The model, tokenizer, data, hooks and loop settings `finetune` builds for argv."""
    args = parse(TINY + argv)
    cfg = TrainConfig.of(config_of(args), epochs=args.epochs, batch_size=args.batch_size,
                         max_length=args.max_length, label_smoothing=0.0, seed=args.seed,
                         progress=False)
    model, tok, data, hooks = build(args, cfg)
    return model, tok, data, hooks, cfg


@pytest.mark.parametrize("method", ["full", "lora", "qlora", "dora", "sora", "adalora", "adapter",
                                    "prefix"])
def test_every_method_that_trains_more_than_a_head_learns_by_sft(method):
    """Each registry method the command line accepts with --task sft: its trainable tensors
    move, the frozen ones do not, the loss and the weights stay finite."""
    model, tok, data, hooks, cfg = run_of(["--method", method, "--train-limit", "48",
                                           "--batch-size", "8"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    evaluation = pelib.load_nlu("banking77", "test", limit=4)
    result, texts = train_sft(model, tok, data, evaluation, cfg, hooks=hooks)
    after = dict(model.named_parameters())
    moved = {n for n, p in after.items() if n in before and not torch.equal(p, before[n])}
    trainable = {n for n, p in after.items() if p.requires_grad}
    assert moved and moved <= trainable, sorted(moved - trainable)[:3]
    assert result.steps == 6 and all(map(torch.isfinite, map(torch.tensor, result.losses)))
    assert len(texts) == 4 and 0 <= result.metrics["invalid_rate"] <= 1


@pytest.mark.parametrize("method", ["lora", "sora"])
def test_an_interrupted_sft_run_resumes_to_the_same_numbers(tmp_path, method):
    """2 epochs of 4 steps with LoRA's dropout on, stopped after step 5 (last checkpoint at 4):
    started again on a freshly built model it resumes there and ends with the losses, weights,
    generated outputs and metrics of a run that was never interrupted (SoRA: its gates' hook
    state too)."""
    def run(ckpt, hooks=()):
        model, tok, data, own, cfg = run_of(["--method", method, "--train-limit", "32",
                                             "--batch-size", "8", "--epochs", "2", "--dropout",
                                             "0.1"])
        cfg.checkpoint, cfg.checkpoint_every = ckpt, 2
        evaluation = pelib.load_nlu("banking77", "test", limit=6)
        res, texts = train_sft(model, tok, data, evaluation, cfg, hooks=own + list(hooks))
        return res, texts, torch.cat([p.flatten() for p in model.parameters() if p.requires_grad])

    ref, texts_ref, w_ref = run(None)
    ckpt = str(tmp_path / "run.ckpt")
    with pytest.raises(KeyboardInterrupt):
        run(ckpt, hooks=[stop_at(5)])
    assert os.path.exists(ckpt)
    res, texts, w = run(ckpt)
    assert res.resumed_at_step == 4 and ref.resumed_at_step is None
    assert res.losses == ref.losses and res.metrics == ref.metrics and texts == texts_ref
    assert [h["loss"] for h in res.history] == [h["loss"] for h in ref.history]
    assert torch.equal(w, w_ref)


def test_a_row_longer_than_max_length_names_the_option(tmp_path):
    with pytest.raises(SystemExit, match=r"training row \d+: .*raise max_length \(--max-length\)"):
        main(["finetune", *TINY, "--train-limit", "8", "--max-length", "40", "--out",
              str(tmp_path)])


def test_the_sft_preset_names_the_zero_shot_floor_and_four_methods_at_the_task_recipe():
    from pelib.compare import preset
    from pelib.options import check

    runs = preset("sft")
    assert [a[a.index("--method") + 1] for _, a in runs] == ["zero-shot", "lora", "qlora", "sora",
                                                             "dora"]
    for _, argv in runs:
        args = parse(argv)
        check(args)
        assert (args.task, args.model, args.epochs, args.batch_size) == ("sft", "smollm2", 1, 16)
        assert args.r == (None if args.method == "zero-shot" else 8)
    assert [label for label, a in preset("smoke") if "sft" in a] == ["zero-shot (floor), SFT",
                                                                     "LoRA r=8, SFT"]


def test_compare_runs_the_smoke_sft_rows_and_tables_them(tmp_path):
    from pelib.compare import main as compare

    compare(["--preset", "smoke", "--only", "SFT", "--out", str(tmp_path), "--no-progress"])
    text = (tmp_path / "summary_smoke.md").read_text()
    assert "| zero-shot (floor), SFT | pelib | 1 | 0 |" in text  # 0 epochs: it trains nothing
    assert "| LoRA r=8, SFT | pelib | 1 | 1 |" in text
    assert "| macro-F1 | invalid | trainable |" in text
    records = json.loads((tmp_path / "summary_smoke.json").read_text())
    assert [r["args"]["task"] for r in records] == ["sft", "sft"]
    assert all("invalid_rate" in r["metrics"] for r in records)
    # each SFT row carries its own ledger (tests/test_ledger.py checks the bytes): the trained
    # row its largest step's, the zero-shot row its weights alone; so the memory table has
    # numbers, not the note of a record that kept its peak alone
    zero, lora = records
    assert zero["trainable_params"] == 0 and zero["ledger"]["batch"] == []
    assert zero["ledger"]["bytes"]["frozen weights"] > 0 == zero["ledger"]["bytes"]["gradients"]
    assert lora["ledger"]["bytes"]["optimizer state"] > 0 and lora["ledger"]["batch"][0] == 16
    assert "| zero-shot (floor), SFT | no step |" in text
    assert "their peak alone" not in text
    assert (tmp_path / "memory_smoke.png").stat().st_size > 0
