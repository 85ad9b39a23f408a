"""Metrics of generated answers: an output that is no label name is a class of its own."""
import pytest
import torch

from pelib.metrics import INVALID, classification_metrics, generation_metrics

# 5 labels, 20 rows, 4 invalid outputs (-1)
Y_TRUE = [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 0, 1, 2, 3, 4]
Y_PRED = [0, 0, -1, 1, 2, 1, 2, -1, -1, 3, 3, 0, 4, -1, 4, 0, 1, 2, 1, 4]


def test_equals_scikit_learn_with_the_invalid_class_as_an_extra_label():
    """scikit-learn 1.9.1 on these rows with -1 replaced by label 5:
    f1_score / precision_score / recall_score(y_true, y_pred, average="macro", zero_division=0)
    and accuracy_score gave these values (the same agreed on 200 random draws)."""
    m = generation_metrics(Y_TRUE, Y_PRED, num_labels=5)
    assert m["f1"] == pytest.approx(0.5992063492063492, abs=1e-12)
    assert m["precision"] == pytest.approx(0.6944444444444443, abs=1e-12)
    assert m["recall"] == pytest.approx(0.5416666666666666, abs=1e-12)
    assert m["accuracy"] == pytest.approx(0.65, abs=1e-12)
    assert m["invalid_rate"] == pytest.approx(4 / 20)


def per_class_f1(t: list[int], p: list[int]) -> dict[int, float]:
    """F1 of every class seen in either list, from its definition."""
    out = {}
    for c in sorted(set(t) | set(p)):
        tp = sum(a == c and b == c for a, b in zip(t, p))
        fp = sum(a != c and b == c for a, b in zip(t, p))
        fn = sum(a == c and b != c for a, b in zip(t, p))
        P, R = tp / (tp + fp) if tp + fp else 0.0, tp / (tp + fn) if tp + fn else 0.0
        out[c] = 2 * P * R / (P + R) if P + R else 0.0
    return out


def test_random_cases_against_the_per_class_definition():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        n, K = int(torch.randint(1, 60, (1,), generator=g)), int(torch.randint(2, 9, (1,), generator=g))
        t = torch.randint(0, K, (n,), generator=g).tolist()
        p = torch.randint(-1, K, (n,), generator=g).tolist()
        f1 = per_class_f1(t, [K if x == INVALID else x for x in p])
        m = generation_metrics(t, p, K)
        assert m["f1"] == pytest.approx(sum(f1.values()) / len(f1), abs=1e-12)
        assert m["invalid_rate"] == pytest.approx(p.count(-1) / n)
        assert m["accuracy"] == pytest.approx(sum(a == b for a, b in zip(t, p)) / n)


def test_without_invalid_outputs_it_is_the_classification_metrics():
    p = [0, 0, 1, 1, 2, 1, 2, 0, 2, 3, 3, 0, 4, 4, 4, 0, 1, 2, 1, 4]
    m = generation_metrics(Y_TRUE, p, 5)
    assert m == dict(classification_metrics(Y_TRUE, p), invalid_rate=0.0)


def test_an_invalid_output_costs_more_than_a_wrong_name():
    """Both are wrong for their row's class; the invalid class also enters the macro mean."""
    wrong = generation_metrics([0, 1, 2, 0], [0, 1, 2, 1], 3)
    invalid = generation_metrics([0, 1, 2, 0], [0, 1, 2, -1], 3)
    assert wrong["accuracy"] == invalid["accuracy"] == 0.75
    assert invalid["f1"] < wrong["f1"]


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="outside 0..2"):
        generation_metrics([0, 3], [0, 1], 3)
    with pytest.raises(ValueError, match="y_pred holds values outside -1"):
        generation_metrics([0, 1], [0, -2], 3)
    with pytest.raises(ValueError, match="shape"):
        generation_metrics([0, 1], [0], 3)
    with pytest.raises(ValueError, match="no rows"):
        generation_metrics([], [], 3)
