"""The linear probe (pelib.probe) and LP-FT's head initialisation (pelib.hooks.probe_head)."""
import json

import pytest
import torch

import pelib
from pelib.__main__ import main
from pelib.batching import encode
from pelib.hooks import probe_head
from pelib.probe import fit_probe
from pelib.train import TrainConfig

pytestmark = pytest.mark.integration  # fits L-BFGS probes and trains tiny models


def _blobs(n=300, h=6, c=4, seed=0):
    """Gaussian classes with an offset and uneven scales: standardisation matters."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(c, h, generator=g) * 2
    y = torch.arange(n) % c
    z = centres[y] + torch.randn(n, h, generator=g)
    return z * torch.linspace(0.1, 30, h) + 5.0, y


def _objective_grad(z, y, weight, bias, l2):
    """The gradient of the probe's objective at (weight, bias), written in standardised
    coordinates from scratch: zero at the optimum."""
    mu, sd = z.mean(0), z.std(0) + 1e-6
    W = (weight * sd).T.clone().requires_grad_()              # (H, C) on standardised features
    b = (bias + weight @ mu).clone().requires_grad_()
    loss = torch.nn.functional.cross_entropy((z - mu) / sd @ W + b, y) + l2 * (W ** 2).sum()
    return torch.autograd.grad(loss, (W, b))


def test_probe_is_the_optimum_and_folds_onto_raw_features():
    z, y = _blobs()
    weight, bias = fit_probe(z, y, 4, l2=1e-3)
    assert weight.shape == (4, 6) and bias.shape == (4,)
    gW, gb = _objective_grad(z, y, weight, bias, 1e-3)
    assert gW.abs().max() < 1e-4 and gb.abs().max() < 1e-4  # a stationary point: converged
    assert ((z @ weight.T + bias).argmax(-1) == y).float().mean() > 0.9
    # a stronger L2 gives a smaller standardised weight: the penalty is applied
    small, _ = fit_probe(z, y, 4, l2=1.0)
    sd = z.std(0)
    assert (small * sd).norm() < (weight * sd).norm()


def test_probe_without_bias_and_bad_shapes():
    z, y = _blobs()
    weight, bias = fit_probe(z - z.mean(0), y, 4, bias=False)
    assert bias is None and ((z - z.mean(0)) @ weight.T).argmax(-1).eq(y).float().mean() > 0.9
    with pytest.raises(ValueError, match=r"features \(N, H\) and N labels"):
        fit_probe(z[:10], y, 4)


@pytest.mark.parametrize("name,wrap", [("minilm", None), ("minilm", "peft"), ("smollm2", "pelib")])
def test_probe_head_loads_the_probe_of_the_models_features(name, wrap):
    """After probe_head the model's logits are the probe's logits on its own pooled features:
    the fitted head is in the trainable copy (also inside peft's wrapper; SmolLM2's score has
    no bias), and the training loss drops below the random head's."""
    from pelib import peers
    from pelib.classifier import split_head

    model, tok = pelib.tiny_backbone(name, 77)
    targets = ["query", "value"] if name == "minilm" else ["q_proj", "v_proj"]
    if wrap == "pelib":
        model = pelib.apply_lora(model, targets, r=2, alpha=4)
    elif wrap == "peft":
        model = peers.lora(model, targets, 2, 4)
    data = pelib.load_nlu("banking77", "train", limit=96)
    ids, y = encode(tok, data.texts, 32), torch.tensor(data.labels)
    enc = tok(data.texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        before = torch.nn.functional.cross_entropy(model(**enc).logits, y)
    probe_head(model, ids, y, tok.pad_token_id, TrainConfig())
    base = model.get_base_model() if wrap == "peft" else model
    features, _ = split_head(base)
    with torch.no_grad():
        z = features(enc["input_ids"], enc["attention_mask"])
        weight, bias = fit_probe(z, y, 77, bias=name == "minilm")
        want = z @ weight.T + (bias if bias is not None else 0)
        logits = model(**enc).logits
    assert torch.allclose(logits, want, atol=1e-4)
    assert torch.nn.functional.cross_entropy(logits, y) < before


def test_probe_head_refuses_a_model_it_cannot_split():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="head_init='random'"):
        probe_head(model, [[1, 2]], torch.tensor([0]), 0, TrainConfig())
    with pytest.raises(ValueError, match="head_init must be one of"):
        TrainConfig(head_init="zeros")


def test_cli_head_init_probe(tmp_path):
    """--head-init probe reaches the loop (its config says so) and changes the run's numbers:
    the first step's loss is the probe's, far under the random head's."""
    common = ["finetune", "--tiny", "--train-limit", "64", "--eval-limit", "16", "--epochs", "1",
              "--batch-size", "64", "--out", str(tmp_path), "--no-progress"]
    main(common + ["--name", "random"])
    main(common + ["--name", "probe", "--head-init", "probe"])
    rand, probe = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("random", "probe"))
    assert rand["config"]["head_init"] == "random" and probe["config"]["head_init"] == "probe"
    assert probe["args"]["head_init"] == "probe"
    assert probe["losses"][0] < rand["losses"][0] - 0.5
