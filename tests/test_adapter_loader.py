"""Adapter files load through one loader that refuses what does not fit the model."""
import json

import pytest
import torch
from conftest import batch, tiny

import pelib
from pelib.io import CONFIG_NAME, WEIGHTS_NAME


def _saved_lora(path, **kw):
    model = pelib.apply_lora(tiny(), ["query", "value"], r=4, alpha=8, **kw)
    for _, m in pelib.lora.lora_layers(model):
        torch.nn.init.normal_(m.lora_B.weight, std=0.1)
    pelib.save_adapter(model, path)
    return model.eval()


def test_loading_into_a_model_with_other_settings_is_refused(tmp_path):
    ours = _saved_lora(tmp_path / "ad")
    same = pelib.load_adapter(pelib.apply_lora(tiny(), ["query", "value"], r=4, alpha=8),
                              tmp_path / "ad").eval()
    with torch.no_grad():
        assert torch.equal(ours(**batch()).logits, same(**batch()).logits)
    other_alpha = pelib.apply_lora(tiny(), ["query", "value"], r=4, alpha=32)
    with pytest.raises(ValueError, match="other settings.*lora_alpha"):
        pelib.load_adapter(other_alpha, tmp_path / "ad")
    merged = pelib.lora.merge(pelib.apply_lora(tiny(), ["query", "value"], r=4, alpha=8))
    with pytest.raises(ValueError, match="merged model"):
        pelib.load_adapter(merged, tmp_path / "ad")
    with pytest.raises(ValueError, match="already has LoRA layers"):
        pelib.apply_prefix(pelib.apply_lora(tiny(), ["query"], r=2))


def test_peft_alpha_pattern_is_honoured(tmp_path):
    from peft import LoraConfig, TaskType, get_peft_model

    theirs = get_peft_model(tiny(), LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8,
                                               target_modules=["key", "value"],
                                               alpha_pattern={"value": 32}))
    for n, p in theirs.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    theirs.eval().save_pretrained(tmp_path / "peft")
    ours = pelib.load_adapter(tiny(), tmp_path / "peft").eval()
    scalings = {n.rsplit(".", 1)[-1]: m.scaling for n, m in pelib.lora.lora_layers(ours)}
    assert scalings == {"key": 2.0, "value": 8.0}
    with torch.no_grad():
        assert torch.equal(ours(**batch()).logits, theirs(**batch()).logits)


def test_broken_files_give_clear_errors(tmp_path):
    _saved_lora(tmp_path / "ad")
    (tmp_path / "ad" / CONFIG_NAME).write_text('{"peft_type": "LORA", ')
    with pytest.raises(ValueError, match="not valid JSON"):
        pelib.load_adapter(tiny(), tmp_path / "ad")
    _saved_lora(tmp_path / "ad")
    data = (tmp_path / "ad" / WEIGHTS_NAME).read_bytes()
    (tmp_path / "ad" / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors"):
        pelib.load_adapter(tiny(), tmp_path / "ad")
    _saved_lora(tmp_path / "ad")
    config = json.loads((tmp_path / "ad" / CONFIG_NAME).read_text())
    (tmp_path / "ad" / CONFIG_NAME).write_text(json.dumps(dict(config, peft_type="ADALORA")))
    with pytest.raises(ValueError, match="to_lora"):
        pelib.load_adapter(tiny(), tmp_path / "ad")
