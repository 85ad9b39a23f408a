import pytest
import torch

from pelib.metrics import classification_metrics, confusion_matrix


def test_hand_computed_example():
    y_true = [0, 0, 1, 1, 2, 2]
    y_pred = [0, 1, 1, 1, 0, 3]  # class 3 is predicted but never true
    m = classification_metrics(y_true, y_pred)
    # per class P: 1/2, 2/3, 0, 0   R: 1/2, 1, 0, 0   F1: 1/2, 4/5, 0, 0
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["precision"] == pytest.approx((1 / 2 + 2 / 3) / 4)
    assert m["recall"] == pytest.approx((1 / 2 + 1) / 4)
    assert m["f1"] == pytest.approx((1 / 2 + 4 / 5) / 4)


def test_against_loop_definition():
    g = torch.Generator().manual_seed(0)
    t, p = torch.randint(0, 9, (500,), generator=g), torch.randint(0, 11, (500,), generator=g)
    cm = confusion_matrix(t, p)
    assert cm.sum() == 500 and cm[3, 4] == ((t == 3) & (p == 4)).sum()
    f1s = []
    for c in sorted(set(t.tolist()) | set(p.tolist())):
        tp = ((t == c) & (p == c)).sum().item()
        fp = ((t != c) & (p == c)).sum().item()
        fn = ((t == c) & (p != c)).sum().item()
        P = tp / (tp + fp) if tp + fp else 0.0
        R = tp / (tp + fn) if tp + fn else 0.0
        f1s.append(2 * P * R / (P + R) if P + R else 0.0)
    assert classification_metrics(t, p)["f1"] == pytest.approx(sum(f1s) / len(f1s))
    with pytest.raises(ValueError, match="shape"):
        classification_metrics([1, 2], [1])


def test_balanced_metrics_equal_the_metrics_of_a_balanced_copy():
    """balanced=True scores an imbalanced split as the split would score if every class had the
    same count: here, each row repeated lcm / count of its class, then the plain metrics."""
    import math

    g = torch.Generator().manual_seed(1)
    t = torch.tensor([0] * 2 + [1] * 3 + [2] * 6 + [3] * 4)               # counts 2, 3, 6, 4
    p = torch.where(torch.rand(len(t), generator=g) < 0.6, t, torch.randint(0, 5, t.shape, generator=g))
    counts = torch.bincount(t)
    lcm = math.lcm(*counts.tolist())
    reps = torch.tensor([lcm // counts[c] for c in t.tolist()])
    balanced_copy = classification_metrics(t.repeat_interleave(reps), p.repeat_interleave(reps))
    got = classification_metrics(t, p, balanced=True)
    assert got == pytest.approx(balanced_copy)
    assert got["recall"] == pytest.approx(classification_metrics(t, p)["recall"])  # unchanged
    assert got["precision"] != pytest.approx(classification_metrics(t, p)["precision"])
    even = torch.arange(12) % 4                                              # already balanced
    assert classification_metrics(even, p[:12], balanced=True) == pytest.approx(
        classification_metrics(even, p[:12]))
