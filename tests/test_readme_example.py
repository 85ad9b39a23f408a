"""The README's Python example, run as printed, trains what `make run`'s LoRA row trains: the
library's defaults are the recipe the command line uses, so both end at the same test F1."""
import json
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def first_python_block(text: str) -> str:
    block = re.search(r"^```python\n(.*?)^```", text, re.S | re.M)
    assert block, "README.md has no ```python block"
    return block.group(1)


@pytest.mark.integration  # trains through the API and the command line
def test_the_python_api_defaults_train_what_the_cli_trains(tmp_path):
    """The README example's calls with the library's defaults, on a toy model and a subset, give
    bit for bit the losses and metrics of the command line's LoRA row on the same subset."""
    import pelib
    from pelib.__main__ import main
    from pelib.compare import preset

    label, argv = next((label, a) for label, a in preset("workshop")
                       if label == "LoRA r=8" and "--impl" not in a)
    main(["finetune", *argv, "--fp32", "--tiny", "--train-limit", "48", "--eval-limit", "24",
          "--out", str(tmp_path), "--no-progress", "--name", "cli"])
    record = json.loads((tmp_path / "cli.json").read_text())

    model, tokenizer = pelib.tiny_backbone("minilm", num_labels=77)
    pelib.apply_lora(model, ["query", "key", "value", "dense"])
    train = pelib.load_nlu("banking77", "train", limit=48)
    test = pelib.load_nlu("banking77", "test", limit=24)
    config = pelib.TrainConfig(epochs=1, head_init="probe", head_lr=2e-3, progress=False)
    result = pelib.train.train(model, tokenizer, train, test, config)
    assert result.losses == record["losses"] and result.metrics == record["metrics"]
    assert result.trainable_params == record["trainable_params"]


@pytest.mark.slow  # two full-size one-epoch MiniLM runs on Banking77: minutes each
@pytest.mark.timeout(1800)  # above the suite's 600 s per test: two runs of several minutes
def test_readme_example_reproduces_the_lora_row_of_make_run(tmp_path, monkeypatch, capsys):
    from pelib.__main__ import main
    from pelib.compare import preset

    monkeypatch.chdir(tmp_path)  # the example writes its adapter folder here
    scope: dict = {}
    exec(compile(first_python_block(README.read_text()), str(README), "exec"), scope)
    example = scope["result"].metrics["f1"]
    assert (tmp_path / "my-adapter" / "adapter_config.json").exists()

    # `make run`'s LoRA r=8 row (`compare --preset workshop --only "LoRA r=8"`, the pelib one),
    # in fp32 as the example trains (a CPU with bf16 units would otherwise pick bf16)
    label, argv = next((label, a) for label, a in preset("workshop")
                       if label == "LoRA r=8" and "--impl" not in a)
    main(["finetune", *argv, "--fp32", "--out", str(tmp_path / "cli"), "--no-progress",
          "--name", "lora"])
    record = json.loads((tmp_path / "cli" / "lora.json").read_text())
    assert round(example, 4) == round(record["metrics"]["f1"], 4)
    assert f"{example:.4f}" in capsys.readouterr().out  # the example prints it
