"""pelib.patch on a Llama sequence classifier: the same loss and outputs, and unpatch restores it."""
import pytest
import torch
from conftest import batch

import pelib

pytestmark = pytest.mark.integration  # Triton kernels in the interpreter


def test_patch_on_a_llama_classifier_keeps_its_loss_and_its_outputs():
    from pelib.patch import patch, unpatch

    model = pelib.tiny_backbone("smollm2", 5, with_tokenizer=False)[0].eval()
    pelib.apply_lora(model, ["q_proj", "v_proj"], r=2)
    x = batch(model.config.vocab_size)
    labels = torch.tensor([0, 3, 4])
    with torch.no_grad():
        ref = model(**x, labels=labels)
        patch(model)
        got = model(**x, labels=labels)
        unpatch(model)
        back = model(**x, labels=labels)
    assert torch.allclose(got.logits, ref.logits, atol=1e-5) and torch.equal(back.logits, ref.logits)
    assert torch.allclose(got.loss, ref.loss, atol=1e-5)  # sequence classification loss, not causal
