"""Solutions to notebook 10's exercises (and a plausible wrong answer for each)."""
import torch


def activation_bytes(model, batch):
    """Bytes autograd saves for backward in one training forward: each storage once (a view
    shares its base's), the model's own parameters and buffers left out (they are weights)."""
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved = {}                                                   # storage address -> bytes

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in weights:
            saved[s.data_ptr()] = s.nbytes()
        return t

    was_training = model.training
    model.train()                                                 # dropout as in training
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**batch)                                      # the loss is built here too
    del out                                                       # frees the graph: no backward
    model.train(was_training)
    return sum(saved.values())


def activation_bytes_every_tensor(model, batch):  # wrong: counts views twice and the weights too
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch)
    return total[0]


def pareto(rows):
    def dominates(a, b):
        return a["trainable"] <= b["trainable"] and a["f1"] >= b["f1"] and \
            (a["trainable"] < b["trainable"] or a["f1"] > b["f1"])
    return {k for k, v in rows.items() if not any(dominates(w, v) for j, w in rows.items() if j != k)}


def pareto_strict(rows):  # drops ties: a row equal to another counts as dominated
    return {k for k, v in rows.items()
            if not any(w["trainable"] <= v["trainable"] and w["f1"] >= v["f1"]
                       for j, w in rows.items() if j != k)}


SOLUTIONS = {1: activation_bytes, 2: pareto}
WRONG = {1: activation_bytes_every_tensor, 2: pareto_strict}
