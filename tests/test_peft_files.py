"""peft adapter files that pelib must not read wrong: a feature pelib does not implement is
refused by name, a field of the wrong kind is refused by name, a file without a task loads as
peft loads it, and a file that holds base-model weights never overwrites the base model."""
import json

import pytest
import torch
from conftest import batch, tiny
from safetensors.torch import load_file, save_file

import pelib
from pelib.io import CONFIG_NAME, WEIGHTS_NAME

BASE = dict(r=4, lora_alpha=8, target_modules=["query", "value"])


def peft_folder(path, task_type="SEQ_CLS", **fields):
    """A peft LoRA adapter of the tiny MiniLM with non-zero B and head, saved by peft."""
    from peft import LoraConfig, get_peft_model

    theirs = get_peft_model(tiny(), LoraConfig(task_type=task_type, **{**BASE, **fields}))
    torch.manual_seed(1)
    for n, p in theirs.named_parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    theirs.eval().save_pretrained(path)
    return theirs


@pytest.mark.parametrize("field, value", [
    ("bias", "all"), ("bias", "lora_only"), ("layers_to_transform", [0]),
    ("exclude_modules", ["bert.encoder.layer.0.attention.self.query"]), ("lora_bias", True),
])
def test_a_peft_feature_pelib_does_not_implement_is_refused_by_name(tmp_path, field, value):
    peft_folder(tmp_path, **{field: value})
    model = tiny()
    with pytest.raises(ValueError, match=rf"{field} = .* is a peft feature pelib does not support"):
        pelib.load_adapter(model, tmp_path)
    assert getattr(model, "pelib_adapter", None) is None


def test_a_file_without_a_task_loads_as_peft_loads_it(tmp_path):
    from peft import PeftModel

    peft_folder(tmp_path, task_type=None)  # no head in the file: peft keeps the base model's head
    theirs = PeftModel.from_pretrained(tiny(), tmp_path).eval()
    ours = pelib.load_adapter(tiny(), tmp_path).eval()
    x = batch()
    with torch.no_grad():
        assert torch.equal(ours(**x).logits, theirs(**x).logits)
    assert not ours.classifier.weight.requires_grad  # peft does not train it either


def edit(path, **fields):
    config = json.loads((path / CONFIG_NAME).read_text())
    for k, v in fields.items():
        if v is ...:
            del config[k]
        else:
            config[k] = v
    (path / CONFIG_NAME).write_text(json.dumps(config))


@pytest.mark.parametrize("fields, named", [
    (dict(lora_alpha=None), "lora_alpha = None is not a finite number"),
    (dict(lora_alpha="16"), "lora_alpha = '16' is not a finite number"),
    (dict(r=4.5), "r = 4.5 is not a positive integer"),
    (dict(r=...), r"r = '\(missing\)' is not a positive integer"),
    (dict(target_modules=None), "target_modules = None names no modules"),
    (dict(target_modules=5), "target_modules = 5 names no modules"),
    (dict(target_modules=[]), r"target_modules = \[\] names no modules"),
    (dict(target_modules=...), r"target_modules = '\(missing\)' names no modules"),
    (dict(rank_pattern="x"), "rank_pattern = 'x' must map module-name patterns to ranks"),
    (dict(alpha_pattern={"query": "x"}), "alpha_pattern = .* must map module-name patterns"),
])
def test_a_config_field_of_the_wrong_kind_is_one_line_naming_it(tmp_path, fields, named):
    peft_folder(tmp_path)
    edit(tmp_path, **fields)
    with pytest.raises(ValueError, match=rf"{CONFIG_NAME}: {named}") as e:
        pelib.load_adapter(tiny(), tmp_path)
    assert "\n" not in str(e.value)


def test_tensors_outside_the_adapter_never_overwrite_the_base_model(tmp_path):
    peft_folder(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    key = "bert.embeddings.word_embeddings.weight"
    tensors["base_model.model." + key] = torch.zeros(30522, 32)
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    model = tiny()
    before = model.get_parameter(key).clone()
    with pytest.raises(ValueError, match=rf"neither adapter weights nor in its modules_to_save.*{key}"):
        pelib.load_adapter(model, tmp_path)
    assert torch.equal(model.get_parameter(key), before)
    # listed in modules_to_save, the embeddings are the adapter's to set (peft's rule)
    edit(tmp_path, modules_to_save=["classifier", "word_embeddings"])
    loaded = pelib.load_adapter(tiny(), tmp_path)
    assert not loaded.get_parameter(key).any()


@pytest.mark.parametrize("apply", [
    lambda m: pelib.apply_adapters(m), lambda m: pelib.apply_prefix(m, prefix_length=2)])
def test_save_adapter_of_a_method_without_a_peft_file_says_how_to_save_it(tmp_path, apply):
    model = apply(tiny())
    with pytest.raises(ValueError, match=r"peft has no adapter file for that method.*save_file\(") as e:
        pelib.save_adapter(model, tmp_path / "x")
    assert "apply_lora" not in str(e.value)
    assert not (tmp_path / "x").exists()
