"""Module-name patterns from files: matched as peft 0.21 matches them, and never hanging.

`target_modules` as one string is a regular expression over the full name; a rank_pattern /
alpha_pattern key is a regular expression that `(.*\\.)?(key)$` matches from the name's start.
The reference is peft itself: the same adapter folder loaded by pelib and by
PeftModel.from_pretrained gives the same logits.
"""
import json

import pytest
import torch
from conftest import batch, tiny

import pelib
from pelib.inject import find_targets, pattern_value
from pelib.io import CONFIG_NAME

ISSUED = r"([\w.]+)+!"         # backtracks without end in `re` (and in peft); `regex` sees the "!"
HANG = r"([\w.]|[a-z])+(?=\d$)"  # backtracks without end in `regex` too


@pytest.fixture
def quick_limit(monkeypatch):
    monkeypatch.setattr(pelib.inject, "PATTERN_SECONDS", 0.2)


def peft_folder(path, **config):
    """A peft LoRA adapter of the tiny MiniLM with random B, saved to `path`; returns peft's model."""
    from peft import LoraConfig, TaskType, get_peft_model

    theirs = get_peft_model(tiny(), LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8,
                                               target_modules=["query", "key", "value"], **config))
    g = torch.Generator().manual_seed(0)
    for n, p in theirs.named_parameters():
        if "lora_B" in n:
            p.data = torch.randn(p.shape, generator=g) * 0.1
    theirs.eval().save_pretrained(path)
    return theirs


@pytest.mark.parametrize("alpha_pattern", [{"query|value": 64}, {r"layer\.0\..*query": 64},
                                           {"value": 32, "query": 16}])
def test_alpha_pattern_keys_are_regular_expressions_as_in_peft(tmp_path, alpha_pattern):
    from peft import PeftModel

    peft_folder(tmp_path / "ad", alpha_pattern=alpha_pattern)
    theirs = PeftModel.from_pretrained(tiny(), tmp_path / "ad").eval()
    ours = pelib.load_adapter(tiny(), tmp_path / "ad").eval()
    peft_scaling = {n.removeprefix("base_model.model."): m.scaling["default"]
                    for n, m in theirs.named_modules() if hasattr(m, "lora_A") and m.lora_A}
    assert {n: m.scaling for n, m in pelib.lora.lora_layers(ours)} == peft_scaling
    assert len(set(peft_scaling.values())) > 1  # the pattern changed some layers, not all
    with torch.no_grad():
        assert torch.equal(ours(**batch()).logits, theirs(**batch()).logits)


def test_rank_pattern_keys_are_regular_expressions_as_in_peft(tmp_path):
    from peft import PeftModel

    peft_folder(tmp_path / "ad", rank_pattern={r"layer\.1\..*(key|value)": 2})
    theirs = PeftModel.from_pretrained(tiny(), tmp_path / "ad").eval()
    ours = pelib.load_adapter(tiny(), tmp_path / "ad").eval()
    ranks = {n: m.r for n, m in pelib.lora.lora_layers(ours)}
    assert ranks == {n.removeprefix("base_model.model."): m.r["default"]
                     for n, m in theirs.named_modules() if hasattr(m, "lora_A") and m.lora_A}
    assert sorted(set(ranks.values())) == [2, 4]
    with torch.no_grad():
        assert torch.equal(ours(**batch()).logits, theirs(**batch()).logits)


def test_pattern_value_is_peft_get_pattern_key():
    from peft.utils.other import get_pattern_key

    names = ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.10.attention.self.query",
             "bert.encoder.layer.1.attention.self.value", "bert.encoder.layer.0.attention.output.dense",
             "xquery", "query"]
    for keys in (["query"], ["query|value"], [r"layer\.0\..*query"], ["self.query"], ["dense", "query"],
                 ["layer.1.*value"], ["uery"]):
        pattern = {k: i for i, k in enumerate(keys)}
        for n in names:
            want = pattern.get(get_pattern_key(keys, n), None)
            assert pattern_value(pattern, n, None) == want, (keys, n)


def test_a_backtracking_target_regex_is_refused(quick_limit):
    with pytest.raises(ValueError, match=r"target '.*' takes more than 0.2 s to match the module names"):
        find_targets(tiny(), HANG)


def test_a_backtracking_pattern_key_is_refused(quick_limit):
    with pytest.raises(ValueError, match="takes more than .* simplify the regular expression"):
        pattern_value({HANG: 4}, "bert.encoder.layer.0.attention.self.query" * 4, 8)


@pytest.mark.parametrize("field,value", [("target_modules", HANG), ("alpha_pattern", {HANG: 64}),
                                         ("rank_pattern", {HANG: 2})])
def test_a_file_with_a_backtracking_pattern_is_refused(tmp_path, quick_limit, field, value):
    """A config from a file whose pattern never finishes matching."""
    peft_folder(tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / CONFIG_NAME).read_text())
    cfg[field] = value
    (tmp_path / "ad" / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="takes more than .* s to match"):
        pelib.load_adapter(tiny(), tmp_path / "ad")


def test_the_target_that_hung_is_refused_at_once(tmp_path):
    """The case that hung `load_adapter`: the target regex matches no module, and says so."""
    peft_folder(tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / CONFIG_NAME).read_text())
    (tmp_path / "ad" / CONFIG_NAME).write_text(json.dumps({**cfg, "target_modules": ISSUED}))
    with pytest.raises(ValueError, match="matches no module"):
        pelib.load_adapter(tiny(), tmp_path / "ad")


def test_a_bad_pattern_key_is_named():
    with pytest.raises(ValueError, match=r"key 'query\(' is not a valid regular expression \(missing"):
        pattern_value({"query(": 4}, "bert.encoder.layer.0.attention.self.query", 8)
