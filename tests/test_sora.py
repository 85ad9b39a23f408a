"""SoRA: the gated layer, the exact soft threshold vs the official update, the prox's lr scale,
the sparsity schedule, accumulation invariance, pruning to a peft-loadable LoRA, bad inputs."""
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import batch, tiny
from torch import nn

import pelib
from pelib.__main__ import main
from pelib.hooks import Hook
from pelib.io import CONFIG_NAME, WEIGHTS_NAME
from pelib.optim import make_optimizer
from pelib.sora import (
    SoRA,
    SoRALinear,
    SparsitySchedule,
    apply_sora,
    export_lora,
    live_ranks,
    official_threshold,
    prune,
    soft_threshold,
    sora_layers,
)
from pelib.train import TrainConfig, train

pytestmark = pytest.mark.integration  # runs through the CLI and trainings of whole schedules

TARGETS = ["query", "value", "dense"]


def randomise(model, seed=1, dead=()):
    """Random B (std 0.1) and gates with some exact zeros; modules in `dead` lose every gate."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, m in sora_layers(model):
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)
            gate = torch.randn(m.r, generator=g)
            gate[torch.rand(m.r, generator=g) < 0.4] = 0.0
            gate[0] = 0.7  # at least one live rank ...
            if n in dead:  # ... unless the module is meant to die
                gate.zero_()
            m.gate.copy_(gate)
    return model


def test_soft_threshold_is_exact_and_official_is_not():
    lam = 0.125  # dyadic values: float32 and the Python floats below agree exactly
    g = torch.tensor([0.5, 0.1875, 0.15625, 0.125, 0.0625, 0.0, -0.0625, -0.125, -0.21875, -0.625])
    # the prox of lam*|g|, written out case by case (and torch's softshrink, a peer)
    expected = torch.tensor([v - lam if v > lam else v + lam if v < -lam else 0.0 for v in g.tolist()])
    assert torch.equal(soft_threshold(g, lam), expected)
    assert torch.equal(soft_threshold(g, lam), F.softshrink(g, lam))
    official = official_threshold(g, lam)
    band = (g.abs() > lam) & (g.abs() < 2 * lam)  # lam < |g| < 2 lam
    assert band.sum() == 3
    assert torch.equal(official[band], torch.zeros(3))  # zeroed, instead of |g| - lam
    assert (soft_threshold(g, lam)[band].abs() > 0.01).all()
    big = g.abs() >= 2 * lam
    assert torch.equal(official[big], expected[big])  # outside the band they agree
    assert official[3] == lam and official[7] == -lam  # the official strict '<' keeps |g| == lam
    assert torch.equal(soft_threshold(g, 0.0), g)
    for f in (soft_threshold, official_threshold):
        with pytest.raises(ValueError, match="non-negative sparse lambda"):
            f(g, -0.1)
        with pytest.raises(ValueError, match=">= 0"):
            f(g, float("nan"))


def test_layer_forward_init_and_merge():
    base = nn.Linear(20, 12)
    layer = SoRALinear(base, r=4, alpha=8)
    assert layer.gate.shape == (4,) and torch.equal(layer.gate, torch.ones(4))
    x = torch.randn(3, 5, 20)  # (B, T, in)
    assert torch.equal(layer(x), base(x))  # B = 0: the base layer exactly
    torch.manual_seed(0)
    assert SoRALinear(nn.Linear(20, 12), r=4, gate_init="normal").gate.std() > 0.2
    with pytest.raises(ValueError, match="gate_init"):
        SoRALinear(nn.Linear(20, 12), r=4, gate_init="zeros")
    with torch.no_grad():
        layer.lora_B.weight.normal_()
        layer.gate.copy_(torch.tensor([0.5, 0.0, -2.0, 1.0]))
    A, B, g = layer.lora_A.weight, layer.lora_B.weight, layer.gate
    ref = x @ base.weight.T + base.bias + 2.0 * ((x @ A.T) * g) @ B.T  # alpha/r = 2
    assert torch.allclose(layer(x), ref, atol=1e-5, rtol=0)
    # the gradient of the gate: dL/dg_k = s * sum_tokens (x A^T)_k (G B)_k with G = dL/dy
    G = torch.randn(3, 5, 12)
    (layer(x) * G).sum().backward()
    manual = 2.0 * ((x @ A.T) * (G @ B)).sum((0, 1))
    assert torch.allclose(layer.gate.grad, manual.detach(), atol=1e-4, rtol=1e-5)
    with torch.no_grad():
        y = layer(x)
        layer.merge()
        assert torch.allclose(layer(x), y, atol=1e-5, rtol=0)
        layer.unmerge()


def gate_hook_setup(lr_scaled, variant="exact", xi=0.5):
    model = randomise(apply_sora(tiny(), ["query"], r=4, alpha=8))
    hook = SoRA(xi, gate_lr=0.2, lr_scaled=lr_scaled, variant=variant)
    opt = make_optimizer(model, TrainConfig(lr=1e-3), [hook])
    hook.begin(model, opt, total_steps=10)
    return model, hook, opt


@pytest.mark.parametrize("lr_scaled", [True, False])
def test_prox_threshold_scale(lr_scaled):
    """The paper's T_{eta*xi} reads the gate group's current lr; the official form uses xi."""
    model, hook, opt = gate_hook_setup(lr_scaled)
    assert hook.group["lr"] == 0.2 and hook.group["weight_decay"] == 0.0
    hook.group["lr"] = 0.3  # as a scheduler would set it
    before = {n: m.gate.detach().clone() for n, m in sora_layers(model)}
    hook.step(model, 1)  # no gradients: only the prox acts
    lam = 0.5 * 0.3 if lr_scaled else 0.5
    for n, m in sora_layers(model):
        assert torch.equal(m.gate, F.softshrink(before[n], lam))
    assert hook.history == [(0.5, lam)]


def test_official_variant_in_the_hook():
    model, hook, _ = gate_hook_setup(False, "official", xi=0.5)
    with torch.no_grad():
        for _, m in sora_layers(model):
            m.gate.copy_(torch.tensor([0.7, 1.5, -0.6, 0.2]))
    hook.step(model, 1)
    for _, m in sora_layers(model):
        assert torch.allclose(m.gate, torch.tensor([0.0, 1.0, 0.0, 0.0]))  # exact: 0.2, 1, -0.1, 0


def test_schedule_stages_and_errors():
    s = SparsitySchedule.linear(0.1, 0.3, 3)
    assert s.lambdas == pytest.approx([0.1, 0.2, 0.3])
    s.begin(total_steps=9)
    assert [s(t) for t in range(1, 10)] == pytest.approx([0.1] * 3 + [0.2] * 3 + [0.3] * 3)
    fixed = SparsitySchedule([1.0, 2.0], stage_steps=4)
    fixed.begin(total_steps=10)
    assert [fixed(t) for t in (1, 4, 5, 10)] == [1.0, 1.0, 2.0, 2.0]  # last value holds
    with pytest.raises(ValueError, match="does not end within training"):
        SparsitySchedule([1.0, 2.0, 3.0], stage_steps=5).begin(total_steps=10)
    with pytest.raises(ValueError, match="fewer stages"):
        SparsitySchedule.linear(0.1, 0.2, 5).begin(total_steps=3)
    with pytest.raises(ValueError, match="finite list"):
        SparsitySchedule(x * 0.1 for x in range(3))
    with pytest.raises(ValueError, match="non-negative"):
        SparsitySchedule([0.1, -0.2])
    with pytest.raises(ValueError, match="empty"):
        SparsitySchedule([])
    with pytest.raises(ValueError, match="stage_steps"):
        SparsitySchedule([0.1], stage_steps=0)
    with pytest.raises(ValueError, match="non-negative"):
        SoRA(-1.0)
    with pytest.raises(ValueError, match="variant"):
        SoRA(0.1, variant="approx")


def no_dropout(model):
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def test_grad_accumulation_matches_big_batch():
    """8 x 1 and 1 x 8 (accumulated) give the same gates and weights: one prox per optimizer step."""
    data = pelib.load_nlu("banking77", "train", limit=8)
    data = data._replace(texts=["card payment declined again today"] * 8)
    outs, hooks = [], []
    for bs, acc in [(8, 1), (1, 8)]:
        torch.manual_seed(0)
        model, tok = pelib.tiny_backbone("minilm", 77)
        apply_sora(no_dropout(model), ["query", "value"], r=4, alpha=8, gate_init="normal")
        hook = SoRA(SparsitySchedule([0.6, 1.2]), gate_lr=0.5)
        train(model, tok, data, data, TrainConfig(epochs=3, lr=1e-2, batch_size=bs, grad_accum=acc,
                                                  warmup_ratio=0, progress=False), hooks=[hook])
        outs.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        hooks.append(hook)
    assert len(hooks[0].history) == len(hooks[1].history) == 3  # once per optimizer step
    gates = [torch.cat([v for n, v in o.items() if n.endswith("gate")]) for o in outs]
    assert (gates[0] == 0).any() and (gates[0] != 0).any()  # the prox did prune something
    # live ranks per step (notebook 10 plots them; a zeroed gate can revive at the next step)
    live = hooks[0].live_history
    assert len(live) == 3 and live[-1] == int((gates[0] != 0).sum())
    assert hooks[0].live_history == hooks[1].live_history
    assert torch.equal(gates[0] == 0, gates[1] == 0)
    for n in outs[0]:
        assert (outs[0][n] - outs[1][n]).abs().max() < 1e-6, n


def test_prune_loads_in_peft_with_same_outputs(tmp_path):
    from peft import PeftModel

    dead = "bert.encoder.layer.1.attention.self.value"
    model = randomise(apply_sora(tiny(), TARGETS, r=4, alpha=8), dead=[dead]).eval()
    torch.nn.init.normal_(model.classifier.weight)
    live = live_ranks(model)
    assert live[dead] == 0 and all(v >= 1 for k, v in live.items() if k != dead)
    export_lora(model, tmp_path / "ad")
    assert live_ranks(model) == live  # the model itself is untouched
    cfg = json.loads((tmp_path / "ad" / CONFIG_NAME).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4
    assert dead not in cfg["target_modules"] and len(cfg["target_modules"]) == len(live) - 1
    assert cfg["rank_pattern"] == {k: v for k, v in live.items() if 0 < v < 4}
    assert cfg["rank_pattern"]  # some module really has a reduced rank
    x = batch()
    theirs = PeftModel.from_pretrained(tiny(), tmp_path / "ad").eval()
    ranks = {n.removeprefix("base_model.model.").removesuffix(".lora_A.default"):
             m.weight.shape[0] for n, m in theirs.named_modules() if n.endswith("lora_A.default")}
    assert ranks == {k: v for k, v in live.items() if v}
    ours_again = pelib.load_adapter(tiny(), tmp_path / "ad").eval()
    with torch.no_grad():
        y = model(**x).logits
        assert (y - theirs(**x).logits).abs().max() < 1e-5
        assert (y - ours_again(**x).logits).abs().max() < 1e-5
    # the same function in fewer parameters: r' (in + out) per live module, nothing for the dead
    pruned = prune(model)
    assert not sora_layers(pruned) and isinstance(pruned.get_submodule(dead), nn.Linear)
    lora_params = sum(p.numel() for n, p in pruned.named_parameters() if ".lora_" in n)
    dims = {n: (m.in_features, m.out_features) for n, m in pelib.lora.lora_layers(pruned)}
    assert lora_params == sum(live[n] * (i + o) for n, (i, o) in dims.items())
    with torch.no_grad():
        assert (y - pruned(**x).logits).abs().max() < 1e-5


def test_all_gates_zero_is_an_error():
    model = apply_sora(tiny(), ["query"], r=2)
    with torch.no_grad():
        for _, m in sora_layers(model):
            m.gate.zero_()
    with pytest.raises(ValueError, match="every gate is zero.*lower the sparse lambda"):
        prune(model)


def test_gated_adapter_round_trip_and_wrong_gate_shape(tmp_path):
    model = randomise(apply_sora(tiny(), TARGETS, r=4, alpha=8)).eval()
    pelib.save_adapter(model, tmp_path / "sora")
    again = pelib.load_adapter(tiny(), tmp_path / "sora").eval()
    x = batch()
    with torch.no_grad():
        assert torch.equal(model(**x).logits, again(**x).logits)
    export_lora(model, tmp_path / "lora")
    with pytest.raises(ValueError, match="pelib.load_adapter"):
        pelib.load_adapter(tiny(), tmp_path / "lora", method="sora")
    from safetensors.torch import load_file, save_file

    sd = load_file(tmp_path / "sora" / WEIGHTS_NAME)
    key = next(k for k in sd if k.endswith(".gate"))
    sd[key] = sd[key].reshape(1, -1)  # the official code's (1, r) layout
    save_file(sd, tmp_path / "sora" / WEIGHTS_NAME)
    with pytest.raises(ValueError, match=r"shape \(1, 4\).*\(r,\) = \(4,\)"):
        pelib.load_adapter(tiny(), tmp_path / "sora")


def test_cli_sora_records_live_ranks_and_writes_pruned_adapter(tmp_path):
    from peft import PeftModel

    main(["finetune", "--tiny", "--method", "sora", "--train-limit", "64", "--eval-limit", "32",
          "--epochs", "2", "--r", "4", "--batch-size", "16", "--sparse-lambda", "0.5",
          "--sparse-lambda-max", "2", "--gate-lr", "0.05", "--out", str(tmp_path),
          "--no-progress", "--save-adapter", str(tmp_path / "ad")])
    name = "minilm-tiny_banking77_sora-r4_pelib_s0"
    rec = json.loads((tmp_path / f"{name}.json").read_text())
    s = rec["sora"]
    assert s["initial_ranks_total"] == 4 * len(s["live_ranks"])
    assert s["live_ranks_total"] == sum(s["live_ranks"].values())
    assert s["params_after_pruning"] <= s["params_before_pruning"]
    cfg = json.loads((tmp_path / "ad" / CONFIG_NAME).read_text())
    assert cfg["peft_type"] == "LORA"
    PeftModel.from_pretrained(pelib.tiny_backbone("minilm", 77, with_tokenizer=False)[0],
                              tmp_path / "ad")
    with pytest.raises(SystemExit, match="does not end|fewer stages"):
        main(["finetune", "--tiny", "--method", "sora", "--sparse-lambda-max", "1",
              "--sparse-stages", "9", "--batch-size", "8", "--epochs", "1", "--out", str(tmp_path),
              "--train-limit", "16"])  # 2 steps cannot hold 9 stages
    assert rec["adapter"] == str(tmp_path / "ad")
    with pytest.raises(SystemExit, match="non-negative"):
        main(["finetune", "--tiny", "--method", "sora", "--sparse-lambda", "-1",
              "--out", str(tmp_path), "--train-limit", "8"])


def test_interrupted_sora_run_resumes_to_the_same_gates():
    """A SoRA run cut off after step 7 (last checkpoint at 6) resumes to the same gates,
    weights, losses and per-step thresholds as an uninterrupted run (the prox reads the gate
    group's lr, which the checkpointed scheduler restores)."""
    import tempfile

    from pelib.finetune import build, parse

    class StopAt(Hook):
        def step(self, model, step):
            if step == 7:
                raise KeyboardInterrupt

    argv = ["--tiny", "--method", "sora", "--r", "4", "--train-limit", "96",
            "--epochs", "2", "--batch-size", "8", "--sparse-lambda", "0.5", "--sparse-lambda-max",
            "2.0", "--gate-lr", "0.5"]

    def run(ckpt, extra=()):
        cfg = TrainConfig(epochs=2, lr=5e-3, batch_size=8, progress=False, checkpoint=ckpt,
                          checkpoint_every=3)
        model, tok, data, hooks = build(parse(argv), cfg)
        res = train(model, tok, data, data, cfg, hooks=hooks + list(extra))
        w = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])
        return res, w, hooks[0].history

    ref, w_ref, h_ref = run(None)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = f"{tmp}/s.ckpt"
        with pytest.raises(KeyboardInterrupt):
            run(ckpt, [StopAt()])
        res, w, h = run(ckpt)
    assert res.resumed_at_step == 6 and res.losses == ref.losses and h == h_ref
    assert torch.equal(w, w_ref)
