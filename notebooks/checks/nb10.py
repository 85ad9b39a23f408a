"""Checkers for notebook 10 (the comparison): a measurement of the activations a training step
keeps for backward, and a prediction of DoRA's memory bill from the model's shapes, each
against pelib's tensor ledger (hidden while the answer runs)."""
import torch

import pelib
import pelib.measure
from checks._guard import forbidden

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _batch(tokenizer, T, rows=4):
    texts = pelib.load_nlu("banking77", "train", limit=rows, seed=0).texts
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=T, return_tensors="pt")
    return dict(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                labels=torch.arange(rows) % 77)


def exercise_1(activation_bytes):
    """activation_bytes(model, batch) == the bytes autograd saves in one forward, each storage
    once, the model's own weights excluded (pelib.measure.memory_ledger's last entry)."""
    model, tok = pelib.tiny_backbone("smollm2", 77, hidden_size=64, intermediate_size=128,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    pelib.apply_lora(model, TARGETS, r=8, alpha=16)
    got = {}
    for T in (16, 32):
        batch = _batch(tok, T)
        # the reference, and anything that calls it (a backward, an optimizer), is off limits here
        with forbidden((pelib.measure, "memory_ledger"), (torch.optim, "AdamW"), (torch.Tensor, "backward")):
            got[T] = int(activation_bytes(model, batch))
        want = pelib.measure.memory_ledger(model, batch)["activations saved for backward"]
        assert got[T] == want, (f"T={T}: you counted {got[T]:,} bytes, the ledger {want:,}: count each "
                                "storage once (views share one) and leave out the model's weights")
    per_token = (got[32] - got[16]) / (4 * 16)
    print(f"exercise_1: {got[16]:,} bytes at 4 x 16 tokens, {got[32]:,} at 4 x 32 == the ledger; "
          f"about {per_token:,.0f} bytes per extra token on this tiny model")


def exercise_2(dora_bill):
    """dora_bill(model, targets, r) == the trainable, gradient and optimizer bytes that
    pelib.measure.memory_ledger measures once pelib.apply_dora(model, targets, r) is built (the
    head trains too; fp32; AdamW), predicted from the plain model's shapes."""
    import copy

    import pelib.dora

    model, tok = pelib.tiny_backbone("smollm2", 77, hidden_size=64, intermediate_size=128,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    batch = _batch(tok, 16)
    kinds = {"trainable": "trainable (adapter + head)", "gradients": "gradients",
             "optimizer state": "optimizer state"}
    for targets, r in ((TARGETS, 8), (["q_proj", "v_proj"], 4), (["down_proj"], 1)):
        with forbidden((pelib, "apply_dora"), (pelib.dora, "apply_dora"),
                       (pelib.dora.DoRALinear, "__init__"), (pelib.measure, "memory_ledger"),
                       (torch.Tensor, "backward"), (torch.optim, "AdamW")):
            got = dora_bill(copy.deepcopy(model), list(targets), r)
        built = pelib.apply_dora(copy.deepcopy(model), list(targets), r=r)
        ledger = pelib.measure.memory_ledger(built, batch)
        for k, name in kinds.items():
            assert int(got[k]) == ledger[name], (
                f"targets {targets}, r={r}: {k} {int(got[k]):,} bytes, the ledger measures "
                f"{ledger[name]:,}: which tensors does a DoRA layer add to LoRA's A and B, and what "
                "does AdamW keep per parameter tensor besides its two moments?")
        print(f"exercise_2: DoRA r={r} on {', '.join(targets)}: trainable "
              f"{ledger[kinds['trainable']]:,} B, gradients {ledger['gradients']:,} B, AdamW "
              f"{ledger['optimizer state']:,} B == the ledger")
