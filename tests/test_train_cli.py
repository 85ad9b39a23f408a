"""The training loop and the command line, on toy models and small real-data subsets."""
import json
import os

import pytest
import torch
from conftest import stop_at

import pelib
from pelib.__main__ import main
from pelib.batching import length_grouped_batches
from pelib.hooks import Hook
from pelib.schedule import lr_schedule, total_steps
from pelib.train import TrainConfig, train

pytestmark = pytest.mark.integration  # tiny runs through the CLI


def test_schedule_and_batching():
    f = lr_schedule(total=100, warmup=10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(55) == pytest.approx(0.5)
    import random

    lengths = [random.Random(0).randint(3, 60) for _ in range(1000)]
    batches = length_grouped_batches(lengths, 32, random.Random(0))
    assert sorted(i for b in batches for i in b) == list(range(1000))
    pad = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    assert pad < 1.1 * sum(lengths)  # grouping by length leaves little padding
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)


class Recorder(Hook):
    """A hook: counts calls, sees gradients at step time, adds a loss term."""
    def __init__(self):
        self.steps, self.grads_present, self.loss_calls, self.begun = [], [], 0, None

    def begin(self, model, optimizer, total_steps):
        self.begun = (isinstance(optimizer, torch.optim.AdamW), total_steps)

    def loss(self, model, loss):
        self.loss_calls += 1
        return loss + 0.0 * sum(p.sum() for p in model.parameters() if p.requires_grad)

    def step(self, model, step):
        self.steps.append(step)
        self.grads_present.append(all(p.grad is not None for p in model.parameters() if p.requires_grad))


def test_loop_learns_and_calls_hooks():
    model, tok = pelib.tiny_backbone("minilm", 77)
    pelib.apply_lora(model, ["query", "value"], r=4, alpha=8)
    data = pelib.load_nlu("banking77", "train", limit=64)
    hook = Recorder()
    cfg = TrainConfig(epochs=3, lr=5e-3, batch_size=8, grad_accum=2, progress=False)
    res = train(model, tok, data, data, cfg, hooks=[hook], dev_data=data)
    assert res.steps == 3 * 4 and hook.steps == list(range(1, 13)) and all(hook.grads_present)
    assert hook.loss_calls == 3 * 8 and hook.begun == (True, 12)
    assert total_steps(64, cfg) == 12
    assert res.history[-1]["loss"] < res.history[0]["loss"]  # it learns the 64 examples
    assert res.trainable_params == pelib.trainable_parameters(model)
    assert res.peak_memory_mb > 50 and res.train_seconds > 0
    assert set(res.metrics) == {"accuracy", "precision", "recall", "f1"}
    # the dev split's scores after each epoch, plain and as if class-balanced (pelib.metrics)
    from pelib.metrics import classification_metrics
    preds = pelib.evaluation.predict(model, pelib.batching.encode(tok, data.texts, 64), tok.pad_token_id)
    assert res.history[-1]["dev_f1"] == pytest.approx(res.metrics["f1"])  # dev = eval data here
    assert res.history[-1]["dev_f1_balanced"] == pytest.approx(
        classification_metrics(data.labels, preds, balanced=True)["f1"])


class GradNorms(Hook):
    """A hook: the global norm of the gradients the optimizer stepped with."""
    def __init__(self):
        self.norms = []

    def step(self, model, step):
        grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g) for g in grads]))))


def test_max_grad_norm_clips_every_step():
    data = pelib.load_nlu("banking77", "train", limit=32)
    norms = {}
    for clip in (None, 0.05):
        model, tok = pelib.tiny_backbone("minilm", 77)
        pelib.apply_lora(model, ["query", "value"], r=4, alpha=8)
        hook = GradNorms()
        train(model, tok, data, data, TrainConfig(epochs=2, lr=5e-3, batch_size=8, progress=False,
                                                  max_grad_norm=clip), hooks=[hook])
        norms[clip] = hook.norms
    assert max(norms[None]) > 0.1  # unclipped, the norm exceeds the clip below
    assert max(norms[0.05]) <= 0.05 * (1 + 1e-5) and len(norms[0.05]) == 8
    with pytest.raises(ValueError, match="max_grad_norm"):
        TrainConfig(max_grad_norm=0)
    from pelib.finetune import parse

    assert parse(["--max-grad-norm", "1"]).max_grad_norm == 1.0 and parse([]).max_grad_norm is None


def test_grad_accumulation_matches_big_batch():
    """Equal-length texts: 1 x 8 and 2 x 4 (accumulated) give the same update."""
    data = pelib.load_nlu("banking77", "train", limit=8)
    data = data._replace(texts=["card payment declined again today"] * 8)
    outs = []
    for bs, acc in [(8, 1), (4, 2)]:
        model, tok = pelib.tiny_backbone("minilm", 77)
        pelib.apply_lora(model, ["query"], r=2)
        model.config.hidden_dropout_prob = 0.0
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        train(model, tok, data, data, TrainConfig(epochs=1, lr=1e-2, batch_size=bs, grad_accum=acc,
                                                  warmup_ratio=0, progress=False))
        outs.append(torch.cat([p.flatten() for p in model.parameters() if p.requires_grad]))
    assert (outs[0] - outs[1]).abs().max() < 1e-6


def test_cli_writes_json_and_png(tmp_path, capsys):
    main(["finetune", "--tiny", "--train-limit", "96", "--eval-limit", "40", "--epochs", "1",
          "--r", "2", "--out", str(tmp_path), "--no-progress", "--name", "run"])
    rec = json.loads((tmp_path / "run.json").read_text())
    assert rec["trainable_params"] > 0 and rec["args"]["r"] == 2 and rec["eval_rows"] == 40
    assert set(rec["metrics"]) == {"accuracy", "precision", "recall", "f1"}
    assert (tmp_path / "run_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| run |" in capsys.readouterr().out


def test_cli_trains_dora(tmp_path):
    """DoRA is one registry entry: the CLI trains it with LoRA's options and refuses others'."""
    main(["finetune", "--method", "dora", "--tiny", "--train-limit", "16", "--eval-limit", "16",
          "--epochs", "1", "--batch-size", "8", "--max-length", "16", "--r", "2",
          "--out", str(tmp_path), "--no-progress", "--name", "run"])
    rec = json.loads((tmp_path / "run.json").read_text())
    assert rec["args"]["method"] == "dora" and rec["config"]["lr"] == 2e-3
    assert set(rec["metrics"]) == {"accuracy", "precision", "recall", "f1"}
    with pytest.raises(SystemExit, match="--gate-lr is an option of --method sora, not dora"):
        main(["finetune", "--method", "dora", "--gate-lr", "0.1", "--tiny", "--out", str(tmp_path)])


def test_cli_bad_inputs(tmp_path):
    with pytest.raises(SystemExit):  # argparse: unknown method
        main(["finetune", "--method", "vera", "--tiny"])
    with pytest.raises(SystemExit, match="choose r <= 32"):
        main(["finetune", "--tiny", "--r", "64", "--out", str(tmp_path), "--train-limit", "8"])
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    if os.access(ro, os.W_OK):  # running as root: make the path impossible instead
        ro = tmp_path / "file"
        ro.write_text("")
    with pytest.raises(SystemExit, match="cannot write results"):
        main(["finetune", "--tiny", "--out", str(ro / "sub")])


@pytest.mark.slow  # real MiniLM weights, pelib and peft
def test_bench_lora_prints_both_and_ratio(capsys):
    main(["bench", "lora", "--steps", "4", "--r", "2"])
    out = capsys.readouterr().out
    assert "pelib" in out and "peft" in out and "pelib/peft" in out
    with pytest.raises(SystemExit, match="usage"):
        main(["bench", "nothing"])


@pytest.mark.parametrize("stop", [5, 9])  # last save mid-epoch (4), at an epoch end (8)
def test_interrupted_run_resumes_to_the_same_numbers(tmp_path, stop):
    """3 epochs of 4 steps with dropout on: stopped after step `stop`, started again on a
    freshly built model, the run resumes from its checkpoint and ends with the same losses,
    weights and metrics as a run that was never interrupted."""
    data = pelib.load_nlu("banking77", "train", limit=64)

    def run(ckpt, hooks=()):
        model, tok = pelib.tiny_backbone("minilm", 77)
        pelib.apply_lora(model, ["query", "value"], r=4, alpha=8, dropout=0.1)
        cfg = TrainConfig(epochs=3, lr=5e-3, batch_size=16, progress=False, checkpoint=ckpt,
                          checkpoint_every=2)
        res = train(model, tok, data, data, cfg, hooks=hooks, dev_data=data)
        return res, torch.cat([p.flatten() for p in model.parameters() if p.requires_grad])

    ref, w_ref = run(None)
    ckpt = str(tmp_path / "run.ckpt")
    with pytest.raises(KeyboardInterrupt):
        run(ckpt, hooks=[stop_at(stop)])
    assert os.path.exists(ckpt)
    res, w = run(ckpt)
    assert res.resumed_at_step == stop - 1 and ref.resumed_at_step is None
    assert res.losses == ref.losses and res.metrics == ref.metrics
    assert [h["loss"] for h in res.history] == [h["loss"] for h in ref.history]
    assert torch.equal(w, w_ref)


def test_checkpoint_of_another_run_is_refused(tmp_path):
    data = pelib.load_nlu("banking77", "train", limit=32)
    model, tok = pelib.tiny_backbone("minilm", 77)
    pelib.apply_lora(model, ["query"], r=2)
    ckpt = str(tmp_path / "c.ckpt")
    with pytest.raises(KeyboardInterrupt):
        train(model, tok, data, data, TrainConfig(epochs=2, batch_size=8, progress=False,
              checkpoint=ckpt, checkpoint_every=1), hooks=[stop_at(2)])
    with pytest.raises(ValueError, match="another run"):
        train(model, tok, data, data, TrainConfig(epochs=2, batch_size=8, lr=1e-3, progress=False,
              checkpoint=ckpt, checkpoint_every=1))


def test_head_lr_is_its_own_param_group():
    """The fresh head learns at head_lr, the rest at lr, also inside peft's wrapper; without
    head_lr everything is one group."""
    from pelib import peers
    from pelib.optim import make_optimizer

    for build in (lambda m: pelib.apply_lora(m, ["query", "value"], r=2, alpha=4),
                  lambda m: peers.lora(m, ["query", "value"], 2, 4)):
        model = build(pelib.tiny_backbone("minilm", 7, with_tokenizer=False)[0])
        opt = make_optimizer(model, TrainConfig(lr=1e-3, head_lr=5e-2), [])
        by_lr = {g["lr"]: {id(p) for p in g["params"]} for g in opt.param_groups}
        names = {id(p): n for n, p in model.named_parameters()}
        assert sorted(by_lr) == [1e-3, 5e-2]
        assert all("classifier" in names[i] for i in by_lr[5e-2]) and len(by_lr[5e-2]) == 2
        assert all("lora_" in names[i] for i in by_lr[1e-3])
        assert len(make_optimizer(model, TrainConfig(lr=1e-3, head_lr=None), []).param_groups) == 1
    assert TrainConfig().head_lr is not None  # the recipe's default: the head in its own group
    with pytest.raises(ValueError, match="head_lr must be a finite number > 0"):
        TrainConfig(head_lr=0.0)


def test_cli_head_lr_and_pooling(tmp_path):
    common = ["finetune", "--tiny", "--train-limit", "32", "--eval-limit", "16", "--epochs", "1",
              "--out", str(tmp_path), "--no-progress"]
    with pytest.raises(SystemExit, match="set its lr with --lr, not --head-lr"):
        main(common + ["--method", "head", "--head-lr", "1e-2"])
    with pytest.raises(SystemExit, match="--pooling cls is not one of smollm2's"):
        main(common + ["--model", "smollm2", "--pooling", "cls"])
    main(common + ["--method", "lora", "--pooling", "cls", "--head-lr", "3e-2"])
    rec = json.loads((tmp_path / "minilm-tiny-cls_banking77_lora-r8_pelib_s0.json").read_text())
    assert rec["config"]["head_lr"] == 3e-2 and rec["config"]["lr"] == 2e-3
    main(common + ["--method", "head", "--lr", "5e-3"])
    rec = json.loads((tmp_path / "minilm-tiny_banking77_head_pelib_s0.json").read_text())
    assert rec["config"]["head_lr"] == rec["config"]["lr"] == 5e-3


def test_head_floor_freezes_the_backbone_and_its_dropout():
    from pelib.methods import METHODS, Run

    model, _ = pelib.tiny_backbone("minilm", 7, with_tokenizer=False, hidden_dropout_prob=0.1,
                                   attention_probs_dropout_prob=0.1)
    model, hooks = METHODS["head"].build["pelib"](model, METHODS["head"].config(), Run([], 10))
    drop = {n: m.p for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout)}
    assert drop.pop("dropout") == 0.1 and drop and set(drop.values()) == {0.0}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {"classifier.weight", "classifier.bias"} and hooks == []


@pytest.mark.parametrize("name,pooling", [("minilm", "mean"), ("minilm", "cls"), ("smollm2", None)])
def test_split_head_equals_the_model(name, pooling):
    """head(features(x)) is the model's own logits, padded rows included (transformers' forward
    is the reference: mean pooling, [CLS] + pooler, Llama's last real token)."""
    from pelib.classifier import split_head

    model, tok = pelib.tiny_backbone(name, 7, pooling=pooling)
    model.eval()
    enc = tok(["my card was declined", "hi", "where is the money I sent yesterday?"],
              padding=True, return_tensors="pt")
    assert (enc["attention_mask"] == 0).any()  # some rows are padded
    features, head = split_head(model)
    with torch.no_grad():
        ours = head(features(enc["input_ids"], enc["attention_mask"]))
        assert torch.allclose(ours, model(**enc).logits, atol=1e-6)
    assert split_head(torch.nn.Linear(2, 2)) is None


@pytest.mark.parametrize("name", ["minilm", "smollm2"])
def test_head_floor_on_cached_features_equals_the_full_loop(name):
    """The floor computes its frozen trunk once; training the head on those features gives the
    numbers of running the whole model every step (same batches, same head dropout draws)."""
    from pelib.distributed import ProcessGroup
    from pelib.hooks import frozen_trunk
    from pelib.methods import METHODS, Run

    data = pelib.load_nlu("banking77", "train", limit=48)
    runs = {}
    for cache in (True, False):
        model, tok = pelib.tiny_backbone(name, 77)
        model, _ = METHODS["head"].build["pelib"](model, METHODS["head"].config(), Run([], 10))
        if name == "minilm":
            model.dropout.p = 0.3  # the head's own dropout stays live: its draws must match
        cfg = TrainConfig(epochs=2, lr=3e-2, batch_size=8, progress=False, cache_features=cache)
        assert (frozen_trunk(model, cfg, [], ProcessGroup()) is None) != cache
        res = train(model, tok, data, data, cfg)
        runs[cache] = (res, torch.cat([p.flatten() for p in model.parameters() if p.requires_grad]))
    (a, wa), (b, wb) = runs[True], runs[False]
    assert (wa - wb).abs().max() < 1e-5 and a.losses == pytest.approx(b.losses, abs=1e-5)
    assert a.metrics == b.metrics


def test_no_feature_cache_when_the_trunk_trains_or_drops_out():
    from pelib.distributed import ProcessGroup
    from pelib.hooks import frozen_trunk
    from pelib.inject import train_heads_only

    cfg, group = TrainConfig(), ProcessGroup()
    lora = pelib.apply_lora(pelib.tiny_backbone("minilm", 7, with_tokenizer=False)[0], ["query"], r=2)
    assert frozen_trunk(lora, cfg, [], group) is None  # the LoRA factors train
    head = train_heads_only(pelib.tiny_backbone("minilm", 7, with_tokenizer=False,
                                                      hidden_dropout_prob=0.1)[0])
    assert frozen_trunk(head, cfg, [], group) is None  # the trunk's dropout changes its features
    for m in head.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    assert frozen_trunk(head, cfg, [], group) is not None
    assert frozen_trunk(head, cfg, [object()], group) is None  # a hook may read the trunk


def test_weight_decay_is_decoupled_and_spares_biases_and_layernorm():
    """AdamW's decay (Loshchilov & Hutter 2019): with zero gradients one step multiplies each
    decayed weight by exactly 1 - lr * wd; biases and LayerNorm scales (1-d) do not move."""
    from pelib.optim import make_optimizer

    model = pelib.apply_lora(pelib.tiny_backbone("minilm", 7, with_tokenizer=False)[0],
                             ["query", "value"], r=2, alpha=4)
    for p in model.parameters():  # B = 0 at init: give every trainable tensor a value to decay
        if p.requires_grad:
            torch.nn.init.normal_(p)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = make_optimizer(model, TrainConfig(lr=1e-2, head_lr=5e-2, weight_decay=0.1), [])
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        factor = 1 - lr_of[id(p)] * 0.1 if p.dim() >= 2 else 1.0
        assert torch.allclose(p.detach(), before[n] * factor, rtol=0, atol=1e-7), n
    assert {n for n, p in model.named_parameters() if p.requires_grad and p.dim() < 2} \
        == {"classifier.bias"}  # the one 1-d trainable tensor here, spared
    # wd 0 and no head lr: one group, as before
    assert len(make_optimizer(model, TrainConfig(lr=1e-3, head_lr=None), []).param_groups) == 1


def test_cli_weight_decay_and_warmup(tmp_path):
    common = ["finetune", "--tiny", "--train-limit", "32", "--eval-limit", "16", "--epochs", "1",
              "--out", str(tmp_path), "--no-progress"]
    for bad in ("-0.1", "nan"):
        with pytest.raises(SystemExit, match="--weight-decay must be a finite number >= 0"):
            main(common + ["--weight-decay", bad])
    with pytest.raises(SystemExit, match=r"--warmup-ratio is a share of the steps in \[0, 1\)"):
        main(common + ["--warmup-ratio", "1"])
    for bad in (dict(weight_decay=-1.0), dict(weight_decay=float("nan")), dict(warmup_ratio=1.0),
                dict(warmup_ratio=-0.1)):  # the API refuses what the CLI refuses
        with pytest.raises(ValueError, match=next(iter(bad))):
            TrainConfig(**bad)
    main(common + ["--weight-decay", "0.01", "--warmup-ratio", "0.1", "--schedule", "cosine"])
    rec = json.loads((tmp_path / "minilm-tiny_banking77_lora-r8_pelib_s0.json").read_text())
    assert rec["config"]["weight_decay"] == 0.01 and rec["config"]["warmup_ratio"] == 0.1
    assert rec["config"]["schedule"] == "cosine"


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_lr_schedules_match_transformers_after_the_warmup(schedule):
    """After the warm-up each shape equals transformers' own schedule of that name; during it
    ours starts at 1/warmup (transformers' step 0 has lr 0 and learns nothing)."""
    import transformers

    peer = {"linear": transformers.get_linear_schedule_with_warmup,
            "cosine": transformers.get_cosine_schedule_with_warmup,
            "constant": lambda opt, w, total: transformers.get_constant_schedule_with_warmup(opt, w)}
    total, warmup = 50, 5
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched, theirs = peer[schedule](opt, warmup, total), []
    for _ in range(total):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    ours = [lr_schedule(total, warmup, schedule)(s) for s in range(total)]
    assert ours[warmup:] == pytest.approx(theirs[warmup:], abs=1e-12)
    assert ours[:warmup] == pytest.approx([(s + 1) / warmup for s in range(warmup)])
    if schedule == "cosine":  # half a cosine: 1/2 halfway through the decay, near 0 at the end
        assert ours[warmup + (total - warmup) // 2] == pytest.approx(0.5, abs=0.04)
        assert ours[-1] < 0.01


class LrRecorder(Hook):
    """A hook: the lr of the first param group at every optimizer step."""
    def begin(self, model, optimizer, total_steps):
        self.optimizer, self.lrs = optimizer, []

    def step(self, model, step):
        self.lrs.append(self.optimizer.param_groups[0]["lr"])


def test_the_loop_follows_the_schedule_it_is_given():
    data = pelib.load_nlu("banking77", "train", limit=64)
    for schedule in ("cosine", "constant"):
        model, tok = pelib.tiny_backbone("minilm", 77)
        pelib.apply_lora(model, ["query", "value"], r=4, alpha=8)
        hook = LrRecorder()
        cfg = TrainConfig(epochs=2, lr=1e-3, batch_size=8, warmup_ratio=0.25, progress=False,
                          schedule=schedule)
        train(model, tok, data, data, cfg, hooks=[hook])
        factor = lr_schedule(16, 4, schedule)
        assert hook.lrs == pytest.approx([1e-3 * factor(s) for s in range(16)])
    with pytest.raises(ValueError, match="schedule must be one of"):
        TrainConfig(schedule="step")
    common = ["finetune", "--tiny", "--train-limit", "32", "--eval-limit", "16", "--epochs", "1",
              "--no-progress"]
    with pytest.raises(SystemExit):  # argparse names the choices
        main(common + ["--schedule", "step"])


def test_layer_decay_lowers_the_lr_layer_by_layer():
    """Layer-wise lr decay: Adam's first step moves every weight by its group's lr (m / sqrt(v)
    = sign(g) after one step), so the step sizes read back lr * d**(L - l) for layer l of L, one
    power lower for the embeddings, and the head's own lr."""
    from pelib.optim import make_optimizer

    model = pelib.tiny_backbone("minilm", 7, with_tokenizer=False)[0]  # L = 2, all trainable
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = make_optimizer(model, TrainConfig(lr=1e-2, head_lr=5e-2, layer_decay=0.5), [])
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    expect = {"embeddings": 1e-2 * 0.5 ** 3, "layer.0.": 1e-2 * 0.5 ** 2, "layer.1.": 1e-2 * 0.5,
              "pooler": 1e-2, "classifier": 5e-2}
    for n, p in model.named_parameters():
        (lr,) = [v for k, v in expect.items() if k in n]
        assert torch.allclose(before[n] - p.detach(), torch.full_like(p, lr), rtol=0, atol=1e-6), n
    with pytest.raises(ValueError, match=r"layer_decay must be in \(0, 1\]"):
        TrainConfig(layer_decay=0)


def test_cli_layer_decay(tmp_path):
    common = ["finetune", "--tiny", "--train-limit", "32", "--eval-limit", "16", "--epochs", "1",
              "--out", str(tmp_path), "--no-progress", "--method", "full"]
    with pytest.raises(SystemExit, match=r"--layer-decay must be in \(0, 1\]"):
        main(common + ["--layer-decay", "1.5"])
    main(common + ["--layer-decay", "0.8"])
    rec = json.loads((tmp_path / "minilm-tiny_banking77_full_pelib_s0.json").read_text())
    assert rec["config"]["layer_decay"] == 0.8


class LossAndLogits(Hook):
    """A hook and a forward hook: the loop's loss, and the batch's logits and labels, per step."""
    def __init__(self, model, label_of):
        self.losses, self.seen = [], []
        model.register_forward_hook(self.record, with_kwargs=True)  # (`forward` is a loop event)
        self.label_of = label_of

    def record(self, module, args, kwargs, out):
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        rows = [tuple(i[m.bool()].tolist()) for i, m in zip(ids, mask)]
        self.seen.append((out.logits.detach().float(), torch.tensor([self.label_of[r] for r in rows])))

    def loss(self, model, loss):
        self.losses.append(loss.item())
        return loss


def test_label_smoothing_is_the_smoothed_cross_entropy():
    """With eps, the loop's loss is (1 - eps) * (-log p_y) + eps * mean_k(-log p_k), the formula
    of Szegedy et al. (2016), computed here by hand from the logits the model produced."""
    from pelib.batching import encode

    data = pelib.load_nlu("banking77", "train", limit=32)
    for eps in (0.0, 0.2):
        model, tok = pelib.tiny_backbone("minilm", 77)
        label_of = {tuple(ids): y for ids, y in zip(encode(tok, data.texts, 64), data.labels)}
        hook = LossAndLogits(model, label_of)
        train(model, tok, data, data, TrainConfig(epochs=1, lr=1e-3, batch_size=8, progress=False,
                                                  label_smoothing=eps), hooks=[hook])
        assert len(hook.losses) == 4  # the training steps; the evaluation's forwards come after
        for loss, (logits, y) in zip(hook.losses, hook.seen[:4]):
            logp = logits.log_softmax(-1)
            nll, uniform = -logp[torch.arange(len(y)), y], -logp.mean(-1)
            assert loss == pytest.approx(((1 - eps) * nll + eps * uniform).mean().item(), rel=1e-5)
    with pytest.raises(ValueError, match="label_smoothing"):
        TrainConfig(label_smoothing=1.0)
    common = ["finetune", "--tiny", "--train-limit", "32", "--eval-limit", "16", "--epochs", "1",
              "--no-progress"]
    with pytest.raises(SystemExit, match=r"--label-smoothing is a share of the target in \[0, 1\)"):
        main(common + ["--label-smoothing", "-0.1"])
