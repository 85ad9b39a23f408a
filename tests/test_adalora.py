"""AdaLoRA: the SVD layer, the allocator against peft's RankAllocator step by step, the hook in
pelib.train.train, gradient accumulation, errors, and export to peft."""
import json

import pytest
import torch
from conftest import batch, copy_into_peft, peft_key, tiny

import pelib
from pelib.adalora import RankAllocator, SVDLinear, apply_adalora, orthogonal_regularizer, svd_layers
from pelib.hooks import Hook
from pelib.train import TrainConfig, train

pytestmark = pytest.mark.integration  # runs through the CLI and trainings of whole schedules

TARGETS = ["query", "value", "dense"]


def peft_adalora(init_r, target_r, alpha, total_step, **kw):
    from peft import AdaLoraConfig, TaskType, get_peft_model

    return get_peft_model(tiny(), AdaLoraConfig(
        task_type=TaskType.SEQ_CLS, init_r=init_r, target_r=target_r, lora_alpha=alpha,
        target_modules=TARGETS, total_step=total_step, **kw))


def test_layer_init_and_delta():
    base = torch.nn.Linear(20, 12)
    layer = SVDLinear(base, r=4, alpha=8)
    assert torch.equal(layer.lora_E, torch.zeros(4, 1))
    assert 0.01 < layer.lora_A.std() < 0.03 and 0.01 < layer.lora_B.std() < 0.03  # N(0, 0.02)
    x = torch.randn(7, 20)
    assert torch.equal(layer(x), base(x))  # E = 0: the base model at step 0
    with torch.no_grad():
        layer.lora_E.normal_()
    # ΔW = P diag(λ) Q * alpha / init_r, from the paper's formula
    ref = layer.lora_B @ torch.diag(layer.lora_E.view(-1)) @ layer.lora_A * (8 / 4)
    assert (layer.delta_weight() - ref).abs().max() < 1e-5
    assert (layer(x) - base(x) - x @ ref.T).abs().max() < 1e-5
    model = apply_adalora(tiny(), TARGETS, init_r=4, alpha=8)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(".lora_" in n or n.startswith("classifier") for n in names)
    assert len(svd_layers(model)) == 2 * 5  # q, v, 3 dense per layer x 2 layers (no pooler)


def test_orthogonal_regularizer_formula():
    model = apply_adalora(tiny(), TARGETS, init_r=4, alpha=8)
    terms = []
    for _, m in svd_layers(model):
        P, Q = m.lora_B.detach(), m.lora_A.detach()
        terms += [((Q @ Q.T - torch.eye(4)) ** 2).sum().sqrt(), ((P.T @ P - torch.eye(4)) ** 2).sum().sqrt()]
    assert (orthogonal_regularizer(model) - sum(terms) / len(terms)).abs() < 1e-5
    assert orthogonal_regularizer(model) > 0.5  # N(0, 0.02) columns are far from orthonormal


@pytest.mark.parametrize("tinit,tfinal,deltaT,total", [(3, 5, 2, 24), (0, 0, 1, 12)])
def test_allocation_equals_peft_step_by_step(tinit, tfinal, deltaT, total):
    """Same weights, same batches, same AdamW: loss, budget, scores and masks equal peft's."""
    ours = apply_adalora(tiny(), TARGETS, init_r=4, alpha=8)
    alloc = RankAllocator(ours, target_r=2, tinit=tinit, tfinal=tfinal, deltaT=deltaT,
                          total_step=total)
    theirs = peft_adalora(4, 2, 8, total, tinit=tinit, tfinal=tfinal, deltaT=deltaT)
    copy_into_peft(ours, theirs)
    ours.eval(), theirs.eval()  # no dropout; gradients still flow
    opt_a = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=2e-2)
    opt_b = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=2e-2)
    peft_alloc = theirs.base_model.rankallocator
    budgets = []
    for step in range(1, total + 1):
        x, y = batch(seed=step), torch.tensor([0, 3, step % 5])
        loss_a = alloc.loss(ours, ours(**x, labels=y).loss)
        loss_b = theirs(**x, labels=y).loss  # peft adds its regulariser inside forward
        assert torch.equal(loss_a, loss_b), step
        loss_a.backward(), loss_b.backward()
        opt_a.step(), opt_b.step()
        alloc.step(ours, step)
        theirs.base_model.update_and_allocate(step)
        assert alloc.budget == peft_alloc.budget_schedule(step)[0], step
        budgets.append(alloc.budget)
        for n, m in svd_layers(ours):
            for k in ("lora_A", "lora_E", "lora_B"):
                key = f"{n}.{k}.default"
                if key in peft_alloc.exp_avg_ipt:
                    assert torch.equal(alloc.exp_avg_ipt[f"{n}.{k}"], peft_alloc.exp_avg_ipt[key])
                    assert torch.equal(alloc.exp_avg_unc[f"{n}.{k}"], peft_alloc.exp_avg_unc[key])
                else:  # both reset after the final allocation
                    assert f"{n}.{k}" not in alloc.exp_avg_ipt
            E_b = dict(theirs.named_parameters())[peft_key(n + ".lora_E")]
            assert torch.equal(m.lora_E == 0, E_b == 0), (step, n)
            assert torch.equal(m.lora_E, E_b), (step, n)
        pattern_b = theirs.peft_config["default"].rank_pattern
        if pattern_b is not None:
            assert {f"{n}.lora_E.default": v for n, v in alloc.rank_pattern.items()} == pattern_b
        opt_a.zero_grad(), opt_b.zero_grad()
    assert alloc.budget_schedule(0)[0] == 4 * 10 and budgets[-1] == 2 * 10  # it ran: 40 -> 20 (10 layers)
    assert len(set(budgets)) > 3
    assert sum(alloc.ranks().values()) == 2 * 10
    nonzero = sum(int((m.lora_E != 0).sum()) for _, m in svd_layers(ours))
    assert nonzero == 2 * 10  # the pruned triplets have λ = 0 at the end


class Recording(RankAllocator):
    """Keeps a copy of the triplet scores after every step that has them."""
    def step(self, model, step):
        super().step(model, step)
        if self.exp_avg_ipt:
            self.scores = {n: s.clone() for n, s in self.triplet_scores().items()}


def test_allocator_runs_through_the_training_loop():
    """The hook actually prunes inside pelib.train.train (github.com/huggingface/peft/issues/1801
    and /1327: it is easy to forget update_and_allocate and silently train plain LoRA)."""
    model, tok = pelib.tiny_backbone("minilm", 77)
    apply_adalora(model, TARGETS, init_r=6, alpha=12)
    alloc = RankAllocator(model, target_r=3, tinit=2, tfinal=3, deltaT=2)  # total from begin()
    data = pelib.load_nlu("banking77", "train", limit=96)
    res = train(model, tok, data, data, TrainConfig(epochs=2, lr=5e-3, batch_size=8,
                                                    progress=False), hooks=[alloc])
    assert alloc.total_step == res.steps == 24
    budgets = [h["budget"] for h in alloc.history]
    assert [h["step"] for h in alloc.history] == list(range(1, 25))
    assert budgets[:2] == [60, 60] and budgets[-4:] == [30] * 4
    assert all(a >= b for a, b in zip(budgets, budgets[1:])) and len(set(budgets)) > 4
    assert alloc.history[0]["ranks"] == {n: 6 for n, _ in svd_layers(model)}
    final = alloc.history[-1]["ranks"]
    assert sum(final.values()) == 30 and final != alloc.history[0]["ranks"]
    assert all((m.lora_E.view(-1) == 0).tolist() == [not k for k in alloc.rank_pattern[n]]
               for n, m in svd_layers(model))
    assert model.pelib_adapter["rank_pattern"] == {f"{n}.lora_E": v for n, v in alloc.rank_pattern.items()}


def test_grad_accumulation_gives_the_same_scores_and_ranks():
    data = pelib.load_nlu("banking77", "train", limit=8)
    data = data._replace(texts=["card payment declined again today"] * 8)
    runs = []
    for bs, acc in [(8, 1), (1, 8)]:
        model, tok = pelib.tiny_backbone("minilm", 77)
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        apply_adalora(model, TARGETS, init_r=4, alpha=8)
        alloc = Recording(model, target_r=2, tinit=2, tfinal=2, deltaT=1)
        train(model, tok, data, data, TrainConfig(epochs=10, lr=1e-2, batch_size=bs, grad_accum=acc,
                                                  warmup_ratio=0, progress=False), hooks=[alloc])
        runs.append(alloc)
    a, b = runs
    assert a.total_step == b.total_step == 10
    assert [h["budget"] for h in a.history] == [h["budget"] for h in b.history]
    assert [h["ranks"] for h in a.history] == [h["ranks"] for h in b.history]
    assert a.rank_pattern == b.rank_pattern
    for n in a.scores:
        assert torch.allclose(a.scores[n], b.scores[n], rtol=1e-3, atol=1e-12), n
        assert a.scores[n].abs().max() > 0


def test_bad_inputs_name_the_fix():
    model = apply_adalora(tiny(), TARGETS, init_r=4, alpha=8)
    with pytest.raises(ValueError, match="lower target_r or raise init_r"):
        RankAllocator(model, target_r=5)
    with pytest.raises(ValueError, match="lower tinit/tfinal or train for more steps"):
        RankAllocator(model, target_r=2, tinit=6, tfinal=4, total_step=10)
    late = RankAllocator(model, target_r=2, tinit=6, tfinal=4)
    with pytest.raises(ValueError, match="lower tinit/tfinal"):  # known only at begin()
        late.begin(model, None, 10)
    with pytest.raises(ValueError, match="total_step is unknown.*total_step=N"):
        RankAllocator(model, target_r=2).step(model, 1)
    with pytest.raises(ValueError, match="after loss.backward"):
        RankAllocator(model, target_r=2, total_step=10).step(model, 1)
    with pytest.raises(ValueError, match="total_step=None"):
        RankAllocator(model, target_r=2, total_step=50).begin(model, None, 20)
    with pytest.raises(ValueError, match="apply_adalora"):
        RankAllocator(tiny(), target_r=2)
    with pytest.raises(ValueError, match="already has AdaLoRA"):
        apply_adalora(model, TARGETS)
    with pytest.raises(ValueError, match="choose r <= 32"):
        apply_adalora(tiny(), TARGETS, init_r=40)
    with pytest.raises(ValueError, match="RankAllocator"):
        pelib.save_adapter(apply_adalora(tiny(), TARGETS, init_r=4), "/nonexistent")


def test_pruned_adapter_loads_in_peft(tmp_path):
    from peft import PeftModel

    model, tok = pelib.tiny_backbone("minilm", 5)
    apply_adalora(model, TARGETS, init_r=4, alpha=8)
    alloc = RankAllocator(model, target_r=2, tinit=1, tfinal=2, deltaT=1)
    data = pelib.load_nlu("banking77", "train", limit=48)
    data = data._replace(labels=[y % 5 for y in data.labels])
    train(model, tok, data, data, TrainConfig(epochs=2, lr=1e-2, batch_size=8, progress=False),
          hooks=[alloc])
    model.eval()
    pelib.save_adapter(model, tmp_path / "ad")
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["total_step"] == 12
    assert config["rank_pattern"] == {f"{n}.lora_E": v for n, v in alloc.rank_pattern.items()}
    theirs = PeftModel.from_pretrained(pelib.tiny_backbone("minilm", 5, with_tokenizer=False)[0],
                                       tmp_path / "ad").eval()
    ranks = alloc.ranks()
    assert sum(ranks.values()) == 2 * 10 and min(ranks.values()) < 4  # some triplets dropped
    for n, m in svd_layers(model):  # peft rebuilt each module at its pruned rank
        layer = theirs.base_model.model.get_submodule(n)
        assert layer.lora_A["default"].shape == (ranks[n], m.in_features)
        if ranks[n]:  # scaling kept at alpha / init_r (peft leaves a rank-0 module's at 0)
            assert layer.ranknum["default"].item() == 4
    x = batch()
    with torch.no_grad():
        ours, peft_out = model(**x).logits, theirs(**x).logits
    assert (ours - peft_out).abs().max() < 1e-6
    assert not torch.equal(ours, tiny()(**x).logits)  # the adapter changes the model


@pytest.mark.parametrize("impl", ["pelib", "peft"])
def test_cli_adalora_prunes_with_either_impl(tmp_path, impl):
    from pelib.__main__ import main

    main(["finetune", "--tiny", "--method", "adalora", "--impl", impl, "--init-r", "4",
          "--target-r", "2", "--train-limit", "96", "--eval-limit", "40", "--epochs", "2",
          "--out", str(tmp_path), "--no-progress"])
    rec = json.loads((tmp_path / f"minilm-tiny_banking77_adalora-r4to2_{impl}_s0.json").read_text())
    ada = rec["adalora"]
    assert ada["schedule"] == dict(tinit=1, tfinal=2, deltaT=10, total_step=6)  # 10% / 30% of 6
    n = len(ada["final_ranks"])
    assert n == 2 * 6 and ada["budget"][0] == 4 * n and ada["budget"][-1] == 2 * n
    assert sum(ada["final_ranks"].values()) == 2 * n
    layers = svd_layers(apply_adalora(tiny(), TARGETS + ["key"], init_r=2))
    assert ada["final_ranks"].keys() == {k for k, _ in layers}


def test_cli_adalora_bad_inputs(tmp_path):
    from pelib.__main__ import main

    common = ["finetune", "--tiny", "--method", "adalora", "--train-limit", "64", "--epochs", "1",
              "--out", str(tmp_path), "--no-progress"]
    for impl in ("pelib", "peft"):
        with pytest.raises(SystemExit, match="lower --target-r or raise --init-r"):
            main(common + ["--impl", impl, "--init-r", "4", "--target-r", "6"])
        with pytest.raises(SystemExit, match="lower them or train for more epochs"):
            main(common + ["--impl", impl, "--tinit", "1", "--tfinal", "1"])  # 2 steps in all


def test_fold_into_plain_lora_loads_in_peft_and_pelib(tmp_path):
    from peft import PeftModel

    from pelib.adalora import to_lora
    from pelib.lora import lora_layers

    model = apply_adalora(tiny(), TARGETS, init_r=4, alpha=8).eval()
    alloc = RankAllocator(model, target_r=2, tinit=0, tfinal=0, deltaT=1, total_step=10)
    g = torch.Generator().manual_seed(0)
    for _, m in svd_layers(model):  # a trained-looking adapter, then the final mask
        m.lora_E.data = torch.randn(4, 1, generator=g)
        for p in (m.lora_A, m.lora_E, m.lora_B):
            p.grad = torch.randn(p.shape, generator=g)
    alloc.step(model, 9)  # scores from these gradients, masked to b(9) = 20 = the target
    ranks, x = alloc.ranks(), batch()
    assert alloc.budget == sum(ranks.values()) == 20 and len(set(ranks.values())) > 1
    emptied = svd_layers(model)[0]  # a module whose every λ is 0 must fall back to its base
    emptied[1].lora_E.data.zero_()
    ranks[emptied[0]] = 0
    with torch.no_grad():
        before = model(**x).logits
        to_lora(model)
        after = model(**x).logits
    assert (before - after).abs().max() < 1e-5
    assert {n: m.r for n, m in lora_layers(model)} == {n: k for n, k in ranks.items() if k}
    assert not svd_layers(model) and isinstance(model.get_submodule(emptied[0]), torch.nn.Linear)
    pelib.save_adapter(model, tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["rank_pattern"] == {n: k for n, k in ranks.items() if k}
    theirs = PeftModel.from_pretrained(tiny(), tmp_path / "lora").eval()
    again = pelib.load_adapter(tiny(), tmp_path / "lora").eval()
    with torch.no_grad():
        assert (theirs(**x).logits - before).abs().max() < 1e-5
        assert torch.equal(again(**x).logits, after)


@pytest.mark.parametrize("impl", ["pelib", "peft"])
def test_interrupted_adalora_run_resumes_to_the_same_budget_and_weights(tmp_path, impl):
    """The allocator's scores live outside the model; a checkpoint carries them (hook
    state_dict), so a run cut off mid-pruning resumes to the same budgets, masks and weights."""
    from pelib.finetune import build, parse

    class StopAt(Hook):
        def step(self, model, step):
            if step == 7:
                raise KeyboardInterrupt

    argv = ["--tiny", "--method", "adalora", "--impl", impl, "--init-r", "4",
            "--target-r", "2", "--train-limit", "96", "--epochs", "2", "--batch-size", "8",
            "--tinit", "2", "--tfinal", "4", "--delta-t", "2"]

    def run(ckpt, extra=()):
        args = parse(argv)
        cfg = TrainConfig(epochs=2, lr=5e-3, batch_size=8, progress=False, checkpoint=ckpt,
                          checkpoint_every=3)
        model, tok, data, hooks = build(args, cfg)
        res = train(model, tok, data, data, cfg, hooks=hooks + list(extra))
        weights = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])
        return res, weights, [h["budget"] for h in hooks[0].history]

    ref, w_ref, b_ref = run(None)
    ckpt = str(tmp_path / "a.ckpt")
    with pytest.raises(KeyboardInterrupt):
        run(ckpt, [StopAt()])
    res, w, b = run(ckpt)
    assert res.resumed_at_step == 6 and res.losses == ref.losses
    assert b == b_ref and len(set(b)) > 2 and torch.equal(w, w_ref)
