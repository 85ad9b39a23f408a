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


@pytest.mark.slow  # two full-size one-epoch MiniLM runs on Banking77: minutes each
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
