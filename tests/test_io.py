"""Adapter files: pelib <-> peft round trips, atomic writes, clear errors."""
import json
import os

import pytest
import torch
from conftest import batch, randomise_B, tiny

import pelib
from pelib.io import CONFIG_NAME, WEIGHTS_NAME, atomic_write


def trained_pelib(name="minilm", targets=("query", "value", "dense")):
    model = pelib.apply_lora(tiny(name=name), list(targets), r=4, alpha=8)
    randomise_B(model)
    torch.nn.init.normal_(model.get_submodule("classifier" if name == "minilm" else "score").weight)
    return model.eval()


@pytest.mark.parametrize("name,targets", [("minilm", ["query", "value", "dense"]),
                                          ("smollm2", ["q_proj", "o_proj", "up_proj"])])
def test_pelib_adapter_loads_in_peft(tmp_path, name, targets):
    from peft import PeftModel

    ours = trained_pelib(name, targets)
    pelib.save_adapter(ours, tmp_path / "ad")
    assert sorted(os.listdir(tmp_path / "ad")) == [CONFIG_NAME, WEIGHTS_NAME]
    theirs = PeftModel.from_pretrained(tiny(name=name), tmp_path / "ad").eval()
    x = batch(ours.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(ours(**x).logits, theirs(**x).logits)
    # and back into pelib: a fresh base + load_adapter gives the same logits
    again = pelib.load_adapter(tiny(name=name), tmp_path / "ad").eval()
    with torch.no_grad():
        assert torch.equal(ours(**x).logits, again(**x).logits)


def test_peft_adapter_loads_in_pelib(tmp_path):
    from peft import LoraConfig, TaskType, get_peft_model

    theirs = get_peft_model(tiny(), LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8,
                                               target_modules=["key", "dense"], use_rslora=True))
    for n, p in theirs.named_parameters():
        if "lora_B" in n or "modules_to_save" in n:
            torch.nn.init.normal_(p, std=0.1)
    theirs.eval().save_pretrained(tmp_path / "peft")
    ours = pelib.load_adapter(tiny(), tmp_path / "peft").eval()
    assert all(m.use_rslora for _, m in pelib.lora.lora_layers(ours))
    x = batch()
    with torch.no_grad():
        assert torch.equal(ours(**x).logits, theirs(**x).logits)


def test_adapter_for_another_model_names_the_keys(tmp_path):
    pelib.save_adapter(trained_pelib(), tmp_path / "ad")
    other = pelib.tiny_backbone("minilm", 5, with_tokenizer=False, hidden_size=48)[0]
    with pytest.raises(ValueError, match=r"shape mismatch.*query\.lora_A\.weight.*\(4, 32\)"):
        pelib.load_adapter(other, tmp_path / "ad")
    with pytest.raises(ValueError, match="match no module"):
        pelib.load_adapter(tiny(name="smollm2"), tmp_path / "ad")
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        pelib.load_adapter(tiny(), tmp_path / "nothing")


def test_nan_weights_refused(tmp_path):
    model = trained_pelib()
    pelib.save_adapter(model, tmp_path / "ok")
    with torch.no_grad():
        pelib.lora.lora_layers(model)[0][1].lora_A.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        pelib.save_adapter(model, tmp_path / "bad")
    assert not (tmp_path / "bad" / WEIGHTS_NAME).exists()
    from safetensors.torch import load_file, save_file

    sd = load_file(tmp_path / "ok" / WEIGHTS_NAME)
    next(iter(sd.values()))[0, 0] = float("inf")
    save_file(sd, tmp_path / "ok" / WEIGHTS_NAME)
    with pytest.raises(ValueError, match="NaN/inf"):
        pelib.load_adapter(tiny(), tmp_path / "ok")


def test_writes_are_atomic(tmp_path):
    target = tmp_path / "f.json"
    target.write_text("old")

    def crash(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, crash)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["f.json"]
    atomic_write(target, lambda tmp: open(tmp, "w").write("new"))
    assert target.read_text() == "new" and os.stat(target).st_mode & 0o044  # readable by others


def test_merged_adapter_is_not_saved(tmp_path):
    model = trained_pelib()
    pelib.lora.merge(model)
    with pytest.raises(ValueError, match="unmerge"):
        pelib.save_adapter(model, tmp_path / "m")
    pelib.lora.unmerge(model)
    cfg = json.loads((pelib.save_adapter(model, tmp_path / "m") / CONFIG_NAME).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["modules_to_save"] == ["classifier"]
