"""Prefix tuning: shapes under GQA, folding, masks, a manual attention reference, generation,
parity with peft on a tiny Llama, errors, and a CLI run."""
import json
import math
import warnings

import pytest
import torch
from conftest import tiny
from torch import nn

import pelib
from pelib.prefix import apply_prefix, fold, prefix_parameters


def ids_and_mask(model, B=3, T=9, pad_row=1, keep=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 1000, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[pad_row, keep:] = 0  # right padding, as pelib.train collates
    ids[pad_row, keep:] = model.config.pad_token_id
    return ids, mask


def test_encoder_shapes_gqa_and_fold_is_exact():
    # SmolLM2's head layout: 9 query heads share 3 KV heads; the prefix has the KV heads.
    model = apply_prefix(tiny("smollm2", hidden_size=72, num_attention_heads=9, num_key_value_heads=3,
                              head_dim=8), prefix_length=5, hidden=20).eval()
    enc = model.prefix_encoder
    P_K, P_V = enc.layer_kv(1)
    assert P_K.shape == P_V.shape == (3, 5, 8)
    ids, mask = ids_and_mask(model)
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        fold(model)
        after = model(input_ids=ids, attention_mask=mask).logits
    assert enc.folded and enc.prefix.shape == (2, 2, 3, 5, 8)  # (n_layers, 2, n_kv, L_p, hd)
    assert not hasattr(enc, "mlp") and torch.equal(enc.prefix[1, 0], P_K)
    assert torch.equal(before, after)


@pytest.mark.parametrize("projection", [True, False])
@pytest.mark.parametrize("name", ["minilm", "smollm2"])
def test_trainable_parameters_closed_form(name, projection):
    model = apply_prefix(tiny(name), prefix_length=4, hidden=24, projection=projection)
    c = model.config
    n_kv = getattr(c, "num_key_value_heads", c.num_attention_heads)
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    d = c.hidden_size
    head = d * 5 + (5 if name == "minilm" else 0)
    expected = (4 * d + d * 24 + 24 + 24 * (2 * 2 * n_kv * hd) + 2 * 2 * n_kv * hd
                if projection else 2 * 2 * n_kv * 4 * hd)
    assert prefix_parameters(2, n_kv, hd, 4, d, 24, projection) == expected
    assert pelib.trainable_parameters(model) == expected + head
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == \
        {"prefix_encoder", "classifier" if name == "minilm" else "score"}
    fold(model)
    assert pelib.trainable_parameters(model) == 2 * 2 * n_kv * 4 * hd + head


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name,task", [("minilm", "classification"), ("smollm2", "causal_lm"),
                                       ("smollm2", "classification")])
def test_padded_batch_equals_rows_one_by_one(name, task, attn):
    model = tiny(name, task)
    model.set_attn_implementation(attn)
    model = apply_prefix(model, prefix_length=3).eval()
    ids, mask = ids_and_mask(model)
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask).logits
        for b in range(ids.shape[0]):
            n = int(mask[b].sum())
            alone = model(input_ids=ids[b:b + 1, :n]).logits[0]
            got = batched[b, :n] if task == "causal_lm" else batched[b]
            assert (got - alone).abs().max() < 1e-5, (b, (got - alone).abs().max())


def test_prefix_changes_the_output_and_trains():
    base = tiny("minilm").eval()
    ids, mask = ids_and_mask(base)
    with torch.no_grad():
        y0 = base(input_ids=ids, attention_mask=mask).logits
    model = apply_prefix(base, prefix_length=3).eval()
    out = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 2]))
    assert not torch.allclose(out.logits, y0)  # a random prefix is not an identity
    out.loss.backward()
    enc = model.prefix_encoder
    assert enc.embedding.grad.abs().max() > 0 and enc.mlp[2].weight.grad.abs().max() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


def test_bert_attention_equals_manual_softmax_over_prefix_and_keys():
    model = apply_prefix(tiny("minilm"), prefix_length=4, projection=False).eval()
    attn = model.bert.encoder.layer[1].attention.self
    B, T, d, H = 2, 6, 32, 4
    hd = d // H
    x = torch.randn(B, T, d)
    mask = torch.zeros(B, 1, T, T)
    mask[1, ..., 4:] = torch.finfo(torch.float32).min  # row 1: last two keys are padding
    with torch.no_grad():
        got = attn(x, attention_mask=mask)[0]                          # (B, T, d)
        def split(t):
            return t.view(B, T, H, hd).transpose(1, 2)                 # (B, H, T, hd)

        q, k, v = split(attn.query(x)), split(attn.key(x)), split(attn.value(x))
        P_K, P_V = model.prefix_encoder.prefix[1]                      # (H, L_p, hd)
        k = torch.cat([P_K.expand(B, -1, -1, -1), k], 2)               # (B, H, L_p + T, hd)
        v = torch.cat([P_V.expand(B, -1, -1, -1), v], 2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd)               # (B, H, T, L_p + T)
        scores[1, ..., 4 + 4:] = float("-inf")                         # prefix always visible
        want = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, d)
    assert (got - want).abs().max() < 1e-6


def greedy_by_hand(model, ids, steps):
    seq = ids
    for _ in range(steps):  # full forward every step: no cache at all
        nxt = model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    return seq


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_generate_equals_manual_greedy_loop(attn):
    # untied embeddings: a tiny random model with tied ones just repeats its last token
    model = tiny("smollm2", "causal_lm", tie_word_embeddings=False)
    model.set_attn_implementation(attn)
    model = apply_prefix(model, prefix_length=4).eval()
    ids = torch.randint(5, 1000, (1, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=6, do_sample=False, pad_token_id=2)
        manual = greedy_by_hand(model, ids, 6)
        base = tiny("smollm2", "causal_lm", tie_word_embeddings=False).eval()
        assert not torch.equal(greedy_by_hand(base, ids, 6), manual)  # the prefix is in there
    assert out.shape == (1, 13) and torch.equal(out, manual)
    assert len(set(out[0, 7:].tolist())) > 1  # not a degenerate repeat


def test_parity_with_peft_prefix_tuning_on_tiny_llama():
    """Same prefix values in peft's PrefixTuningConfig: the same logits.

    peft puts the prefix into the KV cache, so Llama numbers the real tokens from L_p on; we
    keep them at 0, 1, ... Passing position_ids = L_p + arange(T) to ours matches peft."""
    from peft import PrefixTuningConfig, TaskType, get_peft_model

    L_p, T = 4, 7
    ours = apply_prefix(tiny("smollm2", task="causal_lm"), prefix_length=L_p, projection=False).eval()
    theirs = get_peft_model(tiny("smollm2", task="causal_lm"), PrefixTuningConfig(
        task_type=TaskType.CAUSAL_LM, num_virtual_tokens=L_p)).eval()
    P = ours.prefix_encoder.prefix                                    # (n_layers, 2, n_kv, L_p, hd)
    flat = P.permute(3, 0, 1, 2, 4).reshape(L_p, -1)  # peft's layout: (L_p, n_layers*2*n_kv*hd)
    emb = theirs.prompt_encoder["default"].embedding.weight
    assert emb.shape == flat.shape
    with torch.no_grad():
        emb.copy_(flat)
    ids = torch.randint(5, 1000, (2, T), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft passes the deprecated past_key_values
        y_peft = theirs(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad():
        y_ours = ours(input_ids=ids, attention_mask=mask,
                      position_ids=(L_p + torch.arange(T))[None]).logits
        y_ours_default = ours(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(y_ours, y_peft)
    assert not torch.allclose(y_ours_default, y_peft)  # the position shift is the only difference


def test_bad_inputs_name_the_fix():
    for L in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="prefix_length must be a positive integer"):
            apply_prefix(tiny("smollm2"), prefix_length=L)
    with pytest.raises(ValueError, match="hidden must be a positive integer"):
        apply_prefix(tiny("smollm2"), prefix_length=4, hidden=0)
    model = tiny("smollm2")
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match=r"\['eager', 'sdpa'\], not 'flex_attention'"):
        apply_prefix(model, 4)
    with pytest.raises(ValueError, match=r"model types \['bert', 'llama'\].*'Sequential'"):
        apply_prefix(nn.Sequential(nn.Linear(4, 4)), 4)
    with pytest.raises(ValueError, match="already has a prefix"):
        apply_prefix(apply_prefix(tiny("smollm2"), 2), 2)
    with pytest.raises(ValueError, match="no prefix"):
        fold(tiny("smollm2"))


@pytest.mark.integration  # a tiny run through the command line
def test_cli_prefix(tmp_path):
    from pelib.__main__ import main

    main(["finetune", "--tiny", "--method", "prefix", "--prefix-length", "4", "--train-limit",
          "64", "--eval-limit", "32", "--epochs", "1", "--out", str(tmp_path), "--no-progress",
          "--name", "run"])
    rec = json.loads((tmp_path / "run.json").read_text())
    d, labels = 32, 77
    assert rec["trainable_params"] == prefix_parameters(2, 4, 8, 4, d) + d * labels + labels
    assert rec["args"]["prefix_length"] == 4 and rec["config"]["lr"] == 3e-3
