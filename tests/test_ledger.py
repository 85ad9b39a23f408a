"""pelib.measure.memory_ledger: the bytes of one training step by kind, measured from real
tensors, against hand counts from the parameter shapes (exact), and checkpointing's effect."""
import math

import pytest
import torch
from conftest import batch, tiny

import pelib
from pelib.measure import LEDGER_KINDS, memory_ledger
from pelib.quant import Linear4bit, apply_qlora, qlora_nbytes, quantized_nbytes

LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# A 2-layer Llama whose linears are a good part of the model (a small vocabulary) and whose rows
# are multiples of the 4-bit blocksize (64): the QLoRA ledger is then about the linears.
SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16)


def llama(method="lora"):
    model = tiny("smollm2", **SMALL)
    if method == "qlora":
        return apply_qlora(model, LLAMA, r=4, alpha=8)
    return pelib.apply_lora(model, LLAMA, r=4, alpha=8)


def step_batch(vocab=256):
    return dict(batch(vocab), labels=torch.tensor([0, 3, 1]))


def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def hand_count(model):
    """The ledger's first four rows from shapes: named_parameters / named_buffers list each
    shared tensor once; AdamW keeps two fp32 moments per weight and a 4-byte step per tensor."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad] + [b for _, b in model.named_buffers()]
    return {LEDGER_KINDS[0]: nbytes(frozen), LEDGER_KINDS[1]: nbytes(trainable),
            LEDGER_KINDS[2]: nbytes(trainable),
            LEDGER_KINDS[3]: 2 * nbytes(trainable) + 4 * len(trainable)}


@pytest.mark.parametrize("name,targets", [("smollm2", LLAMA), ("minilm", ["query", "value"])])
def test_weights_gradients_and_adamw_equal_the_hand_count(name, targets):
    model = pelib.apply_lora(tiny(name, **(SMALL if name == "smollm2" else {})), targets, r=4, alpha=8)
    ledger = memory_ledger(model, step_batch(256 if name == "smollm2" else 30522))
    assert list(ledger) == list(LEDGER_KINDS)
    expected = hand_count(model)
    for kind, value in expected.items():
        assert ledger[kind] == value, kind
    assert ledger[LEDGER_KINDS[4]] > 0


def test_checkpointing_saves_fewer_activations_and_the_model_is_left_as_found(monkeypatch):
    from transformers.utils import generic

    warned = []  # transformers warns once per process: record every call instead
    monkeypatch.setattr(generic.logger, "warning_once", lambda msg, *a, **k: warned.append(msg))
    model = llama()
    model.eval()
    assert model.config.use_cache
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plain = memory_ledger(model, step_batch())
    ckpt = memory_ledger(model, step_batch(), checkpointing=True)
    assert not [m for m in warned if "use_cache" in m]  # a training step asks for no KV cache
    assert model.config.use_cache  # and the generation default is put back
    kind = "activations saved for backward"
    assert 0 < ckpt[kind] < plain[kind]
    assert {k: v for k, v in ckpt.items() if k != kind} == {k: v for k, v in plain.items() if k != kind}
    # as found: weights, no gradients, eval mode, checkpointing off
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert not model.training and not model.is_activation_checkpointing
    assert memory_ledger(model, step_batch()) == plain  # and measuring again gives the same


def test_qlora_frozen_bytes_are_the_4bit_count():
    lora, qlora = llama("lora"), llama("qlora")
    a, b = memory_ledger(lora, step_batch()), memory_ledger(qlora, step_batch())
    layers = [m for m in qlora.modules() if isinstance(m, Linear4bit)]
    quantised = sum(m.in_features * m.out_features for m in layers)
    dense = a["frozen weights"] - 4 * quantised  # embeddings, norms, RoPE's buffers
    # per linear: NF4 bytes + double-quantised scales (pelib.quant.quantized_nbytes) and its own
    # copies of the two code tables (16 and 256 fp32 values)
    four_bit = sum(quantized_nbytes(m.in_features * m.out_features, 64, True) + 4 * (16 + 256)
                   for m in layers)
    assert b["frozen weights"] == dense + four_bit
    n = qlora_nbytes(qlora)
    assert b["frozen weights"] == n["packed"] + n["scales"] + n["code_tables"] + n["frozen_dense"]
    bits = 8 * (four_bit - 4 * (16 + 256) * len(layers)) / quantised
    assert math.isclose(bits, 4 + 8 / 64 + 32 / (64 * 256), rel_tol=0.01)  # ~4.127 vs 32 bits
    assert b["frozen weights"] < 0.5 * a["frozen weights"]
    for kind in LEDGER_KINDS[1:4]:  # the same adapter and head
        assert a[kind] == b[kind], kind


def test_bad_input_is_refused_with_the_fix():
    model = tiny("smollm2", **SMALL).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters.*apply_lora"):
        memory_ledger(model, step_batch())
    with pytest.raises(ValueError, match="input_ids"):
        memory_ledger(llama(), [1, 2, 3])


# -- the ledger a run records (pelib.runs.run_ledger), on the models `pelib finetune` builds ----
SMOKE = ["--tiny", "--train-limit", "64", "--batch-size", "16", "--max-length", "32"]


def built(model, method, *extra):
    """The model, tokenizer, training rows and loop settings of a tiny finetune run."""
    from pelib.finetune import build, config_of, parse
    from pelib.train import TrainConfig

    args = parse(["--model", model, "--method", method, *SMOKE, *extra])
    cfg = TrainConfig.of(config_of(args), batch_size=args.batch_size, max_length=args.max_length)
    m, tokenizer, data, _ = build(args, cfg)
    return m, tokenizer, data, cfg


@pytest.mark.parametrize("name", ["minilm", "smollm2"])
def test_a_runs_ledger_is_the_hand_count_and_full_holds_more_than_lora_than_qlora(name):
    from pelib.runs import run_ledger

    totals = {}
    for method in ("full", "lora", "qlora"):
        model, tokenizer, data, cfg = built(name, method, *(["--r", "8"] if method != "full" else []))
        led = run_ledger(model, tokenizer, data, cfg)
        assert list(led["bytes"]) == list(LEDGER_KINDS)
        # parameters x bytes: AdamW's two fp32 moments per trainable weight (+ a 4-byte step per
        # tensor), a gradient as large as the trainable weights
        for kind, value in hand_count(model).items():
            assert led["bytes"][kind] == value, (method, kind)
        assert led["bytes"][LEDGER_KINDS[4]] > 0
        # the run's longest rows, padded to the longest of them
        lengths = sorted((len(ids) for ids in tokenizer(data.texts, truncation=True, max_length=32)
                          ["input_ids"]), reverse=True)
        assert led["batch"] == [16, lengths[0]]
        totals[method] = sum(led["bytes"].values())
    assert totals["full"] > totals["lora"] > totals["qlora"], totals


def test_full_fine_tuning_holds_gradients_and_two_adamw_states_per_weight():
    from pelib.runs import run_ledger

    model, tokenizer, data, cfg = built("minilm", "full")
    led = run_ledger(model, tokenizer, data, cfg)["bytes"]
    n = sum(p.numel() for p in model.parameters())  # every weight trains, in fp32
    tensors = len(list(model.parameters()))
    assert led["trainable (adapter + head)"] == led["gradients"] == 4 * n
    assert led["optimizer state"] == 2 * 4 * n + 4 * tensors
    assert led["frozen weights"] == sum(b.numel() * b.element_size() for b in model.buffers())


def test_the_report_names_the_ledgers_kinds():
    from pelib.report import LEDGER_SHORT

    assert tuple(LEDGER_SHORT) == LEDGER_KINDS


# -- an instruction-tuning run's ledger: its chat rows, its answer-only loss ----------------------
def sft_built(method, *extra):
    """A tiny `--task sft` run's model, tokenizer, rows and settings (fp32: the bytes are exact)."""
    from pelib.finetune import build, config_of, parse
    from pelib.train import TrainConfig

    args = parse(["--model", "smollm2", "--task", "sft", "--method", method, "--tiny", "--fp32",
                  "--train-limit", "24", "--batch-size", "8", *extra])
    cfg = TrainConfig.of(config_of(args), batch_size=args.batch_size, max_length=args.max_length,
                         label_smoothing=0.0)
    m, tokenizer, data, _ = build(args, cfg)
    return m, tokenizer, data, cfg


def test_an_sft_runs_ledger_is_the_hand_count_of_its_longest_conversations():
    from pelib.runs import run_ledger
    from pelib.sft import encode

    model, tokenizer, data, cfg = sft_built("lora", "--r", "4")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    led = run_ledger(model, tokenizer, data, cfg, "sft")
    for kind, value in hand_count(model).items():  # gradients = trainable, AdamW = 2 x (+ steps)
        assert led["bytes"][kind] == value, kind
    assert led["bytes"][LEDGER_KINDS[4]] > 0
    # B = --batch-size rows, T = the longest whole conversation (prompt + answer + eos)
    T = max(len(encode(tokenizer, t, data.label_names[y], cfg.max_length)[0])
            for t, y in zip(data.texts, data.labels))
    assert led["batch"] == [8, T]
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # left as found


def test_the_sft_ledger_runs_the_answer_only_loss_not_the_models_own():
    """The same batch through the model's own loss (labels -100 outside the answer, but the
    logits of every position made and saved) holds more activations than pelib.sft.sft_loss,
    which applies the LM head to the answer's rows only; the weights' rows are equal."""
    from pelib.sft import collate_train, encode, sft_loss

    model, tokenizer, data, cfg = sft_built("lora", "--r", "4")
    rows = [encode(tokenizer, t, data.label_names[y]) for t, y in zip(data.texts[:4], data.labels)]
    b = collate_train(rows, tokenizer.pad_token_id)
    ours = memory_ledger(model, b, loss_fn=sft_loss)
    own = memory_ledger(model, b)  # LlamaForCausalLM's loss over the whole (B, T, V) logits
    act = LEDGER_KINDS[4]
    assert 0 < ours[act] < own[act]
    assert {k: v for k, v in ours.items() if k != act} == {k: v for k, v in own.items() if k != act}
