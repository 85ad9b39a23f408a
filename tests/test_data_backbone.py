"""The shipped data and the packaged pretrained backbones, loaded offline."""
import hashlib
import re

import pytest
import torch

import pelib
from pelib.data import DATA_DIR, load_nlu

ROWS = {("banking77", "train"): 9003, ("banking77", "dev"): 1000, ("banking77", "test"): 3080,
        ("clinc150", "train"): 18000, ("clinc150", "dev"): 2250, ("clinc150", "test"): 2250}


@pytest.mark.parametrize("name,split", list(ROWS))
def test_rows_labels_and_checksums(name, split):
    d = load_nlu(name, split)
    assert len(d.texts) == len(d.labels) == ROWS[name, split]
    assert len(d.label_names) == {"banking77": 77, "clinc150": 150}[name]
    assert d.label_names == sorted(d.label_names) and set(d.labels) <= set(range(len(d.label_names)))
    # pelib/_data/README.md records the sha256 of every file; the files must still match it
    readme = (DATA_DIR / "README.md").read_text()
    digest = hashlib.sha256((DATA_DIR / name / f"{split}.tsv").read_bytes()).hexdigest()
    assert re.search(rf"{name}/{split}\.tsv\s*\|.*{digest}", readme)


def test_multiline_rows_and_stable_subsets():
    texts = load_nlu("banking77", "train").texts
    assert any("\n" in t for t in texts)  # quoted multi-line rows survive
    a, b = load_nlu("banking77", "dev", limit=50, seed=3), load_nlu("banking77", "dev", limit=50, seed=3)
    assert a == b and len(a.texts) == 50


def test_bad_names_are_clear(tmp_path):
    with pytest.raises(ValueError, match="choose one of.*banking77"):
        load_nlu("banking", "train")
    with pytest.raises(ValueError, match="split"):
        load_nlu("banking77", "validation")
    with pytest.raises(FileNotFoundError, match="data_dir=.* has no banking77/train.tsv") as e:
        load_nlu("banking77", "train", data_dir=tmp_path)
    assert "git" not in str(e.value)  # the user's own folder: nothing of pelib's to restore
    with pytest.raises(ValueError, match="choose one of"):
        pelib.load_backbone("bert-base", num_labels=3)
    with pytest.raises(ValueError, match="no causal-LM head"):
        pelib.load_backbone("minilm", task="causal_lm")
    with pytest.raises(ValueError, match=r"smollm2 pools with one of \['last'\], not 'mean'"):
        pelib.load_backbone("smollm2", num_labels=3, pooling="mean")
    with pytest.raises(ValueError, match="not of task='causal_lm'"):
        pelib.tiny_backbone("smollm2", task="causal_lm", pooling="last")


def test_mean_pooling_classifier_against_its_formula():
    """logits = W mean_t(h_t over real tokens) + b, computed by hand from the encoder's states;
    padding a row more does not change its logits (the mask, not the length, decides)."""
    model, tok = pelib.tiny_backbone("minilm", 6)
    model.eval()
    enc = tok(["my card was declined", "why was my card payment refused today at the shop"],
              padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model.bert(**enc).last_hidden_state  # (B, T, H)
        m = enc["attention_mask"].unsqueeze(-1).float()
        ref = model.classifier((h * m).sum(1) / m.sum(1))
        out = model(**enc, labels=torch.tensor([1, 4]))
        assert torch.allclose(out.logits, ref, atol=1e-6)
        assert torch.allclose(out.loss, torch.nn.functional.cross_entropy(ref, torch.tensor([1, 4])))
        longer = tok(["my card was declined"], padding="max_length", max_length=20, return_tensors="pt")
        assert torch.allclose(model(**longer).logits[0], out.logits[0], atol=1e-5)
        # [CLS] pooling would read one token: the two poolings really differ
        cls, _ = pelib.tiny_backbone("minilm", 6, pooling="cls")
        assert not torch.allclose(cls.eval()(**enc).logits, out.logits)


@pytest.mark.slow  # real pretrained weights
def test_minilm_pretrained():
    model, tok = pelib.load_backbone("minilm", num_labels=77)
    assert type(model).__name__ == "MeanPoolBertClassifier" and model.bert.pooler is None
    cls, _ = pelib.load_backbone("minilm", num_labels=77, pooling="cls")
    assert type(cls).__name__ == "BertForSequenceClassification"
    assert torch.equal(cls.bert.encoder.layer[5].output.dense.weight,
                       model.bert.encoder.layer[5].output.dense.weight)  # the same checkpoint
    n = sum(p.numel() for n_, p in model.named_parameters() if not n_.startswith("classifier"))
    assert 22_000_000 < n < 23_000_000  # ~22.7M
    # pretrained, not random: the two "bank" sentences are closer than an unrelated one
    enc = tok(["my card was declined", "why was my card payment refused", "the weather is nice"],
              padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model.bert(**enc).last_hidden_state
    e = torch.nn.functional.normalize((h * enc["attention_mask"][..., None]).sum(1), dim=-1)
    assert e[0] @ e[1] > e[0] @ e[2] + 0.2


@pytest.mark.slow  # real pretrained weights
def test_smollm2_pretrained_both_heads():
    model, tok = pelib.load_backbone("smollm2", task="causal_lm")
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])
    clf, _ = pelib.load_backbone("smollm2", num_labels=4)
    assert type(clf).__name__ == "LlamaForSequenceClassification"
    assert torch.equal(clf.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)
    enc = tok(["hello there", "a longer second sentence here"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert clf(**enc).logits.shape == (2, 4)


def test_tiny_backbones():
    for name in ("minilm", "smollm2"):
        m, _ = pelib.tiny_backbone(name, 3, with_tokenizer=False)
        assert sum(p.numel() for p in m.parameters()) < 3_000_000
    m, _ = pelib.tiny_backbone("smollm2", task="causal_lm", with_tokenizer=False)
    assert m.config.num_key_value_heads < m.config.num_attention_heads  # GQA, as SmolLM2


def test_a_merged_classifier_saved_with_save_pretrained_loads_in_transformers(tmp_path):
    """transformers' own loaders, on the folder alone, give the fine-tuned logits: the folder
    says the model pools the mean (a BertForSequenceClassification would read [CLS] + a fresh
    pooler), and merged LoRA weights are saved as plain weights."""
    from transformers import AutoModelForSequenceClassification, BertForSequenceClassification, pipeline

    model, tok = pelib.tiny_backbone("minilm", 5)
    pelib.apply_lora(model, ["query", "value", "dense"], r=4)
    torch.manual_seed(0)
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.2)
    with pytest.raises(ValueError, match="not merged.*pelib.lora.merge"):
        model.save_pretrained(tmp_path / "unmerged")
    pelib.lora.merge(model).eval()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    texts = ["my card was declined", "why was my card payment refused today at the shop"]
    enc = tok(texts, padding=True, return_tensors="pt")
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    assert not isinstance(loaded, BertForSequenceClassification)
    assert not any(hasattr(m, "base_layer") for m in loaded.modules())  # plain Linear layers
    with torch.no_grad():
        want = model(**enc).logits
        assert (loaded(**enc).logits - want).abs().max() < 1e-5
    scores = pipeline("text-classification", model=str(tmp_path / "m"), top_k=None)(texts)
    for row, probs in zip(scores, want.softmax(-1)):
        got = {d["label"]: d["score"] for d in row}
        assert max(abs(got[f"LABEL_{k}"] - probs[k].item()) for k in range(5)) < 1e-5
    # and the loaded model is a pelib classifier again: its own save round-trips
    assert loaded.config.model_type == "bert"  # what adapters and prefixes key their layers on
    pelib.apply_prefix(loaded, prefix_length=2)


@pytest.mark.slow  # a fresh interpreter
def test_without_pelib_transformers_refuses_the_folder_instead_of_reading_cls(tmp_path):
    import subprocess
    import sys

    pelib.tiny_backbone("minilm", 5, with_tokenizer=False)[0].save_pretrained(tmp_path)
    code = ("from transformers import AutoModelForSequenceClassification as A; "
            f"A.from_pretrained({str(tmp_path)!r})")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "model type `pelib_mean_pool_bert`" in r.stderr
