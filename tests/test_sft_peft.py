"""An instruction-tuned adapter written by pelib loads in transformers + peft as a causal LM, and
`generate` there writes the same strings as pelib's generate_answers on the same rows."""
import pytest
import torch

import pelib
from pelib.backbone import DEFAULT_TARGETS
from pelib.sft import generate_answers

pytestmark = pytest.mark.integration  # builds, saves and reloads models; greedy decoding

NAMES = ["card_arrival", "lost_or_stolen_card", "card_not_working", "top_up_failed"]
TEXTS = ["my card has not arrived yet", "someone stole my card", "why was my top up declined?",
         "the card does not work at the shop", "hello", "I lost my wallet with my card in it"]


def base(seed=0):
    model, tok = pelib.tiny_backbone("smollm2", task="causal_lm", seed=seed)
    return model.eval(), tok


def with_random_B(model, seed=1):
    """An adapter that changes what the model writes (a fresh LoRA's B is 0)."""
    g = torch.Generator().manual_seed(seed)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data = torch.randn(p.shape, generator=g) * 0.5
    return model.eval()


def peft_model(tmp_path, quantized: bool):
    """transformers' causal LM of the saved base weights (bitsandbytes NF4 + DQ when
    `quantized`, as QLoRA trains on), the adapter folder loaded on it with peft."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    base()[0].save_pretrained(tmp_path / "base")
    # the LM head stays dense (it is the tied embedding, which QLoRA does not quantise either)
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32,
                             llm_int8_skip_modules=["lm_head"])
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", dtype=torch.float32, attn_implementation="eager", device_map="cpu",
        quantization_config=nf4 if quantized else None)
    return PeftModel.from_pretrained(model, tmp_path / "adapter").eval()


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_peft_generates_the_strings_pelib_generates(tmp_path, method):
    model, tok = base()
    apply = pelib.apply_lora if method == "lora" else pelib.apply_qlora
    ours = with_random_B(apply(model, DEFAULT_TARGETS["smollm2"], r=4, alpha=8))
    pelib.save_adapter(ours, tmp_path / "adapter")
    theirs = peft_model(tmp_path, quantized=method == "qlora")
    assert type(theirs).__name__ == "PeftModelForCausalLM"
    layers = {type(m).__name__ for m in theirs.modules()}
    assert ("Linear4bit" in layers) == (method == "qlora")  # bitsandbytes' 4-bit base

    kw = dict(batch_size=3, max_new_tokens=6)
    a = generate_answers(ours, tok, TEXTS, NAMES, **kw)
    b = generate_answers(theirs, tok, TEXTS, NAMES, **kw)
    same = sum(x == y for x, y in zip(a.texts, b.texts))
    assert same == len(TEXTS), (same, a.texts, b.texts)
    # the comparison has teeth: the rows differ, and the adapter changed what the base writes
    assert len(set(a.texts)) > 1 and all(a.texts)
    assert generate_answers(base()[0], tok, TEXTS, NAMES, **kw).texts != a.texts
    # constrained decoding, too: the same names
    c = generate_answers(ours, tok, TEXTS, NAMES, constrained=True, **kw)
    d = generate_answers(theirs, tok, TEXTS, NAMES, constrained=True, **kw)
    assert c.texts == d.texts and c.predictions == d.predictions
