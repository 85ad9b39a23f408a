"""`pelib finetune --save-adapter DIR`: the trained adapter of every method with a peft file,
loaded with peft on the same base, computes what pelib's trained model computes; a method with no
file, or an adapter already in DIR, is refused before training."""
import json
import logging
from unittest import mock

import pytest
import torch
from conftest import batch
from test_sft_peft import NAMES, TEXTS, peft_model

import pelib
import pelib.finetune
from pelib.__main__ import main
from pelib.io import CONFIG_NAME, WEIGHTS_NAME
from pelib.sft import generate_answers

pytestmark = pytest.mark.integration  # tiny runs through the CLI

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its CPU import logs a warning

TINY = ["--tiny", "--train-limit", "16", "--eval-limit", "8", "--epochs", "1", "--batch-size",
        "8", "--no-progress", "--fp32"]


def run(tmp_path, *argv, monkeypatch=None):
    """Run the CLI; with `monkeypatch`, return the model it trained (as pelib built it)."""
    built = []
    if monkeypatch is not None:
        build = pelib.finetune.build

        def keep(*a, **kw):
            out = build(*a, **kw)
            built.append(out)
            return out

        monkeypatch.setattr(pelib.finetune, "build", keep)
    assert main(["finetune", *TINY, "--out", str(tmp_path), "--name", "x", *argv]) == 0
    return built[0][:2] if built else None


def record(tmp_path):
    return json.loads((tmp_path / "x.json").read_text())


def base_with_dequantised_weights(model):
    """The tiny base, each QLoRA target's weight replaced by the NF4 weight pelib computes with
    (dequantised in fp32), so peft's LoRA runs on the same base weights as pelib's."""
    from pelib.quant import qlora_layers

    base = pelib.tiny_backbone("minilm", 77, with_tokenizer=False)[0]
    with torch.no_grad():
        for name, m in qlora_layers(model):
            base.get_submodule(name).weight.copy_(m.base_layer.dequantized_weight(torch.float32))
    return base


# AdaLoRA's budget schedule needs a few steps: 6 of batch 8, ranks 4 -> 2
LONGER = {"adalora": ["--train-limit", "48", "--init-r", "4", "--target-r", "2"]}


@pytest.mark.parametrize("method", ["lora", "qlora", "dora", "adalora"])
def test_classify_adapter_gives_pelibs_logits_in_peft(tmp_path, monkeypatch, method):
    from peft import PeftModel

    folder = tmp_path / "ad"
    model, _ = run(tmp_path, "--method", method, "--lr", "3e-2", "--save-adapter", str(folder),
                   *LONGER.get(method, []), monkeypatch=monkeypatch)
    assert record(tmp_path)["adapter"] == str(folder)
    cfg = json.loads((folder / CONFIG_NAME).read_text())
    assert cfg["task_type"] == "SEQ_CLS" and cfg["peft_type"] == \
        ("ADALORA" if method == "adalora" else "LORA")
    assert bool(cfg.get("use_dora")) == (method == "dora")
    fresh = pelib.tiny_backbone("minilm", 77, with_tokenizer=False)[0]
    base = base_with_dequantised_weights(model) if method == "qlora" else fresh
    theirs = PeftModel.from_pretrained(base, folder).eval()
    x = batch(model.config.vocab_size)
    with torch.no_grad():
        ours = model.eval()(**x).logits
        torch.testing.assert_close(theirs(**x).logits, ours, rtol=1e-5, atol=1e-6)
        # the comparison has teeth: training moved the adapter, and the base alone differs
        untrained = pelib.tiny_backbone("minilm", 77, with_tokenizer=False)[0].eval()(**x).logits
    assert (ours - untrained).abs().max() > 1e-3


def test_sft_lora_adapter_generates_pelibs_answers_in_peft(tmp_path, monkeypatch):
    """--task sft: the adapter loads as AutoModelForCausalLM + PeftModel, whose logits and greedy
    answers are those of pelib's trained model."""
    folder = tmp_path / "adapter"  # where test_sft_peft's peft_model reads it
    model, tok = run(tmp_path, "--model", "smollm2", "--task", "sft", "--method", "lora",
                     "--lr", "3e-2", "--save-adapter", str(folder), monkeypatch=monkeypatch)
    assert record(tmp_path)["adapter"] == str(folder)
    assert json.loads((folder / CONFIG_NAME).read_text())["task_type"] == "CAUSAL_LM"
    theirs = peft_model(tmp_path, quantized=False)
    assert type(theirs).__name__ == "PeftModelForCausalLM"
    model.eval()
    x = batch(model.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(theirs(**x).logits, model(**x).logits, rtol=1e-5, atol=1e-5)
    kw = dict(batch_size=3, max_new_tokens=6)
    a = generate_answers(model, tok, TEXTS, NAMES, **kw)
    b = generate_answers(theirs, tok, TEXTS, NAMES, **kw)
    assert a.texts == b.texts and all(a.texts)
    # training moved the adapter: B is no longer the zero it starts at
    assert any(p.abs().max() > 0 for n, p in model.named_parameters() if "lora_B" in n)


@pytest.mark.parametrize("argv,message", [
    (["--method", "full"], "--save-adapter writes an adapter file peft reads, and --method full "
                           "has none; drop --save-adapter, or train --method lora, qlora"),
    (["--method", "head"], "--method head has none"),
    (["--method", "adapter"], "--method adapter has none"),
    (["--method", "prefix"], "--method prefix has none"),
    (["--method", "lora", "--impl", "peft"], "--impl peft builds peft's model; drop --impl peft"),
])
def test_a_method_without_a_file_is_refused_before_training(tmp_path, argv, message):
    folder = tmp_path / "ad"
    with mock.patch("pelib.train.train", side_effect=AssertionError("trained")):
        with pytest.raises(SystemExit) as e:
            main(["finetune", *TINY, "--out", str(tmp_path), "--save-adapter", str(folder), *argv])
    text = str(e.value.code)
    assert "\n" not in text and message in text, text
    assert not folder.exists() and not list(tmp_path.glob("*.json"))


def test_zero_shot_is_refused_too(tmp_path):
    with pytest.raises(SystemExit, match="--method zero-shot has none"):
        main(["finetune", "--tiny", "--model", "smollm2", "--task", "sft", "--method", "zero-shot",
              "--out", str(tmp_path), "--save-adapter", str(tmp_path / "ad")])


def test_an_adapter_in_dir_is_replaced_only_with_overwrite(tmp_path):
    folder = tmp_path / "ad"
    folder.mkdir()
    (folder / CONFIG_NAME).write_text("mine")
    (folder / "notes.txt").write_text("mine too")
    with mock.patch("pelib.train.train", side_effect=AssertionError("trained")):
        with pytest.raises(SystemExit, match=f"--save-adapter {folder} holds an adapter already "
                                             f"\\({CONFIG_NAME}\\); pass --overwrite"):
            run(tmp_path, "--save-adapter", str(folder))
    assert (folder / CONFIG_NAME).read_text() == "mine" and not list(tmp_path.glob("*.json"))
    run(tmp_path, "--save-adapter", str(folder), "--overwrite")
    assert json.loads((folder / CONFIG_NAME).read_text())["peft_type"] == "LORA"
    assert (folder / WEIGHTS_NAME).exists() and (folder / "notes.txt").read_text() == "mine too"
    # the folder's own files left alone, a second run refuses the adapter it wrote
    with pytest.raises(SystemExit, match="holds an adapter already"):
        run(tmp_path, "--save-adapter", str(folder))
