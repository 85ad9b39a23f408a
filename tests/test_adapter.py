"""Bottleneck adapters: identity at step 0, placement, closed-form parameter count, errors,
first-gradient structure, and a CLI run."""
import json

import pytest
import torch
from conftest import tiny
from torch import nn

import pelib
from pelib.adapter import Adapter, AdapterLinear, adapter_layers, adapter_parameters, apply_adapters


def batch(model, B=3, T=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, model.config.vocab_size, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 7:] = 0  # one right-padded row
    ids[1, 7:] = model.config.pad_token_id
    return dict(input_ids=ids, attention_mask=mask)


def test_adapter_starts_as_identity():
    a = Adapter(32, 4)
    assert torch.equal(a.adapter_up.weight, torch.zeros(32, 4))
    assert 0 < a.adapter_down.weight.std() < 0.02  # near-zero normal, as Houlsby
    h = torch.randn(2, 5, 32)
    assert torch.equal(a(h), h)
    n = sum(p.numel() for p in a.parameters())
    assert n == adapter_parameters(32, 4) == 2 * 32 * 4 + 4 + 32


@pytest.mark.parametrize("kind", ["houlsby", "pfeiffer"])
@pytest.mark.parametrize("name,task", [("minilm", "classification"), ("smollm2", "classification"),
                                       ("smollm2", "causal_lm")])
def test_identity_at_step_0_and_parameter_count(name, kind, task):
    base = tiny(name, task=task).eval()
    x = batch(base)
    with torch.no_grad():
        y0 = base(**x).logits
    model = apply_adapters(base, kind=kind, bottleneck=6).eval()
    with torch.no_grad():
        assert torch.equal(model(**x).logits, y0)  # W_up = 0: exactly the base model

    cfg = model.config
    d, n_layers, m = cfg.hidden_size, cfg.num_hidden_layers, 6
    per_layer = 2 if kind == "houlsby" else 1
    head = {"minilm": d * 5 + 5, "smollm2": d * 5}[name] if task == "classification" else 0
    expected = n_layers * per_layer * adapter_parameters(d, m) + head
    assert pelib.trainable_parameters(model) == expected
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(".adapter." in n or n.startswith(("classifier", "score")) for n in trainable)


def test_placement():
    bert = apply_adapters(tiny("minilm"), "houlsby", 4)
    assert [n for n, _ in adapter_layers(bert)] == [
        f"bert.encoder.layer.{i}.{s}" for i in range(2) for s in ("attention.output.dense",
                                                                 "output.dense")]
    assert [n for n, _ in adapter_layers(apply_adapters(tiny("minilm"), "pfeiffer", 4))] == [
        f"bert.encoder.layer.{i}.output.dense" for i in range(2)]
    llama = apply_adapters(tiny("smollm2"), "houlsby", 4)
    assert [n for n, _ in adapter_layers(llama)] == [
        f"model.layers.{i}.{s}" for i in range(2) for s in ("self_attn.o_proj", "mlp.down_proj")]
    # the adapter sits between the projection and the dropout/residual/LayerNorm of BertSelfOutput
    out = bert.bert.encoder.layer[0].attention.output
    assert isinstance(out.dense, AdapterLinear) and isinstance(out.LayerNorm, nn.LayerNorm)


def test_first_gradient_reaches_up_projection_only():
    """With W_up = 0, dL/dW_down = W_up^T (...) = 0: only W_up (and b_up) move on step 1."""
    model = apply_adapters(tiny("minilm"), "pfeiffer", 4)
    model(**batch(model), labels=torch.tensor([0, 3, 1])).loss.backward()
    for _, layer in adapter_layers(model):
        assert layer.adapter.adapter_up.weight.grad.abs().max() > 0
        assert layer.adapter.adapter_down.weight.grad.abs().max() == 0
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


def test_bad_inputs_name_the_fix():
    for m in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="bottleneck must be a positive integer"):
            apply_adapters(tiny(), "houlsby", m)
    with pytest.raises(ValueError, match=r"unknown adapter kind 'lora'.*houlsby.*pfeiffer"):
        apply_adapters(tiny(), "lora", 8)
    with pytest.raises(ValueError, match="activation"):
        apply_adapters(tiny(), "houlsby", 8, activation="swishy")
    with pytest.raises(ValueError, match=r"model types \['bert', 'llama'\].*'Sequential'"):
        apply_adapters(nn.Sequential(nn.Linear(4, 4)), "houlsby", 2)
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match=r"not in 'gpt2'"):
        apply_adapters(gpt2, "houlsby", 2)
    with pytest.raises(ValueError, match="already has adapters"):
        apply_adapters(apply_adapters(tiny(), "houlsby", 2), "pfeiffer", 2)


@pytest.mark.integration  # a tiny run through the command line
def test_cli_adapter(tmp_path):
    from pelib.__main__ import main

    main(["finetune", "--tiny", "--method", "adapter", "--adapter-kind", "pfeiffer",
          "--bottleneck", "4", "--train-limit", "64", "--eval-limit", "32", "--epochs", "1",
          "--out", str(tmp_path), "--no-progress", "--name", "run"])
    rec = json.loads((tmp_path / "run.json").read_text())
    d, n_layers, labels = 32, 2, 77
    assert rec["trainable_params"] == n_layers * adapter_parameters(d, 4) + d * labels + labels
    assert rec["args"]["adapter_kind"] == "pfeiffer" and rec["config"]["lr"] == 1e-3
