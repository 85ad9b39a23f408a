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


def dora_bill(model, targets, r):
    """Bytes of DoRA r on `targets` before building it: each adapted nn.Linear (d_in -> d_out)
    adds A (r, d_in), B (d_out, r) and the magnitude m (d_out,); the head trains as it is. All
    fp32: a gradient per weight, AdamW's two moments per weight and a 4-byte `step` per tensor."""
    weights = tensors = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            weights += r * (m.in_features + m.out_features) + m.out_features
            tensors += 3                                                  # A, B, m
    for name, p in model.named_parameters():
        if name.split(".")[0] in ("score", "classifier"):                # the head
            weights, tensors = weights + p.numel(), tensors + 1
    return {"trainable": 4 * weights, "gradients": 4 * weights,
            "optimizer state": 8 * weights + 4 * tensors}


def lora_bill(model, targets, r):  # wrong: LoRA's bill, the magnitude vector forgotten
    bill = dora_bill(model, targets, r)
    mags = [m.out_features for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets]
    m_bytes = 4 * sum(mags)                                               # one m per layer
    return {"trainable": bill["trainable"] - m_bytes, "gradients": bill["gradients"] - m_bytes,
            "optimizer state": bill["optimizer state"] - 2 * m_bytes - 4 * len(mags)}


SOLUTIONS = {1: activation_bytes, 2: dora_bill}
WRONG = {1: activation_bytes_every_tensor, 2: lora_bill}
