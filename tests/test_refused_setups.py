"""Options and setups that do not fit are refused before anything trains, with the fix named."""
from unittest import mock

import pytest

import pelib
from pelib.__main__ import main


@pytest.mark.parametrize("argv,message", [
    (["--method", "lora", "--init-r", "4"], "--init-r is an option of --method adalora"),
    (["--method", "sora", "--impl", "peft"], "--impl peft is only for --method lora, qlora"),
    (["--method", "lora", "--lr", "0"], "lr must be a finite number > 0"),
    (["--method", "lora", "--lr", "inf"], "lr must be a finite number > 0"),
    (["--method", "lora", "--epochs", "inf"], "epochs must be a finite number > 0"),
    (["--method", "lora", "--max-length", "1"], "no room for text"),
    (["--method", "lora", "--max-length", "1000"], "exceeds the model's 128 position"),
    (["--method", "lora", "--name", "../x"], "plain file stem"),
    (["--method", "lora", "--dropout", "1.5"], "dropout must be in"),
    (["--method", "lora", "--alpha", "nan"], "alpha must be a finite number"),
])
def test_cli_options_that_do_not_fit_are_refused(tmp_path, argv, message):
    with pytest.raises(SystemExit, match=message):
        main(["finetune", "--tiny", "--train-limit", "8", "--out", str(tmp_path), *argv])


@pytest.mark.parametrize("method,option", [
    ("adapter", ["--r", "4"]), ("full", ["--r", "4"]), ("adalora", ["--r", "4"]),
    ("head", ["--r", "4"]), ("head", ["--alpha", "8"]), ("prefix", ["--dropout", "0.1"]),
    ("adapter", ["--dropout", "0.1"]), ("adapter", ["--targets", "query"]),
    ("prefix", ["--targets", "query"]), ("sora", ["--rslora"]), ("adalora", ["--rslora"]),
    ("full", ["--rslora"]), ("lora", ["--bottleneck", "8"]), ("head", ["--lora-r", "4"]),
])
def test_an_option_the_method_lacks_is_refused(tmp_path, method, option):
    """The method options come from the configs' fields: one the method's config does not have
    is an error naming the option and the method, before anything is built."""
    flag = "--r" if option[0] == "--lora-r" else option[0]
    with mock.patch("pelib.finetune.build", side_effect=AssertionError("built")):
        with pytest.raises(SystemExit, match=f"^pelib: {flag} is an option of --method .*, "
                                             f"not {method}$"):
            main(["finetune", "--tiny", "--method", method, "--out", str(tmp_path), *option])


def test_training_a_merged_adapter_is_refused():
    from pelib.train import TrainConfig, train

    model, tok = pelib.tiny_backbone("minilm", 77)
    pelib.lora.merge(pelib.apply_lora(model, ["query"], r=2))
    data = pelib.load_nlu("banking77", "train", limit=8)
    with pytest.raises(ValueError, match="merged.*unmerge"):
        train(model, tok, data, data, TrainConfig(epochs=1, progress=False))
