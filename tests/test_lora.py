"""LoRA: init, scaling, errors, merge/unmerge, and parity with peft on the same weights."""
import math

import pytest
import torch
from conftest import batch, copy_into_peft, pelib_key, randomise_B, tiny
from torch import nn

import pelib
from pelib.lora import LoRALinear, lora_layers, merge, unmerge


def test_init_scaling_and_freezing():
    base = nn.Linear(20, 12)
    layer = LoRALinear(base, r=4, alpha=8)
    assert torch.equal(layer.lora_B.weight, torch.zeros(12, 4))
    bound = 1 / math.sqrt(20)  # kaiming-uniform with a=sqrt(5) on fan_in=20
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.std() > bound / 3
    assert layer.scaling == 2.0
    assert LoRALinear(nn.Linear(20, 12), r=4, alpha=8, use_rslora=True).scaling == 4.0
    x = torch.randn(7, 20)
    assert torch.equal(layer(x), base(x))  # B = 0: identical to the base at step 0

    model = pelib.apply_lora(tiny(), ["query", "value"], r=4, alpha=8)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".lora_" in n or n.startswith("classifier") for n in names)
    assert any(n.startswith("classifier") for n in names)  # the new head trains
    n_layers, d = 2, 32
    expected = n_layers * 2 * (4 * d + d * 4) + (d * 5 + 5)  # A and B per target + head
    assert pelib.trainable_parameters(model) == expected
    trainable, total = pelib.count_parameters(model)
    assert trainable < total


def test_bad_inputs_name_the_fix():
    with pytest.raises(ValueError, match="match no module.*query"):
        pelib.apply_lora(tiny(), ["qkv"], r=4)
    with pytest.raises(ValueError, match="positive integer"):
        pelib.apply_lora(tiny(), ["query"], r=0)
    with pytest.raises(ValueError, match="choose r <= 32"):
        pelib.apply_lora(tiny(), ["query"], r=33)
    with pytest.raises(TypeError, match="nn.Linear"):
        pelib.apply_lora(tiny(), ["word_embeddings"], r=4)
    model = pelib.apply_lora(tiny(), ["query"], r=4)
    with pytest.raises(ValueError, match="already has LoRA"):
        pelib.apply_lora(model, ["query"], r=4)


def test_regex_target_and_rank_pattern():
    model = pelib.apply_lora(tiny(), r".*layer\.0\.attention\.self\.(query|key)", r=4,
                             rank_pattern={"key": 2})
    ranks = {n: m.r for n, m in lora_layers(model)}
    assert ranks == {"bert.encoder.layer.0.attention.self.query": 4,
                     "bert.encoder.layer.0.attention.self.key": 2}


@pytest.mark.parametrize("name", ["minilm", "smollm2"])
def test_merge_unmerge(name):
    model = pelib.apply_lora(tiny(name=name), ["query", "value"] if name == "minilm"
                             else ["q_proj", "v_proj", "down_proj"], r=4, alpha=8).eval()
    randomise_B(model)
    x = batch(model.config.vocab_size)
    W0 = {n: m.base_layer.weight.clone() for n, m in lora_layers(model)}
    with torch.no_grad():
        y = model(**x).logits
        merge(model)
        y_merged = model(**x).logits
        assert not torch.equal(W0[next(iter(W0))], lora_layers(model)[0][1].base_layer.weight)
        unmerge(model)
        y_back = model(**x).logits
    assert (y - y_merged).abs().max() < 1e-5
    assert (y - y_back).abs().max() < 1e-6
    for n, m in lora_layers(model):
        assert (m.base_layer.weight - W0[n]).abs().max() < 1e-6


@pytest.mark.parametrize("name,targets", [("minilm", ["query", "value", "dense"]),
                                          ("smollm2", ["q_proj", "k_proj", "gate_proj"])])
def test_parity_with_peft(name, targets):
    """Same base weights, same A/B: pelib's logits and gradients equal peft's."""
    from peft import LoraConfig, TaskType, get_peft_model

    ours = pelib.apply_lora(tiny(name=name), targets, r=4, alpha=8)
    randomise_B(ours)
    theirs = get_peft_model(tiny(name=name), LoraConfig(
        task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, target_modules=targets))
    copy_into_peft(ours, theirs)  # our adapter + head (peft's names carry the adapter name)
    ours.eval(), theirs.eval()  # no dropout: the comparison is deterministic
    x = batch(ours.config.vocab_size)
    labels = torch.tensor([0, 3, 1])
    out_a, out_b = ours(**x, labels=labels), theirs(**x, labels=labels)
    assert torch.equal(out_a.logits, out_b.logits)
    out_a.loss.backward()
    out_b.loss.backward()
    grads_b = {pelib_key(n): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    for n, p in ours.named_parameters():
        if p.requires_grad:
            assert (p.grad - grads_b[n]).abs().max() <= 1e-6, n
