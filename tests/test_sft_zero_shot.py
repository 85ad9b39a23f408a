"""The zero-shot floor of the instruction-tuning table (`pelib finetune --task sft --method
zero-shot`): the untrained Instruct model, every label name listed once in its prompt, 0
trainable parameters and 0 steps, scored by generation like the trained rows; refused where it
does not apply (a classifier, an option of training)."""
import json
from collections import Counter

import pytest

import pelib
from pelib.__main__ import main
from pelib.measure import LEDGER_KINDS
from pelib.metrics import generation_metrics

pytestmark = pytest.mark.integration  # runs the toy SmolLM2 through the command line

TINY = ["--model", "smollm2", "--task", "sft", "--method", "zero-shot", "--tiny", "--no-progress"]


def test_the_prompt_lists_every_label_name_exactly_once():
    from pelib.backbone import load_tokenizer
    from pelib.sft import prompt_ids

    tok = load_tokenizer("smollm2")
    names = pelib.load_nlu("banking77", "test", limit=4).label_names
    assert len(names) == 77
    text = "I still have not received my new card, why?"
    prompt = tok.decode(prompt_ids(tok, text, names))
    listed = prompt.split("from this list: ", 1)[1].split(".\nMessage: ", 1)
    assert listed[1].startswith(text) and prompt.count(text) == 1
    counts = Counter(listed[0].split(", "))
    assert counts == Counter(n.replace("_", " ") for n in names)  # each name, once, nothing else
    assert set(counts.values()) == {1}
    # and the trained rows' prompt lists none
    plain = tok.decode(prompt_ids(tok, text))
    assert not any(f" {n.replace('_', ' ')}," in plain for n in names)


def test_a_tiny_zero_shot_run_trains_nothing_and_scores_its_outputs(tmp_path, capsys):
    main(["finetune", *TINY, "--eval-limit", "8", "--fp32", "--out", str(tmp_path)])
    name = "smollm2-tiny_banking77_zero-shot_pelib_s0_sft"
    rec = json.loads((tmp_path / f"{name}.json").read_text())
    assert (rec["trainable_params"], rec["steps"], rec["losses"], rec["train_rows"]) == (0, 0, [], 0)
    assert rec["total_params"] > 0 and rec["task"] == "sft" and rec["decoding"] == "greedy"
    assert not (tmp_path / f"{name}_loss.png").exists()  # no loss to plot
    # the metrics are those of its outputs, matched to the names here
    evaluation = pelib.load_nlu("banking77", "test", limit=8, seed=0)
    assert rec["eval_rows"] == 8 and len(rec["outputs"]) == 8
    by_text = {n.replace("_", " "): i for i, n in enumerate(evaluation.label_names)}
    preds = [by_text.get(o, -1) for o in rec["outputs"]]
    assert rec["metrics"] == generation_metrics(evaluation.labels, preds, 77)
    assert rec["metrics"]["invalid_rate"] == preds.count(-1) / 8
    # its ledger: the weights alone (no step), as many bytes as the model's tensors hold (fp32;
    # parameters() lists the tied LM head and embedding once)
    model, _ = pelib.tiny_backbone("smollm2", None, task="causal_lm", with_tokenizer=False)
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert rec["base_dtype"] == "fp32"
    assert rec["ledger"]["bytes"] == {LEDGER_KINDS[0]: weights, **{k: 0 for k in LEDGER_KINDS[1:]}}
    assert rec["ledger"]["batch"] == []
    assert f"| {name} |" in capsys.readouterr().out

    main(["finetune", *TINY, "--eval-limit", "8", "--constrained", "--out", str(tmp_path),
          "--name", "c"])
    rec = json.loads((tmp_path / "c.json").read_text())
    assert rec["decoding"] == "constrained" and rec["metrics"]["invalid_rate"] == 0.0
    assert all(o in by_text for o in rec["outputs"])


@pytest.mark.parametrize("argv, message", [
    (["--tiny", "--method", "zero-shot"], r"--method zero-shot .* is --task sft; add --task sft"),
    (["--tiny", "--model", "smollm2", "--method", "zero-shot"], "add --task sft"),
    (TINY + ["--r", "8"], "--r is an option of --method"),
    (TINY + ["--lr", "1e-3"], "--lr is an option of training"),
    (TINY + ["--epochs", "1"], "--epochs is an option of training"),  # even at the task's value
    (TINY + ["--batch-size", "16"], "--batch-size is an option of training"),
    (TINY + ["--max-length", "160"], "--max-length is an option of training"),
    (TINY + ["--train-limit", "32"], "--train-limit is an option of training"),
    (TINY + ["--warmup-ratio", "0.1"], "--warmup-ratio is an option of training"),
    (TINY + ["--head-lr", "1e-2"], "--head-lr is an option of the classification head"),
])
def test_zero_shot_is_refused_where_it_does_not_apply(tmp_path, argv, message):
    with pytest.raises(SystemExit, match=message):
        main(["finetune", *argv, "--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())  # refused before anything was written
