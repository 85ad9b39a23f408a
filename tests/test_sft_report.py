"""compare's tables for instruction-tuned rows: an `invalid` column, the share of generated
answers that are no label name, read from each record's metrics and checked here against a
count over the outputs themselves."""
import statistics

from pelib.metrics import generation_metrics
from pelib.report import summary

NAMES = ["card_arrival", "lost_or_stolen_card", "top_up_failed"]


def record(label, task, outputs, y_true, seed=0):
    """A run's record as finetune writes it (the fields the tables read); an SFT run's metrics
    come from its outputs as pelib.sft scores them: a text that is no name is invalid (-1)."""
    by_text = {n.replace("_", " "): i for i, n in enumerate(NAMES)}
    metrics = generation_metrics(y_true, [by_text.get(o, -1) for o in outputs], len(NAMES)) \
        if task == "sft" else dict(accuracy=0.5, precision=0.5, recall=0.5, f1=0.5)
    return dict(name=f"{label}{seed}", label=label, metrics=metrics, trainable_params=10,
                total_params=100, peak_memory_mb=700.0, seconds_per_step=0.1, train_seconds=1.0,
                losses=[1.0], history=[dict(epoch=1, loss=0.7)], train_rows=32,
                eval_rows=len(y_true), eval_split="test", memory_kind="process RSS (sampled)",
                outputs=outputs,
                args=dict(model="smollm2", tiny=True, data="banking77", method="lora",
                          impl="pelib", task=task, epochs=1.0, batch_size=16, max_length=160))


def cell(text: str, row: str, column: str) -> str:
    """The cell of a markdown table in `text`: the row whose first cell is `row`."""
    lines = [line for line in text.splitlines() if line.startswith("| method |")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    line = next(x for x in text.splitlines() if x.startswith(f"| {row} |"))
    return [c.strip() for c in line.strip("|").split("|")][header.index(column)]


Y = [0, 1, 2, 0, 1, 2, 0, 1]
SEED0 = ["card arrival", "lost or stolen card", "top up", "card arrival", "I lost my card",
         "top up failed", "card arrival", "lost or stolen card"]   # 2 of 8 no name
SEED1 = ["card arrival", "cards", "top up failed", "top up failed", "lost or stolen card",
         "top up failed", "card", "???"]                            # 3 of 8 no name


def invalid_share(outputs):
    return sum(o.replace(" ", "_") not in NAMES for o in outputs) / len(outputs)


def test_an_sft_row_shows_its_invalid_share_mean_and_spread_over_seeds():
    records = [record("LoRA r=8, SFT", "sft", SEED0, Y, 0), record("LoRA r=8, SFT", "sft", SEED1, Y, 1)]
    shares = [invalid_share(SEED0), invalid_share(SEED1)]
    assert shares == [2 / 8, 3 / 8]
    text = summary(records)
    got = cell(text, "LoRA r=8, SFT", "invalid")
    assert got == f"{statistics.fmean(shares):.4f} ± {statistics.stdev(shares):.4f}"
    assert cell(text, "LoRA r=8, SFT", "dev F1") == "-"  # scored on no dev split


def test_a_classifier_row_beside_sft_rows_has_none_and_classifier_tables_no_column():
    mixed = summary([record("LoRA r=8", "classify", None, Y), record("LoRA r=8, SFT", "sft", SEED0, Y)])
    assert cell(mixed, "LoRA r=8", "invalid") == "-"
    assert cell(mixed, "LoRA r=8, SFT", "invalid") == f"{invalid_share(SEED0):.4f}"
    header = next(x for x in mixed.splitlines() if x.startswith("| method |"))
    rule = mixed.splitlines()[mixed.splitlines().index(header) + 1]
    assert rule.count("---") == header.count("|") - 1  # a rule cell per column
    classify = summary([record("LoRA r=8", "classify", None, Y)])
    assert "invalid |" not in classify
    assert cell(classify, "LoRA r=8", "macro-F1") == "0.5000"
