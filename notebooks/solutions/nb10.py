"""Solutions to notebook 10's exercises (and a plausible wrong answer for each)."""


def head_only(model):
    for p in model.parameters():
        p.requires_grad_(False)
    model.classifier.requires_grad_(True)
    return model


def encoder_frozen(model):  # freezes the encoder layers but forgets the embeddings
    model.bert.encoder.requires_grad_(False)
    return model


def pareto(rows):
    def dominates(a, b):
        return a["trainable"] <= b["trainable"] and a["f1"] >= b["f1"] and \
            (a["trainable"] < b["trainable"] or a["f1"] > b["f1"])
    return {k for k, v in rows.items() if not any(dominates(w, v) for j, w in rows.items() if j != k)}


def pareto_strict(rows):  # drops ties: a row equal to another counts as dominated
    return {k for k, v in rows.items()
            if not any(w["trainable"] <= v["trainable"] and w["f1"] >= v["f1"]
                       for j, w in rows.items() if j != k)}


SOLUTIONS = {1: head_only, 2: pareto}
WRONG = {1: encoder_frozen, 2: pareto_strict}
