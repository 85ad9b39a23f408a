"""The loop's hook protocol (pelib.hooks) and the one check of the loop's settings
(pelib.settings), which the Python API and the command line share."""
from unittest import mock

import pytest

import pelib
from pelib.__main__ import main
from pelib.hooks import EVENTS, FeatureCache, Hook, ProbeHead, check_hooks
from pelib.train import TrainConfig, train


@pytest.mark.parametrize("name", ["stpe", "steps", "los", "begins", "param_group", "prepared"])
def test_a_misspelt_hook_event_is_an_error_when_the_class_is_defined(name):
    with pytest.raises(TypeError, match=f"{name} is not a hook event; did you mean"):
        type("Misspelt", (Hook,), {name: lambda self, *a: None})


def test_a_hook_that_is_not_a_hook_is_refused_before_training():
    class Duck:  # a duck-typed object: a misspelling here would pass unnoticed
        def step(self, model, step):
            pass

    model, tok = pelib.tiny_backbone("minilm", 77)
    data = pelib.load_nlu("banking77", "train", limit=8)
    with pytest.raises(TypeError, match="hooks must subclass pelib.hooks.Hook.*got Duck"):
        train(model, tok, data, data, TrainConfig(epochs=1, progress=False), hooks=[Duck()])
    assert check_hooks([]) == []


def test_every_event_has_a_default_and_the_methods_and_loop_hooks_are_hooks():
    from pelib.adalora import RankAllocator
    from pelib.peers import PeftAdaLoRA
    from pelib.sora import SoRA

    hook = Hook()
    assert hook.param_groups(None) == [] and hook.forward(None, [0]) is None
    assert hook.loss(None, 3.0) == 3.0 and hook.state_dict() is None
    assert set(EVENTS) <= set(vars(Hook))
    for cls in (RankAllocator, SoRA, PeftAdaLoRA, ProbeHead, FeatureCache):
        assert issubclass(cls, Hook)
        own = {n for n in vars(cls) if not n.startswith("_") and callable(vars(cls)[n])}
        assert own & set(EVENTS), cls  # it handles some event


def test_a_recording_hook_sees_every_event_in_order():
    class Log(Hook):
        def __init__(self):
            self.seen = []

        def begin(self, model, optimizer, total_steps):
            self.seen.append(("begin", total_steps))

        def prepare(self, model, rows):
            self.seen.append(("prepare", len(rows.ids), rows.step))

        def loss(self, model, loss):
            self.seen.append("loss")
            return loss

        def step(self, model, step):
            self.seen.append(("step", step))

    model, tok = pelib.tiny_backbone("minilm", 77)
    pelib.apply_lora(model, ["query"], r=2)
    data = pelib.load_nlu("banking77", "train", limit=16)
    log = Log()
    train(model, tok, data, data, TrainConfig(epochs=1, batch_size=8, progress=False), hooks=[log])
    assert log.seen == [("begin", 2), ("prepare", 16, 0), "loss", ("step", 1), "loss", ("step", 2)]


BAD = [("weight_decay", -1.0, "--weight-decay", "must be a finite number >= 0"),
       ("warmup_ratio", 1.0, "--warmup-ratio", r"is a share of the steps in \[0, 1\)"),
       ("label_smoothing", 1.0, "--label-smoothing", r"is a share of the target in \[0, 1\)"),
       ("layer_decay", 0.0, "--layer-decay", r"must be in \(0, 1\]"),
       ("lr", 0.0, "--lr", "must be a finite number > 0"),
       ("epochs", float("inf"), "--epochs", "must be a finite number > 0"),
       ("max_grad_norm", -1.0, "--max-grad-norm", "must be a finite number > 0"),
       ("batch_size", 0, "--batch-size", "must be >= 1"),
       ("grad_accum", 0, "--grad-accum", "must be >= 1"),
       ("checkpoint_every", 0, "--checkpoint-every", "must be >= 1")]


@pytest.mark.parametrize("field,value,flag,words", BAD)
def test_the_api_and_the_cli_refuse_the_same_settings_with_the_same_words(tmp_path, field, value,
                                                                          flag, words):
    with pytest.raises(ValueError, match=f"^{field} {words}"):
        TrainConfig(**{field: value})
    with mock.patch("pelib.finetune.build", side_effect=AssertionError("built")):
        with pytest.raises(SystemExit, match=f"^pelib: {flag} {words}"):
            main(["finetune", "--tiny", "--out", str(tmp_path), flag, str(value)])
